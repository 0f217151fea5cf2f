"""`agentlog copy` between JSONL directories and PostgreSQL: exact, idempotent, resumable."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent
from agentlog._codec import record_to_json
from agentlog.server.postgres import PostgresBackend
from tests.contract import delta
from tests.pg import database
from tests.servers import running_server
from tests.test_arcan_fixtures import FIXTURE_DIRS, identical, raw_lines

ARCAN_KEYS = ["id", "session_id", "parent_id", "timestamp", "event"]


def run_copy(source: Path | str, destination: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentlog.server", "copy", str(source), str(destination)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def copy(source: Path | str, destination: Path | str) -> str:
    result = run_copy(source, destination)
    assert result.returncode == 0, result.stderr
    return result.stdout


def fixture_lines(root: Path) -> dict[str, list[dict[str, Any]]]:
    return {p.name: raw_lines(p) for p in sorted(root.glob("*.jsonl"))}


@pytest.fixture
def url() -> Iterator[str]:
    with database() as made:
        yield made


@pytest.mark.parametrize("fixtures", FIXTURE_DIRS, ids=lambda p: p.name)
def test_arcan_fixtures_round_trip_through_postgres_exactly(
    fixtures: Path, tmp_path: Path, url: str
) -> None:
    source = tmp_path / "source"
    shutil.copytree(fixtures, source)
    back = tmp_path / "back"
    assert "0 session(s) were already complete" in copy(source, url)
    copy(url, back)
    original = fixture_lines(fixtures)

    # Served from PostgreSQL: every record as arcan wrote it.
    async def open_backend() -> PostgresBackend:
        return await PostgresBackend.open(url)

    with running_server(open_backend) as target, AgentlogClient(target) as client:
        for name, lines in original.items():
            records = client.load_session(name.removesuffix(".jsonl"))
            assert len(records) == len(lines)
            for sequence, (record, line) in enumerate(zip(records, lines, strict=True), 1):
                assert record.timestamp_rfc3339 == line["timestamp"]
                assert identical(record_to_json(record), {**line, "sequence": sequence})
    # Back in JSONL: lines arcan's reader takes, with the same values.
    assert sorted(p.name for p in back.glob("*.jsonl")) == sorted(original)
    for name, lines in original.items():
        copied = fixture_lines(back)[name]
        assert len(copied) == len(lines)
        for sequence, (line, source_line) in enumerate(zip(copied, lines, strict=True), 1):
            assert list(line)[:5] == ARCAN_KEYS  # arcan's keys first, in arcan's order
            assert line["sequence"] == sequence
            extra = {k: line[k] for k in line if k not in ARCAN_KEYS}
            assert set(extra) <= {"sequence", "batch_end"}  # fields arcan ignores
            assert identical({k: line[k] for k in ARCAN_KEYS}, source_line)
    # The source is only read.
    assert fixture_lines(source) == original


def test_copying_again_copies_nothing_twice(tmp_path: Path, url: str) -> None:
    shutil.copytree(FIXTURE_DIRS[0], tmp_path / "source")
    copy(tmp_path / "source", url)
    again = copy(tmp_path / "source", url)
    assert again.startswith("copied 0 record(s)")
    assert "were already complete" in again


def test_an_interrupted_copy_is_finished_by_running_it_again(tmp_path: Path, url: str) -> None:
    full = tmp_path / "full"
    shutil.copytree(FIXTURE_DIRS[0], full)
    partial = tmp_path / "partial"
    shutil.copytree(FIXTURE_DIRS[0], partial)
    longest = max(partial.glob("*.jsonl"), key=lambda p: len(p.read_bytes()))
    lines = longest.read_bytes().splitlines(keepends=True)
    longest.write_bytes(b"".join(lines[: len(lines) // 3]))  # as far as it had come
    copy(partial, url)
    finished = copy(full, url)
    assert f"copied {len(lines) - len(lines) // 3:,} record(s)" in finished
    back = tmp_path / "back"
    copy(url, back)
    assert fixture_lines(back)[longest.name] == [
        {**line, "sequence": n} for n, line in enumerate(raw_lines(full / longest.name), 1)
    ]


def test_a_destination_written_by_others_is_refused(tmp_path: Path) -> None:
    source, destination = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURE_DIRS[0], source)
    session = sorted(source.glob("*.jsonl"))[0].name.removesuffix(".jsonl")
    from agentlog.server import JsonlSessionRepository

    with JsonlSessionRepository(destination) as other:
        other.append(AppendEvent(session_id=session, event=delta(session, "not from a")))
    result = run_copy(source, destination)
    assert result.returncode == 1
    assert "written by something other than this copy" in result.stderr


def test_copy_refuses_a_missing_source(tmp_path: Path) -> None:
    result = run_copy(tmp_path / "nope", tmp_path)
    assert result.returncode == 1
    assert "no such data directory" in result.stderr
