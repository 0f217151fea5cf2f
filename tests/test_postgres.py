"""The PostgreSQL backend beyond the contract suite: the feed's order across
transactions, replicas on one database, faults, migrations and secrets.

Everything runs against the machine's real PostgreSQL (see tests/pg.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentlog import (
    AgentlogClient,
    AlreadyExistsError,
    AppendEvent,
    CaughtUp,
    DataLossError,
    FeedGap,
    FeedRecord,
    JsonValue,
    NewEvent,
    ToolCall,
    ToolCallRequested,
    UnavailableError,
    WrongExpectedSequence,
)
from agentlog._codec import event_to_json
from agentlog.server import JsonlSessionRepository, Server
from agentlog.server._rules import PendingAppend, Prepared
from agentlog.server.metrics import serve_metrics
from agentlog.server.postgres import PostgresBackend, migrate_database
from agentlog.server.postgres._notify import LISTENER_NAME
from agentlog.server.postgres._schema import LATEST
from tests.contract import delta
from tests.pg import control_server, database, name_of, url_of
from tests.servers import LoopThread, running_server, served
from tests.test_observability import scrape, value

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def url() -> Iterator[str]:
    with database() as made:
        yield made


@contextlib.contextmanager
def replica(
    url: str, poll_seconds: float = 0.5, statement_timeout_ms: int = 30_000
) -> Iterator[tuple[str, Server]]:
    """A server on PostgresBackend over `url`; yields its target and the server."""

    async def open_backend() -> PostgresBackend:
        return await PostgresBackend.open(
            url, poll_seconds=poll_seconds, statement_timeout_ms=statement_timeout_ms
        )

    with served(open_backend) as (built, _):
        yield f"127.0.0.1:{built.port}", built


def health_of(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(answer.status)


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Collector:
    """Follows an iterator of a subscription on a thread, keeping what it yields."""

    def __init__(self, items: Iterator[Any]) -> None:
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                self.items.append(item)
        except BaseException as exc:
            self.error = exc

    def records(self) -> list[Any]:
        return [item for item in self.items if not isinstance(item, CaughtUp)]


def raw_append(conn: psycopg.Connection[Any], session_id: str, text: str) -> int:
    """Call the append function as a replica does, in `conn`'s transaction; the
    first position it took."""
    event_json = event_to_json(delta(session_id, text))
    row = conn.execute(
        "SELECT outcome, first_position FROM agentlog_append(%s::text[], %s::text[],"
        " %s::bigint[], %s::integer[], %s::bigint[], %s::integer[], %s::text[], %s::bytea[],"
        " %s::bytea[], %s::bigint)",
        (
            [session_id],
            ["main"],
            [None],
            [1],
            [None],
            [1],
            [str(uuid.uuid4())],
            [None],
            [orjson.dumps(event_json)],
            time.time_ns(),
        ),
    ).fetchone()
    assert row is not None
    assert row[0] == 0
    return int(row[1])


def test_a_follower_never_skips_a_record_committed_late_at_a_lower_position(url: str) -> None:
    with replica(url) as (target, _), AgentlogClient(target) as client:
        client.append(AppendEvent(session_id="warm", event=delta("warm", "0")))
        feed = Collector(client.subscribe_all(from_position=1))
        wait_until(lambda: any(isinstance(i, CaughtUp) for i in feed.items), what="caught up")
        # A transaction takes position 2 and stays open ...
        with psycopg.connect(url) as held:
            lower = raw_append(held, "slow", "lower")
            assert lower == 2
            # ... while other writers append.
            later: list[Any] = []
            writer = threading.Thread(
                target=lambda: later.append(
                    client.append(AppendEvent(session_id="fast", event=delta("fast", "x")))
                )
            )
            writer.start()
            time.sleep(1.0)
            # Nothing past the open transaction is acknowledged or visible yet:
            # a higher position cannot commit before a lower one.
            assert later == []
            assert [i.position for i in feed.records()] == [1]
            held.commit()
        writer.join(30)
        assert len(later) == 1
        assert later[0].sequence == 1
        wait_until(lambda: len(feed.records()) == 3, what="both records")
        records = feed.records()
        assert [(r.position, r.record.session_id) for r in records] == [
            (1, "warm"),
            (2, "slow"),
            (3, "fast"),
        ]


def test_a_subscriber_on_one_replica_gets_every_append_made_through_another(url: str) -> None:
    with (
        replica(url) as (target_a, _),
        replica(url) as (target_b, _),
        AgentlogClient(target_a) as writer,
        AgentlogClient(target_b) as reader,
    ):
        session = f"shared-{uuid.uuid4()}"
        follower = Collector(reader.subscribe_session(session, from_sequence=1))
        feed = Collector(reader.subscribe_all(from_position=1))

        def write(index: int) -> None:
            for n in range(25):
                if n % 5 == 4:
                    events = [NewEvent(event=delta(session, f"{index}-{n}-{k}")) for k in range(3)]
                    writer.append_batch(session, events)
                else:
                    writer.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        stored = writer.load_session(session)
        assert len(stored) == 4 * (20 + 5 * 3)
        wait_until(lambda: len(follower.records()) == len(stored), what="the session's records")
        wait_until(lambda: len(feed.records()) == len(stored), what="the feed's records")
        assert [r.id for r in follower.records()] == [r.id for r in stored]
        positions = [item.position for item in feed.records()]
        assert positions == list(range(1, len(stored) + 1))
        assert sorted(item.record.id for item in feed.records()) == sorted(r.id for r in stored)
        assert follower.error is None
        assert feed.error is None


def _listener_pids(admin: psycopg.Connection[Any], name: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (name, LISTENER_NAME),
    ).fetchall()
    return [int(row[0]) for row in rows]


def test_a_lost_notification_costs_a_delay_never_a_record(url: str) -> None:
    name = name_of(url)
    with (
        replica(url) as (target_a, _),
        replica(url, poll_seconds=0.3) as (target_b, _),
        AgentlogClient(target_a) as writer,
        AgentlogClient(target_b) as reader,
        psycopg.connect(url_of("postgres"), autocommit=True) as admin,
    ):
        session = f"lost-{uuid.uuid4()}"
        follower = Collector(reader.subscribe_session(session, from_sequence=1))
        wait_until(lambda: len(_listener_pids(admin, name)) == 2, what="both listeners")
        wait_until(lambda: bool(follower.items), what="the subscription")
        # Cut every listener off, again and again, while appending: the
        # notifications sent while a listener is away reach nobody.
        cutting = threading.Event()

        def cut() -> None:
            while not cutting.is_set():
                for pid in _listener_pids(admin, name):
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.005)

        cutter = threading.Thread(target=cut)
        cutter.start()
        try:
            for n in range(40):
                writer.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))
                time.sleep(0.01)
        finally:
            cutting.set()
            cutter.join(30)
        wait_until(lambda: len(follower.records()) == 40, what="every record")
        assert [r.sequence for r in follower.records()] == list(range(1, 41))


def test_killing_the_servers_connections_under_load_loses_nothing(url: str) -> None:
    name = name_of(url)
    with (
        replica(url) as (target, _),
        psycopg.connect(url_of("postgres"), autocommit=True) as admin,
    ):
        acknowledged: dict[str, int] = {}
        errors: list[BaseException] = []
        unretried: list[BaseException] = []  # what a client that never retries saw
        stop = threading.Event()

        def write_once(index: int) -> None:
            with AgentlogClient(target, retries=0) as client:
                session = f"once-{index}"
                while not stop.is_set():
                    try:
                        client.append(AppendEvent(session_id=session, event=delta(session, "o")))
                    except Exception as exc:
                        unretried.append(exc)

        def write(index: int) -> None:
            with AgentlogClient(target, retries=50) as client:
                session = f"kill-{index}"
                while not stop.is_set():
                    try:
                        if len(acknowledged) % 3 == 0:
                            events = [NewEvent(event=delta(session, "b")) for _ in range(4)]
                            records = client.append_batch(session, events)
                        else:
                            event = delta(session, "s")
                            records = [client.append(AppendEvent(session_id=session, event=event))]
                    except BaseException as exc:
                        errors.append(exc)
                        return
                    for record in records:
                        acknowledged[record.id] = record.sequence

        threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
        threads += [threading.Thread(target=write_once, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        killed = 0
        for _ in range(5):
            time.sleep(0.4)
            killed += len(
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()",
                    (name,),
                ).fetchall()
            )
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert killed >= 5
        # Appends cut off fail UNAVAILABLE (retryable), never UNKNOWN or INTERNAL.
        assert unretried, "no append was in flight when its connection was killed"
        assert {type(exc) for exc in unretried} == {UnavailableError}
        wait_until(lambda: health_of(target) == SERVING, what="SERVING again")
        with AgentlogClient(target) as client:
            stored = {r.id: r.sequence for i in range(6) for r in client.load_session(f"kill-{i}")}
            for i in range(6):
                sequences = [r.sequence for r in client.load_session(f"kill-{i}")]
                assert sequences == list(range(1, len(sequences) + 1))
        assert len(acknowledged) > 100
        assert {i: stored.get(i) for i in acknowledged} == acknowledged  # each present once


def test_a_database_restart_is_survived_and_reported_by_health(url: str) -> None:
    with replica(url) as (target, _), AgentlogClient(target, retries=100) as client:
        session = f"restart-{uuid.uuid4()}"
        feed = Collector(client.subscribe_all(from_position=1))
        acknowledged: list[str] = []
        statuses: list[int] = []
        stop = threading.Event()

        def write() -> None:
            while not stop.is_set():
                record = client.append(AppendEvent(session_id=session, event=delta(session, "r")))
                acknowledged.append(record.id)

        def watch_health() -> None:
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    statuses.append(health_of(target))
                time.sleep(0.02)

        workers = [threading.Thread(target=write), threading.Thread(target=watch_health)]
        for worker in workers:
            worker.start()
        wait_until(lambda: len(acknowledged) > 20, what="appends before the restart")
        # Stopped and started in two steps rather than `restart`: a quick restart can
        # finish between two health checks, and the test must see the down state.
        control_server("stop")
        try:
            wait_until(lambda: NOT_SERVING in statuses, what="NOT_SERVING while it is down")
        finally:
            control_server("start")
        before = len(acknowledged)
        wait_until(lambda: len(acknowledged) > before + 20, what="appends after the restart")
        wait_until(lambda: statuses[-1:] == [SERVING], what="SERVING after the restart")
        stop.set()
        for worker in workers:
            worker.join(60)
        stored = [r.id for r in client.load_session(session)]
        assert stored == acknowledged  # every acknowledged append, once, in order
        wait_until(lambda: len(feed.records()) == len(stored), what="the feed to resume")
        assert [i.record.id for i in feed.records()] == stored
        assert [i.position for i in feed.records()] == list(range(1, len(stored) + 1))
        assert all(isinstance(i, FeedRecord) for i in feed.records())


def test_replicas_starting_together_migrate_once(url: str) -> None:
    loop = LoopThread()
    try:
        results = loop.run(_migrate_together(url))
    finally:
        loop.close()
    assert sorted(results) == [(0, LATEST)] + [(LATEST, LATEST)] * 5
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM agentlog_schema ORDER BY version").fetchall()
    assert rows == [(version,) for version in range(1, LATEST + 1)]  # each applied once


async def _migrate_together(url: str) -> list[tuple[int, int]]:
    import asyncio

    return list(await asyncio.gather(*(migrate_database(url) for _ in range(6))))


def test_a_database_written_before_branches_is_migrated_and_served_as_branch_main(
    url: str,
) -> None:
    from agentlog.server.postgres._schema import MIGRATIONS

    with psycopg.connect(url, autocommit=True) as conn:  # as agentlog 1 left it
        conn.execute(
            "CREATE TABLE agentlog_schema (version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(MIGRATIONS[0][1].encode())
        conn.execute("INSERT INTO agentlog_schema (version) VALUES (1)")
        ids = []
        for text in ["a", "b", "c"]:
            record_id = str(uuid.uuid4())
            ids.append(record_id)
            row = conn.execute(
                "SELECT outcome FROM agentlog_append(%s::text[], %s::bigint[], %s::integer[],"
                " %s::bigint[], %s::integer[], %s::text[], %s::bytea[], %s::bytea[], %s::bigint)",
                (
                    ["old"],
                    [None],
                    [1],
                    [None],
                    [1],
                    [record_id],
                    [ids[-2].encode() if len(ids) > 1 else None],
                    [orjson.dumps(event_to_json(delta("old", text)))],
                    time.time_ns(),
                ),
            ).fetchone()
            assert row == (0,)
    with running_server(_opener(url)) as target, AgentlogClient(target) as client:
        records = client.load_session("old")
        assert [(r.id, r.branch_id, r.sequence) for r in records] == [
            (record_id, "main", n) for n, record_id in enumerate(ids, 1)
        ]
        [info] = client.list_sessions().sessions
        assert [(b.branch_id, b.event_count) for b in info.branches] == [("main", 3)]
        assert client.append(AppendEvent(session_id="old", event=delta("old", "d"))).sequence == 4
        made = client.fork_session("old", 3, new_branch_id="later")
        copies = client.load_session("old", branch_id="later")
        assert made.event_count == 3
        assert copies[2].parent_id == copies[1].id
        assert [c.branch_id for c in client.load_children(ids[0])] == ["main"]
    with psycopg.connect(url) as conn:
        versions = conn.execute("SELECT version FROM agentlog_schema ORDER BY version").fetchall()
    assert versions == [(version,) for version in range(1, LATEST + 1)]


def _opener(url: str) -> Any:
    async def open_backend() -> PostgresBackend:
        return await PostgresBackend.open(url)

    return open_backend


def test_a_schema_newer_than_this_agentlog_is_refused(url: str) -> None:
    loop = LoopThread()
    try:
        loop.run(migrate_database(url))
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO agentlog_schema (version) VALUES (%s)", (LATEST + 1,))
        result = subprocess.run(
            [sys.executable, "-m", "agentlog.server", "migrate", "--store", url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        loop.close()
    assert result.returncode == 1
    assert f"schema is version {LATEST + 1}, newer than this agentlog" in result.stderr


def test_migrate_command_says_what_it_did(url: str) -> None:
    def migrate() -> str:
        result = subprocess.run(
            [sys.executable, "-m", "agentlog.server", "migrate"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**_env(), "AGENTLOG_STORE": url},
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert f"migrated from schema version 0 to {LATEST}" in migrate()
    assert "nothing to do" in migrate()


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_passwords_never_appear_in_messages() -> None:
    secret = "s3cret-Pa55"
    store = f"postgresql://agentlog:{secret}@127.0.0.1:1/nothing"
    for command in (
        ["serve", "--addr", "127.0.0.1:0", "--store", store, "--connect-timeout", "1"],
        ["migrate", "--store", store, "--connect-timeout", "1"],
        ["copy", store, store + "x", "--connect-timeout", "1"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "agentlog.server", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, (command, result.stderr)
        assert secret not in result.stderr + result.stdout
        assert "PostgreSQL" in result.stderr
        assert "127.0.0.1" in result.stderr  # says where it tried


def test_json_is_stored_byte_for_byte_as_the_jsonl_store_writes_it(
    url: str, tmp_path: Path
) -> None:
    value: JsonValue = {
        "z": 18446744073709551615,
        "a": [9007199254740993, -0.0, 1.5e300, None, {}, []],
        "m": "nul \x00, line separator \u2028, é",
        "b": {"nested": True, "n": -(2**63)},
    }
    session = "bytes"
    event = ToolCallRequested(
        run_id="r",
        session_id=session,
        iteration=0,
        call=ToolCall(call_id="c", tool_name="t", input=value),
    )
    with JsonlSessionRepository(tmp_path / "data") as jsonl:
        jsonl.append(AppendEvent(session_id=session, event=event))
    line = (tmp_path / "data" / f"{session}.jsonl").read_bytes()
    in_file = line[line.index(b'"event":') + len(b'"event":') : line.rindex(b',"sequence"')]
    with replica(url) as (target, _), AgentlogClient(target) as client:
        stored = client.append(AppendEvent(session_id=session, event=event))
        assert client.load_session(session) == [stored]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT event FROM agentlog_events").fetchone()
    assert row is not None
    assert bytes(row[0]) == in_file
    assert list(orjson.loads(in_file)["call"]["input"]) == ["z", "a", "m", "b"]  # key order


def test_appends_committed_together_are_each_decided_alone(url: str) -> None:
    async def scenario() -> list[Any]:
        backend = await PostgresBackend.open(url)
        try:
            taken = str(uuid.uuid4())
            await backend.append(_pending("elsewhere", [taken]))
            first = str(uuid.uuid4())
            appends = [
                _pending("s1", [first]),
                _pending("s1", [str(uuid.uuid4())], expected=0),  # s1 has 1 by then
                _pending("s1", [first]),  # a retry of the first, sent with it
                _pending("s2", [str(uuid.uuid4()), taken]),  # an id of another session
                _pending("s2", [str(uuid.uuid4()) for _ in range(3)], expected=0),
                _pending("s1", [str(uuid.uuid4())], expected=2**64 - 1),
            ]
            return list(
                await asyncio.gather(*(backend.append(a) for a in appends), return_exceptions=True)
            )
        finally:
            await backend.close()

    loop = LoopThread()
    try:
        stored, refused, retried, conflict, batch, impossible = loop.run(scenario())
    finally:
        loop.close()
    assert stored.first_sequence == 1
    assert isinstance(refused, WrongExpectedSequence)
    assert refused.actual_sequence == 1
    assert retried.records()[0].id == stored.records()[0].id
    assert retried.first_sequence == 1
    assert isinstance(conflict, AlreadyExistsError)
    assert conflict.metadata["session_id"] == "elsewhere"
    assert [r.sequence for r in batch.records()] == [1, 2, 3]
    assert isinstance(impossible, WrongExpectedSequence)
    assert impossible.expected_sequence == 2**64 - 1


def test_an_append_the_database_refuses_fails_alone_in_its_group(url: str) -> None:
    # An append that makes the database fail (here, a trigger an operator added) is
    # sent with others in one group commit: the group is decided again append by
    # append, so only that one fails; a record too large is refused before it is
    # sent; the others are stored.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.session_id = 'poison' THEN RAISE EXCEPTION 'no poison here'; END IF;"
            " RETURN NEW; END $$"
        )

    async def scenario() -> list[Any]:
        backend = await PostgresBackend.open(url)
        try:
            await backend.append(_pending("warm", [str(uuid.uuid4())]))  # schema made
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(
                    "CREATE TRIGGER poison BEFORE INSERT ON agentlog_events FOR EACH ROW"
                    " EXECUTE FUNCTION refuse_poison()"
                )
            huge = event_to_json(delta("big", "x" * (5 << 20)))
            appends = [
                _pending("good-1", [str(uuid.uuid4())]),
                _pending("poison", [str(uuid.uuid4())]),
                PendingAppend("big", [Prepared(str(uuid.uuid4()), None, huge)], None),
                _pending("good-2", [str(uuid.uuid4()) for _ in range(2)]),
                _pending("good-1", [str(uuid.uuid4())], expected=1),
            ]
            # Held back until all are queued, so they go to the database together.
            lock = await psycopg.AsyncConnection.connect(url)
            await lock.execute("SELECT 1 FROM agentlog_meta FOR UPDATE")
            waiting = [asyncio.ensure_future(backend.append(a)) for a in appends]
            await asyncio.sleep(0.3)
            await lock.rollback()
            await lock.close()
            return list(await asyncio.gather(*waiting, return_exceptions=True))
        finally:
            await backend.close()

    loop = LoopThread()
    try:
        good, poison, big, batch, expected = loop.run(scenario())
    finally:
        loop.close()
    assert good.first_sequence == 1
    assert isinstance(poison, Exception)
    assert getattr(big, "reason", None) == "RECORD_TOO_LARGE"
    assert [r.sequence for r in batch.records()] == [1, 2]
    assert expected.first_sequence == 2


def _pending(session_id: str, ids: list[str], expected: int | None = None) -> PendingAppend:
    event_json = event_to_json(delta(session_id, "g"))
    return PendingAppend(session_id, [Prepared(i, None, event_json) for i in ids], expected)


def test_a_statement_past_its_timeout_is_unavailable_and_stores_nothing(url: str) -> None:
    with replica(url, statement_timeout_ms=300) as (target, _), AgentlogClient(target) as warm:
        warm.append(AppendEvent(session_id="t", event=delta("t", "0")))
        with psycopg.connect(url) as blocker, AgentlogClient(target, retries=0) as client:
            # Another transaction holds the feed's lock for longer than the timeout.
            blocker.execute("SELECT * FROM agentlog_meta FOR UPDATE")
            with pytest.raises(UnavailableError) as refused:
                client.append(AppendEvent(session_id="t", event=delta("t", "late")))
            blocker.rollback()
        assert refused.value.reason == "DATABASE_TIMEOUT"
        assert "statement timeout" in str(refused.value)
        assert [r.event for r in warm.load_session("t")] == [delta("t", "0")]
        warm.append(AppendEvent(session_id="t", event=delta("t", "1")))  # and it recovers
        assert warm.head("t").sequence == 2  # type: ignore[union-attr]


def test_a_row_changed_by_hand_harms_only_its_own_session(url: str) -> None:
    with replica(url) as (target, _), AgentlogClient(target) as client:
        for n in range(3):
            for session in ("good", "bad"):
                client.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))
        with psycopg.connect(url) as conn:
            conn.execute(
                "UPDATE agentlog_events SET event = %s WHERE session_id = 'bad' AND sequence >= 2",
                (b'{"part_type": "no_such_kind"}',),
            )
        with pytest.raises(DataLossError) as damaged:
            client.load_session("bad")
        assert damaged.value.metadata["session_id"] == "bad"
        assert "changed outside agentlog" in str(damaged.value)
        assert len(client.load_session("good")) == 3
        feed = []
        for item in client.subscribe_all(from_position=1):
            if isinstance(item, CaughtUp):
                break
            feed.append(item)
        # Positions 4 and 6 hold bad's damaged records: gaps, and the feed goes on.
        assert [type(i).__name__ for i in feed] == [
            "FeedRecord",
            "FeedRecord",
            "FeedRecord",
            "FeedGap",
            "FeedRecord",
            "FeedGap",
        ]
        gaps = [i for i in feed if isinstance(i, FeedGap)]
        assert [(g.first_position, g.last_position, g.session_id) for g in gaps] == [
            (4, 4, "bad"),
            (6, 6, "bad"),
        ]
        assert gaps[0].reason == "DAMAGED_RECORD"


def test_the_metrics_show_the_pool_and_the_feed_head(url: str) -> None:
    metrics_server = serve_metrics("127.0.0.1:0")
    port = metrics_server.port
    with replica(url) as (target, _), AgentlogClient(target, retries=0) as client:
        before = scrape(f"http://127.0.0.1:{port}/metrics")
        client.append_batch("metered", [NewEvent(event=delta("metered", "x"))] * 5)
        after = scrape(f"http://127.0.0.1:{port}/metrics")
    metrics_server.close()
    assert value(after, "agentlog_postgres_pool_connections", state="size") >= 1
    assert value(after, "agentlog_postgres_pool_connections", state="waiting") == 0
    assert (
        value(after, "agentlog_feed_head_position") - value(before, "agentlog_feed_head_position")
        == 5
    )
    assert (
        value(after, "agentlog_appended_events_total")
        - value(before, "agentlog_appended_events_total")
        == 5
    )
