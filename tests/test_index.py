"""The JSONL store's index: it forgets no id, whatever it does to stay small and fast."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentlog import AlreadyExistsError, AppendEvent, NewEvent
from agentlog.server import JsonlSessionRepository
from agentlog.server.jsonl.index import StoreIndex
from agentlog.server.jsonl.keys import KeyFilter, Row, key_of
from tests.contract import delta, started


def wait_ready(index: StoreIndex) -> None:
    deadline = time.monotonic() + 30
    while not index._filter.ready or index._next_filter is not None:
        assert time.monotonic() < deadline, "the key filter was never filled"
        time.sleep(0.01)


def test_keys_of_uuids_and_of_other_ids_are_stable_and_positive() -> None:
    record_id = "0c7421a5-7c6f-4b3e-8517-6757d1e510f2"
    assert key_of(record_id) == int("0c7421a57c6fb3e", 16)
    assert key_of("not-a-uuid") == key_of("not-a-uuid") > 0
    assert key_of("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz") > 0  # UUID-shaped, not hex
    assert all(0 <= key_of(str(uuid.uuid4())) < 2**63 for _ in range(1000))


def test_the_filter_finds_every_id_while_it_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(KeyFilter, "MIN_CAPACITY", 128)
    index = StoreIndex(tmp_path)
    index.open_filter(0)
    index.filter_indexed()
    wait_ready(index)
    first_capacity = index._filter.capacity
    ids: list[str] = []
    for batch in range(40):
        new = [str(uuid.uuid4()) for _ in range(50)]
        # Each row a 100-byte line, after the ones before it.
        rows: list[Row] = [
            (i, None, len(ids) + n + 1, (len(ids) + n) * 100, key_of(i)) for n, i in enumerate(new)
        ]
        index.record("s", rows, inode=1, size=rows[-1][3] + 100, last=rows[-1][3])
        ids += [row[0] for row in rows]
        if batch % 3 == 0:
            index.flush()  # some on disk, some still in memory
        for record_id in ids[-60:]:  # and while a larger filter is being filled
            assert record_id in index.holders([record_id]), "an id the index holds was missed"
    wait_ready(index)
    assert index._filter.capacity > first_capacity * 8
    missing = [record_id for record_id in ids if record_id not in index.holders([record_id])]
    assert missing == []
    strangers = [str(uuid.uuid4()) for _ in range(2000)]
    false_positives = sum(index._filter.might_hold(key_of(s)) for s in strangers)
    assert false_positives < 100  # about 1% at capacity
    index.close()


def test_ids_of_an_earlier_run_are_known_once_the_filter_is_filled(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as repo:
        first = AppendEvent(session_id="a", event=started("a"), id=str(uuid.uuid4()))
        stored = repo.append(first)
        repo.append_batch("b", [NewEvent(event=delta("b", str(i))) for i in range(200)])
        taken = repo.load_session("b")[-1].id
    with JsonlSessionRepository(tmp_path) as repo:
        wait_ready(repo._index)
        assert repo.append(first) == stored  # a retry: the record as stored
        with pytest.raises(AlreadyExistsError, match="already used by session 'b'"):
            repo.append(AppendEvent(session_id="a", event=delta("a", "x"), id=taken))
        assert [r.sequence for r in repo.load_session("a")] == [1]


def test_a_clean_close_keeps_the_filter_and_a_crash_does_not(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as repo:
        assert repo._index._filter.ready  # built while the (empty) directory was indexed
        first = repo.append(AppendEvent(session_id="a", event=started("a")))
    assert (tmp_path / ".agentlog.keys").exists()
    with JsonlSessionRepository(tmp_path) as repo:
        assert repo._index._filter.ready  # loaded, not refilled
        assert not (tmp_path / ".agentlog.keys").exists()  # good for one open only
        assert repo._index._filter.might_hold(key_of(first.id))
    # A process that dies without closing leaves nothing to load.
    crash = (
        "import os, sys; from agentlog import AppendEvent; "
        "from agentlog.server import JsonlSessionRepository; from tests.contract import delta; "
        f"repo = JsonlSessionRepository({str(tmp_path)!r}); "
        "print(repo.append(AppendEvent(session_id='a', event=delta('a', 'x'))).id, flush=True); "
        "os._exit(0)"
    )
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, check=True)
    second_id = done.stdout.strip()
    assert not (tmp_path / ".agentlog.keys").exists()
    with JsonlSessionRepository(tmp_path) as repo:
        wait_ready(repo._index)  # filled from the index again
        for record_id in (first.id, second_id):
            assert repo._index._filter.might_hold(key_of(record_id))
        with pytest.raises(AlreadyExistsError):
            repo.append(AppendEvent(session_id="b", event=started("b"), id=second_id))


def test_the_write_ahead_log_stays_bounded_while_serving_and_is_cut_back_when_quiet(
    tmp_path: Path,
) -> None:
    from agentlog.server.jsonl.index import FLUSH_SECONDS, INDEX_FILE
    from agentlog.server.jsonl.index_tables import WAL_LIMIT_BYTES

    repository = JsonlSessionRepository(tmp_path, sync="never")
    wal = tmp_path / f"{INDEX_FILE}-wal"
    peak = 0
    try:
        for batch in range(400):  # 40,000 events: several times the checkpoint interval
            session = f"w{batch % 40}"
            repository.append_batch(
                session, [NewEvent(event=delta(session, str(n))) for n in range(100)]
            )
            if wal.exists():
                peak = max(peak, wal.stat().st_size)
        deadline = time.monotonic() + 10
        while wal.stat().st_size > 0:  # quiet: checkpointed and truncated
            assert time.monotonic() < deadline, f"the log stayed {wal.stat().st_size:,} bytes"
            time.sleep(FLUSH_SECONDS)
        main = (tmp_path / INDEX_FILE).stat().st_size
    finally:
        repository.close()
    assert peak <= 2 * WAL_LIMIT_BYTES, f"the log reached {peak:,} bytes"
    assert main > 400_000  # the rows are in the main file, not only in the log
