"""Exactly once under stress: many rounds of writers racing on a new session, with
both cores kept busy by other processes, through the store in process (every sync
policy) and through the gRPC service (JSONL and PostgreSQL).

Each round, on a new session, four writers start together: A appends one event
with an id of its own, then sends the very same append again; B does that, then
the same with a batch of two; C does what A does; D reads the head and appends
three events expecting it. A reader looks at the session meanwhile. However they
interleave, every id is stored once, every retry is answered with the record as
first stored, and sequences have no gaps. (The property test in
test_concurrency_properties.py tries far fewer interleavings.)
"""

from __future__ import annotations

import collections
import contextlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

from agentlog import (
    AgentlogClient,
    AppendEvent,
    EventRecord,
    NewEvent,
    TextDelta,
    WrongExpectedSequence,
)
from agentlog.server import JsonlSessionRepository
from agentlog.server.postgres import PostgresBackend
from tests.pg import database
from tests.servers import running_server

# Rounds a run does at most, and at least whatever the time; each run otherwise
# stops after its seconds (about 45 s for the five).
ROUNDS = 1000
MIN_ROUNDS = 150


class Store(Protocol):
    def append(self, event: AppendEvent) -> EventRecord: ...

    def append_batch(
        self, session_id: str, events: list[NewEvent], *, expected_sequence: int | None = None
    ) -> list[EventRecord]: ...

    def head(self, session_id: str) -> EventRecord | None: ...

    def load_session(self, session_id: str) -> list[EventRecord]: ...


def delta(session: str, text: str) -> TextDelta:
    return TextDelta(run_id="r", session_id=session, iteration=1, delta=text)


@contextmanager
def busy_cores(count: int = 2) -> Iterator[None]:
    """Other processes keeping the cores busy, as on a shared machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def one_round(stores: list[Store], session: str) -> list[str]:
    """Run the writers of one round (each with a store of its own, which may be shared);
    what went wrong, if anything."""
    problems: list[str] = []
    answers: dict[str, list[EventRecord]] = collections.defaultdict(list)
    start = threading.Barrier(6)

    def twice(store: Store, name: str) -> None:
        again = AppendEvent(session_id=session, event=delta(session, name), id=str(uuid.uuid4()))
        answers[name].append(store.append(again))
        answers[name].append(store.append(again))

    def a(store: Store) -> None:
        start.wait()
        twice(store, "a")

    def b(store: Store) -> None:
        start.wait()
        twice(store, "b")
        batch = [NewEvent(event=delta(session, f"b{i}"), id=str(uuid.uuid4())) for i in range(2)]
        answers["batch"] += store.append_batch(session, batch)
        answers["batch"] += store.append_batch(session, batch)

    def c(store: Store) -> None:
        start.wait()
        twice(store, "c")

    def d(store: Store) -> None:
        start.wait()
        head = store.head(session)
        with contextlib.suppress(WrongExpectedSequence):
            store.append_batch(
                session,
                [NewEvent(event=delta(session, f"d{i}")) for i in range(3)],
                expected_sequence=head.sequence if head else 0,
            )

    def reader(store: Store) -> None:
        start.wait()
        store.load_session(session)

    def header(store: Store) -> None:
        start.wait()
        store.head(session)

    errors: list[BaseException] = []

    def run(step: Callable[[Store], None], store: Store) -> Callable[[], None]:
        def go() -> None:
            try:
                step(store)
            except BaseException as exc:
                errors.append(exc)
                start.abort()

        return go

    steps = [a, b, c, d, reader, header]
    threads = [
        threading.Thread(target=run(step, stores[i % len(stores)])) for i, step in enumerate(steps)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    if errors:
        return [f"a writer failed: {errors[0]!r}"]
    records = stores[0].load_session(session)
    counts = collections.Counter(r.id for r in records)
    twice_stored = [record_id for record_id, n in counts.items() if n > 1]
    if twice_stored:
        problems.append(f"ids stored twice: {twice_stored}")
    if [r.sequence for r in records] != list(range(1, len(records) + 1)):
        problems.append(f"sequences with gaps: {[r.sequence for r in records]}")
    for name in ("a", "b", "c"):
        first, retried = answers[name]
        if first != retried:
            problems.append(f"{name}'s retry was answered {retried.sequence}, not {first.sequence}")
    batch = answers["batch"]
    if batch[:2] != batch[2:]:
        problems.append("the batch's retry was answered other records")
    return problems


def run_rounds(stores: list[Store], prefix: str, seconds: float) -> None:
    failed: list[str] = []
    deadline = time.monotonic() + seconds
    done = 0
    with busy_cores():
        while done < ROUNDS and (done < MIN_ROUNDS or time.monotonic() < deadline):
            problems = one_round(stores, f"{prefix}-{done}")
            if problems:
                failed.append(f"round {done}: {'; '.join(problems)}")
            done += 1
    assert not failed, f"{len(failed)} of {done} rounds went wrong:\n" + "\n".join(failed[:5])


@pytest.mark.parametrize(("sync", "seconds"), [("always", 5), ("interval", 9), ("never", 9)])
def test_racing_writers_in_process_store_every_id_once(
    tmp_path: Path, sync: str, seconds: float
) -> None:
    with JsonlSessionRepository(tmp_path, sync=sync, sync_interval_ms=5) as store:
        run_rounds([store], "s", seconds)


def clients(target: str, count: int) -> list[Any]:
    return [AgentlogClient(target) for _ in range(count)]


def test_racing_writers_through_the_server_on_jsonl_store_every_id_once(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as store, running_server(store) as target:
        connected = clients(target, 6)
        try:
            run_rounds(connected, "s", 5)
        finally:
            for client in connected:
                client.close()


def test_racing_writers_through_the_server_on_postgresql_store_every_id_once() -> None:
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as target:
            connected = clients(target, 6)
            try:
                run_rounds(connected, "s", 5)
            finally:
                for client in connected:
                    client.close()
