"""Three `agentlog serve` processes on one PostgreSQL database, as a mesh runs them:
writers spread over them into shared sessions, every replica's feed the same,
and a replica killed in the middle of batches."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from agentlog import (
    AgentlogClient,
    AgentlogError,
    AppendEvent,
    CaughtUp,
    FeedRecord,
    NewEvent,
    WrongExpectedSequence,
)
from tests.contract import delta
from tests.pg import database
from tests.test_server import wait_for_port

WRITERS = 32
SESSIONS = 4


class Replica:
    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "AGENTLOG_STORE": url, "AGENTLOG_POOL_SIZE": "4"},
        )
        port, _ = wait_for_port(self.process)
        self.target = f"127.0.0.1:{port}"
        # Keep reading its log, so that a full pipe never stalls it.
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for _ in self.process.stderr:
            pass

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    with database() as url:
        started = [Replica(url) for _ in range(3)]
        try:
            yield started
        finally:
            for replica in started:
                replica.stop()


def feed_of(target: str) -> list[tuple[int, str]]:
    """The whole feed as one replica serves it: (position, id) up to CaughtUp."""
    with AgentlogClient(target) as client:
        items: list[tuple[int, str]] = []
        for item in client.subscribe_all(from_position=1):
            if isinstance(item, CaughtUp):
                return items
            assert isinstance(item, FeedRecord)
            items.append((item.position, item.record.id))
    raise AssertionError("the feed ended")


def test_writers_spread_over_three_replicas_share_sessions_exactly(
    replicas: list[Replica],
) -> None:
    sessions = [f"mesh-{uuid.uuid4()}" for _ in range(SESSIONS)]
    acknowledged: dict[str, tuple[str, int]] = {}
    refused: set[str] = set()
    conflicts: list[tuple[int, int]] = []  # (expected, actual) of each refused append
    errors: list[BaseException] = []
    lock = threading.Lock()

    def write(index: int) -> None:
        rng = random.Random(index)
        expecting = index % 2 == 1
        try:
            with AgentlogClient(replicas[index % 3].target) as client:
                for _ in range(12):
                    session = rng.choice(sessions)
                    count = rng.choice([1, 1, 3])
                    events = [NewEvent(event=delta(session, "m")) for _ in range(count)]
                    expected = None
                    if expecting:
                        head = client.head(session)
                        expected = head.sequence if head else 0
                    try:
                        if count == 1:
                            event = AppendEvent(
                                session_id=session,
                                event=events[0].event,
                                expected_sequence=expected,
                            )
                            records = [client.append(event)]
                        else:
                            records = client.append_batch(
                                session, events, expected_sequence=expected
                            )
                    except WrongExpectedSequence as exc:
                        with lock:
                            refused.add(session)
                            conflicts.append((expected or 0, exc.actual_sequence))
                        continue
                    with lock:
                        for record in records:
                            acknowledged[record.id] = (session, record.sequence)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert refused, "expectations were never contested: the test did not race"
    assert all(actual > expected for expected, actual in conflicts)
    with AgentlogClient(replicas[0].target) as client:
        stored = {}
        for session in sessions:
            records = client.load_session(session)
            assert [r.sequence for r in records] == list(range(1, len(records) + 1))
            stored.update({r.id: (session, r.sequence) for r in records})
    assert stored == acknowledged  # nothing lost, nothing twice, nothing unacknowledged
    feeds = [feed_of(replica.target) for replica in replicas]
    assert feeds[0] == feeds[1] == feeds[2]
    assert [position for position, _ in feeds[0]] == list(range(1, len(stored) + 1))
    assert sorted(i for _, i in feeds[0]) == sorted(stored)


def test_a_replica_killed_during_batches_leaves_each_batch_whole_or_absent(
    replicas: list[Replica],
) -> None:
    sessions = [f"kill-{uuid.uuid4()}" for _ in range(SESSIONS)]
    batches: list[list[str]] = []
    acknowledged: set[str] = set()
    failed_over: list[str] = []  # batches sent again through another replica
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def write(index: int) -> None:
        rng = random.Random(index)
        clients = [AgentlogClient(r.target, retries=1, timeout=10) for r in replicas]
        try:
            while not stop.is_set():
                session = rng.choice(sessions)
                events = [
                    NewEvent(event=delta(session, "k"), id=str(uuid.uuid4())) for _ in range(5)
                ]
                with lock:
                    batches.append([e.id or "" for e in events])
                # The same batch, same ids, through the next replica if one fails.
                for attempt in range(3):
                    client = clients[(index + attempt) % 3]
                    try:
                        records = client.append_batch(session, events)
                    except AgentlogError:
                        with lock:
                            failed_over.append(session)
                        continue
                    with lock:
                        acknowledged.update(r.id for r in records)
                    break
        except BaseException as exc:
            errors.append(exc)
        finally:
            for client in clients:
                client.close()

    threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    victim = replicas[1]
    with AgentlogClient(victim.target) as probe:
        while sum(len(probe.load_session(s)) for s in sessions) < 200:
            time.sleep(0.01)
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(30)
    with AgentlogClient(replicas[0].target) as probe:
        before = sum(len(probe.load_session(s)) for s in sessions)
        while sum(len(probe.load_session(s)) for s in sessions) < before + 200:
            time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert failed_over, "no batch was cut off by the kill: the test did not test it"
    with AgentlogClient(replicas[2].target) as client:
        stored: dict[str, tuple[str, int]] = {}
        for session in sessions:
            records = client.load_session(session)
            assert [r.sequence for r in records] == list(range(1, len(records) + 1))
            for r in records:
                assert r.id not in stored, "an event stored twice"
                stored[r.id] = (session, r.sequence)
    assert acknowledged <= set(stored)  # every acknowledged event is there
    for batch in batches:
        present = [i in stored for i in batch]
        assert all(present) or not any(present), "a batch stored in part"
        if all(present):
            sequences = [stored[i][1] for i in batch]
            assert sequences == list(range(sequences[0], sequences[0] + len(batch)))
    assert feed_of(replicas[0].target) == feed_of(replicas[2].target)
