"""What the benchmark groups share: servers, clients, timing and seeding."""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlog import (
    AgentlogClient,
    AppendEvent,
    AsyncAgentlogClient,
    CaughtUp,
    FeedRecord,
    NewEvent,
    TextDelta,
)
from agentlog._codec import record_to_proto
from agentlog._lines import record_from_line
from agentlog.server._rules import MESSAGE_RECORDS
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc

READ_ROUNDS = 3
Results = dict[str, tuple[float, str]]
DELTA_TEXT = "token of a longer streamed answer, with some text to give each line a realistic size."


@contextmanager
def server(
    data_dir: Path, *args: str, env: dict[str, str] | None = None, log: list[str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A server on `data_dir` with `args`; its log lines are kept in `log`, if given."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentlog.server",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--grace",
            "1",
            *args,
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert process.stderr is not None
        found = None
        for line in process.stderr:  # warnings may come first (a certificate expiring soon)
            if log is not None:
                log.append(line)
            found = re.search(r"serving on (127\.0\.0\.1:\d+)", line)
            if found:
                break
        # Keep reading the log, so that a full pipe never stalls the server.
        stderr = process.stderr
        reader = stderr.read if log is None else lambda: log.extend(stderr)
        threading.Thread(target=reader, daemon=True).start()
        assert found, "the server did not start"
        yield found.group(1), process
    finally:
        process.terminate()
        process.wait(60)


def append_rate_c64(target: str, options: dict[str, Any], calls: int) -> float:
    """Appends per second from 64 concurrent callers on one AsyncAgentlogClient."""

    async def run() -> float:
        async with AsyncAgentlogClient(target, **options) as client:
            counter = iter(range(10**9))

            async def caller() -> None:
                for _ in range(calls // 64):
                    n = next(counter)
                    session = f"c-{n % 64}"
                    await client.append(AppendEvent(session_id=session, event=delta(session, n)))

            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(64)))
            return (calls // 64) * 64 / (time.perf_counter() - start)

    return asyncio.run(run())


def load_rate(target: str, options: dict[str, Any], session: str = "load") -> float:
    """Records per second of one LoadSession of `session` through AgentlogClient."""
    with AgentlogClient(target, timeout=600, **options) as client:
        start = time.perf_counter()
        count = sum(1 for _ in client.read_session(session))
        return count / (time.perf_counter() - start)


def delta(session: str, i: int) -> TextDelta:
    return TextDelta(run_id="bench", session_id=session, iteration=i % 1000, delta=DELTA_TEXT)


def rate(count: int, action: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(count):
        action()
    return count / (time.perf_counter() - start)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def median_page_ms(client: AgentlogClient, token: str | None, pages: int = 50) -> float:
    """The median time (ms) of ListSessions pages of 100, following `token` onwards."""
    timings = []
    for _ in range(pages):
        start = time.perf_counter()
        page = client.list_sessions(page_size=100, page_token=token)
        timings.append((time.perf_counter() - start) * 1000)
        token = page.next_page_token
    return percentile(timings, 0.5)


def concurrent_rate(
    target: str, clients: int, calls: int, make: Callable[[Any, int], Any]
) -> float:
    """Calls per second from `clients` concurrent callers on one asyncio loop."""

    async def run() -> float:
        async with AsyncAgentlogClient(target) as client:
            channel = grpc.aio.insecure_channel(target)
            health = health_pb2_grpc.HealthStub(channel)
            counter = iter(range(10**9))

            async def caller() -> None:
                for _ in range(calls // clients):
                    await make((client, health), next(counter))

            start = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(clients)))
            elapsed = time.perf_counter() - start
            await channel.close(None)
            return (calls // clients) * clients / elapsed

    return asyncio.run(run())


def empty_call(handles: Any, _: int) -> Any:
    return handles[1].Check(health_pb2.HealthCheckRequest(service=""), timeout=10)


def append_call(handles: Any, n: int) -> Any:
    session = f"c-{n % 64}"  # 64 sessions: concurrent appends to distinct sessions
    return handles[0].append(AppendEvent(session_id=session, event=delta(session, n)))


def concurrent_batches(target: str, writers: int, batches: int) -> float:
    """Events per second from `writers` concurrent writers appending batches of 100, each to
    its own session, on one asyncio loop."""

    async def run() -> float:
        async with AsyncAgentlogClient(target) as client:

            async def writer(k: int) -> None:
                session = f"batched-{k}"
                events = [NewEvent(event=delta(session, i)) for i in range(100)]
                for _ in range(batches // writers):
                    await client.append_batch(session, events)

            start = time.perf_counter()
            await asyncio.gather(*(writer(k) for k in range(writers)))
            return (batches // writers) * writers * 100 / (time.perf_counter() - start)

    return asyncio.run(run())


def write_arcan_session(path: Path, session: str, count: int, parent: str | None = None) -> str:
    """A session file as arcan writes it (no agentlog fields), fast; returns the first id."""
    first = ""
    with path.open("wb") as file:
        lines = []
        for i in range(count):
            record_id = str(uuid.uuid4())
            first = first or record_id
            lines.append(
                orjson.dumps(
                    {
                        "id": record_id,
                        "session_id": session,
                        "parent_id": parent if i == 0 else None,
                        "timestamp": "2026-11-25T01:33:38.853460046Z",
                        "event": {
                            "part_type": "text_delta",
                            "run_id": "r",
                            "session_id": session,
                            "iteration": i % 1000,
                            "delta": DELTA_TEXT,
                        },
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
            if len(lines) == 10_000:
                file.write(b"".join(lines))
                lines = []
        file.write(b"".join(lines))
    return first


def timed_ms(action: Callable[[], object], repeat: int = 20) -> float:
    action()  # warm: first calls build per-session state
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        timings.append((time.perf_counter() - start) * 1000)
    return percentile(timings, 0.5)


class _Prebuilt(session_pb2_grpc.SessionRepositoryServicer):
    """Streams the same records, built once, in the server's batch size."""

    def __init__(self, messages: list[pb.LoadSessionResponse]) -> None:
        self.messages = messages

    async def LoadSession(self, request: Any, context: Any) -> Any:
        for message in self.messages:
            yield message


def stream_ceiling(path: Path, count: int) -> float:
    """Records per second a Python client receives when the server does no work per record."""
    records = []
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            records.append(record_to_proto(record_from_line(line, number)))
    size = MESSAGE_RECORDS
    messages = [
        pb.LoadSessionResponse(records=records[i : i + size]) for i in range(0, count, size)
    ]
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            grpc_server = grpc.aio.server()
            session_pb2_grpc.add_SessionRepositoryServicer_to_server(
                _Prebuilt(messages), grpc_server
            )
            box["port"] = grpc_server.add_insecure_port("127.0.0.1:0")
            await grpc_server.start()
            box["stop"] = asyncio.Event()
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await box["stop"].wait()
            await grpc_server.stop(1)

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    ready.wait(30)
    rates = []
    with AgentlogClient(f"127.0.0.1:{box['port']}", timeout=600) as client:
        for _ in range(READ_ROUNDS):
            start = time.perf_counter()
            received = sum(1 for _ in client.read_session("big"))
            rates.append(received / (time.perf_counter() - start))
    box["loop"].call_soon_threadsafe(box["stop"].set)
    thread.join(30)
    return statistics.median(rates)


def bench_subscriptions(
    target: str,
    results: Results,
    subscribers: int,
    appends: int,
    *,
    writer_target: str | None = None,
    prefix: str = "",
) -> None:
    """Delay from an Append's acknowledgement to each live subscriber's receipt (0 if before);
    the appends go through `writer_target` (another replica) if given."""
    session = f"live-{subscribers}"
    acked: dict[int, float] = {}
    received: list[tuple[int, float]] = []
    ready = threading.Event()
    done = threading.Event()

    async def follow(client: AsyncAgentlogClient, counter: list[int]) -> None:
        async for item in client.subscribe_session(session):
            if isinstance(item, CaughtUp):
                counter[0] += 1
                if counter[0] == subscribers:
                    ready.set()
                continue
            received.append((item.sequence, time.perf_counter()))
            if item.sequence >= appends:
                return

    async def run_followers() -> None:
        async with AsyncAgentlogClient(target, timeout=None) as client:
            counter = [0]
            await asyncio.gather(*(follow(client, counter) for _ in range(subscribers)))
        done.set()

    thread = threading.Thread(target=lambda: asyncio.run(run_followers()))
    thread.start()
    ready.wait(60)
    with AgentlogClient(writer_target or target) as writer:
        for i in range(appends):
            record = writer.append(AppendEvent(session_id=session, event=delta(session, i)))
            acked[record.sequence] = time.perf_counter()
            time.sleep(0.002)  # one at a time: measure delay, not queueing
    done.wait(120)
    thread.join(10)
    delays = [max(at - acked[sequence], 0.0) * 1000 for sequence, at in received]
    name = f"{prefix}subscribe_delay_p{{}}_ms_{subscribers}_subscribers"
    results[name.format(50)] = (percentile(delays, 0.5), "ms")
    results[name.format(99)] = (percentile(delays, 0.99), "ms")


def bench_feed(
    target: str,
    results: Results,
    scale: int,
    *,
    writer_targets: list[str] | None = None,
    prefix: str = "",
) -> None:
    """Events per second the all-sessions feed delivers while 16 writers append batches
    (spread over `writer_targets`, other replicas, if given)."""
    writers, batch_size = 16, 20
    batches = max(scale // 100, 5)
    total = writers * batches * batch_size
    delivered: list[float] = []
    ready = threading.Event()

    def follow() -> None:
        with AgentlogClient(target, timeout=None) as client:
            for item in client.subscribe_all():
                if isinstance(item, CaughtUp):
                    ready.set()
                elif isinstance(item, FeedRecord):
                    delivered.append(time.perf_counter())
                    if len(delivered) == total:
                        return

    def write(n: int) -> None:
        session = f"feed-{n}"
        batch = [NewEvent(event=delta(session, i)) for i in range(batch_size)]
        writing_to = writer_targets or [target]
        with AgentlogClient(writing_to[n % len(writing_to)]) as client:
            for _ in range(batches):
                client.append_batch(session, batch)

    follower = threading.Thread(target=follow)
    follower.start()
    ready.wait(30)
    start = time.perf_counter()
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = time.perf_counter() - start
    follower.join(120)
    results[f"{prefix}feed_writers_events_per_s_16"] = (total / written, "1/s")
    results[f"{prefix}feed_delivered_events_per_s_16_writers"] = (
        total / (delivered[-1] - start),
        "1/s",
    )


def single_client_figures(
    target: str, results: Results, scale: int, name: Callable[[str], str]
) -> int:
    """An empty unary RPC and Appends from one client (rate, p50, p99), AppendBatch of 100
    from 1 and 8 writers, stored under `name(figure)`; the number of batches sent."""
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        ping = health_pb2.HealthCheckRequest(service="")
        health.Check(ping, timeout=10)
        results[name("empty_unary_rps_c1")] = (rate(scale, lambda: health.Check(ping)), "1/s")
    with AgentlogClient(target) as client:
        latencies = []
        for n in range(scale):
            start = time.perf_counter()
            client.append(AppendEvent(session_id="single", event=delta("single", n)))
            latencies.append((time.perf_counter() - start) * 1000)
        results[name("append_rps_c1")] = (1000 * len(latencies) / sum(latencies), "1/s")
        results[name("append_p50_ms_c1")] = (percentile(latencies, 0.5), "ms")
        results[name("append_p99_ms_c1")] = (percentile(latencies, 0.99), "ms")
        batch = [NewEvent(event=delta("batched", n)) for n in range(100)]
        batches = max(scale // 5, 10)
        client.append_batch("batched", batch)
        results[name("append_batch_events_per_s")] = (
            rate(batches, lambda: client.append_batch("batched", batch)) * len(batch),
            "1/s",
        )
    results[name("append_batch_events_per_s_c8")] = (
        concurrent_batches(target, 8, batches),
        "1/s",
    )
    return batches


def all_pages(client: AgentlogClient) -> int:
    """List every session, 1,000 a page; how many there were."""
    listed, token = 0, None
    while True:
        page = client.list_sessions(page_size=1000, page_token=token)
        listed += len(page.sessions)
        token = page.next_page_token
        if token is None:
            return listed
