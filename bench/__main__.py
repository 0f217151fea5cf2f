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
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlog import (
    AgentlogClient,
    AppendEvent,
    AsyncAgentlogClient,
)
from agentlog._lines import (
    record_from_line,
)
from bench.common import (
    DELTA_TEXT,
    READ_ROUNDS,
    Results,
    all_pages,
    append_call,
    bench_feed,
    bench_subscriptions,
    concurrent_rate,
    delta,
    empty_call,
    median_page_ms,
    rate,
    server,
    single_client_figures,
    stream_ceiling,
    timed_ms,
    write_arcan_session,
)

RESULTS = Path(__file__).resolve().parent / "results.json"


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

        def jsonl_name(figure: str) -> str:
            if figure.startswith("empty"):
                return figure
            # The JSONL figures name the sync policy: "..._c1_always", "..._always_c8".
            return figure.replace("_c1", "_c1_always").replace("_per_s", "_per_s_always")

        single_client_figures(target, results, scale, jsonl_name)
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


def write_and_sync(fd: int, line: bytes) -> None:
    os.write(fd, line)
    os.fsync(fd)


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


def bench_reads(tmp: Path, results: Results, big: int) -> None:
    data = tmp / "reads"
    data.mkdir()
    write_arcan_session(data / "one.jsonl", "one", 1)
    write_arcan_session(data / "big.jsonl", "big", big)
    with server(data) as (target, _), AgentlogClient(target, timeout=600) as client:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            ping = health_pb2.HealthCheckRequest(service="")
            results["empty_unary_p50_ms"] = (timed_ms(lambda: health.Check(ping), 200), "ms")
        results["head_ms_1_event"] = (timed_ms(lambda: client.head("one"), 200), "ms")
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
    bench_ten_thousand(tmp, results)
    start = time.perf_counter()
    seed_head(data / "big.jsonl")
    results["seed_head_ms_1m_events"] = ((time.perf_counter() - start) * 1000, "ms")
    results["stream_ceiling_records_per_s"] = (stream_ceiling(data / "big.jsonl", big), "1/s")


def read_and_parse_ms(path: Path) -> float:
    """The floor of reading a session: its file read and each line parsed by orjson,
    in this process (no record objects, no server, no wire)."""
    start = time.perf_counter()
    parsed = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    assert parsed
    return (time.perf_counter() - start) * 1000


def bench_ten_thousand(tmp: Path, results: Results) -> None:
    """A 10,000-event session read whole through the Python client (median of 5), beside
    reading and parsing its file in this process."""
    data = tmp / "ten-thousand"
    data.mkdir()
    write_arcan_session(data / "ten.jsonl", "ten", 10_000)
    with server(data) as (target, _), AgentlogClient(target) as client:
        client.load_session("ten")
        results["load_session_ms_10k_events"] = (
            timed_ms(lambda: client.load_session("ten"), 5),
            "ms",
        )
    floors = [read_and_parse_ms(data / "ten.jsonl") for _ in range(5)]
    results["read_and_parse_ms_10k_events"] = (statistics.median(floors), "ms")


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


def bench_live(tmp: Path, results: Results, scale: int) -> None:
    with server(tmp / "live") as (target, _):
        for subscribers in (1, 100):
            bench_subscriptions(target, results, subscribers, appends=200)
        bench_feed(target, results, scale)


FANOUT_SESSIONS = 20
# Subscribers in a process of their own, taking messages as bytes: the cost
# measured is the server's, not a client's decoding. "feed" subscribes to the
# all-sessions feed (every subscriber takes every record).
FANOUT_SUBSCRIBERS = """
import asyncio, sys, grpc
from agentlog.v1 import session_pb2 as pb
target, sessions, each, from_start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
feed = len(sys.argv) > 5 and sys.argv[5] == "feed"
async def follow(channel, session, ready):
    if feed:
        call = channel.unary_stream(
            "/agentlog.v1.SessionRepository/SubscribeAll",
            request_serializer=pb.SubscribeAllRequest.SerializeToString,
            response_deserializer=lambda data: data,
        )(pb.SubscribeAllRequest(from_position=1 if from_start == "1" else None))
    else:
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


def _subscribers(target: str, subscribers: int, from_start: str, mode: str) -> list[Any]:
    """Two processes of subscribers, as many clients would be; once each is ready."""
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
                mode,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for followers in processes:
        assert followers.stdout is not None
        assert followers.stdout.readline().strip() == "ready", "subscribers did not start"
    return processes


def _rss_mb(process: subprocess.Popen[str]) -> float:
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def bench_feed_fanout(tmp: Path, results: Results, subscribers: int, minutes: float) -> None:
    """Append rate with `subscribers` SubscribeAll streams reading everything (two other
    processes), over `minutes`: the rate of its last minute, and the server's memory at
    its start and end (flat: nobody queues records)."""
    with server(tmp / "feed-fanout", "--sync", "never") as (target, process):
        fanout_rate(target, 2)
        base = fanout_rate(target, 5)
        results["feed_fanout_append_rps_0_subscribers"] = (base, "1/s")
        processes = _subscribers(target, subscribers, "0", "feed")
        try:
            rates, memory = [], []
            end = time.monotonic() + minutes * 60
            while time.monotonic() < end:
                rates.append(fanout_rate(target, 10))
                memory.append(_rss_mb(process))
            last = rates[-6:]
            results[f"feed_fanout_append_rps_{subscribers}_subscribers"] = (
                statistics.median(last),
                "1/s",
            )
            results["feed_fanout_server_rss_mb_first"] = (memory[0], "MB")
            results["feed_fanout_server_rss_mb_last"] = (memory[-1], "MB")
        finally:
            for followers in processes:
                followers.kill()
                followers.wait()


def bench_fanout(tmp: Path, results: Results, subscribers: int) -> None:
    """Append rate with no subscriber and with `subscribers` SubscribeSession streams
    (spread over FANOUT_SESSIONS sessions, each taking every new record), and the
    server's memory with streams that start from sequence 1."""
    with server(tmp / "fanout", "--sync", "never") as (target, process):
        fanout_rate(target, 2)  # warm up, and give every session history
        results["fanout_append_rps_0_subscribers"] = (fanout_rate(target, 5), "1/s")
        for from_start in ("0", "1"):
            processes = _subscribers(target, subscribers, from_start, "session")
            try:
                name = "from_start" if from_start == "1" else "live"
                rps = fanout_rate(target, 5)
                results[f"fanout_append_rps_{subscribers}_subscribers_{name}"] = (rps, "1/s")
                results[f"fanout_server_rss_mb_{name}"] = (_rss_mb(process), "MB")
            finally:
                for followers in processes:
                    followers.kill()
                    followers.wait()


def bench_listing(tmp: Path, results: Results, sessions: int) -> None:
    every = tmp / "every"
    every.mkdir()
    for n in range(10_000):
        write_arcan_session(every / f"s{n:05d}.jsonl", f"s{n:05d}", 3)
    with server(every) as (target, _), AgentlogClient(target) as client:
        start = time.perf_counter()
        listed = all_pages(client)
        results["list_all_sessions_per_s_10k_first"] = (
            listed / (time.perf_counter() - start),
            "1/s",
        )
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            listed = all_pages(client)
            rates.append(listed / (time.perf_counter() - start))
        results["list_all_sessions_per_s_10k"] = (statistics.median(rates), "1/s")
    data = tmp / "listing"
    data.mkdir()
    for n in range(sessions):
        write_arcan_session(data / f"session-{n:07d}.jsonl", f"session-{n:07d}", 1)
    with server(data) as (target, _), AgentlogClient(target) as client:
        start = time.perf_counter()
        page = client.list_sessions(page_size=100)
        results["list_first_page_ms_cold"] = ((time.perf_counter() - start) * 1000, "ms")
        page_ms = median_page_ms(client, page.next_page_token)
        results[f"list_page_ms_{sessions // 1000}k_sessions"] = (page_ms, "ms")


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
    "head_ms_1_event": "empty_unary_p50_ms",
    "head_ms_1m_events": "head_ms_1_event",
    "seed_head_ms_1m_events": "head_ms_1m_events",
    "load_session_records_per_s": "stream_ceiling_records_per_s",
    "load_session_ms_10k_events": "read_and_parse_ms_10k_events",
    "feed_delivered_events_per_s_16_writers": "feed_writers_events_per_s_16",
    "fanout_append_rps_2000_subscribers_live": "fanout_append_rps_0_subscribers",
    "fanout_append_rps_2000_subscribers_from_start": "fanout_append_rps_0_subscribers",
    "feed_fanout_append_rps_2000_subscribers": "feed_fanout_append_rps_0_subscribers",
    "feed_fanout_server_rss_mb_last": "feed_fanout_server_rss_mb_first",
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
        "--only",
        help="run one group: appends, reads, children, live, fanout, feed-fanout, listing, "
        "branches, lifecycle, security, typescript, streaming, http, index, postgres",
    )
    parser.add_argument(
        "--store",
        help="a PostgreSQL server (postgresql://USER@HOST:PORT/DB) to measure the PostgreSQL "
        "store on, beside JSONL; its databases are made and dropped by the run",
    )
    args = parser.parse_args()
    results: Results = {}
    groups: dict[str, Callable[[Path], None]] = {
        "appends": lambda tmp: bench_appends(tmp, results, args.scale, args.rounds),
        "reads": lambda tmp: bench_reads(tmp, results, args.big),
        "children": lambda tmp: bench_children(tmp, results, args.sessions),
        "live": lambda tmp: bench_live(tmp, results, args.scale),
        "fanout": lambda tmp: bench_fanout(tmp, results, 2000),
        "feed-fanout": lambda tmp: bench_feed_fanout(tmp, results, 2000, 2.0),
        "listing": lambda tmp: bench_listing(tmp, results, args.sessions),
    }
    if args.large:
        groups["large"] = lambda tmp: bench_large(tmp, results)
    from bench import branches

    groups["branches"] = lambda tmp: branches.run(tmp, results, args)
    CEILINGS.update(branches.CEILINGS)
    from bench import lifecycle

    groups["lifecycle"] = lambda tmp: lifecycle.run(tmp, results, args)
    CEILINGS.update(lifecycle.CEILINGS)
    from bench import security

    groups["security"] = lambda tmp: security.run(results, args.scale, args.rounds)
    CEILINGS.update(security.CEILINGS)
    from bench import typescript

    groups["typescript"] = lambda tmp: typescript.run(tmp, results, args.scale, args.rounds)
    CEILINGS.update(typescript.CEILINGS)
    from bench import index

    groups["index"] = lambda tmp: index.run(tmp, results, args.big)
    from bench import streaming

    groups["streaming"] = lambda tmp: streaming.run(tmp, results, args.rounds, args.store)
    CEILINGS.update(streaming.CEILINGS)
    from bench import http

    groups["http"] = lambda tmp: http.run(tmp, results, args.scale, args.rounds)
    CEILINGS.update(http.CEILINGS)
    if args.store:
        from bench import postgres

        groups["postgres"] = lambda tmp: postgres.run(tmp, results, args.store, args)
        CEILINGS.update(postgres.CEILINGS)
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
