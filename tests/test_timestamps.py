"""A session's timestamps never go backwards, whatever the clock does.

Clocks step back (NTP corrections, a VM restored, replicas whose clocks differ).
The store gives a record the time of its commit, or the session's last timestamp
if that is later, on every backend; another session is not held to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, NewEvent
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server.postgres import PostgresBackend
from tests.contract import delta
from tests.pg import database
from tests.servers import running_server

HOUR = 3600 * 10**9


class Clock:
    """A clock the test sets (nanoseconds since the epoch)."""

    def __init__(self, offset: int = 0) -> None:
        self.now = time.time_ns() + offset

    def __call__(self) -> int:
        return self.now


@contextmanager
def memory(_: Path, clock: Clock) -> Iterator[Any]:
    yield MemorySessionRepository(clock=clock)


@contextmanager
def jsonl(root: Path, clock: Clock) -> Iterator[Any]:
    with JsonlSessionRepository(root, clock=clock) as store:
        yield store


@contextmanager
def jsonl_served(root: Path, clock: Clock) -> Iterator[Any]:
    with (
        JsonlSessionRepository(root, clock=clock) as store,
        running_server(store) as target,
        AgentlogClient(target) as client,
    ):
        yield client


@contextmanager
def postgres_served(_: Path, clock: Clock) -> Iterator[Any]:
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url, clock=clock)

        with running_server(open_backend) as target, AgentlogClient(target) as client:
            yield client


STORES: dict[str, Callable[[Path, Clock], AbstractContextManager[Any]]] = {
    "memory": memory,
    "jsonl": jsonl,
    "jsonl-served": jsonl_served,
    "postgresql": postgres_served,
}


@pytest.mark.parametrize("kind", list(STORES))
def test_a_sessions_timestamps_never_go_back_when_the_clock_steps_back(
    kind: str, tmp_path: Path
) -> None:
    clock = Clock()
    with STORES[kind](tmp_path, clock) as store:
        first = store.append(AppendEvent(session_id="s", event=delta("s", "1")))
        assert first.timestamp_ns == clock.now
        clock.now -= HOUR  # the clock steps back an hour
        second = store.append(AppendEvent(session_id="s", event=delta("s", "2")))
        batch = store.append_batch("s", [NewEvent(event=delta("s", str(i))) for i in range(3)])
        assert second.timestamp_ns == first.timestamp_ns
        assert {r.timestamp_ns for r in batch} == {first.timestamp_ns}
        # Another session takes the clock as it is.
        other = store.append(AppendEvent(session_id="t", event=delta("t", "1")))
        assert other.timestamp_ns == clock.now
        clock.now += 2 * HOUR  # and forward again: time moves on
        third = store.append(AppendEvent(session_id="s", event=delta("s", "3")))
        assert third.timestamp_ns == clock.now
        stored = [r.timestamp_ns for r in store.load_session("s")]
        assert stored == sorted(stored)
        assert store.head("s").timestamp_ns == clock.now


def test_two_replicas_whose_clocks_differ_never_step_a_session_back() -> None:
    ahead, behind = Clock(), Clock(-HOUR)
    with database() as url:

        def replica(clock: Clock) -> Callable[[], Any]:
            async def open_backend() -> PostgresBackend:
                return await PostgresBackend.open(url, clock=clock)

            return open_backend

        with (
            running_server(replica(ahead)) as first,
            running_server(replica(behind)) as second,
            AgentlogClient(first) as a,
            AgentlogClient(second) as b,
        ):
            for i in range(6):
                writer = a if i % 2 == 0 else b
                writer.append(AppendEvent(session_id="s", event=delta("s", str(i))))
                ahead.now += 1000
                behind.now += 1000
            stamps = [r.timestamp_ns for r in a.load_session("s")]
            assert stamps == sorted(stamps)
            assert stamps[1] == stamps[0]  # the replica behind took the session's time
            # A session only the replica behind writes has that replica's time.
            alone = b.append(AppendEvent(session_id="t", event=delta("t", "x")))
            assert alone.timestamp_ns == behind.now
