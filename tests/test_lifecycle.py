"""The session lifecycle beyond the contract: erasure checked on the bytes, SIGKILL during
deletes, label updates and retention sweeps, retention in the background, and the
commands a person uses (sessions, show, delete, label)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from agentlog import AgentlogClient, AppendEvent, NewEvent, SessionDeleted, ToolCall
from agentlog import ToolCallRequested as Requested
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server._retention import RetentionSweeper, parse_duration
from agentlog.server.backend import Backend
from agentlog.server.blocking import BlockingStore
from agentlog.server.postgres import PostgresBackend
from tests.contract import delta, new_session
from tests.pg import conninfo, database
from tests.servers import LoopThread, running_server, serve_process

NS = 1_000_000_000


def all_bytes(root: Path) -> bytes:
    """Every byte of every file under `root`."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.mark.parametrize("layout", ["seed", "branches"])
def test_a_deleted_session_leaves_no_byte_of_its_content_in_the_jsonl_directory(
    tmp_path: Path, layout: str
) -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    session = f"s-{uuid.uuid4().hex[:8]}"
    with JsonlSessionRepository(tmp_path, layout=layout) as store:
        store.append(AppendEvent(session_id="other", event=delta("other", "keep me")))
        records = store.append_batch(
            session,
            [NewEvent(event=delta(session, f"{secret} {i}")) for i in range(50)],
            labels={"title": secret},
        )
        if layout == "branches":
            store.fork_session(session, 10, new_branch_id="alt")
        store._index.flush()
    # A torn tail kept by recovery: the start cuts it and keeps a copy aside.
    path = tmp_path / (f"{session}.jsonl" if layout == "seed" else f"{session}__main.jsonl")
    with path.open("ab") as file:
        file.write(b'{"id": "torn", "event": "' + secret.encode())
    with JsonlSessionRepository(tmp_path) as store:
        assert secret.encode() in all_bytes(tmp_path / ".agentlog-recovered")
        markers = store.delete_session(session, all_branches=True)
        assert len(markers) == (2 if layout == "branches" else 1)
        assert store.load_session("other")[0].event.delta == "keep me"  # type: ignore[union-attr]
    content = all_bytes(tmp_path)
    assert secret.encode() not in content
    for record in records:
        assert record.id.encode() not in content
    with JsonlSessionRepository(tmp_path) as store:
        assert store.load_session(session) == []
        assert store.list_sessions().sessions[0].session_id == "other"


def test_a_deleted_session_leaves_no_row_in_postgresql_after_its_vacuum() -> None:
    secret = f"SECRET-{uuid.uuid4().hex}"
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as target, AgentlogClient(target) as client:
            session = new_session()
            client.append_batch(
                session,
                [NewEvent(event=delta(session, f"{secret} {i}")) for i in range(20)],
                labels={"title": secret},
            )
            client.append(AppendEvent(session_id="other", event=delta("other", "keep")))
            client.delete_session(session, all_branches=True)
        with psycopg.connect(conninfo(url), autocommit=True) as conn:
            conn.execute("VACUUM FULL")
            conn.execute("CHECKPOINT")
            data = conn.execute("SHOW data_directory").fetchone()
            assert data is not None
            files = []
            for (table,) in conn.execute(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace"
                " WHERE n.nspname = 'public' AND c.relkind IN ('r','t','i')"
            ).fetchall():
                found = conn.execute("SELECT pg_relation_filepath(%s)", (table,)).fetchone()
                if found and found[0]:
                    files.append(Path(str(data[0])) / str(found[0]))
            for (table,) in conn.execute(
                "SELECT reltoastrelid::regclass::text FROM pg_class WHERE reltoastrelid <> 0"
                " AND relnamespace = 'public'::regnamespace"
            ).fetchall():
                found = conn.execute("SELECT pg_relation_filepath(%s)", (table,)).fetchone()
                if found and found[0]:
                    files.append(Path(str(data[0])) / str(found[0]))
        assert files
        readable = [f for f in files if os.access(f, os.R_OK)]
        assert readable, "the test must be able to read the database's files"
        content = b"".join(f.read_bytes() for f in readable if f.exists())
        assert b"keep" in content  # the check reads the right files
        assert secret.encode() not in content


# --- crashes ---

CRASH_SCRIPT = r"""
import sys
from agentlog import AppendEvent, NewEvent, TextDelta
from agentlog.server import JsonlSessionRepository

root, count = sys.argv[1], int(sys.argv[2])
def ev(s, t):
    return TextDelta(run_id="r", session_id=s, iteration=1, delta=t)
store = JsonlSessionRepository(root)
for i in range(count):
    s = f"s{i:03d}"
    if not store.load_session(s):
        store.append_batch(s, [NewEvent(event=ev(s, str(k))) for k in range(40)], labels={"n": "0"})
print("ready", flush=True)
for i in range(count):
    s = f"s{i:03d}"
    for version in range(2, 5):
        store.update_session_labels(s, {"n": str(version)})
        print("labeled", s, version, flush=True)
    if i % 2 == 0:
        store.delete_session(s)
        print("deleted", s, flush=True)
    else:
        store.append(AppendEvent(session_id=s, event=ev(s, "after")))
        print("appended", s, flush=True)
"""


def _read_lines(process: subprocess.Popen[str], into: list[list[str]]) -> None:
    into.extend(line.split() for line in process.stdout or ())


def test_sigkill_during_deletes_and_label_updates_leaves_each_whole_or_not_done(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    for round_ in range(4):
        root = tmp_path / f"r{round_}"
        root.mkdir()
        process = subprocess.Popen(
            [sys.executable, "-c", CRASH_SCRIPT, str(root), "30"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        done: list[list[str]] = []
        reader = threading.Thread(target=_read_lines, args=(process, done), daemon=True)
        reader.start()
        time.sleep(rng.uniform(0.05, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        reader.join(5)
        labeled = {s[1]: int(s[2]) for s in done if len(s) == 3 and s[0] == "labeled"}
        deleted = {s for kind, s, *_ in done if kind == "deleted"}
        appended = {s for kind, s, *_ in done if kind == "appended"}
        with JsonlSessionRepository(root) as store:
            listed = {i.session_id: i for i in store.list_sessions(page_size=1000).sessions}
            for i in range(30):
                s = f"s{i:03d}"
                records = store.load_session(s)
                if s in deleted:
                    assert records == [], s
                    assert s not in listed, s
                    continue
                # Whole or gone (a delete cut short), never a part.
                assert len(records) in (0, 40, 41), (s, len(records))
                if not records:
                    assert i % 2 == 0
                    assert s not in listed
                    continue
                if s in appended:
                    assert len(records) == 41
                version = listed[s].labels_version
                assert version >= labeled.get(s, 1)
                assert listed[s].labels == {"n": "0" if version == 1 else str(version)}
            feed = list(store.read_all(1))
            assert all(not hasattr(item, "reason") for item in feed), "no gap in the feed"


# --- retention ---


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * NS

    def __call__(self) -> int:
        return self.now


@pytest.mark.parametrize("kind", ["memory", "jsonl"])
def test_retention_deletes_branches_last_appended_to_before_its_horizon(
    tmp_path: Path, kind: str
) -> None:
    clock = Clock()
    store: BlockingStore = (
        MemorySessionRepository(clock=clock)
        if kind == "memory"
        else JsonlSessionRepository(tmp_path, clock=clock)
    )
    with store:
        for i in range(5):
            store.append(AppendEvent(session_id=f"old-{i}", event=delta("o", "x")))
        clock.now += 100 * NS
        store.append(AppendEvent(session_id="new", event=delta("n", "x")))
        store.append(AppendEvent(session_id="old-0", event=delta("o", "touched")))
        assert store.expire(clock.now - 50 * NS, 2) == 2  # a batch at most
        assert store.expire(clock.now - 50 * NS, 100) == 2
        assert store.expire(clock.now - 50 * NS, 100) == 0
        left = [i.session_id for i in store.list_sessions().sessions]
        assert left == ["new", "old-0"]
        markers = [i for i in store.read_all(1) if isinstance(i, SessionDeleted)]
        assert sorted(m.session_id for m in markers) == ["old-1", "old-2", "old-3", "old-4"]


def test_replicas_on_one_postgresql_sweep_without_fighting() -> None:
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as target, AgentlogClient(target) as client:
            for i in range(0, 300, 10):
                for j in range(i, i + 10):
                    client.append(AppendEvent(session_id=f"s{j}", event=delta("s", "x")))
            loop = LoopThread()
            try:
                backends = [loop.run(PostgresBackend.open(url)) for _ in range(3)]

                async def sweep_together() -> list[int]:
                    horizon = time.time_ns() + NS
                    return list(await asyncio.gather(*(b.expire(horizon, 1000) for b in backends)))

                counts = loop.run(sweep_together())
                for backend in backends:
                    loop.run(backend.close())
            finally:
                loop.close()
            assert sum(counts) == 300
            assert sorted(counts)[:2] == [0, 0]  # one swept, the others left it
            assert client.list_sessions().sessions == []


def test_serve_with_retention_sweeps_in_the_background(tmp_path: Path) -> None:
    served = serve_process(tmp_path, "--retention", "1s", "--retention-interval", "0.3s")
    try:
        with AgentlogClient(served.target) as client:
            client.append(AppendEvent(session_id="short-lived", event=delta("s", "x")))
            deadline = time.monotonic() + 20
            while client.list_sessions().sessions:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.load_session("short-lived") == []
        deadline = time.monotonic() + 5
        while "retention sweep: deleted 1 branch" not in served.logged:
            assert time.monotonic() < deadline, served.log
            time.sleep(0.05)
    finally:
        served.process.terminate()
        served.process.wait(30)


def test_a_retention_must_be_a_duration() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("90m") == 5400
    for bad in ("", "0s", "thirty days", "-1d", "5y"):
        with pytest.raises(ValueError, match=r"duration|longer than nothing"):
            parse_duration(bad)
    result = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "serve", "--retention", "soon"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "not a duration" in result.stderr


def test_a_sweep_logs_and_counts_what_it_did() -> None:
    from agentlog.server import metrics

    store = MemorySessionRepository()
    store.append(AppendEvent(session_id="x", event=delta("x", "x")))
    loop = LoopThread()
    try:
        backend = loop.run(_backend_of(store))
        before = metrics.RETENTION_DELETED._value.get()
        sweeper = RetentionSweeper(backend, retention_seconds=0.001, interval_seconds=60)
        time.sleep(0.01)
        assert loop.run(sweeper.sweep()) == 1
        assert metrics.RETENTION_DELETED._value.get() == before + 1
        loop.run(backend.close())
    finally:
        loop.close()


async def _backend_of(store: BlockingStore) -> Backend:
    from concurrent.futures import ThreadPoolExecutor

    return store.backend(ThreadPoolExecutor(2))


# --- the commands ---


def run(target: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentlog.server", *args, "--addr", target],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        check=False,
    )


def test_the_commands_list_show_label_and_delete_sessions(tmp_path: Path) -> None:
    with JsonlSessionRepository(tmp_path) as store, running_server(store) as target:
        session = "chat-1"
        with AgentlogClient(target) as client:
            client.append_batch(
                session,
                [
                    NewEvent(event=delta(session, "Hello, ")),
                    NewEvent(event=delta(session, "world")),
                    NewEvent(
                        event=Requested(
                            run_id="run-1",
                            session_id=session,
                            iteration=1,
                            call=ToolCall(call_id="c1", tool_name="read_file", input={"p": 1}),
                        )
                    ),
                ],
                labels={"app": "demo", "user": "ana"},
            )
            client.append(AppendEvent(session_id="chat-2", event=delta("chat-2", "x")))
        listing = run(target, "sessions", "--label", "app=demo")
        assert listing.returncode == 0, listing.stderr
        assert "chat-1" in listing.stdout
        assert "chat-2" not in listing.stdout
        assert "app=demo user=ana" in listing.stdout
        as_json = run(target, "sessions", "--prefix", "chat-", "--json")
        assert [line.count('"session_id"') for line in as_json.stdout.splitlines()] == [1, 1]
        shown = run(target, "show", session)
        assert shown.returncode == 0, shown.stderr
        assert "text: Hello, world" in shown.stdout
        assert 'tool call read_file [c1] input: {"p": 1}' in shown.stdout
        stored = run(target, "show", session, "--json")
        assert stored.stdout.count("\n") == 3
        assert '"delta":"Hello, "' in stored.stdout
        labeled = run(
            target, "label", session, "title=First chat", "user-", "--expect-version", "1"
        )
        assert labeled.returncode == 0, labeled.stderr
        assert "app=demo title=First chat (version 2)" in labeled.stdout
        conflict = run(target, "label", session, "x=y", "--expect-version", "1")
        assert conflict.returncode == 1
        assert "FAILED_PRECONDITION" in conflict.stderr
        unasked = run(target, "delete", session)
        assert unasked.returncode == 2
        assert "--yes" in unasked.stderr
        deleted = run(target, "delete", session, "--yes")
        assert deleted.returncode == 0, deleted.stderr
        assert "deleted branch main of session chat-1: 3 record(s)" in deleted.stdout
        again = run(target, "delete", session, "--yes")
        assert again.returncode == 1
        assert "NOT_FOUND" in again.stderr
        missing = run(target, "show", session)
        assert missing.returncode == 1
        assert "has no records" in missing.stderr


def test_a_copy_carries_labels(tmp_path: Path) -> None:
    from agentlog.server.copying import copy_store

    source, destination = tmp_path / "a", tmp_path / "b"
    with JsonlSessionRepository(source) as store:
        store.append(AppendEvent(session_id="s", event=delta("s", "x"), labels={"app": "chat"}))
        store.update_session_labels("s", {"title": "T"})
        store.append(AppendEvent(session_id="plain", event=delta("p", "x")))
    summary = asyncio.run(copy_store(str(source), str(destination), progress=None))
    assert not summary.failures
    asyncio.run(copy_store(str(source), str(destination), progress=None))  # again: unchanged
    with JsonlSessionRepository(destination) as store:
        [labeled, plain] = store.list_sessions().sessions[::-1]
        assert (labeled.session_id, labeled.labels) == ("s", {"app": "chat", "title": "T"})
        assert labeled.labels_version == 1
        assert plain.labels == {}


def test_an_append_between_a_deletes_reading_and_its_unlink_is_deleted_and_reserved_too(
    tmp_path: Path,
) -> None:
    import uuid as uuids

    from agentlog import AlreadyExistsError
    from agentlog.server._pauses import hold

    with JsonlSessionRepository(tmp_path) as store:
        store.max_cached_sessions = 1  # the session's state is evicted while held
        store.append(AppendEvent(session_id="s", event=delta("s", "first")))
        late = AppendEvent(session_id="s", event=delta("s", "late"), id=str(uuids.uuid4()))
        result: list[object] = []
        with hold("delete.reserved") as reserved:
            deleter = threading.Thread(target=lambda: result.append(store.delete_session("s")))
            deleter.start()
            reserved.wait()
            store.append(late)  # read by nobody yet
            store.append(AppendEvent(session_id="other", event=delta("o", "evicts s")))
        deleter.join(30)
        [markers] = result
        assert [m.last_sequence for m in markers] == [2]  # type: ignore[attr-defined]
        assert store.load_session("s") == []
        with pytest.raises(AlreadyExistsError):  # its id was reserved with the rest
            store.append(late)
