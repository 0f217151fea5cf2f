"""Every thread a store or server starts ends when it is closed, and nothing waits forever:
the test run ends when the tests do."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agentlog import AgentlogClient, AppendEvent
from agentlog.server import JsonlSessionRepository
from tests.contract import delta
from tests.servers import running_server


def started_since(before: set[threading.Thread]) -> list[threading.Thread]:
    deadline = time.monotonic() + 10
    while True:
        alive = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_every_thread_a_store_and_its_server_start_ends_when_they_are_closed(
    tmp_path: Path,
) -> None:
    before = set(threading.enumerate())
    repo = JsonlSessionRepository(tmp_path, use_syncfs=False)  # fsync: a thread pool too
    with running_server(repo) as target, AgentlogClient(target) as client:
        for i in range(20):
            client.append(AppendEvent(session_id=f"s{i % 4}", event=delta("s", str(i))))
        assert len(client.load_session("s1")) == 5
    repo.close()
    assert started_since(before) == []


def test_appends_handed_to_an_event_loop_that_never_runs_are_answered_at_close(
    tmp_path: Path,
) -> None:
    repo = JsonlSessionRepository(tmp_path)
    repo.on_durable(lambda: True)  # takes the acknowledgements over, then never acknowledges
    answers: list[Any] = []
    writer = threading.Thread(
        target=lambda: answers.append(
            repo.append(AppendEvent(session_id="s", event=delta("s", "x")))
        ),
        daemon=True,
    )
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # durable, not yet acknowledged: waiting
    repo.close()
    writer.join(10)
    assert not writer.is_alive()
    assert [a.sequence for a in answers] == [1]
    with JsonlSessionRepository(tmp_path) as reopened:
        assert [r.sequence for r in reopened.load_session("s")] == [1]
