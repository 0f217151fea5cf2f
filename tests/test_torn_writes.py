"""One open finishes recovery from a torn write, wherever the write was torn.

A crash (a power loss, or a kernel that wrote a file's pages in part) can leave a
session file ending anywhere inside an append's lines. Start-up recovery cuts,
in one step, the incomplete last line and the rest of the batch it belonged to
(never acknowledged: acknowledging waits for the whole write to be synced), keeps
the bytes in `.agentlog-recovered/` and logs once what it cut and why. A last
line that is a whole record lacking only its newline is what arcan leaves when it
dies between writing a record and the newline, and arcan reads that record: it is
kept, and given its newline.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import pytest

from agentlog import AgentlogClient, AppendEvent, NewEvent
from agentlog.server import JsonlSessionRepository
from tests.contract import delta, started
from tests.test_crash_recovery import start_server, start_server_logging

RECOVERED = ".agentlog-recovered"


def written(data: Path) -> tuple[bytes, int, list[bytes]]:
    """A session written by agentlog: record 1, then a batch of five. Returns the file's
    bytes, where the batch starts, and the batch's lines."""
    with JsonlSessionRepository(data) as repo:
        repo.append(AppendEvent(session_id="s", event=started("s")))
        repo.append_batch("s", [NewEvent(event=delta("s", f"word {i}")) for i in range(5)])
    whole = (data / "s.jsonl").read_bytes()
    lines = whole.splitlines(keepends=True)
    return whole, len(lines[0]), lines[1:]


def test_a_batch_torn_at_any_byte_is_recovered_by_one_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    whole, batch_start, batch = written(tmp_path / "written")
    data = tmp_path / "data"
    data.mkdir()
    # Every tear of the batch's bytes, each in a session file of its own, opened once.
    tears = range(batch_start + 1, len(whole))
    for tear in tears:
        (data / f"t-{tear}.jsonl").write_bytes(whole[:tear])
    caplog.set_level(logging.WARNING, "agentlog.server")
    with JsonlSessionRepository(data) as repo:
        for tear in tears:
            session = f"t-{tear}"
            records = repo.load_session(session)
            if tear == len(whole) - 1:
                # Only the final newline is missing: the batch is whole, and kept.
                assert len(records) == 6, tear
                assert (data / f"{session}.jsonl").read_bytes() == whole
                continue
            assert [r.sequence for r in records] == [1], tear
            assert (data / f"{session}.jsonl").read_bytes() == whole[:batch_start], tear
            kept = data / RECOVERED / f"{session}.jsonl.{batch_start}"
            assert kept.read_bytes() == whole[batch_start:tear], tear
            assert repo.append(AppendEvent(session_id=session, event=started("s"))).sequence == 2
    cut_lines = [r.getMessage() for r in caplog.records if "cut " in r.getMessage()]
    assert len(cut_lines) == len(tears) - 1  # one line for each session cut
    in_third_line = batch_start + len(batch[0]) + len(batch[1]) + 10
    [third] = [m for m in cut_lines if f"t-{in_third_line}.jsonl" in m]
    assert "an incomplete last line and the rest of a batch cut short" in third
    [first] = [m for m in cut_lines if f"t-{batch_start + 10}.jsonl" in m]
    assert "an incomplete last line at" in first
    # A second open finds nothing more to do.
    caplog.clear()
    with JsonlSessionRepository(data) as repo:
        assert repo.recovered == []
    assert not [r for r in caplog.records if "cut " in r.getMessage()]


def test_a_torn_batch_is_recovered_by_one_restart_of_the_server(tmp_path: Path) -> None:
    data = tmp_path / "data"
    process, target = start_server(data)
    with AgentlogClient(target) as client:
        first = client.append(AppendEvent(session_id="s", event=started("s")))
        client.append_batch("s", [NewEvent(event=delta("s", f"word {i}")) for i in range(5)])
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    # The disk kept two of the batch's lines and half of the third.
    path = data / "s.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    torn = b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2]
    path.write_bytes(torn)
    process, target, started_log = start_server_logging(data)  # once
    try:
        with AgentlogClient(target) as client:
            assert client.load_session("s") == [first]
            again = client.append(AppendEvent(session_id="s", event=delta("s", "again")))
            assert again.sequence == 2
            assert client.head("s") == again
    finally:
        process.send_signal(signal.SIGTERM)
        _, log = process.communicate(timeout=20)
    log = started_log + log
    assert log.count("cut an incomplete last line and the rest of a batch cut short") == 1
    assert (data / RECOVERED / f"s.jsonl.{len(lines[0])}").read_bytes() == torn[len(lines[0]) :]


def test_a_whole_last_record_without_its_newline_is_kept_as_arcan_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    with JsonlSessionRepository(data) as repo:
        for i in range(3):
            repo.append(AppendEvent(session_id="s", event=delta("s", str(i))))
    # arcan's own lines carry no "sequence"; one died between the record and "\n".
    arcan_line = (data / "s.jsonl").read_bytes().splitlines()[0].replace(b',"sequence":1', b"")
    (data / "a.jsonl").write_bytes(arcan_line + b"\n" + arcan_line.replace(b'"0"', b'"1"'))
    path = data / "s.jsonl"
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    caplog.set_level(logging.WARNING, "agentlog.server")
    with JsonlSessionRepository(data) as repo:
        assert repo.recovered == []
        assert [r.sequence for r in repo.load_session("s")] == [1, 2, 3]
        assert [r.event.delta for r in repo.load_session("a")] == ["0", "1"]  # type: ignore[union-attr]
        assert repo.append(AppendEvent(session_id="s", event=delta("s", "3"))).sequence == 4
    assert (data / "a.jsonl").read_bytes().endswith(b"\n")
    assert not (data / RECOVERED).exists()
    assert "added the newline" in caplog.text


def test_a_record_arcan_left_without_its_newline_while_serving_is_read_and_followed(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with JsonlSessionRepository(data) as repo:
        first = repo.append(AppendEvent(session_id="s", event=delta("s", "0")))
        # arcan appends a record and dies before writing its newline.
        line = (data / "s.jsonl").read_bytes().splitlines()[0]
        arcan = line.replace(b',"sequence":1', b"").replace(first.id.encode(), b"a" * 36)
        with (data / "s.jsonl").open("ab") as file:
            file.write(arcan)
        records = repo.load_session("s")
        assert [r.id for r in records] == [first.id, "a" * 36]
        head = repo.head("s")
        assert head is not None
        assert head.id == "a" * 36
        # The next append ends arcan's line first.
        third = repo.append(AppendEvent(session_id="s", event=delta("s", "2")))
        assert third.sequence == 3
        assert [r.sequence for r in repo.load_session("s")] == [1, 2, 3]
    lines = (data / "s.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""  # every line ends with its newline
    assert [json.loads(x)["id"] for x in lines[:-1]] == [first.id, "a" * 36, third.id]
