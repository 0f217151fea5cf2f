"""Benchmarks: figures beside a ceiling measured in the same run, on the same machine.

Each figure is measured against a real `agentlog serve` process on loopback,
through the real Python client. Results are printed as a table and written to
bench/results.json (name -> value and unit) so runs can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlog import AgentlogClient, AppendEvent, NewEvent, TextDelta
from agentlog.server import JsonlSessionRepository

RESULTS = Path(__file__).resolve().parent / "results.json"


@contextmanager
def server(data_dir: Path) -> Iterator[str]:
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
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        found = re.search(r"serving on (127\.0\.0\.1:\d+)", process.stderr.readline())
        assert found, "the server did not start"
        yield found.group(1)
    finally:
        process.terminate()
        process.wait(30)


def rate(count: int, action: Callable[[], object]) -> float:
    start = time.perf_counter()
    for _ in range(count):
        action()
    return count / (time.perf_counter() - start)


def delta(session: str, i: int) -> TextDelta:
    return TextDelta(run_id="bench", session_id=session, iteration=i, delta=f"token {i} " * 8)


def bench_appends(target: str, results: dict[str, tuple[float, str]], scale: int) -> None:
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        ping = health_pb2.HealthCheckRequest(service="")
        health.Check(ping, timeout=10)
        results["empty_unary_rps_c1"] = (rate(scale, lambda: health.Check(ping, timeout=10)), "1/s")
    with AgentlogClient(target) as client:
        i = iter(range(10**9))
        results["append_rps_c1_always"] = (
            rate(
                scale,
                lambda: client.append(
                    AppendEvent(session_id="single", event=delta("single", next(i)))
                ),
            ),
            "1/s",
        )
        batch = [NewEvent(event=delta("batched", n)) for n in range(100)]
        batches = max(scale // 10, 10)
        events_per_s = rate(batches, lambda: client.append_batch("batched", batch)) * len(batch)
        results["append_batch_events_per_s_always"] = (events_per_s, "1/s")
        # An RPC-bound ceiling: as many batches as empty calls, each full.
        results["append_batch_ceiling_events_per_s"] = (
            results["empty_unary_rps_c1"][0] * len(batch),
            "1/s",
        )


def bench_subscriptions(
    target: str, results: dict[str, tuple[float, str]], subscribers: int, appends: int
) -> None:
    """Delay from an Append's acknowledgement to each live subscriber's receipt.

    Subscribers run on one asyncio loop in this process (the async client);
    appends come from a sync client on another thread, one at a time. A
    record that arrives before its acknowledgement counts as 0 ms.
    """
    import asyncio
    import threading

    from agentlog import AsyncAgentlogClient, CaughtUp

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
    delays = sorted(max(at - acked[sequence], 0.0) * 1000 for sequence, at in received)
    results[f"subscribe_delay_p50_ms_{subscribers}_subscribers"] = (
        delays[len(delays) // 2],
        "ms",
    )
    results[f"subscribe_delay_p99_ms_{subscribers}_subscribers"] = (
        delays[int(len(delays) * 0.99)],
        "ms",
    )


def bench_feed(target: str, results: dict[str, tuple[float, str]], scale: int) -> None:
    """Events per second the all-sessions feed delivers while 16 writers append batches."""
    import threading

    from agentlog import CaughtUp, FeedRecord

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


def bench_listing(data_dir: Path, results: dict[str, tuple[float, str]], sessions: int) -> None:
    repo = JsonlSessionRepository(data_dir, sync=False)
    event = delta("s", 0)
    start = time.perf_counter()
    for n in range(sessions):
        session = f"session-{n:07d}"
        repo.append(
            AppendEvent(
                session_id=session,
                event=TextDelta(run_id="bench", session_id=session, iteration=0, delta=event.delta),
            )
        )
    results[f"create_{sessions}_sessions_s"] = (time.perf_counter() - start, "s")
    repo.close()  # the server process takes the directory over
    with server(data_dir) as target, AgentlogClient(target) as client:
        start = time.perf_counter()
        page = client.list_sessions(page_size=100)
        results["list_first_page_ms_cold"] = ((time.perf_counter() - start) * 1000, "ms")
        token = page.next_page_token
        timings = []
        for _ in range(50):
            start = time.perf_counter()
            page = client.list_sessions(page_size=100, page_token=token)
            timings.append(time.perf_counter() - start)
            token = page.next_page_token
        timings.sort()
        results[f"list_page_ms_{sessions}_sessions_p50"] = (timings[len(timings) // 2] * 1000, "ms")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--scale", type=int, default=2000, help="calls per rate measurement")
    parser.add_argument("--sessions", type=int, default=100_000, help="sessions for listing")
    args = parser.parse_args()
    results: dict[str, tuple[float, str]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        with server(Path(tmp) / "appends") as target:
            bench_appends(target, results, args.scale)
            for subscribers in (1, 100):
                bench_subscriptions(target, results, subscribers, appends=200)
            bench_feed(target, results, args.scale)
        bench_listing(Path(tmp) / "listing", results, args.sessions)
    ceilings = {
        "append_rps_c1_always": "empty_unary_rps_c1",
        "append_batch_events_per_s_always": "append_batch_ceiling_events_per_s",
        "feed_delivered_events_per_s_16_writers": "feed_writers_events_per_s_16",
    }
    print(f"{'figure':44} {'value':>14}  {'unit':4}  ratio to ceiling")
    for name, (value, unit) in results.items():
        ceiling = ceilings.get(name)
        ratio = f"{value / results[ceiling][0]:.2f} x {ceiling}" if ceiling else ""
        print(f"{name:44} {value:14.2f}  {unit:4}  {ratio}")
    RESULTS.write_text(
        json.dumps({k: {"value": v, "unit": u} for k, (v, u) in results.items()}, indent=2) + "\n"
    )
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
