"""The session lifecycle: the delete of a 1,000,000-record session (records per second
beside a plain copy of its file); ListSessions filtered by one label over 100,000
sessions, first and later pages (milliseconds a page beside an unfiltered page); and a
retention sweep of 10,000 expired sessions while 16 writers append (their rate during
the sweep beside their rate after it, in the same server). On JSONL, and on PostgreSQL
with --store."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg

from agentlog import AgentlogClient, AppendEvent, AsyncAgentlogClient
from agentlog.server.jsonl.sessions_db import SESSIONS_DB, SessionsDb
from bench.branches import raw_copy_records_per_s, write_branch
from bench.common import DELTA_TEXT, Results, delta, server

LABELED = 100_000
EXPIRED = 10_000
WRITERS = 16
OLD = "2020-01-01T00:00:00.000000000Z"


def _line(session: str, timestamp: str = OLD) -> bytes:
    return orjson.dumps(
        {
            "id": str(uuid.uuid4()),
            "session_id": session,
            "parent_id": None,
            "timestamp": timestamp,
            "event": {
                "part_type": "text_delta",
                "run_id": "r",
                "session_id": session,
                "iteration": 1,
                "delta": DELTA_TEXT,
            },
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def write_sessions(root: Path, count: int, prefix: str, timestamp: str = OLD) -> None:
    """`count` one-record sessions in the seed layout, as arcan's first store writes."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        session = f"{prefix}{i:06d}"
        (root / f"{session}.jsonl").write_bytes(_line(session, timestamp))


def label_directory(root: Path, count: int, prefix: str) -> None:
    """Labels for the sessions, straight into the store's sessions database: app=app-N
    (N = i % 10, so a label holds 10,000 sessions) and a user of its own."""
    SessionsDb(root).close()  # its schema
    db = sqlite3.connect(root / SESSIONS_DB)
    with db:
        db.executemany(
            "INSERT INTO labels VALUES (?, 1, ?)",
            (
                (
                    f"{prefix}{i:06d}",
                    orjson.dumps({"app": f"app-{i % 10}", "user": f"u{i}"}).decode(),
                )
                for i in range(count)
            ),
        )
    db.close()


def page_ms(target: str, pages: int, **filters: Any) -> tuple[float, float]:
    """Median milliseconds of the first page, and of pages after it (100 sessions each)."""
    with AgentlogClient(target, timeout=120) as client:
        client.list_sessions(page_size=100, **filters)  # warm: states built once
        firsts, laters = [], []
        for _ in range(5):
            start = time.perf_counter()
            page = client.list_sessions(page_size=100, **filters)
            firsts.append(time.perf_counter() - start)
        token = page.next_page_token
        for _ in range(pages):
            start = time.perf_counter()
            page = client.list_sessions(page_size=100, page_token=token, **filters)
            laters.append(time.perf_counter() - start)
            token = page.next_page_token
            if token is None:
                break
    return statistics.median(firsts) * 1000, statistics.median(laters) * 1000


def listing_figures(target: str, results: Results, prefix: str) -> None:
    first, later = page_ms(target, 30, labels={"app": "app-3"})
    results[f"{prefix}list_by_label_first_page_ms_100k"] = (first, "ms")
    results[f"{prefix}list_by_label_later_page_ms_100k"] = (later, "ms")
    first, later = page_ms(target, 30)
    results[f"{prefix}list_unfiltered_first_page_ms_100k"] = (first, "ms")
    results[f"{prefix}list_unfiltered_later_page_ms_100k"] = (later, "ms")


def delete_figures(target: str, results: Results, prefix: str, count: int) -> None:
    with AgentlogClient(target, timeout=3600) as client:
        client.head("big")  # its state built before the clock starts
        start = time.perf_counter()
        [marker] = client.delete_session("big")
        elapsed = time.perf_counter() - start
        assert marker.last_sequence == count
    results[f"{prefix}delete_records_per_s_1m"] = (count / elapsed, "1/s")


async def _writers(target: str, stop: threading.Event, seconds: float | None) -> float:
    """Appends per second from WRITERS concurrent writers until `stop` is set (or for
    `seconds`)."""
    async with AsyncAgentlogClient(target) as client:
        done = 0
        until = None if seconds is None else time.perf_counter() + seconds

        async def writer(k: int) -> None:
            nonlocal done
            session = f"live-{k}"
            n = 0
            while not stop.is_set() and (until is None or time.perf_counter() < until):
                await client.append(AppendEvent(session_id=session, event=delta(session, n)))
                n += 1
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(writer(k) for k in range(WRITERS)))
        return done / (time.perf_counter() - start)


def sweep_figures(target: str, log: list[str], results: Results, prefix: str) -> None:
    """Writers' rate while the first sweep runs (it starts with the server), then after."""
    swept = threading.Event()

    def watch() -> None:
        while not any(re.search(rf"deleted {EXPIRED} branch", line) for line in log):
            time.sleep(0.01)
        swept.set()

    threading.Thread(target=watch, daemon=True).start()
    start = time.perf_counter()
    during = asyncio.run(_writers(target, swept, None))
    took = time.perf_counter() - start
    after = asyncio.run(_writers(target, threading.Event(), max(took, 3.0)))
    results[f"{prefix}writers_rps_during_sweep_10k"] = (during, "1/s")
    results[f"{prefix}writers_rps_without_sweep"] = (after, "1/s")
    results[f"{prefix}sweep_seconds_10k"] = (took, "s")


def bench_jsonl(tmp: Path, results: Results, args: Any) -> None:
    big = int(args.big)
    data = tmp / "delete"
    data.mkdir()
    write_branch(data / "big__main.jsonl", "big", "main", big)
    results["lifecycle_raw_copy_records_per_s"] = (
        raw_copy_records_per_s(data / "big__main.jsonl", big),
        "1/s",
    )
    with server(data) as (target, _):
        delete_figures(target, results, "", big)
    labeled = tmp / "labeled"
    write_sessions(labeled, LABELED, "s-")
    label_directory(labeled, LABELED, "s-")
    with server(labeled) as (target, _):
        listing_figures(target, results, "")
    expired = tmp / "expired"
    write_sessions(expired, EXPIRED, "old-")
    sweep_run(expired, results, "", [])


def sweep_run(data: Path, results: Results, prefix: str, extra: list[str]) -> None:
    log: list[str] = []
    args = (*extra, "--retention", "30d", "--retention-interval", "1h")
    with server(data, *args, log=log) as (target, _):
        sweep_figures(target, log, results, prefix)


def bench_postgres(tmp: Path, results: Results, server_url: str, args: Any) -> None:
    from bench.postgres import bench_database, copy_in

    big = int(args.big)
    with bench_database(server_url) as url:
        data = tmp / "pg-delete"
        data.mkdir()
        write_branch(data / "big__main.jsonl", "big", "main", big)
        with contextlib.suppress(FileNotFoundError):
            (data / ".agentlog.layout").unlink()
        copy_in(data, url)
        with server(tmp / "pg-unused", "--store", url) as (target, _):
            delete_figures(target, results, "pg_", big)
    with (
        bench_database(server_url) as url,
        server(tmp / "pg-unused", "--store", url) as (target, _),
    ):
        _fill_postgres(url, LABELED, labeled=True, prefix="s-", old=False)
        listing_figures(target, results, "pg_")
    with bench_database(server_url) as url:
        with server(tmp / "pg-unused", "--store", url):
            pass  # the schema made
        _fill_postgres(url, EXPIRED, labeled=False, prefix="old-", old=True)
        sweep_run(tmp / "pg-unused", results, "pg_", ["--store", url])


def _fill_postgres(url: str, count: int, *, labeled: bool, prefix: str, old: bool) -> None:
    """One-record sessions straight into the tables (as a copy would leave them)."""
    ns = 1_577_836_800 * 10**9 if old else time.time_ns()
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        position = int(conn.execute("SELECT last_position FROM agentlog_meta").fetchone()[0])  # type: ignore[index]
        events, branches, labels, pairs = [], [], [], []
        for i in range(count):
            session = f"{prefix}{i:06d}"
            record_id = str(uuid.uuid4())
            position += 1
            event = orjson.dumps(
                {
                    "part_type": "text_delta",
                    "run_id": "r",
                    "session_id": session,
                    "iteration": 1,
                    "delta": DELTA_TEXT,
                }
            )
            events.append((position, session, "main", 1, record_id, None, ns, event))
            branches.append((session, "main", 1, ns, ns, record_id))
            if labeled:
                app = f"app-{i % 10}"
                labels.append((session, 1, orjson.dumps({"app": app, "user": f"u{i}"}).decode()))
                pairs += [("app", app, session), ("user", f"u{i}", session)]
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO agentlog_events (position, session_id, branch_id, sequence, id,"
                " parent_id, timestamp_ns, event) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                events,
            )
            cursor.executemany(
                "INSERT INTO agentlog_branches (session_id, branch_id, last_sequence,"
                " first_timestamp_ns, last_timestamp_ns, head_id) VALUES (%s, %s, %s, %s, %s, %s)",
                branches,
            )
            if labeled:
                cursor.executemany("INSERT INTO agentlog_labels VALUES (%s, %s, %s::jsonb)", labels)
                cursor.executemany("INSERT INTO agentlog_label_pairs VALUES (%s, %s, %s)", pairs)
        conn.execute("UPDATE agentlog_meta SET last_position = %s", (position,))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")


def run(tmp: Path, results: Results, args: Any) -> None:
    bench_jsonl(tmp, results, args)
    if args.store:
        bench_postgres(tmp, results, args.store, args)


CEILINGS = {
    "delete_records_per_s_1m": "lifecycle_raw_copy_records_per_s",
    "pg_delete_records_per_s_1m": "lifecycle_raw_copy_records_per_s",
    "list_by_label_first_page_ms_100k": "list_unfiltered_first_page_ms_100k",
    "list_by_label_later_page_ms_100k": "list_unfiltered_later_page_ms_100k",
    "pg_list_by_label_first_page_ms_100k": "pg_list_unfiltered_first_page_ms_100k",
    "pg_list_by_label_later_page_ms_100k": "pg_list_unfiltered_later_page_ms_100k",
    "writers_rps_during_sweep_10k": "writers_rps_without_sweep",
    "pg_writers_rps_during_sweep_10k": "pg_writers_rps_without_sweep",
}
