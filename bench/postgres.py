"""The PostgreSQL store's figures (`python -m bench --store postgresql://...`).

The same figures as the JSONL store's, each with a `pg_` name and a ceiling from
the same run, plus two replicas on one database. Every database used is made
here on the given server and dropped afterwards. Client, servers and the
database share the machine.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from agentlog import AgentlogClient
from agentlog.server.copying import copy_store
from bench.common import (
    Results,
    append_call,
    bench_feed,
    bench_subscriptions,
    concurrent_rate,
    empty_call,
    median_page_ms,
    server,
    single_client_figures,
    stream_ceiling,
    timed_ms,
    write_arcan_session,
)


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A new database on the server `server_url` names; yields its URL, then drops it."""
    name = f"agentlog_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name} ENCODING 'UTF8' TEMPLATE template0")
    try:
        params = conninfo_to_dict(server_url)
        params["dbname"] = name
        yield _as_url(params)
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _as_url(params: Mapping[str, object]) -> str:
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    host, port = params.get("host", "127.0.0.1"), params.get("port", 5432)
    return f"postgresql://{user}{password}@{host}:{port}/{params['dbname']}"


@contextmanager
def pg_server(tmp: Path, url: str) -> Iterator[str]:
    with server(tmp / "unused", "--store", url) as (target, _):
        yield target


def copy_in(source: Path, url: str) -> float:
    """Copy a JSONL directory into the database; records per second."""
    summary = asyncio.run(copy_store(str(source), url, progress=None))
    return summary.records / summary.seconds if summary.seconds else 0.0


def raw_batch_rows_per_s(url: str, batches: int) -> float:
    """Rows per second PostgreSQL itself takes in committed 100-row batches, one
    writer, with the events table's row shape and indexes: the batch ceiling."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE raw_ceiling (position bigint PRIMARY KEY, session_id text NOT NULL,"
            " sequence bigint NOT NULL, id text UNIQUE, parent_id bytea, timestamp_ns bigint,"
            " event bytea, UNIQUE (session_id, sequence))"
        )
        event = b'{"part_type":"text_delta","delta":"' + b"x" * 90 + b'"}'
        position = 0
        start = time.perf_counter()
        for _ in range(batches):
            with conn.transaction(), conn.cursor() as cursor:
                rows = []
                for _ in range(100):
                    position += 1
                    rows.append((position, "s", position, str(uuid.uuid4()), None, 1, event))
                cursor.executemany(
                    "INSERT INTO raw_ceiling VALUES (%s, %s, %s, %s, %s, %s, %s)", rows
                )
        return batches * 100 / (time.perf_counter() - start)


def bench_postgres_appends(
    tmp: Path, results: Results, server_url: str, scale: int, rounds: int
) -> None:
    with bench_database(server_url) as url, pg_server(tmp, url) as target:
        batches = single_client_figures(target, results, scale, lambda figure: f"pg_{figure}")
        results["pg_raw_batch_rows_per_s"] = (raw_batch_rows_per_s(url, batches), "1/s")
        calls = scale * 4
        concurrent_rate(target, 64, calls // 4, append_call)
        empty, appends = [], []
        for _ in range(rounds):
            empty.append(concurrent_rate(target, 64, calls, empty_call))
            appends.append(concurrent_rate(target, 64, calls, append_call))
        results["pg_empty_unary_rps_c64"] = (statistics.median(empty), "1/s")
        results["pg_append_rps_c64"] = (statistics.median(appends), "1/s")


def bench_postgres_reads(tmp: Path, results: Results, server_url: str, big: int) -> None:
    data = tmp / "pg-reads"
    data.mkdir()
    write_arcan_session(data / "one.jsonl", "one", 1)
    write_arcan_session(data / "big.jsonl", "big", big)
    with bench_database(server_url) as url:
        results["pg_copy_in_records_per_s"] = (copy_in(data, url), "1/s")
        with pg_server(tmp, url) as target, AgentlogClient(target, timeout=600) as client:
            results["pg_head_ms_1_event"] = (timed_ms(lambda: client.head("one")), "ms")
            results["pg_head_ms_1m_events"] = (timed_ms(lambda: client.head("big")), "ms")
            reads = []
            for _ in range(3):
                start = time.perf_counter()
                count = sum(1 for _ in client.read_session("big"))
                reads.append(count / (time.perf_counter() - start))
            results["pg_load_session_records_per_s"] = (statistics.median(reads), "1/s")
    if "stream_ceiling_records_per_s" not in results:
        results["stream_ceiling_records_per_s"] = (stream_ceiling(data / "big.jsonl", big), "1/s")


def bench_postgres_children(tmp: Path, results: Results, server_url: str, sessions: int) -> None:
    """LoadChildren of a record with 10 children among 10 or N sessions; ListSessions pages."""
    parent = str(uuid.uuid4())
    for count, name in ((10, "10_sessions"), (sessions, f"{sessions // 1000}k_sessions")):
        data = tmp / f"pg-children-{count}"
        data.mkdir()
        for n in range(count):
            child_of = parent if n % (count // 10) == 0 else None
            write_arcan_session(data / f"s{n:07d}.jsonl", f"s{n:07d}", 3, child_of)
        with bench_database(server_url) as url:
            copy_in(data, url)
            with pg_server(tmp, url) as target, AgentlogClient(target, timeout=600) as client:
                children = functools.partial(client.load_children, parent)
                results[f"pg_children_ms_{name}"] = (timed_ms(children, 5), "ms")
                if count == sessions:
                    token = client.list_sessions(page_size=100).next_page_token
                    page_ms = median_page_ms(client, token)
                    results[f"pg_list_page_ms_{name}"] = (page_ms, "ms")


def bench_postgres_replicas(tmp: Path, results: Results, server_url: str, scale: int) -> None:
    """Two replicas on one database: the feed on one while 16 writers use both, the delay
    from an append through one to a subscriber of the other, and Append at 64 clients."""
    with (
        bench_database(server_url) as url,
        pg_server(tmp, url) as first,
        pg_server(tmp, url) as second,
    ):
        bench_feed(first, results, scale, writer_targets=[first, second], prefix="pg_2_replicas_")
        bench_subscriptions(
            second, results, 1, 200, writer_target=first, prefix="pg_cross_replica_"
        )
        calls = scale * 4

        async def both() -> list[float]:
            return list(
                await asyncio.gather(
                    asyncio.to_thread(concurrent_rate, first, 32, calls // 2, append_call),
                    asyncio.to_thread(concurrent_rate, second, 32, calls // 2, append_call),
                )
            )

        results["pg_2_replicas_append_rps_c64"] = (sum(asyncio.run(both())), "1/s")


def run(tmp: Path, results: Results, server_url: str, args: object) -> None:
    scale, rounds = int(getattr(args, "scale", 1000)), int(getattr(args, "rounds", 5))
    big, sessions = int(getattr(args, "big", 1_000_000)), int(getattr(args, "sessions", 100_000))
    bench_postgres_appends(tmp, results, server_url, scale, rounds)
    bench_postgres_reads(tmp, results, server_url, big)
    bench_postgres_children(tmp, results, server_url, sessions)
    bench_postgres_replicas(tmp, results, server_url, scale)


CEILINGS = {
    "pg_append_rps_c1": "pg_empty_unary_rps_c1",
    "pg_append_rps_c64": "pg_empty_unary_rps_c64",
    "pg_append_batch_events_per_s": "pg_raw_batch_rows_per_s",
    "pg_append_batch_events_per_s_c8": "pg_raw_batch_rows_per_s",
    "pg_head_ms_1m_events": "pg_head_ms_1_event",
    "pg_load_session_records_per_s": "stream_ceiling_records_per_s",
    "pg_children_ms_100k_sessions": "pg_children_ms_10_sessions",
    "pg_2_replicas_feed_delivered_events_per_s_16_writers": (
        "pg_2_replicas_feed_writers_events_per_s_16"
    ),
    "pg_2_replicas_append_rps_c64": "pg_empty_unary_rps_c64",
}
