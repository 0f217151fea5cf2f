"""SIGKILL the server at random moments while clients append; check nothing acknowledged is lost.

With sync "always", after every restart: every acknowledged event is present exactly
once at its sequence; every file parses; every batch is all there or not at all; the
all-sessions feed names every stored record once, in increasing positions.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from agentlog import AgentlogClient, AgentlogError, AppendEvent, NewEvent
from agentlog.server import JsonlSessionRepository
from tests.contract import delta, records_only
from tests.test_server import wait_for_port

ROUNDS = 24
SESSIONS = [f"crash-{n}" for n in range(4)]


def start_server(data: Path) -> tuple[subprocess.Popen[str], str]:
    process, target, _ = start_server_logging(data)
    return process, target


def start_server_logging(data: Path) -> tuple[subprocess.Popen[str], str, str]:
    """`agentlog serve` on `data`: the process, its target, and what it logged at start."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentlog.server",
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--data-dir",
            str(data),
            "--sync",
            "always",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    port, logged = wait_for_port(process)
    return process, f"127.0.0.1:{port}", logged


def test_sigkill_at_random_moments_loses_no_acknowledged_event(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rng = random.Random(5)
    acknowledged: dict[str, tuple[str, int]] = {}  # id -> (session, sequence)
    batches: list[list[str]] = []  # ids of every batch sent, acknowledged or not
    lock = threading.Lock()
    recovered_total = 0

    for _ in range(ROUNDS):
        process, target = start_server(data)
        stop = threading.Event()

        def write(seed: int, target: str = target, stop: threading.Event = stop) -> None:
            local = random.Random(seed)
            with AgentlogClient(target, timeout=5, retries=0) as client:
                while not stop.is_set():
                    session = local.choice(SESSIONS)
                    size = local.choice([1, 1, 5])
                    ids = [str(uuid.uuid4()) for _ in range(size)]
                    with lock:
                        batches.append(ids)
                    try:
                        if size == 1:
                            event = delta(session, "x" * local.randint(1, 3000))
                            records = [
                                client.append(
                                    AppendEvent(session_id=session, event=event, id=ids[0])
                                )
                            ]
                        else:
                            records = client.append_batch(
                                session,
                                [NewEvent(event=delta(session, "b"), id=i) for i in ids],
                            )
                    except AgentlogError:
                        return  # the server is gone
                    with lock:
                        for record in records:
                            acknowledged[record.id] = (session, record.sequence)

        writers = [threading.Thread(target=write, args=(rng.random(),)) for _ in range(8)]
        for writer in writers:
            writer.start()
        time.sleep(rng.uniform(0.05, 0.5))
        process.kill()  # SIGKILL: no chance to finish anything
        process.wait(10)
        stop.set()
        for writer in writers:
            writer.join(30)

        with JsonlSessionRepository(data) as repo:
            recovered_total += len(repo.recovered)
            stored: dict[str, tuple[str, int]] = {}
            for session in repo.session_ids():
                records = repo.load_session(session)  # every file parses
                assert [r.sequence for r in records] == list(range(1, len(records) + 1))
                for record in records:
                    assert record.id not in stored, "an event stored twice"
                    stored[record.id] = (session, record.sequence)
            for record_id, place in acknowledged.items():
                assert stored.get(record_id) == place, "an acknowledged event was lost or moved"
            for ids in batches:
                present = [i in stored for i in ids]
                assert all(present) or not any(present), "a batch landed in part"
            feed = list(records_only(repo.read_all(1)))
            positions = [f.position for f in feed]
            assert positions == sorted(set(positions))
            assert sorted(f.record.id for f in feed) == sorted(stored)

    assert len(acknowledged) > ROUNDS * 5  # the test did append under load
    print(f"{ROUNDS} kills, {len(acknowledged)} acknowledged events, {recovered_total} tails cut")
