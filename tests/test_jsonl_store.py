"""The JSONL store's promises about files: corruption is reported, never spread, never written."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentlog import (
    AgentlogClient,
    AlreadyExistsError,
    AppendEvent,
    DataLossError,
    FailedPreconditionError,
    NewEvent,
    TextDelta,
    UnavailableError,
    WrongExpectedSequence,
)
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server.jsonl import durability as _durability
from tests.contract import delta, records_only, started
from tests.servers import running_server


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def client(data: Path) -> Iterator[AgentlogClient]:
    with running_server(JsonlSessionRepository(data)) as target, AgentlogClient(target) as client:
        yield client


def write_session(client: AgentlogClient, session: str, count: int) -> None:
    for i in range(count):
        client.append(AppendEvent(session_id=session, event=delta(session, f"t{i}")))


def test_a_line_that_does_not_parse_fails_only_its_session(
    client: AgentlogClient, data: Path
) -> None:
    write_session(client, "good", 2)
    write_session(client, "bad", 3)
    path = data / "bad.jsonl"
    lines = path.read_bytes().split(b"\n")
    # Damaged in place, the file's length kept (a shorter file is one cut short).
    lines[1] = b'{"id": "broken", this is not json'.ljust(len(lines[1]))
    path.write_bytes(b"\n".join(lines))
    before = path.read_bytes()

    with pytest.raises(DataLossError) as caught:
        client.load_session("bad")
    assert str(path) in caught.value.message
    assert "line 2" in caught.value.message
    assert caught.value.reason == "CORRUPT_LINE"
    assert caught.value.metadata["file"] == str(path)
    assert caught.value.metadata["line"] == "2"
    assert len(client.load_session("good")) == 2  # other sessions keep working
    assert path.read_bytes() == before  # a read never modifies the file


def test_a_line_of_the_wrong_shape_is_data_loss(client: AgentlogClient, data: Path) -> None:
    write_session(client, "shape", 1)
    path = data / "shape.jsonl"
    record = json.loads(path.read_text())
    record["event"]["part_type"] = "telepathy"
    record["sequence"] = 2
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(DataLossError, match=r"line 2 \(record 2.*unknown event kind 'telepathy'"):
        client.load_session("shape")


def test_a_torn_last_line_refuses_appends_and_keeps_the_bytes(
    client: AgentlogClient, data: Path
) -> None:
    write_session(client, "torn", 2)
    path = data / "torn.jsonl"
    with path.open("ab") as file:
        file.write(b'{"id":"half-written","session_id":"to')
    before = path.read_bytes()
    with pytest.raises(DataLossError, match="line 3"):
        client.load_session("torn")
    with pytest.raises(DataLossError, match="byte offset"):
        client.head("torn")
    with pytest.raises(DataLossError, match="incomplete last line") as caught:
        client.append(AppendEvent(session_id="torn", event=started("torn")))
    assert caught.value.reason == "TORN_LAST_LINE"
    assert path.read_bytes() == before


def test_blank_lines_are_skipped(client: AgentlogClient, data: Path) -> None:
    write_session(client, "blank", 1)
    path = data / "blank.jsonl"
    path.write_bytes(b"\n" + path.read_bytes() + b"\n  \n")
    write_session(client, "blank", 1)
    assert [r.event for r in client.load_session("blank")] == [
        delta("blank", "t0"),
        delta("blank", "t0"),
    ]
    head = client.head("blank")
    assert head is not None


def test_many_writers_on_one_session_lose_nothing_and_never_interleave(
    client: AgentlogClient, data: Path
) -> None:
    writers, per_writer = 32, 25
    acknowledged: list[list[str]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers)

    def write(n: int) -> None:
        try:
            barrier.wait()
            for i in range(per_writer):
                event = TextDelta(run_id=f"w{n}", session_id="busy", iteration=i, delta="x" * 500)
                acknowledged[n].append(
                    client.append(AppendEvent(session_id="busy", event=event)).id
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    raw = (data / "busy.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == writers * per_writer
    parsed = [json.loads(line) for line in lines]  # every line whole
    assert sorted(p["id"] for p in parsed) == sorted(i for ids in acknowledged for i in ids)
    records = client.load_session("busy")
    for n in range(writers):
        mine = [r for r in records if r.event.run_id == f"w{n}"]
        assert [r.id for r in mine] == acknowledged[n]  # each writer's order kept


def test_no_session_id_writes_outside_the_root(tmp_path: Path) -> None:
    data = tmp_path / "inner" / "data"
    repo = JsonlSessionRepository(data)
    for bad in ["../escape", "../../escape", "/tmp/abs", "a/../../b", "..", "."]:
        with pytest.raises(ValueError, match="not a valid session id"):
            repo.append(AppendEvent(session_id=bad, event=started("s")))
    repo.append(AppendEvent(session_id="ok", event=started("ok")))
    everything = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    outside = [p for p in everything if not p.startswith("inner/data/")]
    assert outside == ["inner", "inner/data"]
    assert sorted(p.name for p in data.glob("*.jsonl")) == ["ok.jsonl"]
    # Everything else there is the store's own, dot-named, never a session.
    assert all(p.name.startswith(".") for p in data.iterdir() if p.name != "ok.jsonl")


def test_files_that_are_not_sessions_are_ignored(data: Path) -> None:
    repo = JsonlSessionRepository(data)
    record = repo.append(AppendEvent(session_id="real", event=started("real")))
    (data / "notes.txt").write_text("not a session")
    (data / ".hidden.jsonl").write_text("garbage\n")  # a dot-file session, as arcan reads
    (data / "dir.jsonl").mkdir()
    assert repo.session_ids() == [".hidden", "real"]
    assert repo.load_children(str(uuid.uuid4())) == []
    child = repo.append(AppendEvent(session_id="real", parent_id=record.id, event=started("real")))
    assert repo.load_children(record.id) == [child]


def test_an_unusable_data_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(Exception, match=r"cannot use .* as the data directory"):
        JsonlSessionRepository(blocker / "data")


def test_a_batch_cut_short_is_never_served_in_part(
    client: AgentlogClient, data: Path, tmp_path: Path
) -> None:
    with JsonlSessionRepository(tmp_path / "elsewhere") as elsewhere:
        elsewhere.append(AppendEvent(session_id="cut", event=started("cut")))
        elsewhere.append_batch("cut", [NewEvent(event=delta("cut", str(i))) for i in range(3)])
    lines = (tmp_path / "elsewhere" / "cut.jsonl").read_bytes().splitlines(keepends=True)
    assert [json.loads(line).get("batch_end") for line in lines] == [None, 4, 4, 4]
    path = data / "cut.jsonl"
    # Copied in behind the server's back: a crash after two of the batch's three lines.
    path.write_bytes(b"".join(lines[:3]))
    with pytest.raises(DataLossError, match="sequences 2 to 4 was cut short after sequence 3"):
        client.load_session("cut")
    with pytest.raises(DataLossError, match="cut short"):
        client.append(AppendEvent(session_id="cut", event=started("cut")))
    [info] = client.list_sessions().sessions  # the readable part: the record before the batch
    assert (info.event_count, info.head_id) == (1, json.loads(lines[0])["id"])
    path.write_bytes(lines[0])  # the operator removes the partial batch
    assert [r.sequence for r in client.load_session("cut")] == [1]
    single = client.append(AppendEvent(session_id="cut", event=started("cut")))
    assert single.sequence == 2
    assert "batch_end" not in path.read_text().splitlines()[-1]


def test_one_process_writes_a_data_directory_at_a_time(data: Path) -> None:
    first = JsonlSessionRepository(data)
    with pytest.raises(
        FailedPreconditionError, match=f"in use by another agentlog process \\(pid {os.getpid()}\\)"
    ) as caught:
        JsonlSessionRepository(data)
    assert caught.value.reason == "DATA_DIR_LOCKED"
    first.close()
    with JsonlSessionRepository(data) as second:  # released on close
        second.append(AppendEvent(session_id="s", event=started("s")))
    del second
    JsonlSessionRepository(data).close()  # and on exit from the with block


def feed_of(repo: JsonlSessionRepository, start: int = 1) -> list[tuple[int, str, int]]:
    return [
        (f.position, f.record.session_id, f.record.sequence)
        for f in records_only(repo.read_all(start))
    ]


def test_feed_positions_survive_a_restart(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="a", event=started("a")))
        repo.append_batch("b", [NewEvent(event=delta("b", str(i))) for i in range(2)])
        repo.append(AppendEvent(session_id="a", event=delta("a", "x")))
        before = feed_of(repo)
    assert before == [(1, "a", 1), (2, "b", 1), (3, "b", 2), (4, "a", 2)]
    with JsonlSessionRepository(data) as repo:
        assert feed_of(repo) == before
        assert feed_of(repo, 3) == before[2:]
        assert repo.last_position() == 4
        repo.append(AppendEvent(session_id="c", event=started("c")))
        assert feed_of(repo, 5) == [(5, "c", 1)]


def test_a_torn_feed_tail_is_cut_at_start(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with JsonlSessionRepository(data) as repo:
        for i in range(3):
            repo.append(AppendEvent(session_id="s", event=delta("s", str(i))))
    feed = data / ".agentlog.feed"
    whole = feed.read_bytes()
    feed.write_bytes(whole + b'{"position":4,"sess')  # a crash in the middle of a feed line
    with JsonlSessionRepository(data) as repo:
        assert "dropping 19 bytes" in caplog.text
        assert feed.read_bytes() == whole
        assert [p for p, _, _ in feed_of(repo)] == [1, 2, 3]


def test_a_retry_gives_a_feed_position_to_an_append_the_feed_missed(data: Path) -> None:
    record_id = str(uuid.uuid4())
    append = AppendEvent(session_id="s", event=delta("s", "late"), id=record_id)
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="s", event=started("s")))
        repo.append(append)
    feed = data / ".agentlog.feed"
    lines = feed.read_bytes().splitlines(keepends=True)
    feed.write_bytes(lines[0])  # crashed after the session line, before the feed line
    with JsonlSessionRepository(data) as repo:
        assert repo.append(append).sequence == 2  # the client's retry: stored once
        assert feed_of(repo) == [(1, "s", 1), (2, "s", 2)]
        assert [r.sequence for r in repo.load_session("s")] == [1, 2]


def test_a_new_session_the_feed_missed_joins_it_when_next_read(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="s", event=started("s")))
        repo.append(AppendEvent(session_id="new", event=started("new")))
    feed = data / ".agentlog.feed"
    feed.write_bytes(feed.read_bytes().splitlines(keepends=True)[0])
    (data / ".agentlog.clean").unlink()  # crashed before the feed line of `new`
    arcan_line = (data / "new.jsonl").read_text().replace(',"sequence":1', "")
    (data / "arcan.jsonl").write_text(arcan_line.replace('"new"', '"arcan"'))
    with JsonlSessionRepository(data) as repo:
        assert [r.sequence for r in repo.load_session("new")] == [1]
        assert [r.sequence for r in repo.load_session("arcan")] == [1]
        # agentlog started `new`, so it is in the feed; arcan's session is not.
        assert feed_of(repo) == [(1, "s", 1), (2, "new", 1)]


def test_a_torn_last_line_is_cut_at_open_and_kept_aside(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with JsonlSessionRepository(data) as repo:
        for i in range(3):
            repo.append(AppendEvent(session_id="s", event=delta("s", str(i))))
    path = data / "s.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id":"half","session_id":"s","parent')
    with JsonlSessionRepository(data) as repo:
        side = data / ".agentlog-recovered" / f"s.jsonl.{len(whole)}"
        assert repo.recovered == [side]
        assert side.read_bytes() == b'{"id":"half","session_id":"s","parent'
        assert path.read_bytes() == whole
        assert f"{path}: cut an incomplete last line at byte offset {len(whole)}" in caplog.text
        assert [r.sequence for r in repo.load_session("s")] == [1, 2, 3]
        assert repo.append(AppendEvent(session_id="s", event=started("s"))).sequence == 4


def test_a_batch_cut_short_is_cut_at_open(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="b", event=started("b")))
        repo.append_batch("b", [NewEvent(event=delta("b", str(i))) for i in range(4)])
    path = data / "b.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))  # two of the batch's four lines reached the disk
    (data / ".agentlog.clean").unlink()  # a crash leaves no mark of a clean close
    with JsonlSessionRepository(data) as repo:
        assert len(repo.recovered) == 1
        assert repo.recovered[0].read_bytes() == b"".join(lines[1:3])
        assert [r.sequence for r in repo.load_session("b")] == [1]
        # The feed named the whole batch (it was acknowledged, then lost with the disk):
        # those positions are dropped, never handed out again.
        new = repo.append(AppendEvent(session_id="b", event=started("b")))
        assert new.sequence == 2
        assert feed_of(repo) == [(1, "b", 1), (6, "b", 2)]


def test_the_children_index_follows_the_files(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        root = repo.append(AppendEvent(session_id="a", event=started("a")))
        kids = [
            repo.append(AppendEvent(session_id=s, parent_id=root.id, event=started(s)))
            for s in ("b", "a", "c")
        ]
        assert repo.load_children(root.id) == [kids[1], kids[0], kids[2]]
    # While agentlog is down, arcan appends a child to b and an operator removes c.
    line = json.loads((data / "b.jsonl").read_text())
    line.update(id=str(uuid.uuid4()), sequence=2)
    with (data / "b.jsonl").open("a") as file:
        file.write(json.dumps(line) + "\n")
    (data / "c.jsonl").unlink()
    with JsonlSessionRepository(data) as repo:
        children = repo.load_children(root.id)
        assert [(c.session_id, c.sequence) for c in children] == [("a", 2), ("b", 1), ("b", 2)]
        # And while it runs: a file changed behind its back is re-indexed when next read.
        line.update(id=str(uuid.uuid4()), sequence=3)
        with (data / "b.jsonl").open("a") as file:
            file.write(json.dumps(line) + "\n")
        assert len(repo.load_session("b")) == 3
        assert len(repo.load_children(root.id)) == 4
    (data / ".agentlog.index").unlink()  # derived data: rebuilt at the next open
    with JsonlSessionRepository(data) as repo:
        assert len(repo.load_children(root.id)) == 4


def test_a_clean_close_is_remembered_and_a_crash_is_not(data: Path) -> None:
    repo = JsonlSessionRepository(data)
    repo.append(AppendEvent(session_id="s", event=started("s")))
    assert not (data / ".agentlog.clean").exists()
    repo.close()
    assert (data / ".agentlog.clean").exists()
    with JsonlSessionRepository(data):
        assert not (data / ".agentlog.clean").exists()  # open until closed again


def test_session_states_are_evicted_and_rebuilt(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        repo.max_cached_sessions = 3
        for n in range(10):
            repo.append(AppendEvent(session_id=f"s{n}", event=started(f"s{n}")))
        assert len(repo._states) == 3
        for n in range(10):  # evicted ones are rebuilt from their files
            appended = repo.append(AppendEvent(session_id=f"s{n}", event=delta(f"s{n}", "x")))
            assert appended.sequence == 2
            assert [r.sequence for r in repo.load_session(f"s{n}")] == [1, 2]
        assert len(repo._states) == 3


def test_a_cold_head_reads_only_the_last_line(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        for i in range(5):
            repo.append(AppendEvent(session_id="h", event=delta("h", str(i))))
        expected = repo.load_session("h")[-1]
    with JsonlSessionRepository(data) as repo:
        assert repo.head("h") == expected
        assert "h" not in repo._states  # answered without loading the session
        assert repo.head("nobody") is None
    with JsonlSessionRepository(data) as repo:
        # Changed behind agentlog's back: the index no longer vouches, the full path answers.
        line = json.loads((data / "h.jsonl").read_text().splitlines()[-1])
        line.update(id=str(uuid.uuid4()), sequence=6)
        with (data / "h.jsonl").open("a") as file:
            file.write(json.dumps(line) + "\n")
        head = repo.head("h")
        assert head is not None
        assert (head.sequence, head.id) == (6, line["id"])
        assert "h" in repo._states


@pytest.mark.parametrize("backend", ["memory", "jsonl"])
def test_listeners_are_told_the_feed_positions(data: Path, backend: str) -> None:
    repo = MemorySessionRepository() if backend == "memory" else JsonlSessionRepository(data)
    told: list[tuple[str, list[int], int]] = []
    repo.add_listener(
        lambda p: told.append(
            (p.session_id, [r.sequence for r in p.records() or ()], p.first_position)
        )
    )
    repo.append(AppendEvent(session_id="x", event=started("x")))
    repo.append(AppendEvent(session_id="s", event=started("s")))
    repo.append_batch("s", [NewEvent(event=delta("s", str(i))) for i in range(2)])
    feed = {
        (f.record.session_id, f.record.sequence): f.position for f in records_only(repo.read_all(1))
    }
    assert feed == {("x", 1): 1, ("s", 1): 2, ("s", 2): 3, ("s", 3): 4}
    assert told == [("x", [1], 1), ("s", [1], 2), ("s", [2, 3], 3)]
    assert repo.last_position() == 4
    repo.close()


@pytest.mark.parametrize("backend", ["memory", "jsonl"])
def test_a_group_commit_decides_each_append_as_if_alone_and_in_order(
    data: Path, backend: str
) -> None:
    repo = MemorySessionRepository() if backend == "memory" else JsonlSessionRepository(data)
    repo.append(AppendEvent(session_id="b", event=started("b")))
    first = NewEvent(event=delta("a", "one"), id=str(uuid.uuid4()))
    taken = NewEvent(event=delta("a", "taken"), id=repo.head("b").id)  # type: ignore[union-attr]
    appends = [
        repo.prepare_batch("a", [first], None),
        repo.prepare_batch("b", [NewEvent(event=delta("b", "two"))], 1),
        repo.prepare_batch("a", [NewEvent(event=delta("a", "wrong"))], 0),  # a has 1 by now
        repo.prepare_batch("a", [first], None),  # a retry of the first: same record back
        repo.prepare_batch("c", [taken], None),  # b's id: refused
        repo.prepare_batch("a", [NewEvent(event=delta("a", f"{i}")) for i in range(3)], 1),
        repo.prepare_batch("a", [NewEvent(event=delta("a", "other"), id=first.id)], None),
    ]
    told: list[tuple[str, int, int]] = []
    repo.add_listener(lambda p: told.append((p.session_id, p.first_sequence, p.first_position)))
    results = repo.commit(appends)

    assert [r if isinstance(r, Exception) else [x.sequence for x in r] for r in results][:2] == [
        [1],
        [2],
    ]
    assert isinstance(results[2], WrongExpectedSequence)
    assert results[3] == results[0]
    assert isinstance(results[4], AlreadyExistsError)
    assert [x.sequence for x in results[5]] == [2, 3, 4]  # type: ignore[union-attr]
    assert isinstance(results[6], AlreadyExistsError)
    assert [r.sequence for r in repo.load_session("a")] == [1, 2, 3, 4]
    assert repo.load_session("c") == []
    # Feed positions follow the order of the appends; the retry adds none.
    assert told == [("a", 1, 2), ("b", 2, 3), ("a", 2, 4)]
    assert [(f.position, f.record.session_id) for f in records_only(repo.read_all(1))] == [
        (1, "b"),
        (2, "a"),
        (3, "b"),
        (4, "a"),
        (5, "a"),
        (6, "a"),
    ]
    repo.close()


@pytest.mark.parametrize("use_syncfs", [True, False], ids=["syncfs", "fsync"])
def test_a_failed_sync_stops_appends_until_a_restart_and_loses_nothing(
    data: Path, monkeypatch: pytest.MonkeyPatch, use_syncfs: bool
) -> None:
    if use_syncfs and not _durability.syncfs_available():
        pytest.fail("syncfs(2) with error reporting (Linux 5.8+) is expected on this machine")
    repo = JsonlSessionRepository(data, use_syncfs=use_syncfs)
    assert repo._syncer.method == ("syncfs" if use_syncfs else "fsync")
    kept = repo.append(AppendEvent(session_id="s", event=started("s")))
    size = (data / "s.jsonl").stat().st_size

    def failing_sync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if use_syncfs:
        monkeypatch.setattr(_durability, "_syncfs", failing_sync)
    else:
        monkeypatch.setattr(os, "fsync", failing_sync)
    with pytest.raises(UnavailableError, match="restart") as failed:
        repo.append(AppendEvent(session_id="s", event=delta("s", "lost")))
    assert failed.value.reason == "STORAGE_HALTED"
    # Not acknowledged, so not kept: the lines are cut back off.
    assert (data / "s.jsonl").stat().st_size == size
    monkeypatch.undo()
    with pytest.raises(UnavailableError):  # even once syncs work again: pages may be lost
        repo.append(AppendEvent(session_id="t", event=started("t")))
    assert repo.load_session("s") == [kept]
    repo.close()
    assert not (data / ".agentlog.clean").exists()  # the next start checks everything

    reopened = JsonlSessionRepository(data)
    assert reopened.load_session("s") == [kept]
    assert reopened.append(AppendEvent(session_id="s", event=delta("s", "x"))).sequence == 2
    assert [f.record.sequence for f in records_only(reopened.read_all(1))] == [1, 2]
    reopened.close()


def held_syncs(
    repo: JsonlSessionRepository, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """Make the store's syncs wait: (set when one starts, set to let them go on)."""
    syncing, go_on = threading.Event(), threading.Event()
    real_sync = repo._syncer.sync

    def slow_sync(*args: Any, **kwargs: Any) -> None:
        syncing.set()
        assert go_on.wait(10)
        real_sync(*args, **kwargs)

    monkeypatch.setattr(repo._syncer, "sync", slow_sync)
    return syncing, go_on


def test_reads_never_see_an_append_before_it_is_durable(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = JsonlSessionRepository(data)
    first = repo.append(AppendEvent(session_id="s", event=started("s")))
    syncing, go_on = held_syncs(repo, monkeypatch)
    retry = AppendEvent(session_id="s", event=delta("s", "late"), id=str(uuid.uuid4()))
    answers: list[Any] = []
    writer = threading.Thread(target=lambda: answers.append(repo.append(retry)))
    writer.start()
    assert syncing.wait(10)
    # Written, not yet durable: not read, not the head, not in the feed, not counted.
    assert repo.load_session("s") == [first]
    assert repo.head("s") == first
    assert [f.record for f in records_only(repo.read_all(1))] == [first]
    assert repo.list_sessions().sessions[0].event_count == 1
    # A retry of it meanwhile waits for the same sync and gets the same record.
    retried: list[Any] = []
    retrier = threading.Thread(target=lambda: retried.append(repo.append(retry)))
    retrier.start()
    go_on.set()
    writer.join(10)
    retrier.join(10)
    assert answers == retried
    assert [r.sequence for r in repo.load_session("s")] == [1, 2]
    assert repo.head("s") == answers[0]
    repo.close()


@pytest.mark.parametrize("sync", ["always", "never"])
def test_held_appends_are_answered_when_released(data: Path, sync: str) -> None:
    repo = JsonlSessionRepository(data, sync=sync)
    answered: list[Any] = []
    for i in range(3):
        pending = repo.prepare_append(AppendEvent(session_id="s", event=delta("s", str(i))))
        assert repo.submit([pending], answered.extend, hold=True)
    time.sleep(0.2)
    assert answered == []  # held: not synced, not acknowledged, not visible
    assert repo.load_session("s") == []
    repo.release()
    deadline = time.monotonic() + 10
    while len(answered) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [a.first_sequence for a in answered] == [1, 2, 3]
    assert [r.sequence for r in repo.load_session("s")] == [1, 2, 3]
    repo.close()


def test_appends_held_at_close_are_kept(data: Path) -> None:
    repo = JsonlSessionRepository(data, sync="never")
    pending = repo.prepare_append(AppendEvent(session_id="s", event=started("s")))
    answered: list[Any] = []
    repo.submit([pending], answered.extend, hold=True)
    repo.close()
    assert [a.first_sequence for a in answered] == [1]
    with JsonlSessionRepository(data) as reopened:
        assert [f.record.sequence for f in records_only(reopened.read_all(1))] == [1]


@pytest.mark.parametrize("sync", ["always", "interval"])
def test_held_and_released_appends_are_answered_only_once_durable(
    data: Path, monkeypatch: pytest.MonkeyPatch, sync: str
) -> None:
    # The server's own path: submit(hold=True) from the event loop, then release().
    repo = JsonlSessionRepository(data, sync=sync, sync_interval_ms=20)
    syncing, go_on = held_syncs(repo, monkeypatch)
    answered: list[Any] = []
    pending = repo.prepare_append(AppendEvent(session_id="s", event=started("s")))
    assert repo.submit([pending], answered.extend, block=False, hold=True)
    repo.release()
    if sync == "always":
        assert syncing.wait(10)
        time.sleep(0.1)
        assert answered == []  # not before the sync has returned
        assert repo.load_session("s") == []
    go_on.set()
    deadline = time.monotonic() + 10
    while not answered:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert [a.first_sequence for a in answered] == [1]
    repo.close()


def test_an_append_that_needs_a_file_read_first_is_declined_without_blocking(
    data: Path,
) -> None:
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="s", event=started("s")))
    with JsonlSessionRepository(data) as repo:  # "s" is on disk, not in memory
        pending = repo.prepare_append(AppendEvent(session_id="s", event=delta("s", "x")))
        answered: list[Any] = []
        assert repo.submit([pending], answered.extend, block=False) is False
        assert answered == []
        assert repo.submit([pending], answered.extend) is True  # blocking: reads, then stores
        deadline = time.monotonic() + 10
        while not answered:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert [a.first_sequence for a in answered] == [2]
