"""Directories written by arcan's own code, served as they are, and our appends in arcan's shape."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, TextDelta
from agentlog._codec import (
    record_to_json,
)
from agentlog.server import JsonlSessionRepository
from tests.servers import running_server

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "arcan-jsonl"
FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if p.is_dir()) if FIXTURES.is_dir() else []
AUTO_SI = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.(\d{3}|\d{6}|\d{9}))?Z")
UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_the_fixtures_are_there() -> None:
    # CI clones main with ../shared beside it; without the fixtures nothing below runs.
    assert {p.name for p in FIXTURE_DIRS} >= {"seed-era", "latest-variants"}, FIXTURES


def identical(a: Any, b: Any) -> bool:
    """Equal JSON values of equal types all the way down (so 1 != 1.0 and True != 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def raw_lines(path: Path) -> list[dict[str, Any]]:
    # The stdlib parser keeps every integer exact: the reference reading.
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(params=FIXTURE_DIRS, ids=lambda p: p.name)
def served_copy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    data = tmp_path / "data"
    shutil.copytree(request.param, data)
    with running_server(JsonlSessionRepository(data)) as target:
        yield data, target


def test_every_fixture_record_is_served_exactly(served_copy: tuple[Path, str]) -> None:
    data, target = served_copy
    before = {p.name: p.read_bytes() for p in data.glob("*.jsonl")}
    all_lines = [line for path in sorted(data.glob("*.jsonl")) for line in raw_lines(path)]
    with AgentlogClient(target) as client:
        for path in sorted(data.glob("*.jsonl")):
            expected = raw_lines(path)
            records = client.load_session(path.name.removesuffix(".jsonl"))
            assert len(records) == len(expected)
            for sequence, (record, line) in enumerate(zip(records, expected, strict=True), 1):
                assert record.id == line["id"]
                assert record.sequence == sequence  # arcan's lines: sequence from position
                assert record.parent_id == line["parent_id"]
                assert record.timestamp_rfc3339 == line["timestamp"]  # nanoseconds kept
                assert identical(record_to_json(record), {**line, "sequence": sequence})
            head = client.head(path.name.removesuffix(".jsonl"))
            assert head is not None
            assert head.sequence == len(expected)
            assert identical(record_to_json(head), {**line, "sequence": len(expected)})
        for line in all_lines:
            children = client.load_children(line["id"])
            wanted = [c for c in all_lines if c["parent_id"] == line["id"]]
            assert sorted(c.id for c in children) == sorted(c["id"] for c in wanted)
    # Serving never touches the files.
    assert {p.name: p.read_bytes() for p in data.glob("*.jsonl")} == before


def test_the_sub_agent_session_points_into_its_callers_session(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "seed-era", data)
    with running_server(JsonlSessionRepository(data)) as target, AgentlogClient(target) as client:
        children = client.load_children("cc2d886c-b894-4a22-af43-d04a0848be4c")
    assert {(c.session_id, c.id) for c in children} == {
        ("0194c9a2-6d1e-7c3b-9a51-3f0e2c7b8d10", "f1ba3598-33e9-451f-ad38-92319f29893f"),
        ("0194c9a2-6d1e-7c3b-9a51-3f0e2c7b8d10", "78b3d120-3a55-4f8f-9cc1-6a3ce3cd28da"),
        ("sub_agent.research-1", "08935d3a-0b8c-4fe4-aa94-bde83ff5804e"),
    }


def test_appends_to_an_arcan_session_are_lines_arcan_reads(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "latest-variants", data)
    path = data / "sess-latest-01.jsonl"
    original = path.read_bytes()
    with running_server(JsonlSessionRepository(data)) as target, AgentlogClient(target) as client:
        last = client.head("sess-latest-01")
        assert last is not None
        event = TextDelta(run_id="run-L2", session_id="sess-latest-01", iteration=3, delta="é\x01")
        root = client.append(AppendEvent(session_id="sess-latest-01", event=event))
        child = client.append(
            AppendEvent(session_id="sess-latest-01", parent_id=last.id, event=event)
        )
        loaded = client.load_session("sess-latest-01")
        assert len(loaded) == len(raw_lines(path))
        assert [r.sequence for r in loaded] == list(range(1, len(loaded) + 1))
    content = path.read_bytes()
    assert content.startswith(original)  # append-only: arcan's lines untouched
    new_lines = content[len(original) :].decode().splitlines(keepends=True)
    assert len(new_lines) == 2
    for line, record in zip(new_lines, [root, child], strict=True):
        assert line.endswith("}\n")
        parsed = json.loads(line)
        # arcan's keys in arcan's order, then agentlog's sequence (arcan ignores it).
        assert list(parsed) == ["id", "session_id", "parent_id", "timestamp", "event", "sequence"]
        assert parsed["sequence"] == record.sequence
        assert UUID_V4.fullmatch(parsed["id"])
        assert parsed["id"] == record.id
        assert AUTO_SI.fullmatch(parsed["timestamp"])
        assert parsed["timestamp"] == record.timestamp_rfc3339
        assert next(iter(parsed["event"])) == "part_type"
        assert parsed["event"] == {
            "part_type": "text_delta",
            "run_id": "run-L2",
            "session_id": "sess-latest-01",
            "iteration": 3,
            "delta": "é\x01",
        }
    assert json.loads(new_lines[0])["parent_id"] is None  # present, null, as serde writes it
    assert json.loads(new_lines[1])["parent_id"] == last.id
