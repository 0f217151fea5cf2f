"""One damaged session, file or index harms nobody else, and no acknowledgement is ever wrong:
the feed goes on past damage, damaged or cut files take no appends, another writer's race
ends in a refused append, and a damaged index is rebuilt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from agentlog import (
    AgentlogClient,
    AppendEvent,
    CaughtUp,
    DataLossError,
    FeedGap,
    FeedRecord,
    NewEvent,
)
from agentlog.server import JsonlSessionRepository
from tests.contract import delta
from tests.servers import running_server


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def repo(data: Path) -> Iterator[JsonlSessionRepository]:
    with JsonlSessionRepository(data) as repo:
        yield repo


@pytest.fixture
def client(repo: JsonlSessionRepository) -> Iterator[AgentlogClient]:
    with running_server(repo) as target, AgentlogClient(target) as client:
        yield client


def write(client: AgentlogClient, session: str, count: int) -> None:
    for i in range(count):
        client.append(AppendEvent(session_id=session, event=delta(session, f"{session}-{i}")))


def misnumber_line(path: Path, number: int) -> None:
    """Damage line `number` (1-based) in place, its length kept: its sequence is wrong."""
    lines = path.read_bytes().splitlines(keepends=True)
    record = json.loads(lines[number - 1])
    assert record["sequence"] == number
    lines[number - 1] = lines[number - 1].replace(
        f'"sequence":{number}'.encode(), f'"sequence":{number % 9 + 1}'.encode()
    )
    path.write_bytes(b"".join(lines))


def undelivered(reason: str) -> float:
    return (
        REGISTRY.get_sample_value("agentlog_feed_undelivered_records_total", {"reason": reason})
        or 0.0
    )


def collect(feed: Iterator[Any], until: int) -> list[Any]:
    """Feed items up to and including the first CaughtUp at or past position `until`."""
    items = []
    for item in feed:
        items.append(item)
        if isinstance(item, CaughtUp) and item.position >= until:
            return items
    raise AssertionError("the feed ended")


# --- 1. the all-sessions feed goes on past a damaged session ---


def test_the_feed_goes_on_past_a_damaged_session_and_says_what_it_skipped(
    client: AgentlogClient, data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(client, "a", 2)
    write(client, "bad", 3)
    write(client, "c", 2)
    misnumber_line(data / "bad.jsonl", 2)
    before = undelivered("CORRUPT_LINE")
    with caplog.at_level(logging.ERROR, logger="agentlog.server"):
        items = collect(iter(client.subscribe_all(from_position=1)), until=7)
    records = [i for i in items if isinstance(i, FeedRecord)]
    gaps = [i for i in items if isinstance(i, FeedGap)]
    assert [(r.record.session_id, r.position) for r in records] == [
        ("a", 1),
        ("a", 2),
        ("bad", 3),
        ("bad", 5),  # its own line is whole: only the damaged one is skipped
        ("c", 6),
        ("c", 7),
    ]
    assert [(g.first_position, g.last_position, g.session_id, g.reason) for g in gaps] == [
        (4, 4, "bad", "CORRUPT_LINE"),
    ]
    assert "bad.jsonl" in gaps[0].message
    assert undelivered("CORRUPT_LINE") - before == 1
    assert any("feed skips positions 4 to 4" in r.getMessage() for r in caplog.records)


def test_a_consumer_stored_before_the_damage_moves_on_and_live_streams_survive(
    client: AgentlogClient, data: Path
) -> None:
    write(client, "bad", 2)
    write(client, "ok", 1)
    misnumber_line(data / "bad.jsonl", 2)
    everything = iter(client.subscribe_all(from_position=1))
    others = iter(client.subscribe_all(from_position=1, session_id_prefix="ok"))
    assert any(isinstance(i, FeedGap) for i in collect(everything, until=3))
    assert not any(isinstance(i, FeedGap) for i in collect(others, until=3))
    with pytest.raises(DataLossError):  # the damaged session takes no appends
        client.append(AppendEvent(session_id="bad", event=delta("bad", "more")))
    client.append(AppendEvent(session_id="ok", event=delta("ok", "more")))
    for feed in (everything, others):
        item = next(feed)
        while isinstance(item, CaughtUp):
            item = next(feed)
        assert isinstance(item, FeedRecord)
        assert (item.record.session_id, item.position) == ("ok", 4)


def test_the_in_process_feed_reports_gaps_to_those_who_follow_the_session(
    repo: JsonlSessionRepository, data: Path
) -> None:
    for session in ("bad", "ok"):
        repo.append(AppendEvent(session_id=session, event=delta(session, "x")))
    misnumber_line(data / "bad.jsonl", 1)
    followed = iter(repo.subscribe_all(from_position=1, session_id_prefix="b"))
    assert isinstance(next(followed), FeedGap)
    others = iter(repo.subscribe_all(from_position=1, session_id_prefix="o"))
    item = next(others)
    assert isinstance(item, FeedRecord)
    assert item.record.session_id == "ok"


# --- 2. a damaged line seals its session against appends ---


def test_appends_are_refused_once_a_read_found_a_damaged_line_and_after_a_restart(
    data: Path,
) -> None:
    with JsonlSessionRepository(data) as repo:
        for i in range(3):
            repo.append(AppendEvent(session_id="s", event=delta("s", str(i))))
        misnumber_line(data / "s.jsonl", 2)
        with pytest.raises(DataLossError, match="line 2") as read:
            repo.load_session("s")
        assert read.value.reason == "CORRUPT_LINE"
        with pytest.raises(DataLossError, match="line 2") as appended:
            repo.append(AppendEvent(session_id="s", event=delta("s", "after")))
        assert appended.value.reason == "CORRUPT_LINE"
    size = (data / "s.jsonl").stat().st_size
    with JsonlSessionRepository(data) as repo:
        with pytest.raises(DataLossError, match="line 2"):
            repo.append(AppendEvent(session_id="s", event=delta("s", "after")))
        assert [r.sequence for r in repo.load_session("s", limit=1)] == [1]
    assert (data / "s.jsonl").stat().st_size == size  # nothing was written after the damage


def test_a_damaged_line_another_writer_added_seals_the_session_before_any_read(
    client: AgentlogClient, data: Path
) -> None:
    write(client, "s", 2)
    with (data / "s.jsonl").open("ab") as file:
        file.write(b'{"id": "x", "not an arcan record\n')
        file.write(b"{}\n")
    with pytest.raises(DataLossError, match=r"line [34]") as caught:
        client.append(AppendEvent(session_id="s", event=delta("s", "after")))
    assert caught.value.reason == "CORRUPT_LINE"
    assert (data / "s.jsonl").read_bytes().count(b"\n") == 4


# --- 3. another writer appending at the same moment ---


def test_a_write_that_lands_after_another_writers_line_is_blanked_and_refused(
    repo: JsonlSessionRepository, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.append(AppendEvent(session_id="s", event=delta("s", "first")))
    path = data / "s.jsonl"
    foreign = json.dumps(
        {
            "id": str(uuid.uuid4()),
            "session_id": "s",
            "parent_id": None,
            "timestamp": "2026-11-25T01:33:38.853460046Z",
            "event": {"part_type": "run_errored", "run_id": "r", "session_id": "s", "error": "x"},
        }
    ).encode()
    real_write = os.write
    raced: list[int] = []

    def write_after_another_writer(fd: int, data_: Any) -> int:
        # Forces the interleaving: arcan appends between agentlog's check and its write.
        if not raced and os.path.samestat(os.fstat(fd), path.stat()):
            raced.append(fd)
            with path.open("ab") as other:
                other.write(foreign + b"\n")
        return real_write(fd, data_)

    monkeypatch.setattr(os, "write", write_after_another_writer)
    with pytest.raises(DataLossError) as caught:
        repo.append(AppendEvent(session_id="s", event=delta("s", "second")))
    monkeypatch.undo()
    assert caught.value.reason == "CONCURRENT_WRITER"
    records = repo.load_session("s")  # readable: the misplaced line is blank
    assert [r.sequence for r in records] == [1, 2]
    assert records[1].event.part_type == "run_errored"
    again = repo.append(AppendEvent(session_id="s", event=delta("s", "third")))
    assert again.sequence == 3
    assert repo.load_session("s")[2] == again


ARCAN_WRITER = """
import json, os, sys, time, uuid
path, seconds = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
end = time.monotonic() + seconds
while time.monotonic() < end:
    record = {"id": str(uuid.uuid4()), "session_id": "s", "parent_id": None,
              "timestamp": "2026-11-25T01:33:38.853460046Z",
              "event": {"part_type": "run_errored", "run_id": "r", "session_id": "s",
                        "error": "arcan"}}
    os.write(fd, (json.dumps(record) + "\\n").encode())
    time.sleep(0.0005)
"""


def test_appends_racing_another_writer_are_acknowledged_at_their_true_sequence(
    client: AgentlogClient, data: Path
) -> None:
    write(client, "s", 1)
    writer = subprocess.Popen(
        [sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "3"],
    )
    acknowledged: dict[str, int] = {}
    refusals: list[str | None] = []
    lock = threading.Lock()

    def append_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                record = client.append(AppendEvent(session_id="s", event=delta("s", "mine")))
            except DataLossError as exc:
                with lock:
                    refusals.append(exc.reason)
                continue
            with lock:
                acknowledged[record.id] = record.sequence

    threads = [threading.Thread(target=append_for, args=(3,)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writer.wait(30)
    stored = {r.id: r.sequence for r in client.load_session("s")}
    assert acknowledged
    # Refused when the other writer's line lands between check and write, or (a read
    # catching its write half done) while its last line is incomplete.
    assert set(refusals) <= {"CONCURRENT_WRITER", "TORN_LAST_LINE"}
    for record_id, sequence in acknowledged.items():
        assert stored.get(record_id) == sequence, "acknowledged with a sequence it does not have"


# --- 4. a file cut back behind agentlog's back ---


@pytest.mark.parametrize("keep", [2, 0])
def test_a_file_cut_back_is_data_loss_naming_its_sizes_and_is_never_written_over(
    data: Path, keep: int
) -> None:
    with JsonlSessionRepository(data) as repo:
        records = [
            repo.append(AppendEvent(session_id="s", event=delta("s", str(i)))) for i in range(3)
        ]
        path = data / "s.jsonl"
        size = path.stat().st_size
        lines = path.read_bytes().splitlines(keepends=True)
        with path.open("r+b") as file:
            file.truncate(len(b"".join(lines[:keep])))
        cut = path.stat().st_size
        for call in (lambda: repo.head("s"), lambda: repo.load_session("s")):
            with pytest.raises(DataLossError) as caught:
                call()
            assert caught.value.reason == "FILE_SHRANK"
            assert str(path) in caught.value.message
            assert f"{cut} bytes long but held {size} bytes" in caught.value.message
        reused = AppendEvent(session_id="s", id=records[2].id, event=delta("s", "other"))
        with pytest.raises(DataLossError, match=r"cut or rewritten"):
            repo.append(reused)
        assert path.stat().st_size == cut
    with JsonlSessionRepository(data) as repo:  # remembered across a restart
        with pytest.raises(DataLossError) as caught:
            repo.head("s")
        assert caught.value.reason == "FILE_SHRANK"
        gaps = [item for item in repo.read_all(1) if isinstance(item, FeedGap)]
        assert gaps
        assert gaps[0].reason == "FILE_SHRANK"


# --- 5. a damaged index is rebuilt, never served from ---


def children_fixture(repo: JsonlSessionRepository) -> tuple[str, list[str]]:
    root = repo.append(AppendEvent(session_id="p", event=delta("p", "root")))
    kids = [
        repo.append(AppendEvent(session_id=f"k{i}", parent_id=root.id, event=delta("k", str(i))))
        for i in range(20)
    ]
    return root.id, [k.id for k in kids]


def test_an_index_that_is_not_a_database_is_rebuilt_at_start(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with JsonlSessionRepository(data) as repo:
        root, kids = children_fixture(repo)
    (data / ".agentlog.index").write_bytes(b"this is not a database" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(f"{data / '.agentlog.index'}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING), JsonlSessionRepository(data) as repo:
        assert sorted(r.id for r in repo.load_children(root)) == sorted(kids)
        retry = repo.append(
            AppendEvent(session_id="k0", parent_id=root, id=kids[0], event=delta("k", "0"))
        )
        assert retry.sequence == 1  # the retry is found: the rebuilt index knows every id
    assert any("rebuilt from the session files" in r.getMessage() for r in caplog.records)


def test_an_index_damaged_in_place_is_rebuilt_when_found(data: Path) -> None:
    with JsonlSessionRepository(data) as repo:
        root, kids = children_fixture(repo)
        for i in range(2000):  # enough rows for pages past the header
            repo.append(AppendEvent(session_id="many", event=delta("many", str(i))))
    path = data / ".agentlog.index"
    size = path.stat().st_size
    with path.open("r+b") as file:
        for page in range(2, size // 4096):  # every page but the first: keeps the size
            file.seek(page * 4096 + 100)
            file.write(os.urandom(64))
    assert path.stat().st_size == size
    with JsonlSessionRepository(data) as repo:
        assert sorted(r.id for r in repo.load_children(root)) == sorted(kids)
        retry = repo.append(
            AppendEvent(session_id="k1", parent_id=root, id=kids[1], event=delta("k", "1"))
        )
        assert retry.sequence == 1


# --- 21. a retry is never stored twice, whatever the indexing does meanwhile ---


def test_an_append_between_a_files_stat_and_its_index_entry_is_no_shrink(
    repo: JsonlSessionRepository, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = repo.append(AppendEvent(session_id="s", event=delta("s", "first")))
    path = data / "s.jsonl"
    real_stat = Path.stat
    appended: list[Any] = []

    def stat_then_append(self: Path, **kwargs: Any) -> os.stat_result:
        found = real_stat(self, **kwargs)
        if self == path and not appended:
            # Forces the interleaving: an append is acknowledged right after the stat.
            appended.append(None)
            thread = threading.Thread(
                target=lambda: appended.append(
                    repo.append(AppendEvent(session_id="s", event=delta("s", "second")))
                )
            )
            thread.start()
            thread.join(1.0)  # with the stat under the index's lock, it waits for it
        return found

    monkeypatch.setattr(Path, "stat", stat_then_append)
    repo._index.catch_up("s", path)
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while len(appended) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = appended[1]
    assert repo._index.shrunk("s") is None
    retried = repo.append(AppendEvent(session_id="s", id=second.id, event=delta("s", "second")))
    assert retried.sequence == second.sequence == 2
    again = repo.append(AppendEvent(session_id="s", id=first.id, event=delta("s", "first")))
    assert again.sequence == 1
    assert [r.id for r in repo.load_session("s")] == [first.id, second.id]


def test_batches_are_never_half_indexed(repo: JsonlSessionRepository, data: Path) -> None:
    repo.append_batch("s", [NewEvent(event=delta("s", str(i))) for i in range(3)])
    lines = (data / "s.jsonl").read_bytes().splitlines(keepends=True)
    copy = data / "t.jsonl"
    copy.write_bytes(b"".join(lines[:2]).replace(b'"session_id":"s"', b'"session_id":"t"'))
    found = repo._index.catch_up("t", copy)
    assert found is not None
    assert (found.records, found.size) == (0, 0)  # the batch's last line is missing


# --- a file removed behind agentlog's back is a file cut to nothing ---


def test_a_session_file_removed_while_serving_stays_refused_across_restarts(data: Path) -> None:
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):
        first = client.append(AppendEvent(session_id="s", event=delta("s", "first")))
        other = client.append(AppendEvent(session_id="t", event=delta("t", "other")))
        (data / "s.jsonl").unlink()
        for attempt in (
            lambda: client.append(
                AppendEvent(session_id="s", event=delta("s", "new"), expected_sequence=0)
            ),
            lambda: client.append(
                AppendEvent(session_id="s", id=first.id, event=delta("s", "first"))
            ),
            lambda: client.load_session("s"),
            lambda: client.head("s"),
        ):
            with pytest.raises(DataLossError) as refused:
                attempt()
            assert refused.value.reason == "FILE_SHRANK"
            assert "removed" in str(refused.value)
        feed = _feed_until_caught_up(client)
        assert [type(i).__name__ for i in feed] == ["FeedGap", "FeedRecord"]
        assert feed[0].reason == "FILE_SHRANK"
        assert feed[1].record == other
    assert not (data / "s.jsonl").exists()
    with JsonlSessionRepository(data) as repo:  # and after a restart, crash or not
        with pytest.raises(DataLossError):
            repo.append(AppendEvent(session_id="s", event=delta("s", "new")))
        gaps = [item for item in repo.read_all(1) if isinstance(item, FeedGap)]
        assert [g.reason for g in gaps] == ["FILE_SHRANK"]
    assert not (data / "s.jsonl").exists()


def _feed_until_caught_up(client: AgentlogClient) -> list[Any]:
    items: list[Any] = []
    for item in client.subscribe_all(from_position=1):
        if isinstance(item, CaughtUp):
            return items
        items.append(item)
    return items


def test_sessions_whose_files_arcan_hid_are_served_and_their_children_found(
    data: Path,
) -> None:
    with JsonlSessionRepository(data) as repo:
        parent = repo.append(AppendEvent(session_id="caller", event=delta("caller", "p")))
    line = (data / "caller.jsonl").read_text().replace(',"sequence":1', "")
    child = json.loads(line)
    child.update(id=str(uuid.uuid4()), session_id=".hidden", parent_id=parent.id)
    (data / ".hidden.jsonl").write_text(json.dumps(child) + "\n")
    with JsonlSessionRepository(data) as repo:
        assert [r.id for r in repo.load_children(parent.id)] == [child["id"]]
        assert [r.id for r in repo.load_session(".hidden")] == [child["id"]]
        assert ".hidden" in [s.session_id for s in repo.list_sessions().sessions]


def test_a_feed_resumed_after_a_gap_goes_on_after_the_gap(data: Path) -> None:
    # The client resumes a feed interrupted just after a FeedGap from the position
    # after the gap's last, not inside it (which would report the gap again).
    from agentlog.server import JsonlSessionRepository as Store
    from tests.servers import served

    with Store(data) as repo:
        repo.append_batch("bad", [NewEvent(event=delta("bad", str(i))) for i in range(3)])
        repo.append(AppendEvent(session_id="ok", event=delta("ok", "1")))
        misnumber_line(data / "bad.jsonl", 1)  # the whole batch is lost to the feed
        with served(repo) as (built, _):
            port = built.port
            client = AgentlogClient(f"127.0.0.1:{port}", retries=50)
            feed = iter(client.subscribe_all(from_position=1))
            gap = next(feed)
            assert isinstance(gap, FeedGap)
            assert (gap.first_position, gap.last_position) == (1, 3)
        # The server went away right after the gap; it comes back on the same port.
        with served(repo, port=port):
            rest = []
            for item in feed:
                if isinstance(item, CaughtUp):
                    break
                rest.append(item)
            client.close()
    assert [type(i).__name__ for i in rest] == ["FeedRecord"]
    assert isinstance(rest[0], FeedRecord)
    assert rest[0].position == 4


def test_a_clients_resume_point_after_a_gap_is_past_the_gap() -> None:
    # Where both clients resubscribe from after UNAVAILABLE, item by item.
    from agentlog._client_streams import FeedResume
    from agentlog.v1 import session_pb2 as pb

    resume = FeedResume(1, "", ())
    gap = pb.FeedGap(first_position=5, last_position=9, session_id="bad", reason="CORRUPT_LINE")
    [item] = resume.items(pb.SubscribeAllResponse(gap=gap))
    assert isinstance(item, FeedGap)
    assert resume.request().from_position == 10
    resume.items(pb.SubscribeAllResponse(checkpoint=pb.Checkpoint(position=20)))
    assert resume.request().from_position == 21


def test_head_answers_a_record_another_writer_added_after_agentlogs_own(
    client: AgentlogClient, data: Path
) -> None:
    """Head answers from memory only while the file is as agentlog left it."""
    write(client, "s", 2)
    head = client.head("s")
    assert head is not None
    assert head.sequence == 2
    subprocess.run([sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "0.01"], check=True)
    added = client.head("s")
    assert added is not None
    assert added.sequence > 2
    assert added.event.part_type == "run_errored"
    assert added == client.load_session("s")[-1]


def test_head_of_a_file_another_writer_keeps_writing_follows_it(data: Path) -> None:
    """Head keeps the last line it read of a file it holds no state for (indexed at
    open), and answers from it only while the file is unchanged."""
    data.mkdir()
    (data / "s.jsonl").touch()
    subprocess.run([sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "0.01"], check=True)
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):
        first = client.head("s")
        assert first is not None
        assert client.head("s") == first
        subprocess.run(
            [sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "0.01"], check=True
        )
        later = client.head("s")
        assert later is not None
        assert later.sequence > first.sequence
        assert later == client.load_session("s")[-1]


def test_a_listing_follows_a_file_another_writer_appends_to(data: Path) -> None:
    """A listing keeps each session's summary, and its message, only while the file is as
    it was: lines another writer adds show in the next listing."""
    data.mkdir()
    (data / "s.jsonl").touch()
    subprocess.run([sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "0.01"], check=True)
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):
        [before] = client.list_sessions().sessions
        assert client.list_sessions().sessions == [before]  # kept, and the same
        subprocess.run(
            [sys.executable, "-c", ARCAN_WRITER, str(data / "s.jsonl"), "0.01"], check=True
        )
        [after] = client.list_sessions().sessions
        last = client.load_session("s")[-1]
        assert after.event_count == last.sequence > before.event_count
        assert after.head_id == last.id
        assert after.last_timestamp_ns == last.timestamp_ns
