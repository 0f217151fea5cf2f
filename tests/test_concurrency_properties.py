"""Random interleavings of concurrent appenders, with and without expectations, with retries.

Invariants checked after every run, on every backend: sequences are gapless
and unique; no acknowledged event is lost or stored twice; every acknowledged
append is readable at the sequence it was given; every rejected one is absent.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlog import AgentlogClient, AppendEvent, NewEvent, WrongExpectedSequence
from agentlog.protocol import SessionRepository
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server.postgres import PostgresBackend
from tests.contract import delta
from tests.pg import database
from tests.servers import running_server

# Each writer runs a list of operations:
#   ("plain", n)   append n events (n > 1: one batch), no expectation
#   ("expect", n)  read the head, then append n events expecting that sequence
#   ("retry", n)   append n events, then send the very same request again
operations = st.lists(
    st.tuples(st.sampled_from(["plain", "expect", "retry"]), st.integers(1, 3)),
    min_size=1,
    max_size=6,
)


@dataclass
class Outcome:
    acknowledged: dict[str, int] = field(default_factory=dict)  # id -> sequence
    rejected: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)


def run_writer(
    repo: SessionRepository, session: str, ops: list[tuple[str, int]], out: Outcome
) -> None:
    try:
        for kind, count in ops:
            events = [
                NewEvent(event=delta(session, kind), id=str(uuid.uuid4())) for _ in range(count)
            ]
            expected = None
            if kind == "expect":
                head = repo.head(session)
                expected = head.sequence if head else 0
            attempts = 2 if kind == "retry" else 1
            for _ in range(attempts):
                try:
                    if count == 1:
                        item = events[0]
                        records = [
                            repo.append(
                                AppendEvent(
                                    session_id=session,
                                    event=item.event,
                                    id=item.id,
                                    expected_sequence=expected,
                                )
                            )
                        ]
                    else:
                        records = repo.append_batch(session, events, expected_sequence=expected)
                except WrongExpectedSequence:
                    out.rejected.update(e.id for e in events if e.id)
                    continue
                for record in records:
                    previous = out.acknowledged.setdefault(record.id, record.sequence)
                    assert previous == record.sequence, "a retry moved an event"
    except BaseException as exc:
        out.errors.append(exc)


def check_invariants(repo: SessionRepository, session: str, outcomes: list[Outcome]) -> None:
    for out in outcomes:
        assert out.errors == []
    records = repo.load_session(session)
    assert [r.sequence for r in records] == list(range(1, len(records) + 1))
    stored = {r.id: r.sequence for r in records}
    assert len(stored) == len(records), "an event was stored twice"
    acknowledged = {i: s for out in outcomes for i, s in out.acknowledged.items()}
    rejected = set().union(*(out.rejected for out in outcomes))
    assert acknowledged == stored, "lost or unacknowledged events"
    assert rejected.isdisjoint(stored)


def interleave(repo: SessionRepository, plans: list[list[tuple[str, int]]]) -> None:
    session = f"prop-{uuid.uuid4()}"
    outcomes = [Outcome() for _ in plans]
    barrier = threading.Barrier(len(plans))

    def start(index: int) -> None:
        barrier.wait()
        run_writer(repo, session, plans[index], outcomes[index])

    threads = [threading.Thread(target=start, args=(i,)) for i in range(len(plans))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    check_invariants(repo, session, outcomes)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentlogClient]:
    repo = JsonlSessionRepository(tmp_path_factory.mktemp("data"), sync=False)
    with running_server(repo) as target, AgentlogClient(target) as client:
        yield client


@pytest.fixture(scope="module")
def postgres_client() -> Iterator[AgentlogClient]:
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as target, AgentlogClient(target) as client:
            yield client


BACKENDS: dict[str, Callable[[Path, Any, Any], SessionRepository]] = {
    "memory": lambda tmp, client, pg: MemorySessionRepository(),
    "jsonl": lambda tmp, client, pg: JsonlSessionRepository(tmp / f"d-{uuid.uuid4()}", sync=False),
    "client": lambda tmp, client, pg: client,
    "postgresql": lambda tmp, client, pg: pg,
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plans=st.lists(operations, min_size=2, max_size=6))
def test_concurrent_appends_keep_every_invariant(
    backend: str,
    plans: list[list[tuple[str, int]]],
    tmp_path: Path,
    client: AgentlogClient,
    postgres_client: AgentlogClient,
) -> None:
    interleave(BACKENDS[backend](tmp_path, client, postgres_client), plans)
