"""arcan's layouts both ways, held to a reader written from arcan-format.md
(`tests/arcan_reader.py`, no agentlog code): newest arcan's branch directory served
exactly, what agentlog writes in either layout read by that layout's rules, and
`agentlog copy` between the layouts keeping every record."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import AgentlogClient, AppendEvent, EventRecord, NewEvent
from agentlog.server import JsonlSessionRepository
from tests import arcan_reader
from tests.arcan_reader import BRANCHES, SEED, event_as_json, identical, with_defaults
from tests.contract import delta, started
from tests.samples import every_event
from tests.servers import running_server

SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
NEWEST = SHARED / "arcan-newest" / "branches"
SEED_DIRS = [SHARED / "arcan-jsonl" / "seed-era", SHARED / "arcan-jsonl" / "latest-variants"]
BRANCH_FIELDS = ["id", "session_id", "branch_id", "sequence", "parent_id", "timestamp", "event"]
SEED_FIELDS = ["id", "session_id", "parent_id", "timestamp", "event", "sequence"]


def test_the_newest_fixture_is_there() -> None:
    # CI clones main with ../shared beside it; without the fixture nothing below runs.
    assert len(list(NEWEST.glob("*.jsonl"))) >= 18, NEWEST
    assert all(path.is_dir() for path in SEED_DIRS)


def assert_served_as(record: EventRecord, line: dict[str, Any], sequence: int) -> None:
    """A record as served is the line arcan wrote, field by field."""
    assert record.id == line["id"]
    assert record.session_id == line["session_id"]
    assert record.branch_id == line.get("branch_id", "main")
    assert record.sequence == line.get("sequence", sequence) == sequence
    assert record.parent_id == line["parent_id"]
    assert record.timestamp_ns == arcan_reader.parse_timestamp(line["timestamp"])
    assert identical(event_as_json(record.event), with_defaults(line["event"])), line


@pytest.fixture
def newest(tmp_path: Path) -> Iterator[tuple[Path, AgentlogClient, JsonlSessionRepository]]:
    data = tmp_path / "newest"
    shutil.copytree(NEWEST, data)
    store = JsonlSessionRepository(data)
    with running_server(store) as target, AgentlogClient(target) as client:
        yield data, client, store


def test_newest_arcans_directory_is_served_exactly(
    newest: tuple[Path, AgentlogClient, JsonlSessionRepository],
) -> None:
    data, client, store = newest
    before = {p.name: p.read_bytes() for p in data.glob("*.jsonl")}
    expected = arcan_reader.read_dir(data, BRANCHES)
    assert store.layout == "branches"
    assert ("arcan-newest-x__y", "main") in expected  # named by its lines, not its file name
    for (session, branch), lines in expected.items():
        records = client.load_session(session, branch_id=branch)
        assert len(records) == len(lines)
        for sequence, (record, line) in enumerate(zip(records, lines, strict=True), 1):
            assert_served_as(record, line, sequence)
        head = client.head(session, branch)
        assert head is not None
        assert_served_as(head, lines[-1], len(lines))
    listed = {
        info.session_id: {b.branch_id: b.event_count for b in info.branches}
        for info in client.list_sessions(page_size=1000).sessions
    }
    wanted: dict[str, dict[str, int]] = {}
    for (session, branch), lines in expected.items():
        wanted.setdefault(session, {})[branch] = len(lines)
    assert listed == wanted
    assert "arcan-newest-x" not in listed
    every_line = [line for lines in expected.values() for line in lines]
    for line in every_line:
        served = client.load_children(line["id"])
        children = arcan_reader.load_children(data, line["id"])
        order = sorted(
            children,
            key=lambda c: (c["session_id"].encode(), c["branch_id"].encode(), c["sequence"]),
        )
        assert [(c.id, c.branch_id) for c in served] == [(c["id"], c["branch_id"]) for c in order]
    # Serving never touches arcan's files.
    assert {p.name: p.read_bytes() for p in data.glob("*.jsonl")} == before


def test_appends_and_forks_in_newest_arcans_directory_keep_it_one_arcan_reads(
    newest: tuple[Path, AgentlogClient, JsonlSessionRepository],
) -> None:
    data, client, _ = newest
    fork_file = data / "arcan-newest-main-0__fork-1.jsonl"
    original = fork_file.read_bytes()
    session = "arcan-newest-main-0"
    head = client.head(session, "fork-1")
    assert head is not None
    appended = client.append(
        AppendEvent(
            session_id=session, event=delta(session, "more"), parent_id=head.id, branch_id="fork-1"
        )
    )
    assert appended.sequence == head.sequence + 1
    client.append_batch(
        session, [NewEvent(event=delta(session, str(i))) for i in range(3)], branch_id="new"
    )
    made = client.fork_session(session, 10, branch_id="fork-1", new_branch_id="again")
    assert made.event_count == 10
    assert fork_file.read_bytes().startswith(original)  # arcan's lines untouched
    everything = arcan_reader.read_dir(data, BRANCHES)
    assert everything[(session, "fork-1")][-1]["id"] == appended.id
    assert [r["sequence"] for r in everything[(session, "new")]] == [1, 2, 3]
    copies = everything[(session, "again")]
    sources = everything[(session, "fork-1")][:10]
    for copy, source in zip(copies, sources, strict=True):
        assert copy["id"] != source["id"]
        assert copy["timestamp"] == source["timestamp"]
        assert identical(copy["event"], source["event"])
    # Newest arcan's load_children reads every line of the directory: all still parse.
    for record in everything[(session, "fork-1")]:
        arcan_reader.load_children(data, record["id"])
    for path in data.glob("*.jsonl"):
        for line in path.read_bytes().split(b"\n")[:-1]:
            assert line.startswith(b'{"id":'), path


def test_what_agentlog_writes_in_the_branch_layout_is_what_newest_arcan_reads(
    tmp_path: Path,
) -> None:
    data = tmp_path / "branches"
    with (
        running_server(JsonlSessionRepository(data, layout="branches")) as target,
        AgentlogClient(target) as client,
    ):
        session, odd = "s-1", "a__b"
        first = client.append(AppendEvent(session_id=session, event=started(session)))
        for event in every_event(session):
            client.append(AppendEvent(session_id=session, event=event, parent_id=first.id))
        client.append_batch(
            session,
            [NewEvent(event=delta(session, str(i)), parent_id=first.id) for i in range(3)],
            branch_id="side",
        )
        client.append(AppendEvent(session_id=odd, event=started(odd)))
        client.fork_session(session, 4, new_branch_id="retry")
        client.fork_session(session, 2, branch_id="side", new_session_id="s-2")
        served = {
            (info.session_id, branch.branch_id): client.load_session(
                info.session_id, branch_id=branch.branch_id
            )
            for info in client.list_sessions().sessions
            for branch in info.branches
        }
    found = arcan_reader.read_dir(data, BRANCHES)
    assert (
        set(found)
        == set(served)
        == {
            ("s-1", "main"),
            ("s-1", "side"),
            ("s-1", "retry"),
            ("s-2", "main"),
            ("a__b", "main"),
        }
    )
    assert (data / "a__b__main.jsonl").is_file()
    for place, lines in found.items():
        for sequence, (record, line) in enumerate(zip(served[place], lines, strict=True), 1):
            assert_served_as(record, line, sequence)
            assert list(line)[:7] == BRANCH_FIELDS  # newest arcan's fields, in its order
    children = arcan_reader.load_children(data, first.id)
    assert len(children) == len(every_event(session)) + 3 + 2  # main, side, and retry's copies


def test_what_agentlog_writes_in_the_seed_layout_is_what_the_seed_reads(tmp_path: Path) -> None:
    data = tmp_path / "seed"
    with (
        running_server(JsonlSessionRepository(data, layout="seed")) as target,
        AgentlogClient(target) as client,
    ):
        session = "s"
        first = client.append(AppendEvent(session_id=session, event=started(session)))
        client.append_batch(
            session, [NewEvent(event=e, parent_id=first.id) for e in every_event(session)]
        )
        client.fork_session(session, 3, new_session_id="t")
        served = {s: client.load_session(s) for s in ("s", "t")}
    found = arcan_reader.read_dir(data, SEED)
    assert set(found) == {("s", "main"), ("t", "main")}
    for (session, _), lines in found.items():
        for sequence, (record, line) in enumerate(zip(served[session], lines, strict=True), 1):
            assert_served_as(record, line, sequence)
            assert list(line)[:6] == SEED_FIELDS
            assert "branch_id" not in line


def run_copy(source: Path, destination: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentlog.server", "copy", *extra, str(source), str(destination)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def same_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return len(a) == len(b) and all(
        x["id"] == y["id"]
        and x["parent_id"] == y["parent_id"]
        and arcan_reader.parse_timestamp(x["timestamp"])
        == arcan_reader.parse_timestamp(y["timestamp"])
        and identical(x["event"], y["event"])
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("source", SEED_DIRS, ids=lambda p: p.name)
def test_copy_from_the_seed_layout_to_the_branch_layout_and_back_keeps_every_record(
    tmp_path: Path, source: Path
) -> None:
    branches, seed = tmp_path / "branches", tmp_path / "seed"
    result = run_copy(source, branches, "--layout", "branches")
    assert result.returncode == 0, result.stderr
    original = arcan_reader.read_dir(source, SEED)
    copied = arcan_reader.read_dir(branches, BRANCHES)
    assert set(copied) == set(original)
    for place, lines in original.items():
        assert same_records(copied[place], lines), place
        assert [r["sequence"] for r in copied[place]] == list(range(1, len(lines) + 1))
    result = run_copy(branches, seed, "--layout", "seed")
    assert result.returncode == 0, result.stderr
    back = arcan_reader.read_dir(seed, SEED)
    assert set(back) == set(original)
    for place, lines in original.items():
        assert same_records(back[place], lines), place


def test_copy_of_newest_arcans_directory_into_the_seed_layout_names_what_it_cannot_hold(
    tmp_path: Path,
) -> None:
    seed, branches = tmp_path / "seed", tmp_path / "branches"
    result = run_copy(NEWEST, seed, "--layout", "seed")
    assert result.returncode == 1
    assert "BRANCHES_NEED_BRANCH_LAYOUT" in result.stderr
    assert "'arcan-newest-main-0' (branch 'fork-1')" in result.stderr
    assert "--layout branches" in result.stderr
    original = arcan_reader.read_dir(NEWEST, BRANCHES)
    copied = arcan_reader.read_dir(seed, SEED)
    assert set(copied) == {place for place in original if place[1] == "main"}
    for place, lines in copied.items():
        assert same_records(lines, original[place])
    result = run_copy(NEWEST, branches)
    assert result.returncode == 1  # no --layout: a new directory takes the seed layout
    shutil.rmtree(branches)
    result = run_copy(NEWEST, branches, "--layout", "branches")
    assert result.returncode == 0, result.stderr
    again = arcan_reader.read_dir(branches, BRANCHES)
    assert set(again) == set(original)
    for place, lines in original.items():
        assert same_records(again[place], lines)
