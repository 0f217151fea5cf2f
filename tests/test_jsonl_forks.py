"""Forks in the JSONL store: parents re-pointed exactly however far back (or ahead)
they point, a fork's copy never left half made, and a damaged source refused."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agentlog import AppendEvent, DataLossError, EventRecord
from agentlog.server import JsonlSessionRepository
from agentlog.server.jsonl import _fork
from tests.contract import delta


def test_parents_are_repointed_exactly_however_far_back_or_ahead_they_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Few ids kept at hand and large records (few a block): most parents are looked up
    # in the index and confirmed by reading their lines.
    monkeypatch.setattr(_fork, "RECENT_IDS", 2)
    ahead = str(uuid.uuid4())  # a parent appended later than its child
    with JsonlSessionRepository(tmp_path, layout="branches") as store:
        outside = store.append(AppendEvent(session_id="other", event=delta("other", "o")))
        records: list[EventRecord] = []
        for i in range(40):
            if i == 0:
                parent = None
            elif i == 5:
                parent = ahead
            elif i % 7 == 0:
                parent = outside.id
            else:
                parent = records[i // 3].id  # far back
            records.append(
                store.append(
                    AppendEvent(
                        session_id="s",
                        event=delta("s", f"{i} " + "x" * 300_000),
                        parent_id=parent,
                        id=ahead if i == 30 else None,
                    )
                )
            )
        for up_to in (40, 20):
            branch = f"f{up_to}"
            store.fork_session("s", up_to, new_branch_id=branch)
            copies = store.load_session("s", branch_id=branch)
            position = {r.id: k for k, r in enumerate(records)}
            for copy, original in zip(copies, records, strict=False):
                parent = original.parent_id
                if parent is not None and position.get(parent, up_to) < up_to:
                    assert copy.parent_id == copies[position[parent]].id, original.sequence
                else:
                    assert copy.parent_id == parent, original.sequence
            assert (copies[5].parent_id == ahead) == (up_to <= 30)


def test_a_fork_cut_short_leaves_nothing_and_its_copy_is_removed_at_the_next_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JsonlSessionRepository(tmp_path, layout="branches") as store:
        for i in range(5):
            store.append(AppendEvent(session_id="s", event=delta("s", str(i))))

        def crash(*_: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(_fork.Forks, "_link", crash)
        with pytest.raises(OSError, match="No space left"):
            store.fork_session("s", 3, new_branch_id="f")
        monkeypatch.undo()
        assert store.load_session("s", branch_id="f") == []
        assert store.head("s", "f") is None
    assert not (tmp_path / "s__f.jsonl").exists()
    leftover = tmp_path / _fork.FORKS_DIR / "0123.partial"
    leftover.write_bytes(b'{"id":')  # what a kill mid-copy leaves
    with JsonlSessionRepository(tmp_path) as store:
        assert not leftover.exists()
        assert [b.branch_id for b in store.list_sessions().sessions[0].branches] == ["main"]
        made = store.fork_session("s", 3, new_branch_id="f")
        assert made.event_count == 3


def test_a_fork_of_a_damaged_source_is_refused_naming_the_line(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path, layout="branches") as store:
        for i in range(3):
            store.append(AppendEvent(session_id="s", event=delta("s", str(i))))
    path = tmp_path / "s__main.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"sequence":2', b'"sequence":"2"')
    path.write_bytes(b"\n".join(lines))
    with JsonlSessionRepository(tmp_path) as store:
        with pytest.raises(DataLossError) as caught:
            store.fork_session("s", 3, new_branch_id="f")
        assert "line 2" in caught.value.message
        assert store.load_session("s", branch_id="f") == []
