"""Group commit on the event loop: appends of concurrent writers share a release (and so a sync)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentlog import AppendEvent
from agentlog.server import JsonlSessionRepository
from agentlog.server._rules import PendingAppend
from agentlog.server.blocking import BlockingStore
from agentlog.server.jsonl import backend as jsonl_backend
from tests.contract import delta

WRITERS = 8
APPENDS_EACH = 20


def count_releases(repo: JsonlSessionRepository, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the store's releases (each lets one group of held appends be synced)."""
    releases: list[int] = []
    release = repo.release

    def counted() -> None:
        releases.append(1)
        release()

    monkeypatch.setattr(repo, "release", counted)
    return releases


async def writers_appending(repo: JsonlSessionRepository) -> None:
    """WRITERS writers, each appending, then (as a client would, a round trip later)
    appending again."""
    with ThreadPoolExecutor(4) as executor:
        backend = repo.backend(executor)

        async def writer(number: int) -> None:
            for _ in range(APPENDS_EACH):
                event = AppendEvent(session_id=f"w{number}", event=delta(f"w{number}", "x"))
                await backend.append(pending(event))
                await asyncio.sleep(0.0004 * (number + 1))  # round trips differ

        for number in range(WRITERS):  # build each session's state first
            await backend.append(
                pending(AppendEvent(session_id=f"w{number}", event=delta(f"w{number}", "x")))
            )
        await asyncio.gather(*(writer(number) for number in range(WRITERS)))
        await backend.close()


def pending(event: AppendEvent) -> PendingAppend:
    return BlockingStore.prepare_append(event)


def test_appends_of_writers_that_come_back_together_share_releases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JsonlSessionRepository(tmp_path, sync="never") as repo:
        releases = count_releases(repo, monkeypatch)
        asyncio.run(writers_appending(repo))
        appends = WRITERS * APPENDS_EACH
        assert len(repo.load_session("w0")) == APPENDS_EACH + 1
    # Held until the last group's writers are back: about a writer each per release (about
    # 28 here), where releasing at once lets about 80 go (the next test).
    assert len(releases) < appends / 4, f"{len(releases)} releases for {appends} appends"


def test_without_holding_each_append_is_released_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The contrast that shows the test above measures the hold, not the writers' timing.
    monkeypatch.setattr(jsonl_backend, "MAX_HOLD_SECONDS", 0.0)
    with JsonlSessionRepository(tmp_path, sync="never") as repo:
        releases = count_releases(repo, monkeypatch)
        asyncio.run(writers_appending(repo))
    assert len(releases) >= WRITERS * APPENDS_EACH / 3
