"""The `agentlog` command as a new user meets it: `make serve`, addresses, `tail`, stopping."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agentlog import AgentlogClient, AppendEvent, NewEvent
from tests.contract import delta
from tests.test_server import agentlog, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[str], timeout: float = 30) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=timeout)
    return stderr


def test_make_serve_listens_where_the_environment_says_with_the_console_on(
    tmp_path: Path,
) -> None:
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "AGENTLOG_ADDR": f"127.0.0.1:{port}",
        "AGENTLOG_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "AGENTLOG_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("MAKEFLAGS", None)
    process = subprocess.Popen(
        ["make", "--no-print-directory", "-s", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stderr is not None
        seen: list[str] = []  # make may install first (pyproject.toml changed): skip that
        while (line := process.stderr.readline()) and "serving on" not in line:
            seen.append(line)
        assert f"serving on 127.0.0.1:{port}" in line, "".join([*seen, line])
        assert str(tmp_path / "data") in line
        console = process.stderr.readline()
        assert f"web console on http://127.0.0.1:{http_port}/" in console, console
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
            assert b"console.js" in page.read()
        with AgentlogClient(f"127.0.0.1:{port}") as client:
            client.append(AppendEvent(session_id="m", event=delta("m", "x")))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate(timeout=30)
    assert (tmp_path / "data" / "m.jsonl").exists()


def test_a_name_whose_addresses_are_not_all_free_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = agentlog("serve", "--addr", f"localhost:{port}", "--data-dir", str(tmp_path))
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in stderr
    assert "serving" not in stderr


def test_a_name_binds_every_address_it_has(tmp_path: Path) -> None:
    process = agentlog("serve", "--addr", "localhost:0", "--data-dir", str(tmp_path))
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"serving on localhost:(\d+)", line)
        assert found, line
        port = int(found.group(1))
        for host in ("127.0.0.1", "::1"):
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            with AgentlogClient(target) as client:
                assert client.head("s") is None
    finally:
        stop(process)


@pytest.mark.parametrize("address", ["garbage", "no-such-host.invalid:50051", ":50051"])
def test_tail_fails_fast_on_an_address_that_can_never_answer(address: str) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "tail", "s", "--addr", address],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "agentlog tail:" in result.stderr
    assert address in result.stderr
    assert time.monotonic() - started < 20


def test_tail_says_it_is_connecting_and_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentlog.server",
            "tail",
            "s",
            "--addr",
            f"127.0.0.1:{free_port()}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        assert "connecting to 127.0.0.1:" in process.stderr.readline()
        assert "still retrying" in process.stderr.readline()  # after about 5 s
    finally:
        process.kill()
        process.communicate()


@pytest.mark.parametrize("flag", [["--prefix", "a"], ["--kind", "run_finished"]])
def test_tail_refuses_feed_filters_without_all(flag: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "tail", "s", *flag],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--all" in result.stderr


def test_a_stop_with_a_subscriber_is_prompt_and_says_what_it_waits_for(tmp_path: Path) -> None:
    process = agentlog(
        "serve", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path), "--grace", "30"
    )
    port, _ = wait_for_port(process)
    tail = subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", "tail", "s", "--addr", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert tail.stderr is not None
        assert "connected" in tail.stderr.readline() + tail.stderr.readline()
        time.sleep(0.5)
        started = time.monotonic()
        stderr = stop(process)
        assert time.monotonic() - started < 10  # not the whole 30 s of grace
    finally:
        tail.kill()
        tail.communicate()
        process.kill()
    assert process.returncode == 0
    assert "SIGTERM received: stopping" in stderr
    assert "1 subscription(s)" in stderr


def test_a_second_signal_stops_at_once_and_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    process = agentlog(
        "serve", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path), "--grace", "60"
    )
    port, _ = wait_for_port(process)
    try:
        with AgentlogClient(f"127.0.0.1:{port}") as client:
            # 32 MB: more than flow control lets the server send ahead.
            for _ in range(80):
                events = [NewEvent(event=delta("long", "x" * 4000)) for _ in range(100)]
                client.append_batch("long", events)
            reading = iter(client.read_session("long"))
            next(reading)  # a read in flight, its stream held open by not reading on
            process.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert process.poll() is None  # waiting for the read, within its grace
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
            assert time.monotonic() - started < 10
    finally:
        process.kill()
    assert process.returncode == 0
    assert "received again: stopping now" in stderr
    assert (tmp_path / "long.jsonl").read_text().count("\n") == 8000


def test_make_is_there() -> None:
    assert shutil.which("make") is not None


def test_metrics_are_served_where_asked(tmp_path: Path) -> None:
    process = agentlog(
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        "--metrics-addr",
        "127.0.0.1:0",
    )
    try:
        wait_for_port(process)
        assert process.stderr is not None
        found = re.search(r"metrics at (http://\S+)", process.stderr.readline())
        assert found
        with urllib.request.urlopen(found.group(1), timeout=10) as response:
            text = response.read().decode()
        assert "agentlog_feed_undelivered_records" in text
    finally:
        stop(process)


def test_fork_makes_a_branch_and_tail_follows_it(tmp_path: Path) -> None:
    from agentlog.server import JsonlSessionRepository
    from tests.servers import running_server

    with running_server(JsonlSessionRepository(tmp_path, layout="branches")) as target:
        with AgentlogClient(target) as client:
            for i in range(4):
                client.append(AppendEvent(session_id="s", event=delta("s", f"turn {i}")))

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "agentlog.server", *args, "--addr", target]
            return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

        made = run("fork", "s", "--at", "2", "--to-branch", "retry")
        assert made.returncode == 0, made.stderr
        assert "forked s main 1-2 into session s branch retry: 2 record(s)" in made.stdout
        again = run("fork", "s", "--at", "2", "--to-branch", "retry")
        assert again.returncode == 1
        assert "ALREADY_EXISTS" in again.stderr
        assert "exists already" in again.stderr
        whole = run("fork", "s", "--to-session", "copy")  # up to the last record
        assert whole.returncode == 0, whole.stderr
        assert "4 record(s)" in whole.stdout
        missing = run("fork", "s", "--at", "9", "--to-branch", "x")
        assert missing.returncode == 1
        assert "ends at sequence 4" in missing.stderr
        unnamed = run("fork", "s")
        assert unnamed.returncode == 2
        command = ["tail", "s", "--branch", "retry", "--addr", target, "-n", "5"]
        tail = subprocess.Popen(
            [sys.executable, "-m", "agentlog.server", *command],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert tail.stdout is not None
            shown = [tail.stdout.readline() for _ in range(2)]
        finally:
            tail.send_signal(signal.SIGINT)
            tail.wait(10)
    assert [line.split()[0] for line in shown] == ["#1", "#2"]
    assert 'delta="turn 1"' in shown[1]
