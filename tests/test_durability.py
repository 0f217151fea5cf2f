"""Under sync "always", no append is answered, and no reader sees it, before the
sync that covers it has returned, in process and through the server (whose event
loop acknowledges what the sync thread made durable).

The sync is held back on purpose (`_pauses.hold("commit.syncing")`), one round at
a time: an append staged while one sync runs waits for the next, even when the
first returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, EventRecord
from agentlog.server import JsonlSessionRepository
from agentlog.server._pauses import hold
from tests.contract import delta, records_only, started
from tests.servers import running_server
from tests.test_exactly_once import Background


@contextmanager
def in_process(data: Path) -> Iterator[tuple[Any, Callable[[], list[Any]]]]:
    with JsonlSessionRepository(data) as repo:

        def feed() -> list[Any]:
            return [f.record.id for f in records_only(repo.read_all(1))]

        yield repo, feed


@contextmanager
def served(data: Path) -> Iterator[tuple[Any, Callable[[], list[Any]]]]:
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):

        def feed() -> list[Any]:
            found: list[str] = []
            for item in client.subscribe_all(from_position=1):
                if not hasattr(item, "record"):
                    return found  # CaughtUp: everything stored is delivered
                found.append(item.record.id)
            return found

        yield client, feed


@pytest.mark.parametrize("where", [in_process, served], ids=["in-process", "served"])
def test_appends_are_answered_and_seen_only_once_their_sync_returns(
    tmp_path: Path, where: Callable[..., Any]
) -> None:
    with where(tmp_path / "data") as (store, feed):
        first = store.append(AppendEvent(session_id="s", event=started("s")))

        def sees_only(*records: EventRecord) -> None:
            ids = [r.id for r in records]
            assert [r.id for r in store.load_session("s")] == ids
            assert store.head("s").id == ids[-1]
            assert store.list_sessions().sessions[0].event_count == len(ids)
            assert feed() == ids

        with hold("commit.syncing", times=2) as syncing:
            x = Background(lambda: store.append(AppendEvent(session_id="s", event=delta("s", "x"))))
            syncing.wait(1)  # the sync covering x is held
            y = Background(lambda: store.append(AppendEvent(session_id="s", event=delta("s", "y"))))
            time.sleep(0.3)  # y is written and released meanwhile, for the next sync
            assert not x.done()
            assert not y.done()
            sees_only(first)
            syncing.let_one_through()  # x's sync returns; the next (y's) is held
            syncing.wait(2)
            x_record = x.result()
            time.sleep(0.2)
            assert not y.done(), "an append was answered before the sync that covers it"
            sees_only(first, x_record)
        y_record = y.result()
        sees_only(first, x_record, y_record)
