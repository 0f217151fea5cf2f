"""Streaming appends (`python -m bench --only streaming`).

One writer's 10,000 events, durable (JSONL, `--sync always`), sent three ways to the
same server in interleaved rounds (medians): AppendBatch of 100 events at a time
(the ceiling), and a writer on AppendStream from the blocking and from the asyncio
client, which sends each event as it comes. With `--store`, the same on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from agentlog import AgentlogClient, AppendEvent, AsyncAgentlogClient, NewEvent
from bench.common import Results, delta, server

EVENTS = 10_000
BATCH = 100

CEILINGS = {
    "stream_events_per_s_always": "stream_batch_events_per_s_always",
    "stream_async_events_per_s_always": "stream_batch_events_per_s_always",
    "pg_stream_events_per_s": "pg_stream_batch_events_per_s",
    "pg_stream_async_events_per_s": "pg_stream_batch_events_per_s",
}


def _batched(target: str) -> float:
    session = f"batched-{uuid.uuid4()}"
    with AgentlogClient(target) as client:
        client.head(session)  # connected before the clock starts
        start = time.perf_counter()
        for first in range(0, EVENTS, BATCH):
            client.append_batch(
                session, [NewEvent(event=delta(session, n)) for n in range(first, first + BATCH)]
            )
        return EVENTS / (time.perf_counter() - start)


def _streamed(target: str) -> float:
    session = f"streamed-{uuid.uuid4()}"
    with AgentlogClient(target) as client:
        client.head(session)
        start = time.perf_counter()
        with client.writer() as writer:
            for n in range(EVENTS):
                writer.append(AppendEvent(session_id=session, event=delta(session, n)))
        seconds = time.perf_counter() - start
        assert client.head(session).sequence == EVENTS  # type: ignore[union-attr]
        return EVENTS / seconds


def _streamed_async(target: str) -> float:
    async def run() -> float:
        session = f"async-{uuid.uuid4()}"
        async with AsyncAgentlogClient(target) as client:
            await client.head(session)
            start = time.perf_counter()
            async with client.writer() as writer:
                for n in range(EVENTS):
                    await writer.append(AppendEvent(session_id=session, event=delta(session, n)))
            return EVENTS / (time.perf_counter() - start)

    return asyncio.run(run())


def measure(target: str, results: Results, prefix: str, suffix: str, rounds: int) -> None:
    ways: dict[str, Callable[[str], float]] = {
        "stream_batch_events_per_s": _batched,
        "stream_events_per_s": _streamed,
        "stream_async_events_per_s": _streamed_async,
    }
    for way in ways.values():  # warm: connections, the session files' first appends
        way(target)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            rates[name].append(way(target))
    for name, measured in rates.items():
        results[f"{prefix}{name}{suffix}"] = (statistics.median(measured), "1/s")


def run(tmp: Path, results: Results, rounds: int, store: str | None) -> None:
    with server(tmp / "jsonl") as (target, _):
        measure(target, results, "", "_always", rounds)
    if store is not None:
        from bench.postgres import bench_database, pg_server

        with bench_database(store) as url, pg_server(tmp, url) as target:
            measure(target, results, "pg_", "", rounds)
