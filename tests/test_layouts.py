"""A JSONL directory's one layout: detected from its files, chosen for a new one,
refused when mixed or asked otherwise, and the seed layout's one branch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agentlog import (
    AppendEvent,
    FailedPreconditionError,
    ForkedFrom,
)
from agentlog.server import JsonlSessionRepository
from tests.contract import delta, started


def line(session: str, sequence: int, branch: str | None = None) -> str:
    record: dict[str, object] = {"id": f"00000000-0000-4000-8000-{sequence:012d}"}
    record["session_id"] = session
    if branch is not None:
        record |= {"branch_id": branch, "sequence": sequence}
    record |= {
        "parent_id": None,
        "timestamp": "2026-12-07T06:45:42.664815837Z",
        "event": {"part_type": "run_errored", "run_id": "r", "session_id": session, "error": "e"},
    }
    return json.dumps(record) + "\n"


def test_a_new_directory_takes_the_seed_layout_unless_asked(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path / "a") as store:
        assert store.layout == "seed"
    with JsonlSessionRepository(tmp_path / "b", layout="branches") as store:
        assert store.layout == "branches"
    # Without files to say, the directory's layout file does.
    assert (tmp_path / "b" / ".agentlog.layout").read_text() == "branches\n"
    with JsonlSessionRepository(tmp_path / "b") as store:
        assert store.layout == "branches"


def test_the_layout_is_read_from_the_files(tmp_path: Path) -> None:
    (tmp_path / "s__main.jsonl").write_text(line("s", 1, "main"))
    with JsonlSessionRepository(tmp_path) as store:
        assert store.layout == "branches"
        assert [r.id for r in store.load_session("s")] == ["00000000-0000-4000-8000-000000000001"]


def test_a_directory_with_both_layouts_is_refused_naming_a_file_of_each(tmp_path: Path) -> None:
    (tmp_path / "old.jsonl").write_text(line("old", 1))
    (tmp_path / "new__main.jsonl").write_text(line("new", 1, "main"))
    with pytest.raises(FailedPreconditionError) as caught:
        JsonlSessionRepository(tmp_path)
    assert caught.value.reason == "MIXED_LAYOUTS"
    assert "old.jsonl" in caught.value.message
    assert "new__main.jsonl" in caught.value.message
    served = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0"],
        env={"AGENTLOG_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert served.returncode == 1
    assert "both arcan layouts" in served.stderr


def test_a_layout_other_than_the_directorys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text(line("s", 1))
    with pytest.raises(FailedPreconditionError) as caught:
        JsonlSessionRepository(tmp_path, layout="branches")
    assert caught.value.reason == "LAYOUT_MISMATCH"
    assert "agentlog copy --layout branches" in caught.value.message


def test_the_seed_layout_holds_the_one_branch_main_and_says_how_to_get_more(
    tmp_path: Path,
) -> None:
    with JsonlSessionRepository(tmp_path) as store:
        store.append(AppendEvent(session_id="s", event=started("s")))
        with pytest.raises(FailedPreconditionError) as caught:
            store.append(AppendEvent(session_id="s", event=started("s"), branch_id="alt"))
        assert caught.value.reason == "BRANCHES_NEED_BRANCH_LAYOUT"
        assert "agentlog copy --layout branches" in caught.value.message
        with pytest.raises(FailedPreconditionError):
            store.fork_session("s", 1, new_branch_id="alt")
        made = store.fork_session("s", 1, new_session_id="t")  # a new session: its main
        assert made.forked_from == ForkedFrom("s", "main", 1)
        assert store.load_session("s", branch_id="alt") == []
        assert store.head("s", "alt") is None
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["s.jsonl", "t.jsonl"]


def test_names_come_from_the_lines_not_the_file_name(tmp_path: Path) -> None:
    # arcan may name a branch with "__" (agentlog does not): the file a__b__c.jsonl then
    # holds session "a", branch "b__c", which the split at the last "__" would miss.
    (tmp_path / "a__b__c.jsonl").write_text(line("a", 1, "b__c"))
    with JsonlSessionRepository(tmp_path) as store:
        assert len(store.load_session("a", branch_id="b__c")) == 1
        assert store.load_session("a__b", branch_id="c") == []
        [info] = store.list_sessions().sessions
        assert (info.session_id, [b.branch_id for b in info.branches]) == ("a", ["b__c"])
        with pytest.raises(FailedPreconditionError) as caught:
            store.append(AppendEvent(session_id="a__b", event=started("a__b"), branch_id="c"))
        assert caught.value.reason == "FILE_NAME_TAKEN"


def test_a_file_without_records_is_named_by_its_last_double_underscore(tmp_path: Path) -> None:
    (tmp_path / "x__y__main.jsonl").write_text("")
    with JsonlSessionRepository(tmp_path, layout="branches") as store:
        assert store.list_sessions().sessions == []  # an empty file is no session
        record = store.append(AppendEvent(session_id="x__y", event=delta("x__y", "1")))
        assert record.sequence == 1
    assert (tmp_path / "x__y__main.jsonl").read_text().count("\n") == 1
