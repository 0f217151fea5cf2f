"""Group commit as a pipeline: while one sync runs, the next group forms and is
written; when it returns, one sync covers the whole group. Nothing waits on a timer."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prometheus_client import REGISTRY

from agentlog import AppendEvent
from agentlog.server import JsonlSessionRepository
from agentlog.server._pauses import hold
from agentlog.server._rules import PendingAppend
from agentlog.server.blocking import BlockingStore
from tests.contract import delta

WRITERS = 16


def pending(event: AppendEvent) -> PendingAppend:
    return BlockingStore.prepare_append(event)


def syncs() -> tuple[float, float]:
    """(syncs so far, appends they covered), of every JSONL store in this process."""
    count = REGISTRY.get_sample_value("agentlog_sync_group_appends_count") or 0.0
    total = REGISTRY.get_sample_value("agentlog_sync_group_appends_sum") or 0.0
    return count, total


def test_appends_made_during_a_sync_share_the_next_one(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as repo:

        async def run() -> tuple[float, float]:
            with ThreadPoolExecutor(4) as executor:
                backend = repo.backend(executor)
                for n in range(WRITERS):  # each session's state at hand
                    event = AppendEvent(session_id=f"w{n}", event=delta(f"w{n}", "x"))
                    await backend.append(pending(event))
                with hold("commit.syncing") as syncing:
                    event = AppendEvent(session_id="w0", event=delta("w0", "a"))
                    first = asyncio.ensure_future(backend.append(pending(event)))
                    await asyncio.to_thread(syncing.wait, 1)
                    before = syncs()
                    # While that sync is held, the others write their lines: staged, not synced.
                    others = [
                        asyncio.ensure_future(
                            backend.append(
                                pending(AppendEvent(session_id=f"w{n}", event=delta(f"w{n}", "b")))
                            )
                        )
                        for n in range(1, WRITERS)
                    ]
                    await asyncio.sleep(0.2)
                    assert not any(o.done() for o in others)
                    for n in range(1, WRITERS):
                        assert b'"b"' in (tmp_path / f"w{n}.jsonl").read_bytes()  # written
                    syncing.release()
                    await first
                    await asyncio.gather(*others)
                after = syncs()
                await backend.close()
            return after[0] - before[0], after[1] - before[1]

        count, covered = asyncio.run(run())
        # The held sync (of "a"), then one sync for all the appends made meanwhile.
        assert (count, covered) == (2, WRITERS)
        assert [r.sequence for r in repo.load_session("w5")] == [1, 2]


def test_a_lone_append_is_synced_at_once(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as repo:

        async def run() -> float:
            with ThreadPoolExecutor(4) as executor:
                backend = repo.backend(executor)
                await backend.append(pending(AppendEvent(session_id="s", event=delta("s", "x"))))
                timings = []
                for i in range(20):
                    started = time.perf_counter()
                    await backend.append(
                        pending(AppendEvent(session_id="s", event=delta("s", str(i))))
                    )
                    timings.append(time.perf_counter() - started)
                await backend.close()
            return sorted(timings)[len(timings) // 2]

        median = asyncio.run(run())
    # No timer holds it for others that may come: its latency is about one sync.
    assert median < 0.05
