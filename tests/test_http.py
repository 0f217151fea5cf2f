"""The service over HTTP (`--http-addr`): Connect with JSON as curl sends it, the same
statuses, details, credentials, TLS and metrics as gRPC, streams that end at
shutdown, and the console's files. (The TypeScript suites run the contract through
the Connect and gRPC-Web transports.)"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY

from agentlog.server import MemorySessionRepository, Server
from agentlog.server._auth import Authenticator, JwtSettings
from agentlog.server._tls import TlsFiles
from agentlog.v1 import session_pb2 as pb
from agentlog.v1.session_connect import SessionRepositoryClientSync
from tests.certs import CertificateAuthority
from tests.servers import LoopThread, served
from tests.test_auth import TOKENS, access, keys  # noqa: F401  (fixtures)

SERVICE = "agentlog.v1.SessionRepository"


def call(
    base: str,
    method: str,
    body: dict[str, Any],
    *,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    """POST a JSON request as curl does; the HTTP status and the JSON answer."""
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{base}/{SERVICE}/{method}", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def reason_of(error: dict[str, Any]) -> str:
    for detail in error.get("details", []):
        if detail["type"] == "google.rpc.ErrorInfo":
            info = error_details_pb2.ErrorInfo.FromString(
                base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
            )
            return str(info.reason)
    return ""


@pytest.fixture
def http_server() -> Iterator[tuple[Server, LoopThread]]:
    with served(MemorySessionRepository(), http_address="127.0.0.1:0") as built:
        yield built


def base_of(built: Server, scheme: str = "http") -> str:
    assert built.http is not None
    return f"{scheme}://127.0.0.1:{built.http.port}"


def test_json_calls_as_curl_sends_them_append_and_read_back_exactly(
    http_server: tuple[Server, LoopThread],
) -> None:
    base = base_of(http_server[0])
    event = {
        "toolCallRequested": {
            "runId": "r",
            "sessionId": "web",
            "iteration": 1,
            "call": {
                "callId": "c",
                "toolName": "t",
                "input": {"json": '{"n": 18446744073709551615}'},
            },
        }
    }
    status, answer = call(base, "Append", {"sessionId": "web", "event": event})
    assert status == 200, answer
    assert answer["record"]["sequence"] == "1"
    status, head = call(base, "Head", {"session_id": "web"})  # proto names are accepted too
    assert status == 200
    stored = head["record"]["event"]["toolCallRequested"]["call"]["input"]["json"]
    assert json.loads(stored, parse_int=str) == {"n": "18446744073709551615"}
    status, listed = call(base, "ListSessions", {})
    assert [s["sessionId"] for s in listed["sessions"]] == ["web"]


def test_an_error_over_http_keeps_the_grpc_status_message_and_details(
    http_server: tuple[Server, LoopThread],
) -> None:
    base = base_of(http_server[0])
    status, error = call(base, "Head", {"sessionId": "../escape"})
    assert status == 400
    assert error["code"] == "invalid_argument"
    assert "path separator" in error["message"]
    assert reason_of(error) == "INVALID_SESSION_ID"
    status, error = call(base, "Append", {"sessionId": "s", "expectedSequence": "5", "event": {}})
    assert error["code"] in ("invalid_argument", "failed_precondition"), error
    status, error = call(base, "Head", {"sesion_id": "typo"})
    assert (status, error["code"]) == (400, "invalid_argument")
    assert reason_of(error) == "MALFORMED_REQUEST"
    assert "sesion_id" in error["message"]


def test_credentials_and_session_scopes_hold_over_http(
    access: tuple[Path, JwtSettings],  # noqa: F811
) -> None:
    authenticator = Authenticator(*access)
    repository = MemorySessionRepository()
    with served(repository, http_address="127.0.0.1:0", authenticator=authenticator) as (built, _):
        base = base_of(built)
        event = {"textDelta": {"delta": "x"}}
        status, error = call(base, "Head", {"sessionId": "team-a-1"})
        assert (status, error["code"]) == (401, "unauthenticated")
        assert reason_of(error) == "MISSING_CREDENTIAL"
        status, _ = call(
            base, "Append", {"sessionId": "team-a-1", "event": event}, token=TOKENS["writer"]
        )
        assert status == 200
        status, error = call(
            base, "Append", {"sessionId": "team-b-1", "event": event}, token=TOKENS["writer"]
        )
        assert (status, error["code"]) == (403, "permission_denied")
        status, listed = call(base, "ListSessions", {}, token=TOKENS["writer"])
        assert [s["sessionId"] for s in listed["sessions"]] == ["team-a-1"]


def test_mtls_over_http_needs_a_client_certificate_whose_identity_is_the_caller(
    tmp_path: Path,
    access: tuple[Path, JwtSettings],  # noqa: F811
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "ca")
    issued, agent = ca.server(), ca.client("agent")
    files = TlsFiles(issued.cert, issued.key, client_ca=ca.pem)
    with served(
        MemorySessionRepository(),
        http_address="127.0.0.1:0",
        tls=files,
        authenticator=Authenticator(*access),
    ) as (built, _):
        base = base_of(built, "https")
        anonymous = ssl.create_default_context(cafile=ca.pem)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            call(base, "Head", {"sessionId": "certs-1"}, context=anonymous)
        context = ssl.create_default_context(cafile=ca.pem)
        context.load_cert_chain(agent.cert, agent.key)
        event = {"textDelta": {"delta": "x"}}
        status, _ = call(base, "Append", {"sessionId": "certs-1", "event": event}, context=context)
        assert status == 200
        status, error = call(
            base, "Append", {"sessionId": "other", "event": event}, context=context
        )
        assert (status, error["code"]) == (403, "permission_denied")


def test_http_calls_count_in_the_same_metrics_as_grpc_calls(
    http_server: tuple[Server, LoopThread],
) -> None:
    labels = {
        "grpc_type": "unary",
        "grpc_service": SERVICE,
        "grpc_method": "Head",
        "grpc_code": "INVALID_ARGUMENT",
    }
    before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0
    call(base_of(http_server[0]), "Head", {"sessionId": "../x"})
    assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) == before + 1


def test_a_subscription_over_connect_delivers_live_records_and_ends_at_shutdown() -> None:
    with served(MemorySessionRepository(), http_address="127.0.0.1:0") as (built, loop):
        client = SessionRepositoryClientSync(base_of(built))
        client.append(pb.AppendRequest(session_id="live", event=_delta("one")))
        received: list[Any] = []
        ended: list[BaseException] = []

        def follow() -> None:
            try:
                for message in client.subscribe_session(
                    pb.SubscribeSessionRequest(session_id="live", from_sequence=1)
                ):
                    received.append(message)
            except Exception as exc:
                ended.append(exc)

        follower = threading.Thread(target=follow)
        follower.start()
        client.append(pb.AppendRequest(session_id="live", event=_delta("two")))
        _wait(lambda: sum(len(m.records.records) for m in received) == 2)
        loop.run(built.stop(5))
        follower.join(10)
        assert not follower.is_alive()
        assert ended, "the stream did not end with an error"
        assert "unavailable" in str(getattr(ended[0], "code", "")).lower(), ended


def _delta(text: str) -> pb.AgentEvent:
    return pb.AgentEvent(text_delta=pb.TextDelta(run_id="r", session_id="live", delta=text))


def _wait(condition: Any, seconds: float = 10) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_console_and_healthz_are_served_and_nothing_else(
    http_server: tuple[Server, LoopThread],
) -> None:
    base = base_of(http_server[0])
    with urllib.request.urlopen(f"{base}/", timeout=10) as page:
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "connect-src 'self'" in policy
        assert b"agentlog" in page.read()
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as health:
        assert health.read() == b"SERVING\n"
    for path in ("/../pyproject.toml", "/nothing", "/%2e%2e/etc/passwd"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}{path}", timeout=10)
        assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{base}/", data=b"x"), timeout=10)
    assert refused.value.code == 405
    grpc_call = urllib.request.Request(
        f"{base}/{SERVICE}/Head", data=b"", headers={"content-type": "application/grpc"}
    )
    with pytest.raises(urllib.error.HTTPError) as elsewhere:
        urllib.request.urlopen(grpc_call, timeout=10)
    assert elsewhere.value.code == 415
    assert b"--addr" in elsewhere.value.read()


def test_a_busy_http_port_is_refused_in_agentlogs_words_before_anything_is_made(
    tmp_path: Path,
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = tmp_path / "never"
        result = subprocess.run(
            [
                *(sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0"),
                *("--http-addr", f"127.0.0.1:{port}", "--data-dir", str(data)),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr
    assert "--http-addr" in result.stderr
    assert not data.exists()


def test_https_takes_rotated_certificate_files_at_the_next_connection(tmp_path: Path) -> None:
    first, second = (
        CertificateAuthority(tmp_path / "first", "first-ca"),
        CertificateAuthority(tmp_path / "second", "second-ca"),
    )
    issued = first.server()
    with served(
        MemorySessionRepository(),
        http_address="127.0.0.1:0",
        tls=TlsFiles(issued.cert, issued.key),
    ) as (built, _):
        base = base_of(built, "https")

        def answers(ca: Path) -> bool:
            try:
                call(
                    base, "Head", {"sessionId": "s"}, context=ssl.create_default_context(cafile=ca)
                )
            except urllib.error.URLError:
                return False
            return True

        assert answers(first.pem)
        assert not answers(second.pem)
        second.server(into=issued)  # the files replaced in place, as cert-manager does
        assert answers(second.pem)
        assert not answers(first.pem)


def test_an_append_stream_over_http_is_refused_saying_to_use_grpc(
    http_server: tuple[Server, LoopThread],
) -> None:
    built, _ = http_server
    client = SessionRepositoryClientSync(base_of(built))
    request = pb.AppendStreamRequest(appends=[pb.AppendRequest(session_id="s", event=_delta("x"))])
    with pytest.raises(ConnectError) as refused:
        list(client.append_stream(iter([request])))
    assert refused.value.code == Code.UNIMPLEMENTED
    assert "over gRPC" in refused.value.message
