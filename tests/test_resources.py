"""Running out of a resource is a clear status, never a crash or a lost acknowledgement:
a full disk (a real, small tmpfs) and too few file descriptors (a real rlimit)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AgentlogError, AppendEvent, ResourceExhaustedError
from tests.contract import delta
from tests.test_server import agentlog, wait_for_port


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB file system of its own (tmpfs; the tests run as root, as CI does)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the full-disk tests mount a tmpfs, which needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def serve(data: Path) -> tuple[subprocess.Popen[str], str]:
    process = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
    port, _ = wait_for_port(process)
    return process, f"127.0.0.1:{port}"


def fill(disk: Path) -> None:
    """Take every byte left."""
    with (disk / "filler").open("ab", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                file.write(b"\0")
        except OSError:
            pass


def append_until_refused(client: AgentlogClient, acknowledged: list[Any]) -> AgentlogError:
    """Append 20 kB events to three sessions until refused; the refusal."""
    for i in range(1000):
        event = delta(f"s{i % 3}", "x" * 20_000)
        try:
            acknowledged.append(client.append(AppendEvent(session_id=f"s{i % 3}", event=event)))
        except ResourceExhaustedError as exc:
            return exc
    raise AssertionError("the disk never filled")


def limited(soft: int, hard: int | None, *args: str) -> subprocess.Popen[str]:
    """`agentlog` with an open-file limit (through the shell's ulimit)."""
    limits = f"ulimit -Hn {hard}; " if hard is not None else ""
    command = f'{limits}ulimit -Sn {soft}; exec "$@"'
    return subprocess.Popen(
        ["bash", "-c", command, "agentlog", sys.executable, "-m", "agentlog.server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_full_disk_stops_cleanly_starts_for_reads_and_refuses_appends_until_freed(
    small_disk: Path,
) -> None:
    data = small_disk / "data"
    (small_disk / "filler").write_bytes(b"\0" * (1 << 20))  # freed later
    process, target = serve(data)
    acknowledged: list[Any] = []
    try:
        with AgentlogClient(target, retries=0) as client:
            refused = append_until_refused(client, acknowledged)
            assert refused.reason == "DISK_FULL"
            fill(small_disk)
            with pytest.raises(ResourceExhaustedError):
                client.append(AppendEvent(session_id="s0", event=delta("s0", "y" * 20_000)))
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert len(acknowledged) > 10

    process, target = serve(data)  # the disk is still full
    try:
        with AgentlogClient(target, retries=0) as client:
            stored = {r.id for s in ("s0", "s1", "s2") for r in client.load_session(s)}
            assert {r.id for r in acknowledged} <= stored
            refused = append_until_refused(client, [])
            assert refused.reason == "DISK_FULL"
            (small_disk / "filler").unlink()
            record = client.append(AppendEvent(session_id="s0", event=delta("s0", "room")))
            assert client.head("s0") == record
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr


def test_too_few_file_descriptors_is_resource_exhausted_and_the_server_stays_reachable(
    tmp_path: Path,
) -> None:
    process = limited(128, 128, "serve", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path))
    try:
        port, _ = wait_for_port(process)
        with AgentlogClient(f"127.0.0.1:{port}", retries=0) as client:
            for i in range(300):  # more sessions than descriptors
                session = f"fd-{i}"
                client.append(AppendEvent(session_id=session, event=delta(session, "x")))
            for i in range(0, 300, 7):
                assert len(client.load_session(f"fd-{i}")) == 1
            # Hold many connections open: the server must still answer a new client.
            extra = [AgentlogClient(f"127.0.0.1:{port}", retries=0) for _ in range(60)]
            answered = 0
            refused = 0
            for other in extra:
                try:
                    other.head("fd-1")
                    answered += 1
                except ResourceExhaustedError:
                    refused += 1
            with AgentlogClient(f"127.0.0.1:{port}", retries=0, timeout=10) as late:
                assert late.head("fd-2") is not None
            for other in extra:
                other.close()
            assert answered > 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0


def test_the_open_file_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.fail(f"this test needs a finite hard limit above 256, not {hard}")
    process = limited(256, None, "serve", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path))
    try:
        wait_for_port(process)
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3] == str(hard), line
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


FLOOD = """
import asyncio, sys, grpc
from agentlog.v1 import session_pb2 as pb
target, count = sys.argv[1], int(sys.argv[2])
async def follow(channel, k):
    call = channel.unary_stream(
        "/agentlog.v1.SessionRepository/SubscribeSession",
        request_serializer=pb.SubscribeSessionRequest.SerializeToString,
        response_deserializer=lambda data: data,
    )(pb.SubscribeSessionRequest(session_id=f"flood-{k % 50}", from_sequence=1))
    async for _ in call:
        pass
async def main():
    channel = grpc.aio.insecure_channel(target)  # one connection for all of them
    await asyncio.gather(*(follow(channel, k) for k in range(count)))
asyncio.run(main())
"""


def test_one_clients_flood_of_streams_waits_at_its_end_and_others_go_on(tmp_path: Path) -> None:
    from agentlog.server import JsonlSessionRepository
    from agentlog.server.app import MAX_STREAMS_PER_CONNECTION
    from tests.servers import served

    with JsonlSessionRepository(tmp_path / "data") as store, served(store) as (built, _):
        target = f"127.0.0.1:{built.port}"
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, target, "3000"])
        try:
            with AgentlogClient(target, timeout=10) as other:
                worst = 0.0
                deadline = time.monotonic() + 8
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    other.append(AppendEvent(session_id="other", event=delta("other", "x")))
                    worst = max(worst, time.monotonic() - started)
                    time.sleep(0.05)
                sessions, _ = built.live.subscribers()
        finally:
            flood.kill()
            flood.wait()
    # The connection holds at most its limit of streams; its client queues the rest.
    assert 0 < sessions <= MAX_STREAMS_PER_CONNECTION
    assert worst < 2.0, f"another client's append waited {worst:.1f} s"
