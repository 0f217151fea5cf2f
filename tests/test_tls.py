"""TLS and mTLS with certificates the tests make, rotated while the server runs."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, CaughtUp, TlsConfig, UnavailableError
from agentlog.server import MemorySessionRepository
from agentlog.server._tls import TlsFiles
from tests.certs import CertificateAuthority, Issued
from tests.contract import delta
from tests.servers import running_server
from tests.test_command import stop
from tests.test_server import agentlog, wait_for_port


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca", "test-ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "other", "other-ca")


def appends(target: str, tls: TlsConfig | None) -> bool:
    """Whether an append through a client with `tls` gets through (no retries)."""
    with AgentlogClient(target, tls=tls, retries=0, timeout=5) as client:
        try:
            client.append(AppendEvent(session_id="tls", event=delta("tls", "x")))
        except UnavailableError:
            return False
    return True


@pytest.fixture
def tls_server(ca: CertificateAuthority) -> Iterator[tuple[str, Issued]]:
    issued = ca.server()
    files = TlsFiles(issued.cert, issued.key)
    with running_server(MemorySessionRepository(), tls=files) as target:
        yield target, issued


def test_tls_serves_clients_that_trust_its_ca_only(
    tls_server: tuple[str, Issued], ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    target, _ = tls_server
    assert appends(target, TlsConfig(ca=ca.pem))
    assert not appends(target, None)  # plaintext
    assert not appends(target, TlsConfig(ca=other_ca.pem))  # a CA it was not signed by
    with AgentlogClient(target, tls=TlsConfig(ca=ca.pem, server_name="localhost")) as client:
        assert client.head("tls") is not None


def test_mtls_requires_a_client_certificate_its_ca_signed(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    issued = ca.server()
    files = TlsFiles(issued.cert, issued.key, client_ca=ca.pem)
    agent, stranger = ca.client("agent"), other_ca.client("stranger")
    with running_server(MemorySessionRepository(), tls=files) as target:
        assert appends(target, TlsConfig(ca=ca.pem, cert=agent.cert, key=agent.key))
        assert not appends(target, TlsConfig(ca=ca.pem))  # no client certificate
        assert not appends(target, TlsConfig(ca=ca.pem, cert=stranger.cert, key=stranger.key))
        assert not appends(target, None)


def test_rotated_certificates_are_used_without_a_restart_or_a_dropped_stream(
    tls_server: tuple[str, Issued], ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    target, issued = tls_server
    received: list[Any] = []
    with (
        AgentlogClient(target, tls=TlsConfig(ca=ca.pem)) as early,
        AgentlogClient(target, tls=TlsConfig(ca=ca.pem)) as writer,
    ):
        stream = early.subscribe_session("rotating", from_sequence=1)

        def follow() -> None:
            for item in stream:
                if not isinstance(item, CaughtUp):
                    received.append(item)
                    if len(received) == 4:
                        return

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        for n in range(2):
            writer.append(AppendEvent(session_id="rotating", event=delta("rotating", f"{n}")))
        other_ca.server(into=issued)  # cert-manager writes the new files in place
        assert appends(target, TlsConfig(ca=other_ca.pem))  # new connections: the new cert
        assert not appends(target, TlsConfig(ca=ca.pem))
        for n in range(2, 4):  # through the connection made before the rotation
            writer.append(AppendEvent(session_id="rotating", event=delta("rotating", f"{n}")))
        follower.join(30)
    assert [r.sequence for r in received] == [1, 2, 3, 4]  # the stream went on


def test_serve_and_health_speak_tls_from_the_command_line(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    issued = ca.server()
    agent = ca.client("probe")
    process = agentlog(
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
        "--tls-cert",
        str(issued.cert),
        "--tls-key",
        str(issued.key),
        "--tls-client-ca",
        str(ca.pem),
    )
    try:
        port, line = wait_for_port(process)
        assert "(mTLS)" in line

        def health(*tls: str) -> subprocess.CompletedProcess[str]:
            command = ["health", "--addr", f"127.0.0.1:{port}", "--timeout", "5", *tls]
            return subprocess.run(
                [sys.executable, "-m", "agentlog.server", *command],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )

        ok = health(
            "--tls-ca", str(ca.pem), "--tls-client-cert", str(agent.cert),
            "--tls-client-key", str(agent.key),
        )  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert health().returncode == 1
        assert health("--tls-ca", str(ca.pem)).returncode == 1  # no client certificate
    finally:
        stop(process)


def test_tls_settings_that_cannot_work_are_refused_at_start(tmp_path: Path) -> None:
    for args, said in (
        (["--tls-cert", str(tmp_path / "c.pem")], "both --tls-cert and --tls-key"),
        (["--tls-client-ca", str(tmp_path / "ca.pem")], "needs --tls-cert"),
        (
            ["--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")],
            "no such file",
        ),
    ):
        command = ["serve", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), *args]
        result = subprocess.run(
            [sys.executable, "-m", "agentlog.server", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert said in result.stderr


def test_a_half_written_client_ca_keeps_the_last_good_one(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    server = ca.server()
    agent = ca.client()
    files = TlsFiles(server.cert, server.key, client_ca=ca.pem)
    good = ca.pem.read_bytes()
    trusted = ca.pem.with_name("trusted.pem")  # the client's own copy of the CA
    trusted.write_bytes(good)
    with running_server(MemorySessionRepository(), tls=files) as target:
        mtls = TlsConfig(ca=trusted, cert=agent.cert, key=agent.key)
        assert appends(target, mtls)
        ca.pem.write_bytes(good[: len(good) // 2])  # a rotation caught half-written
        for _ in range(5):  # each new connection reads the files again
            assert appends(target, mtls)
        assert f"{ca.pem} is not a PEM CA certificate" in caplog.text
        ca.pem.write_bytes(good)


def test_an_expired_server_certificate_is_logged_at_start(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    expired = ca.issue("old", dns=("localhost",), ips=("127.0.0.1",), valid_seconds=-60)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentlog.server",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "d"),
            "--tls-cert",
            str(expired.cert),
            "--tls-key",
            str(expired.key),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, logged = wait_for_port(process)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert "expired at" in logged
