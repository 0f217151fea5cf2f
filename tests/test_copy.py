"""`agentlog copy` between JSONL directories and PostgreSQL: exact, idempotent, resumable."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agentlog import AgentlogClient, AppendEvent, FailedPreconditionError
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


def arcan_line(session: str, event: dict[str, Any], parent: str | None = None) -> bytes:
    record = {
        "id": str(uuid.uuid4()),
        "session_id": session,
        "parent_id": parent,
        "timestamp": "2026-11-25T01:33:38.853460046Z",
        "event": {"run_id": "r", "session_id": session, **event},
    }
    return json.dumps(record).encode() + b"\n"


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = {"a": value}
    return value


def test_copy_carries_whatever_the_source_serves(tmp_path: Path, url: str) -> None:
    source = tmp_path / "source"
    source.mkdir()
    lines = [
        arcan_line(
            "odd",
            {
                "part_type": "approval_requested",
                "approval_id": "ap",
                "call_id": "c",
                "tool_name": "t",
                "arguments": None,
                "risk": "spicy",  # not one of arcan's four, but arcan stores a string
            },
        ),
        arcan_line(
            "odd",
            {
                "part_type": "approval_resolved",
                "approval_id": "ap",
                "decision": "maybe",
                "reason": None,
            },
        ),
        arcan_line(
            "odd",
            {
                "part_type": "tool_call_requested",
                "iteration": 1,
                "call": {"call_id": "c", "tool_name": "t", "input": nested(120)},
            },
        ),
        arcan_line(
            "odd",
            {
                "part_type": "tool_call_completed",
                "iteration": 1,
                "result": {"call_id": "c", "tool_name": "t", "output": "x" * (5 << 20)},
            },
        ),
    ]
    (source / "odd.jsonl").write_bytes(b"".join(lines))
    before = sorted(p.name for p in source.iterdir())
    copy(source, url)
    back = tmp_path / "back"
    copy(url, back)
    copied = raw_lines(back / "odd.jsonl")
    original = [json.loads(line) for line in lines]
    assert [{k: line[k] for k in ARCAN_KEYS} for line in copied] == original
    assert sorted(p.name for p in source.iterdir()) == before  # nothing written in the source


def test_one_bad_session_is_reported_and_the_others_are_copied(tmp_path: Path, url: str) -> None:
    source = tmp_path / "source"
    seed_era = next(p for p in FIXTURE_DIRS if p.name == "seed-era")  # three sessions
    shutil.copytree(seed_era, source)
    names = sorted(p.name.removesuffix(".jsonl") for p in source.glob("*.jsonl"))
    bad = source / f"{names[1]}.jsonl"
    kept = bad.read_bytes()
    good_lines = kept.splitlines(keepends=True)
    bad.write_bytes(good_lines[0] + b"this is not json\n" + b"".join(good_lines[1:]))
    result = run_copy(source, url)
    assert result.returncode == 1
    assert f"{names[1]!r}" in result.stderr
    assert "line 2" in result.stderr
    assert "CORRUPT_LINE" in result.stderr
    assert "run the same copy again" in result.stderr
    back = tmp_path / "back"
    copy(url, back)
    for name in names:
        if name != names[1]:
            assert len(raw_lines(back / f"{name}.jsonl")) == len(
                raw_lines(source / f"{name}.jsonl")
            )
    assert len(raw_lines(back / f"{names[1]}.jsonl")) == 1  # as far as it could go
    bad.write_bytes(kept)  # the cause fixed: a re-run finishes
    assert run_copy(source, url).returncode == 0
    shutil.rmtree(back)
    copy(url, back)
    assert len(raw_lines(back / f"{names[1]}.jsonl")) == len(good_lines)


def test_copy_from_a_directory_without_sessions_names_those_below_it(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    shutil.copytree(FIXTURE_DIRS[0], parent / "data")
    result = run_copy(parent, tmp_path / "to")
    assert result.returncode == 1
    assert "holds no session files" in result.stderr
    assert str(parent / "data") in result.stderr


def test_copy_from_a_directory_a_server_is_writing_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    from agentlog.server import JsonlSessionRepository

    with JsonlSessionRepository(source) as serving:
        serving.append(AppendEvent(session_id="s", event=delta("s", "x")))
        result = run_copy(source, tmp_path / "to")
    assert result.returncode == 1
    assert "in use by another agentlog process" in result.stderr


def test_an_interrupted_copy_says_what_it_copied_and_that_a_rerun_finishes(
    tmp_path: Path, url: str
) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for n in range(40):
        session = f"s{n:03d}"
        (source / f"{session}.jsonl").write_bytes(
            b"".join(
                arcan_line(session, {"part_type": "run_errored", "error": "e" * 500})
                for _ in range(3000)
            )
        )
    process = subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", "copy", str(source), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupted once it has copied something, well before it could be done.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error), psycopg.connect(url) as conn:
            found = conn.execute("SELECT count(*) FROM agentlog_events").fetchone()
            if found is not None and found[0] > 0:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted; copied" in err
    assert "Run the same copy again" in err
    copied = int(err.split("copied ")[1].split(" record")[0].replace(",", ""))
    with psycopg.connect(url) as conn:
        stored = conn.execute("SELECT count(*) FROM agentlog_events").fetchone()
    assert stored is not None
    assert copied == stored[0]  # the count said is what the destination holds
    assert copy(source, url)


def test_serve_read_only_answers_reads_refuses_appends_and_writes_nothing(
    tmp_path: Path,
) -> None:
    source = tmp_path / "source"
    shutil.copytree(FIXTURE_DIRS[0], source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    from agentlog.server import JsonlSessionRepository

    with (
        JsonlSessionRepository(source, read_only=True) as store,
        running_server(store) as target,
        AgentlogClient(target) as client,
    ):
        names = [s.session_id for s in client.list_sessions(page_size=1000).sessions]
        assert names
        assert client.load_session(names[0])
        with pytest.raises(FailedPreconditionError) as refused:
            client.append(AppendEvent(session_id=names[0], event=delta("x", "x")))
        assert refused.value.reason == "READ_ONLY"
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
