"""SIGKILL the server at random moments while forks run under load: never half a fork,
never a branch whose records disagree with their source, never an acknowledged fork
lost; on JSONL (branch layout) and PostgreSQL."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentlog import (
    AgentlogClient,
    AgentlogError,
    AppendEvent,
    BranchInfo,
    EventRecord,
    NewEvent,
)
from tests.contract import delta, records_only
from tests.pg import database
from tests.test_server import wait_for_port

ROUNDS = 6
SOURCE = "fork-source"
SOURCE_RECORDS = 3000


def serve(store: list[str]) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0", *store],
        stderr=subprocess.PIPE,
        text=True,
    )
    port, _ = wait_for_port(process)
    # Keep reading what it logs, so a full pipe never stalls it.
    threading.Thread(target=lambda: process.stderr and process.stderr.read(), daemon=True).start()
    return process, f"127.0.0.1:{port}"


def fill_source(target: str) -> None:
    """The source branch: chains of records, some parents far back, some in other
    sessions, some to records that come later."""
    rng = random.Random(3)
    with AgentlogClient(target) as client:
        outside = client.append(AppendEvent(session_id="elsewhere", event=delta("elsewhere", "o")))
        ids: list[str] = []
        later = str(uuid.uuid4())  # a parent that is appended later on
        while len(ids) < SOURCE_RECORDS:
            batch = []
            for _ in range(100):
                choice = rng.random()
                if not ids or choice < 0.05:
                    parent = outside.id
                elif choice < 0.1:
                    parent = later
                else:
                    parent = ids[max(0, len(ids) - 1 - int(rng.expovariate(0.01)))]
                record_id = later if len(ids) == 2500 else str(uuid.uuid4())
                batch.append(
                    NewEvent(event=delta(SOURCE, str(len(ids))), parent_id=parent, id=record_id)
                )
                ids.append(record_id)
            client.append_batch(SOURCE, batch)


@dataclass
class Store:
    """How the test reads a store after a kill: a branch's records, and what is listed."""

    records: Callable[[str, str], list[EventRecord]]
    sessions: Callable[[], list[Any]]

    def forks(self) -> list[BranchInfo]:
        [info] = [s for s in self.sessions() if s.session_id == SOURCE]
        return [b for b in info.branches if b.branch_id != "main"]


def check(store: Store, forks: list[tuple[str, BranchInfo]]) -> None:
    """Every fork listed is whole and agrees with its source."""
    records = store.records
    source = records(SOURCE, "main")
    position = {r.id: k for k, r in enumerate(source)}
    for branch, info in forks:
        assert info.forked_from is not None, branch
        count = info.forked_from.sequence
        copies = records(SOURCE, branch)
        assert len(copies) == info.event_count == count, f"{branch}: half a fork"
        mine = {c.id: k for k, c in enumerate(copies)}
        for k, (copy, original) in enumerate(zip(copies, source[:count], strict=True)):
            assert copy.sequence == k + 1
            assert (copy.event, copy.timestamp_ns) == (original.event, original.timestamp_ns)
            assert copy.id not in position
            parent = original.parent_id
            if parent is not None and position.get(parent, count) < count:
                assert mine[copy.parent_id] == position[parent], f"{branch}: a parent astray"  # type: ignore[index]
            else:
                assert copy.parent_id == parent


def crash_forks(store: list[str], read: Callable[[], Iterator[Store]]) -> None:
    rng = random.Random(11)
    process, target = serve(store)
    fill_source(target)
    process.kill()
    process.wait(10)
    acknowledged: dict[str, int] = {}  # fork branch -> its last copied sequence
    started = 0
    checked: set[str] = set()
    lock = threading.Lock()
    for _ in range(ROUNDS):
        process, target = serve(store)
        stop = threading.Event()

        def fork(seed: float, target: str = target, stop: threading.Event = stop) -> None:
            nonlocal started
            local = random.Random(seed)
            with AgentlogClient(target, timeout=30, retries=0) as client:
                while not stop.is_set():
                    branch = f"f-{uuid.uuid4().hex[:8]}"
                    up_to = local.randint(1, SOURCE_RECORDS)
                    with lock:
                        started += 1
                    try:
                        made = client.fork_session(SOURCE, up_to, new_branch_id=branch)
                    except AgentlogError:
                        return  # the server is gone
                    with lock:
                        acknowledged[branch] = made.forked_from.sequence if made.forked_from else -1

        def append(seed: float, target: str = target, stop: threading.Event = stop) -> None:
            local = random.Random(seed)
            with AgentlogClient(target, timeout=30, retries=0) as client:
                while not stop.is_set():
                    session = f"load-{local.randint(0, 3)}"
                    try:
                        client.append(AppendEvent(session_id=session, event=delta(session, "x")))
                    except AgentlogError:
                        return

        threads = [threading.Thread(target=fork, args=(rng.random(),)) for _ in range(2)]
        threads += [threading.Thread(target=append, args=(rng.random(),)) for _ in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.2, 1.5))
        process.kill()
        process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(60)

        for reader in read():
            forks = [(b.branch_id, b) for b in reader.forks()]
            names = {name for name, _ in forks}
            for branch, sequence in acknowledged.items():
                assert branch in names, f"the acknowledged fork {branch} was lost"
                assert dict(forks)[branch].forked_from.sequence == sequence  # type: ignore[union-attr]
            # Forks made since the last kill (earlier ones were checked then).
            check(reader, [(name, info) for name, info in forks if name not in checked])
            checked.update(names)
    assert len(acknowledged) >= ROUNDS  # forks did complete
    assert started > len(acknowledged)  # and some were cut short by a kill
    print(f"{ROUNDS} kills, {started} forks started, {len(acknowledged)} acknowledged")


def test_forks_cut_short_by_sigkill_leave_nothing_on_jsonl(tmp_path: Path) -> None:
    from agentlog.server import JsonlSessionRepository

    data = tmp_path / "data"

    def read() -> Iterator[Store]:
        with JsonlSessionRepository(data) as repo:
            yield Store(
                lambda session, branch: repo.load_session(session, branch_id=branch),
                lambda: list(repo.list_sessions(page_size=1000).sessions),
            )
            feed = list(records_only(repo.read_all(1)))
            positions = [f.position for f in feed]
            assert positions == sorted(set(positions))
            assert not list((data / ".agentlog-forks").glob("*"))  # cut-short copies gone

    crash_forks(["--data-dir", str(data), "--layout", "branches"], read)


@pytest.fixture
def url() -> Iterator[str]:
    with database() as url:
        yield url


def test_forks_cut_short_by_sigkill_leave_nothing_on_postgresql(url: str) -> None:
    def read() -> Iterator[Store]:
        process, target = serve(["--store", url])
        try:
            with AgentlogClient(target) as client:
                yield Store(
                    lambda session, branch: client.load_session(session, branch_id=branch),
                    lambda: list(client.list_sessions(page_size=1000).sessions),
                )
        finally:
            process.terminate()
            process.wait(30)

    crash_forks(["--store", url], read)


def appends_during_a_fork(target: str) -> tuple[float, int, float]:
    """Fork a long branch while another client appends: how long the fork took, how
    many appends were made while it ran, and the longest an append begun before it
    ended took."""
    with AgentlogClient(target, timeout=120) as client:
        for n in range(40):
            client.append_batch(
                "long", [NewEvent(event=delta("long", f"{n}-{i}")) for i in range(1000)]
            )
        done = threading.Event()
        timings: list[tuple[float, float]] = []

        def append() -> None:
            with AgentlogClient(target) as writer:
                while not done.is_set():
                    started = time.monotonic()
                    writer.append(AppendEvent(session_id="other", event=delta("other", "x")))
                    timings.append((started, time.monotonic()))

        thread = threading.Thread(target=append)
        thread.start()
        time.sleep(0.2)
        started = time.monotonic()
        client.fork_session("long", 40_000, new_branch_id="copy")
        ended = time.monotonic()
        done.set()
        thread.join(30)
        assert len(client.load_session("long", branch_id="copy")) == 40_000
    meanwhile = sum(1 for begun, end in timings if begun >= started and end <= ended)
    longest = max(end - begun for begun, end in timings if begun < ended)
    return ended - started, meanwhile, longest


@pytest.mark.parametrize("backend", ["jsonl", "postgresql"])
def test_appends_go_on_while_a_long_fork_copies(tmp_path: Path, backend: str) -> None:
    from agentlog.server import JsonlSessionRepository
    from tests.servers import running_server

    if backend == "jsonl":
        with running_server(JsonlSessionRepository(tmp_path, layout="branches")) as target:
            took, meanwhile, longest = appends_during_a_fork(target)
    else:
        from agentlog.server.postgres import PostgresBackend

        with database() as url:

            async def open_backend() -> PostgresBackend:
                return await PostgresBackend.open(url)

            with running_server(open_backend) as target:
                took, meanwhile, longest = appends_during_a_fork(target)
    # The copy is made outside the store's lock: appends are not held behind it.
    assert took > 0.3, took
    assert meanwhile >= 20, (took, meanwhile)
    assert longest < took / 3, (took, longest)
