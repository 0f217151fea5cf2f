"""agentlog's benchmarks: every figure beside a ceiling measured in the same run.

Each server figure is measured against a real `agentlog serve` process on
loopback through the real Python client. The table is printed and written to
bench/results.json (figure name -> value and unit; times in ms, rates per
second) so runs can be compared. `--large` adds the 10,000-session,
10,000,000-event start-up and memory figures (several minutes, ~4 GB of disk).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
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
from agentlog._codec import (
    record_to_proto,
)
from agentlog._lines import (
    record_from_line,
)
from agentlog.server._rules import MESSAGE_RECORDS
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc

RESULTS = Path(__file__).resolve().parent / "results.json"
READ_ROUNDS = 3
Results = dict[str, tuple[float, str]]
DELTA_TEXT = "token of a longer streamed answer, with some text to give each line a realistic size."


@contextmanager
def server(data_dir: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
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
        text=True,
    )
    try:
        assert process.stderr is not None
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", process.stderr.readline())
        assert found, "the server did not start"
        yield found.group(1), process
    finally:
        process.terminate()
        process.wait(60)


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


def bench_appends(tmp: Path, results: Results, scale: int, rounds: int) -> None:
    """Appends beside an empty unary RPC on the same server. The 64-client rates are
    measured in `rounds` interleaved rounds (empty, always, never) and each is the
    median of its rounds, so a machine whose speed drifts during the run affects
    figure and ceiling alike."""
    with (
        server(tmp / "always") as (target, _),
        server(tmp / "never", "--sync", "never") as (
            never_target,
            _,
        ),
    ):
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            ping = health_pb2.HealthCheckRequest(service="")
            health.Check(ping, timeout=10)
            results["empty_unary_rps_c1"] = (rate(scale, lambda: health.Check(ping)), "1/s")
        with AgentlogClient(target) as client:
            latencies = []
            for n in range(scale):
                start = time.perf_counter()
                client.append(AppendEvent(session_id="single", event=delta("single", n)))
                latencies.append((time.perf_counter() - start) * 1000)
            results["append_rps_c1_always"] = (1000 * len(latencies) / sum(latencies), "1/s")
            results["append_p50_ms_c1_always"] = (percentile(latencies, 0.5), "ms")
            results["append_p99_ms_c1_always"] = (percentile(latencies, 0.99), "ms")
            batch = [NewEvent(event=delta("batched", n)) for n in range(100)]
            batches = max(scale // 5, 10)
            client.append_batch("batched", batch)
            results["append_batch_events_per_s_always"] = (
                rate(batches, lambda: client.append_batch("batched", batch)) * len(batch),
                "1/s",
            )
        results["append_batch_events_per_s_always_c8"] = (
            concurrent_batches(target, 8, batches),
            "1/s",
        )
        calls = scale * 4
        for warm in (target, never_target):
            concurrent_rate(warm, 64, calls // 4, append_call)
        rates: dict[str, list[float]] = {"empty": [], "always": [], "never": []}
        for _ in range(rounds):
            rates["empty"].append(concurrent_rate(target, 64, calls, empty_call))
            rates["always"].append(concurrent_rate(target, 64, calls, append_call))
            rates["never"].append(concurrent_rate(never_target, 64, calls, append_call))
        results["empty_unary_rps_c64"] = (statistics.median(rates["empty"]), "1/s")
        results["append_rps_c64_always"] = (statistics.median(rates["always"]), "1/s")
        results["append_rps_c64_never"] = (statistics.median(rates["never"]), "1/s")
    line = orjson.dumps({"x": DELTA_TEXT * 2}) + b"\n"
    fd = os.open(tmp / "raw", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        results["raw_write_fsync_lines_per_s"] = (
            rate(scale, lambda: write_and_sync(fd, line)),
            "1/s",
        )
    finally:
        os.close(fd)


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


def write_and_sync(fd: int, line: bytes) -> None:
    os.write(fd, line)
    os.fsync(fd)


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


def seed_head(path: Path) -> Any:
    """The seed's Head: read and parse the whole file, keep the last record."""
    last = None
    for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
        if line.strip():
            last = record_from_line(line, number)
    return last


def seed_children(root: Path, parent_id: str) -> list[Any]:
    """The seed's LoadChildren: parse every line of every file of the store."""
    found = []
    for path in sorted(root.glob("*.jsonl")):
        for number, line in enumerate(path.read_bytes().split(b"\n"), 1):
            if line.strip():
                record = record_from_line(line, number)
                if record.parent_id == parent_id:
                    found.append(record)
    return found


def timed_ms(action: Callable[[], object], repeat: int = 20) -> float:
    action()  # warm: first calls build per-session state
    timings = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        timings.append((time.perf_counter() - start) * 1000)
    return percentile(timings, 0.5)


def bench_reads(tmp: Path, results: Results, big: int) -> None:
    data = tmp / "reads"
    data.mkdir()
    write_arcan_session(data / "one.jsonl", "one", 1)
    write_arcan_session(data / "big.jsonl", "big", big)
    with server(data) as (target, _), AgentlogClient(target, timeout=600) as client:
        results["head_ms_1_event"] = (timed_ms(lambda: client.head("one")), "ms")
        start = time.perf_counter()
        client.head("big")
        results["head_ms_1m_events_first_call"] = ((time.perf_counter() - start) * 1000, "ms")
        results["head_ms_1m_events"] = (timed_ms(lambda: client.head("big")), "ms")
        # The first read is the first since the start: the session's state is built.
        reads = []
        for _ in range(READ_ROUNDS):
            start = time.perf_counter()
            count = sum(1 for _ in client.read_session("big"))
            reads.append(count / (time.perf_counter() - start))
        results["load_session_records_per_s_first"] = (reads[0], "1/s")
        results["load_session_records_per_s"] = (statistics.median(reads), "1/s")
    start = time.perf_counter()
    seed_head(data / "big.jsonl")
    results["seed_head_ms_1m_events"] = ((time.perf_counter() - start) * 1000, "ms")
    results["stream_ceiling_records_per_s"] = (stream_ceiling(data / "big.jsonl", big), "1/s")


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


def bench_children(tmp: Path, results: Results, sessions: int) -> None:
    """LoadChildren of a record with 10 children, spread over a store of 10 or N sessions."""
    parent = str(uuid.uuid4())

    def children_of(client: AgentlogClient) -> object:
        return client.load_children(parent)

    for count, name in ((10, "10_sessions"), (sessions, f"{sessions // 1000}k_sessions")):
        data = tmp / f"children-{count}"
        data.mkdir()
        for n in range(count):
            child_of = parent if n % (count // 10) == 0 else None
            write_arcan_session(data / f"s{n:07d}.jsonl", f"s{n:07d}", 3, child_of)
        with server(data) as (target, _), AgentlogClient(target, timeout=600) as client:
            children_ms = timed_ms(lambda: children_of(client), 5)
            results[f"children_ms_{name}"] = (children_ms, "ms")
        if count == sessions:
            start = time.perf_counter()
            seed_children(data, parent)
            results[f"seed_children_ms_{name}"] = ((time.perf_counter() - start) * 1000, "ms")


def bench_subscriptions(target: str, results: Results, subscribers: int, appends: int) -> None:
    """Delay from an Append's acknowledgement to each live subscriber's receipt (0 if before)."""
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
    with AgentlogClient(target) as writer:
        for i in range(appends):
            record = writer.append(AppendEvent(session_id=session, event=delta(session, i)))
            acked[record.sequence] = time.perf_counter()
            time.sleep(0.002)  # one at a time: measure delay, not queueing
    done.wait(120)
    thread.join(10)
    delays = [max(at - acked[sequence], 0.0) * 1000 for sequence, at in received]
    results[f"subscribe_delay_p50_ms_{subscribers}_subscribers"] = (percentile(delays, 0.5), "ms")
    results[f"subscribe_delay_p99_ms_{subscribers}_subscribers"] = (percentile(delays, 0.99), "ms")


def bench_feed(target: str, results: Results, scale: int) -> None:
    """Events per second the all-sessions feed delivers while 16 writers append batches."""
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
        with AgentlogClient(target) as client:
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
    results["feed_writers_events_per_s_16"] = (total / written, "1/s")
    results["feed_delivered_events_per_s_16_writers"] = (total / (delivered[-1] - start), "1/s")


def bench_live(tmp: Path, results: Results, scale: int) -> None:
    with server(tmp / "live") as (target, _):
        for subscribers in (1, 100):
            bench_subscriptions(target, results, subscribers, appends=200)
        bench_feed(target, results, scale)


FANOUT_SESSIONS = 20
# Subscribers in a process of their own, taking messages as bytes: the cost
# measured is the server's, not a client's decoding.
FANOUT_SUBSCRIBERS = """
import asyncio, sys, grpc
from agentlog.v1 import session_pb2 as pb
target, sessions, each, from_start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
async def follow(channel, session, ready):
    call = channel.unary_stream(
        "/agentlog.v1.SessionRepository/SubscribeSession",
        request_serializer=pb.SubscribeSessionRequest.SerializeToString,
        response_deserializer=lambda data: data,
    )(pb.SubscribeSessionRequest(
        session_id=session, from_sequence=1 if from_start == "1" else None
    ))
    first = True
    async for _ in call:
        if first:
            first = False
            ready.append(1)
            if len(ready) == sessions * each:
                print("ready", flush=True)
async def main():
    local = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    channels = [grpc.aio.insecure_channel(target, options=local) for _ in range(50)]
    ready = []
    await asyncio.gather(*(
        follow(channels[(s * each + k) % 50], f"fan-{s}", ready)
        for s in range(sessions) for k in range(each)
    ))
asyncio.run(main())
"""


def fanout_rate(target: str, seconds: float) -> float:
    """Appends per second from 8 concurrent writers over FANOUT_SESSIONS sessions."""

    async def run() -> float:
        async with AsyncAgentlogClient(target) as client:
            count = 0
            end = time.perf_counter() + seconds

            async def writer(n: int) -> None:
                nonlocal count
                i = n
                while time.perf_counter() < end:
                    session = f"fan-{i % FANOUT_SESSIONS}"
                    await client.append(AppendEvent(session_id=session, event=delta(session, i)))
                    count += 1
                    i += 8

            start = time.perf_counter()
            await asyncio.gather(*(writer(n) for n in range(8)))
            return count / (time.perf_counter() - start)

    return asyncio.run(run())


def bench_fanout(tmp: Path, results: Results, subscribers: int) -> None:
    """Append rate with no subscriber and with `subscribers` SubscribeSession streams
    (spread over FANOUT_SESSIONS sessions, each taking every new record), and the
    server's memory with streams that start from sequence 1."""
    with server(tmp / "fanout", "--sync", "never") as (target, process):
        fanout_rate(target, 2)  # warm up, and give every session history
        results["fanout_append_rps_0_subscribers"] = (fanout_rate(target, 5), "1/s")
        for from_start in ("0", "1"):
            # Two processes of subscribers, as many clients would be.
            processes = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        FANOUT_SUBSCRIBERS,
                        target,
                        str(FANOUT_SESSIONS),
                        str(subscribers // FANOUT_SESSIONS // 2),
                        from_start,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for _ in range(2)
            ]
            try:
                for followers in processes:
                    assert followers.stdout is not None
                    ready = followers.stdout.readline().strip()
                    assert ready == "ready", "subscribers did not start"
                name = "from_start" if from_start == "1" else "live"
                rps = fanout_rate(target, 5)
                results[f"fanout_append_rps_{subscribers}_subscribers_{name}"] = (rps, "1/s")
                status = Path(f"/proc/{process.pid}/status").read_text()
                rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
                results[f"fanout_server_rss_mb_{name}"] = (rss_kb / 1024, "MB")
            finally:
                for followers in processes:
                    followers.kill()
                    followers.wait()


def bench_listing(tmp: Path, results: Results, sessions: int) -> None:
    data = tmp / "listing"
    data.mkdir()
    for n in range(sessions):
        write_arcan_session(data / f"session-{n:07d}.jsonl", f"session-{n:07d}", 1)
    with server(data) as (target, _), AgentlogClient(target) as client:
        start = time.perf_counter()
        page = client.list_sessions(page_size=100)
        results["list_first_page_ms_cold"] = ((time.perf_counter() - start) * 1000, "ms")
        token = page.next_page_token
        timings = []
        for _ in range(50):
            start = time.perf_counter()
            page = client.list_sessions(page_size=100, page_token=token)
            timings.append((time.perf_counter() - start) * 1000)
            token = page.next_page_token
        results[f"list_page_ms_{sessions // 1000}k_sessions"] = (percentile(timings, 0.5), "ms")


def bench_large(tmp: Path, results: Results) -> None:
    data = tmp / "large"
    data.mkdir()
    for n in range(10_000):
        write_arcan_session(data / f"s{n:05d}.jsonl", f"s{n:05d}", 1000)
    start = time.perf_counter()
    with server(data):  # the first start indexes every file
        results["index_build_s_10m_events"] = (time.perf_counter() - start, "s")
    start = time.perf_counter()
    with server(data) as (target, process), AgentlogClient(target, timeout=3600) as client:
        results["startup_s_10m_events"] = (time.perf_counter() - start, "s")
        client.head("s00000")
        status = Path(f"/proc/{process.pid}/status").read_text()
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        results["rss_mb_10m_events"] = (rss_kb / 1024, "MB")


CEILINGS = {
    "children_ms_100k_sessions": "children_ms_10_sessions",
    "seed_children_ms_100k_sessions": "children_ms_100k_sessions",
    "append_rps_c1_always": "empty_unary_rps_c1",
    "append_rps_c64_always": "empty_unary_rps_c64",
    "append_rps_c64_never": "empty_unary_rps_c64",
    "append_batch_events_per_s_always": "raw_write_fsync_lines_per_s",
    "append_batch_events_per_s_always_c8": "raw_write_fsync_lines_per_s",
    "head_ms_1m_events": "head_ms_1_event",
    "seed_head_ms_1m_events": "head_ms_1m_events",
    "load_session_records_per_s": "stream_ceiling_records_per_s",
    "feed_delivered_events_per_s_16_writers": "feed_writers_events_per_s_16",
    "fanout_append_rps_2000_subscribers_live": "fanout_append_rps_0_subscribers",
    "fanout_append_rps_2000_subscribers_from_start": "fanout_append_rps_0_subscribers",
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", type=int, default=1000, help="calls per rate measurement")
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds of the 64-client rates"
    )
    parser.add_argument("--big", type=int, default=1_000_000, help="events in the big session")
    parser.add_argument(
        "--sessions", type=int, default=100_000, help="sessions for listing/children"
    )
    parser.add_argument("--large", action="store_true", help="add the 10M-event figures")
    parser.add_argument(
        "--only", help="run one group: appends, reads, children, live, fanout, listing"
    )
    args = parser.parse_args()
    results: Results = {}
    groups: dict[str, Callable[[Path], None]] = {
        "appends": lambda tmp: bench_appends(tmp, results, args.scale, args.rounds),
        "reads": lambda tmp: bench_reads(tmp, results, args.big),
        "children": lambda tmp: bench_children(tmp, results, args.sessions),
        "live": lambda tmp: bench_live(tmp, results, args.scale),
        "fanout": lambda tmp: bench_fanout(tmp, results, 2000),
        "listing": lambda tmp: bench_listing(tmp, results, args.sessions),
    }
    if args.large:
        groups["large"] = lambda tmp: bench_large(tmp, results)
    for name, run in groups.items():
        if args.only and name != args.only:
            continue
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
            started = time.perf_counter()
            run(Path(tmp))
            print(f"# {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print(f"{'figure':42} {'value':>14}  {'unit':4}  ratio to ceiling")
    for name, (value, unit) in results.items():
        ceiling = CEILINGS.get(name)
        ratio = ""
        if ceiling in results and results[ceiling][0]:
            ratio = f"{value / results[ceiling][0]:.3g} x {ceiling}"
        print(f"{name:42} {value:14.3f}  {unit:4}  {ratio}")
    RESULTS.write_text(
        json.dumps({k: {"value": v, "unit": u} for k, (v, u) in results.items()}, indent=2) + "\n"
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
