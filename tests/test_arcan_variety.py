"""What arcan can write, agentlog serves: free strings where arcan's types are strings,
session files whose names agentlog would not give a new session, and `parent_id: ""`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, ApprovalRequested, ApprovalResolved
from agentlog.errors import InvalidArgumentError
from agentlog.server import JsonlSessionRepository
from tests.servers import running_server


def arcan_line(session_id: str, event: dict[str, Any], parent_id: str | None = None) -> str:
    """One line as arcan writes it (no `sequence`)."""
    record = {
        "id": str(uuid.uuid4()),
        "session_id": session_id,
        "parent_id": parent_id,
        "timestamp": "2026-11-25T01:33:38.853460046Z",
        "event": {"part_type": event.pop("part_type"), "run_id": "r", "session_id": session_id}
        | event,
    }
    return json.dumps(record) + "\n"


def approval(risk: str) -> dict[str, Any]:
    return {
        "part_type": "approval_requested",
        "approval_id": "a",
        "call_id": "c",
        "tool_name": "t",
        "arguments": {"x": 1},
        "risk": risk,
    }


def resolution(decision: str) -> dict[str, Any]:
    return {"part_type": "approval_resolved", "approval_id": "a", "decision": decision}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def client(data: Path) -> Iterator[AgentlogClient]:
    with running_server(JsonlSessionRepository(data)) as target, AgentlogClient(target) as client:
        yield client


@pytest.mark.parametrize("word", ["extreme", "", "HIGH", "maybe"])
def test_any_risk_or_decision_string_arcan_wrote_is_served(
    data: Path, client: AgentlogClient, word: str
) -> None:
    root = str(uuid.uuid4())
    (data / "s.jsonl").write_text(
        arcan_line("s", {"part_type": "text_delta", "iteration": 1, "delta": "root"})
        + arcan_line("s", approval(word), parent_id=root)
        + arcan_line("s", resolution(word), parent_id=root)
    )
    records = client.load_session("s")
    assert isinstance(records[1].event, ApprovalRequested)
    assert records[1].event.risk == word
    assert isinstance(records[2].event, ApprovalResolved)
    assert records[2].event.decision == word
    head = client.head("s")
    assert head is not None
    assert head.event == records[2].event
    assert [r.event for r in client.load_children(root)] == [records[1].event, records[2].event]
    feed_sessions = client.list_sessions().sessions
    assert [s.session_id for s in feed_sessions] == ["s"]


def test_appends_still_say_the_words_the_format_page_lists(client: AgentlogClient) -> None:
    event = ApprovalRequested(
        run_id="r",
        session_id="s",
        approval_id="a",
        call_id="c",
        tool_name="t",
        arguments=None,
        risk="extreme",
    )
    with pytest.raises(InvalidArgumentError, match="'extreme' is not one of"):
        client.append(AppendEvent(session_id="s", event=event))


@pytest.mark.parametrize(
    "session_id",
    ["x" * 230, "tab\there", "back\\slash", "é" * 120],
    ids=["230 bytes", "tab", "backslash", "240 bytes of UTF-8"],
)
def test_a_session_arcan_named_freely_is_listed_read_and_found_as_children(
    data: Path, client: AgentlogClient, session_id: str
) -> None:
    parent = str(uuid.uuid4())
    delta = {"part_type": "text_delta", "iteration": 1, "delta": "hi"}
    (data / f"{session_id}.jsonl").write_text(
        arcan_line(session_id, dict(delta), parent_id=parent)
        + arcan_line(session_id, dict(delta), parent_id=parent)
    )
    (data / "plain.jsonl").write_text(arcan_line("plain", dict(delta), parent_id=parent))
    listed = [s.session_id for s in client.list_sessions().sessions]
    assert session_id in listed
    assert len(client.load_session(session_id)) == 2
    head = client.head(session_id)
    assert head is not None
    assert head.sequence == 2
    children = client.load_children(parent)
    assert sorted(r.session_id for r in children) == sorted([session_id, session_id, "plain"])


def test_children_of_an_empty_parent_id_are_served(data: Path) -> None:
    delta = {"part_type": "text_delta", "iteration": 1, "delta": "hi"}
    (data / "s.jsonl").write_text(
        arcan_line("s", dict(delta), parent_id="")
        + arcan_line("s", dict(delta), parent_id=None)
        + arcan_line("s", dict(delta), parent_id="")
    )
    with (
        running_server(JsonlSessionRepository(data)) as target,
        AgentlogClient(target) as client,
    ):
        children = client.load_children("")
        assert [r.sequence for r in children] == [1, 3]
        assert all(r.parent_id == "" for r in children)
