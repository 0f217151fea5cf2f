"""A retried append is stored once, whatever another thread is doing meanwhile.

An appended id passes through states: staged (decided, its lines written),
acknowledged (visible, its rows pending in the index), being flushed, on disk
in the index; and the index may meanwhile re-read a file (a catch-up), forget a
vanished one, or be rebuilt, and the store may evict the session's state or be
reopened. Each test holds a thread at one such point (`_pauses.hold`), acts
from another, then retries: the retry must be answered with the stored record
and nothing stored twice, on every sync policy.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentlog import AppendEvent, DataLossError, NewEvent
from agentlog.server import JsonlSessionRepository
from agentlog.server._pauses import hold
from tests.contract import delta, records_only

T = TypeVar("T")
SYNCS = ["always", "interval", "never"]


class Background:
    """A call running on a thread of its own: its answer, or the exception it raised."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self._answer: list[Any] = []
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                self._answer.append(call())
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float = 20) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the call did not finish"
        if self._error:
            raise self._error[0]
        return self._answer[0]

    def done(self) -> bool:
        return not self._thread.is_alive()


@pytest.fixture(params=SYNCS)
def repo(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JsonlSessionRepository]:
    with JsonlSessionRepository(tmp_path / "data", sync=request.param, sync_interval_ms=20) as r:
        yield r


def event(session: str, text: str, record_id: str | None = None) -> AppendEvent:
    return AppendEvent(session_id=session, event=delta(session, text), id=record_id or new_id())


def new_id() -> str:
    return str(uuid.uuid4())


def assert_stored_once(repo: JsonlSessionRepository, session: str, count: int) -> None:
    records = repo.load_session(session)
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == count, f"stored twice: {ids}"
    assert [r.sequence for r in records] == list(range(1, count + 1))
    assert len(records_only(repo.read_all(1))) >= count


def test_an_append_while_a_read_finds_its_new_session_missing_is_still_known(
    repo: JsonlSessionRepository,
) -> None:
    # A read of a session that does not exist yet looks at its file (missing) and is
    # held there; an append creates the session meanwhile. What the read then does
    # with "missing" must not make the index forget the append.
    with hold("index.catch_up.looked") as pause:
        reader = Background(lambda: repo.head("s"))
        pause.wait()
        first = repo.append(event("s", "first"))
    reader.result()
    repo._index.flush()
    retried = repo.append(event("s", "first", first.id))
    assert retried == first
    assert_stored_once(repo, "s", 1)


def test_a_file_indexed_while_appends_land_keeps_the_newer_appends(
    repo: JsonlSessionRepository, tmp_path: Path
) -> None:
    # The index reads a new session's file while its first append is written but not
    # yet acknowledged, and is held before committing what it read; two appends are
    # acknowledged meanwhile. Committing the older view must not hide the newer rows.
    path = tmp_path / "data" / "s.jsonl"
    with hold("commit.written") as written:
        writer = Background(lambda: repo.append(event("s", "first")))
        written.wait()
        with hold("index.catch_up.scanned") as scanned:
            indexer = Background(lambda: repo._index.catch_up("s", path))
            scanned.wait()
            written.release()
            first = writer.result()
            second = repo.append(event("s", "second"))
    indexer.result()
    repo._index.flush()
    assert repo.append(event("s", "second", second.id)) == second
    assert repo.append(event("s", "first", first.id)) == first
    assert_stored_once(repo, "s", 2)


def test_a_retry_while_the_index_is_rebuilt_waits_for_it(
    repo: JsonlSessionRepository,
) -> None:
    # The index is found damaged while serving and rebuilt from the files; a retry
    # decided while the rebuild has wiped the old index and not yet read the files
    # would look new.
    first = repo.append(event("s", "first"))
    for i in range(20):
        repo.append(event(f"other-{i}", "x"))
    repo._index.flush()
    with hold("index.rebuild.wiped") as wiped:
        rebuild = Background(
            lambda: repo._index._rebuild(sqlite3.DatabaseError("database disk image is malformed"))
        )
        wiped.wait()
        retry = Background(lambda: repo.append(event("s", "first", first.id)))
        retry._thread.join(0.3)  # it waits for the rebuild (or, wrongly, stores again)
    rebuild.result()
    assert retry.result() == first
    assert_stored_once(repo, "s", 1)


def test_an_append_during_a_rebuild_is_known_once_it_is_done(
    repo: JsonlSessionRepository,
) -> None:
    # Appends acknowledged while a rebuild re-reads the files record their rows in an
    # index that does not yet know the file's earlier records.
    older = [repo.append(event("s", str(i))) for i in range(5)]
    repo._index.flush()
    with hold("index.rebuild.wiped") as wiped:
        rebuild = Background(
            lambda: repo._index._rebuild(sqlite3.DatabaseError("database disk image is malformed"))
        )
        wiped.wait()
        newer = Background(lambda: repo.append(event("s", "newer")))
        newer._thread.join(0.3)
    rebuild.result()
    latest = newer.result()
    repo._index.flush()
    texts = [*(str(i) for i in range(5)), "newer"]
    for record, text in zip([*older, latest], texts, strict=True):
        assert repo.append(event("s", text, record.id)) == record
    assert_stored_once(repo, "s", 6)


def test_a_retry_while_its_rows_are_being_flushed_is_known(
    repo: JsonlSessionRepository,
) -> None:
    first = repo.append(event("s", "first"))
    with hold("index.flush.taken") as taken:
        flusher = Background(repo._index.flush)
        taken.wait()
        assert repo.append(event("s", "first", first.id)) == first
    flusher.result()
    assert repo.append(event("s", "first", first.id)) == first
    assert_stored_once(repo, "s", 1)


@pytest.mark.parametrize("sync", ["interval", "never"])
def test_a_retry_before_the_first_attempt_is_answered_gets_the_same_record(
    tmp_path: Path, sync: str
) -> None:
    # Acknowledged (visible, indexed), its caller not yet answered: a client that gave
    # up waiting retries now. (Under "always", the sync thread answers, and the retry
    # needs the next sync: holding that thread here would hold the retry too; the
    # server's own path, acknowledging on its event loop, is the same code.)
    repo = JsonlSessionRepository(tmp_path / "data", sync=sync)
    repeat = event("s", "first")
    with hold("commit.acknowledged") as acknowledged:
        first = Background(lambda: repo.append(repeat))
        acknowledged.wait()
        retried = repo.append(repeat)
    assert first.result() == retried
    assert_stored_once(repo, "s", 1)
    repo.close()


def test_a_retry_while_the_first_attempt_is_staged_waits_for_it(
    repo: JsonlSessionRepository,
) -> None:
    repeat = event("s", "first")
    with hold("commit.written") as written:
        first = Background(lambda: repo.append(repeat))
        written.wait()
        retry = Background(lambda: repo.append(repeat))
        retry._thread.join(0.2)
        assert not retry.done()  # it cannot be answered before the first attempt is
    assert first.result() == retry.result()
    assert_stored_once(repo, "s", 1)


def test_a_retry_after_the_sessions_state_was_evicted_is_known(
    repo: JsonlSessionRepository,
) -> None:
    repo.max_cached_sessions = 1
    first = repo.append(event("s", "first"))
    repo.append(event("t", "evicts s"))
    assert "s" not in repo._states
    assert repo.append(event("s", "first", first.id)) == first
    repo._index.flush()
    repo.append(event("u", "evicts s"))
    assert repo.append(event("s", "first", first.id)) == first
    assert_stored_once(repo, "s", 1)


@pytest.mark.parametrize("sync", SYNCS)
def test_a_retry_after_a_reopen_is_known_even_if_the_index_was_not_flushed(
    tmp_path: Path, sync: str
) -> None:
    data = tmp_path / "data"
    repo = JsonlSessionRepository(data, sync=sync)
    first = repo.append(event("s", "first"))
    batch = repo.append_batch(
        "s", [NewEvent(event=delta("s", str(i)), id=new_id()) for i in range(3)]
    )
    # As after a crash: the index's rows never reached its file (the session files did).
    repo._index._stop.set()
    repo._index._flusher.join()
    with repo._index._lock:
        repo._index._pending.clear()
    os.close(repo._directory_lock)
    repo._directory_lock = -1
    reopened = JsonlSessionRepository(data, sync=sync)
    try:
        assert reopened.append(event("s", "first", first.id)) == first
        again = reopened.append_batch("s", [NewEvent(event=r.event, id=r.id) for r in batch])
        assert again == batch
        assert_stored_once(reopened, "s", 4)
    finally:
        reopened.close()


def test_lines_cut_back_after_a_failed_sync_leave_no_index_behind_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The index read an append's lines before they were durable; the sync failed and
    # the lines were cut back off. The index must not then claim the file was longer
    # (which would seal the session as cut behind agentlog's back).
    from agentlog.server.jsonl import durability

    data = tmp_path / "data"
    repo = JsonlSessionRepository(data, use_syncfs=False)
    kept = repo.append(event("s", "kept"))
    with hold("commit.written") as written:
        lost = Background(lambda: repo.append(event("s", "lost")))
        written.wait()
        repo._index.catch_up("s", data / "s.jsonl")

        def failing_fsync(path: Path) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(durability, "_fsync_existing", failing_fsync)
    with pytest.raises(Exception, match="restart"):
        lost.result()
    monkeypatch.undo()
    repo.close()
    with JsonlSessionRepository(data) as reopened:
        assert reopened.load_session("s") == [kept]
        assert reopened.append(event("s", "next")).sequence == 2


def test_a_retry_of_a_session_whose_file_vanished_is_refused_not_stored_again(
    repo: JsonlSessionRepository, tmp_path: Path
) -> None:
    first = repo.append(event("s", "first"))
    repo._index.flush()
    (tmp_path / "data" / "s.jsonl").unlink()
    with pytest.raises(DataLossError) as lost:
        repo.append(event("s", "first", first.id))
    assert lost.value.reason == "FILE_SHRANK"
    with pytest.raises(DataLossError):
        repo.append(AppendEvent(session_id="s", event=delta("s", "new"), expected_sequence=0))
    with pytest.raises(DataLossError):
        repo.load_session("s")
    assert not (tmp_path / "data" / "s.jsonl").exists()
