"""`PostgresBackend`: the store on a PostgreSQL database shared by many replicas.

A replica holds nothing but a connection pool and a listener: every record,
session and the feed's position counter live in the database, so replicas can
be added, killed and replaced freely. Appends from concurrent calls are sent
together (one round trip, one transaction, one commit: a group commit, see
`_appends`) to `agentlog_append` (see `_schema`), which takes the feed's counter row lock,
decides each append and stores it. Holding that lock to the commit gives the
feed positions in commit order without holes, and gapless session sequences.
Reads are plain indexed queries on immutable rows, paged by key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
import psycopg_pool
from psycopg.conninfo import make_conninfo

from agentlog._events import ReadDirection
from agentlog._records import (
    BranchInfo,
    EventRecord,
    FeedGap,
    FeedItem,
    FeedRecord,
    ForkedFrom,
    SessionDeleted,
    StoredRecord,
)
from agentlog._validation import (
    MAIN,
    check_count,
    check_parent_query,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import (
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ServerError,
    UnavailableError,
)
from agentlog.server import _rules, metrics
from agentlog.server._forks import ForkPlan, branch_exists, source_too_short
from agentlog.server._listing import PageTokens
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
    Appended,
    PendingAppend,
    Place,
    feed_end,
    wrong_expected_sequence,
)
from agentlog.server._tracing import store_span
from agentlog.server.backend import Backend, Growth, GrowthListener, StoreFigures
from agentlog.server.postgres._appends import MAX_BIGINT, GroupCommit, closing_error
from agentlog.server.postgres._errors import redact, translated, wait_for_database
from agentlog.server.postgres._lifecycle import PostgresLifecycle
from agentlog.server.postgres._notify import FeedListener
from agentlog.server.postgres._rows import (
    RECORD_COLUMNS,
    message_fields_of,
    record_of,
    row_bytes,
    stored_of,
)
from agentlog.server.postgres._schema import migrate

log = logging.getLogger("agentlog.postgres")

DEFAULT_POOL_SIZE = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_POLL_SECONDS = 0.5
# Rows one read query fetches; reads page through longer ranges by key.
READ_ROWS = 1024
POOL_WAIT_SECONDS = 10.0


def is_postgres_url(store: str | None) -> bool:
    """Whether `--store` names a PostgreSQL database (else it is a JSONL directory)."""
    return store is not None and store.startswith(("postgresql://", "postgres://"))


def check_store_path(store: str | None) -> None:
    """Refuse a `--store` that is neither a PostgreSQL URL nor a directory path: a URL
    of a database agentlog does not support (`mysql://...`), or a typo of a supported
    one, would otherwise become a JSONL directory named after it."""
    if store is None or is_postgres_url(store):
        return
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", store)
    if scheme is not None and (store[scheme.end() :].startswith("/") or "@" in store):
        raise InvalidArgumentError(
            f"--store {redact(store)} names a {scheme.group(1)}: store, which agentlog does "
            "not support: give postgresql://USER@HOST:PORT/DB for PostgreSQL, or a "
            "directory path for the JSONL store",
            field="store",
        )


def connection_string(url: str, statement_timeout_ms: int) -> str:
    """The libpq connection string for the store's URL, with agentlog's settings."""
    # Every query agentlog makes is answered by walking an index in order: keep
    # plans on that path (not sequential or bitmap scans, which a plan made while
    # the tables were small, or a wide range, would pick), and leave JIT (a cost
    # for short queries) off.
    return make_conninfo(
        url,
        application_name="agentlog",
        options=(
            f"-c statement_timeout={int(statement_timeout_ms)}"
            " -c enable_seqscan=off -c enable_bitmapscan=off -c jit=off"
        ),
    )


def _pool_stat(pool: psycopg_pool.AsyncConnectionPool[Any], key: str) -> Callable[[], float]:
    return lambda: float(pool.get_stats().get(key, 0))


class PostgresBackend(PostgresLifecycle, Backend):
    """The Backend over PostgreSQL; open with `PostgresBackend.open(url)`."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        conninfo: str,
        page_key: bytes,
        last_position: int,
        *,
        poll_seconds: float,
        connect_timeout: float,
        clock: Callable[[], int] = time.time_ns,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    ) -> None:
        self._pool = pool
        self._clock = clock
        self._branch_of = _branch_of
        self._statement_timeout_ms = statement_timeout_ms
        self._page_tokens = PageTokens(page_key)
        self._listener: GrowthListener | None = None
        self._following: Callable[[Place], bool] | None = None
        self._stopping = False
        self._available = True
        self._availability: list[Callable[[bool], None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reported_gaps: set[tuple[str, str]] = set()
        self._feed = FeedListener(
            conninfo,
            self._announce,
            self._set_available,
            poll_seconds=poll_seconds,
            connect_timeout=connect_timeout,
        )
        self._feed.start(last_position)
        for state, key in (
            ("size", "pool_size"),
            ("available", "pool_available"),
            ("waiting", "requests_waiting"),
        ):
            metrics.POSTGRES_POOL.labels(state).set_function(_pool_stat(pool, key))
        self._appends = GroupCommit(
            pool,
            stored=self._stored,
            read_records=self.read_records,
            spawn=self._spawn,
            clock=clock,
        )

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        clock: Callable[[], int] = time.time_ns,
    ) -> PostgresBackend:
        """Connect (waiting up to `connect_timeout` seconds for the database), migrate
        the schema, and start listening. UnavailableError if the database does not
        answer in time; FailedPreconditionError if its schema is newer than ours.
        `clock` is this replica's time for new records' timestamps (nanoseconds); a
        session's never go backwards, whichever replica's clock is behind."""
        try:
            conninfo = connection_string(url, statement_timeout_ms)
        except psycopg.ProgrammingError as exc:
            raise FailedPreconditionError(
                f"--store {redact(url)} is not a PostgreSQL URL libpq can read ({exc})",
                reason="DATABASE_REFUSED",
            ) from None
        await wait_for_database(conninfo, url, connect_timeout)
        pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
            conninfo,
            min_size=min(2, pool_size),
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=False,
            # A call waits this long for a free connection, then is UNAVAILABLE.
            timeout=min(connect_timeout, POOL_WAIT_SECONDS),
            reconnect_timeout=0,  # keep trying: the database comes back
            name="agentlog",
        )
        try:
            await pool.open(wait=True, timeout=connect_timeout)
        except psycopg_pool.PoolTimeout:
            await pool.close()
            raise UnavailableError(
                f"could not connect to PostgreSQL at {redact(url)} within {connect_timeout:g} s; "
                "is it running, and does the URL name the right host, port, user and database?",
                reason="DATABASE_UNAVAILABLE",
            ) from None
        try:
            async with translated(), pool.connection() as conn:
                await migrate(conn)
                row = await (
                    await conn.execute("SELECT page_key, last_position FROM agentlog_meta")
                ).fetchone()
        except BaseException:
            await pool.close()
            raise
        if row is None:
            await pool.close()
            raise ServerError("agentlog_meta is empty: the schema was changed outside agentlog")
        return cls(
            pool,
            conninfo,
            bytes(row[0]),
            int(row[1]),
            poll_seconds=poll_seconds,
            connect_timeout=connect_timeout,
            clock=clock,
            statement_timeout_ms=statement_timeout_ms,
        )

    @property
    def page_tokens(self) -> PageTokens:
        return self._page_tokens

    # -- health ---------------------------------------------------------------

    @property
    def available(self) -> bool:
        return self._available

    def on_availability(self, callback: Callable[[bool], None]) -> None:
        self._availability.append(callback)

    def _set_available(self, available: bool) -> None:
        self._available = available
        if available:
            # Pooled connections from before the outage are dead: drop them now
            # rather than fail a call on each.
            self._spawn(self._pool.check())
        for callback in self._availability:
            callback(available)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- live -----------------------------------------------------------------

    def watch(
        self, listener: GrowthListener, following: Callable[[Place], bool] | None = None
    ) -> None:
        self._listener, self._following = listener, following

    def _listener_for(self, place: Place) -> GrowthListener | None:
        """The listener, if anyone follows the branch (or the feed)."""
        listener = self._listener
        if listener is None or (self._following is not None and not self._following(place)):
            return None
        return listener

    def _announce(self, growth: Growth) -> None:
        listener = self._listener_for(growth.place)
        if listener is not None:
            listener(growth)

    # -- appends --------------------------------------------------------------

    async def append(self, append: PendingAppend) -> Appended:
        if self._stopping:
            raise closing_error()
        self._check_reachable()
        # The write and the sync are one commit of the database's.
        attributes = {"db.system": "postgresql", "agentlog.events": len(append.batch)}
        with store_span("agentlog.store.commit", **attributes):
            appended = await self._appends.submit(append)
        if append.labels and appended.first_sequence == 1:
            await self.take_labels(append, appended)
        return appended

    def _stored(self, appended: Appended, first_position: int) -> None:
        """Announce an append stored here, records at hand, before its caller hears."""
        last_position = first_position + len(appended.batch) - 1
        self._feed.note(first_position, last_position, local=True)
        listener = self._listener_for((appended.session_id, appended.branch_id))
        if listener is None:
            return  # nobody follows it: its records need not be built
        listener(
            Growth(
                appended.session_id,
                appended.last_sequence,
                first_position,
                last_position,
                appended.records(),
                appended.branch_id,
            )
        )

    def _check_reachable(self) -> None:
        """Fail at once, not after the pool's wait, while the database is known down."""
        if not self._available:
            raise UnavailableError(
                "PostgreSQL is unreachable; this replica reconnects by itself: retry",
                reason="DATABASE_UNAVAILABLE",
            )

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[Any]:
        self._check_reachable()
        async with translated(), self._pool.connection() as conn:
            cursor = await conn.execute(query, params, binary=True)
            rows: list[Any] = await cursor.fetchall()
            return rows

    async def _last_sequence(self, session_id: str, branch_id: str) -> int:
        rows = await self._fetch(
            "SELECT last_sequence FROM agentlog_branches WHERE session_id = %s AND branch_id = %s",
            (session_id, branch_id),
        )
        return int(rows[0][0]) if rows else 0

    async def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> AsyncIterator[list[Any]]:
        check_stored_session_id(session_id)
        check_stored_branch_id(branch_id)
        selected = _rules.read_range(from_sequence, limit, direction)
        # The branch as it is now: later appends are not part of this read.
        wanted = selected.sequences(await self._last_sequence(session_id, branch_id))
        if not wanted:
            return
        low, high = min(wanted[0], wanted[-1]), max(wanted[0], wanted[-1])
        order = "DESC" if selected.backwards else "ASC"
        query = (
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " AND branch_id = %s AND sequence BETWEEN %s AND %s"
            f" ORDER BY sequence {order} LIMIT {READ_ROWS}"
        )
        while low <= high:
            rows = await self._fetch(query, (session_id, branch_id, low, high))
            if not rows:
                return
            run: list[Any] = []
            size = 0
            for row in rows:
                length = row_bytes(row)
                if run and (len(run) == MESSAGE_RECORDS or size + length > MESSAGE_BYTES):
                    yield run
                    run, size = [], 0
                run.append(message_fields_of(row))
                size += length
            yield run
            if selected.backwards:
                high = int(rows[-1][1]) - 1
            else:
                low = int(rows[-1][1]) + 1

    async def read_records(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " AND branch_id = %s AND sequence >= %s ORDER BY sequence LIMIT %s",
            (session_id, branch_id, min(from_sequence, MAX_BIGINT), min(limit, MAX_BIGINT)),
        )
        return [record_of(row) for row in rows]

    async def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        check_stored_session_id(session_id)
        check_stored_branch_id(branch_id)
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " AND branch_id = %s ORDER BY sequence DESC LIMIT 1",
            (session_id, branch_id),
        )
        return record_of(rows[0]) if rows else None

    async def read_stored(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[StoredRecord]:
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " AND branch_id = %s AND sequence >= %s ORDER BY sequence LIMIT %s",
            (session_id, branch_id, min(from_sequence, MAX_BIGINT), min(limit, MAX_BIGINT)),
        )
        return [stored_of(row) for row in rows]

    async def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        rows = await self._fetch(
            _bounded(
                f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
                " AND branch_id = %s AND sequence >= %s ORDER BY sequence LIMIT %s",
                "sequence",
            ),
            (session_id, branch_id, min(from_sequence, MAX_BIGINT), min(limit, MESSAGE_RECORDS)),
        )
        return [record_of(row) for row in rows]

    async def fork(self, plan: ForkPlan) -> BranchInfo:
        if self._stopping:
            raise closing_error()
        expected = plan.expected
        if expected is not None and expected > MAX_BIGINT:
            expected = -1  # can never hold
        self._check_reachable()
        params = (
            plan.session_id,
            plan.branch_id,
            min(plan.up_to_sequence, MAX_BIGINT),
            expected,
            plan.new_session_id,
            plan.new_branch_id,
        )
        # A fork's statement copies every record: its timeout grows with their number.
        timeout_ms = self._statement_timeout_ms + plan.up_to_sequence * FORK_MS_PER_RECORD
        with store_span("agentlog.store.fork", **{"db.system": "postgresql"}):
            async with translated():
                try:
                    async with self._pool.connection() as conn, conn.transaction():
                        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
                        cursor = await conn.execute(
                            "SELECT outcome, last_sequence, first_position, first_ns, last_ns,"
                            " head_id FROM agentlog_fork(%s, %s, %s, %s, %s, %s)",
                            params,
                        )
                        row = await cursor.fetchone()
                except psycopg.Error as exc:
                    if exc.sqlstate == BRANCH_MADE_MEANWHILE:
                        raise branch_exists(plan.new_session_id, plan.new_branch_id) from None
                    raise
        if row is None:
            raise ServerError("agentlog_fork answered nothing")
        outcome, last, first_position, first_ns, last_ns, head_id = row
        if outcome == 1:
            raise source_too_short(plan, int(last))
        if outcome == 2:
            raise wrong_expected_sequence(
                plan.session_id, plan.expected or 0, int(last), plan.branch_id
            )
        if outcome == 3:
            raise branch_exists(plan.new_session_id, plan.new_branch_id)
        first_position, count = int(first_position), plan.up_to_sequence
        self._feed.note(first_position, first_position + count - 1, local=True)
        place = (plan.new_session_id, plan.new_branch_id)
        listener = self._listener_for(place)
        if listener is not None:
            growth = Growth(
                plan.new_session_id,
                count,
                first_position,
                first_position + count - 1,
                branch_id=plan.new_branch_id,
            )
            listener(growth)
        return BranchInfo(
            branch_id=plan.new_branch_id,
            event_count=count,
            first_timestamp_ns=int(first_ns),
            last_timestamp_ns=int(last_ns),
            head_id=str(head_id),
            forked_from=plan.origin,
        )

    async def read_children(self, parent_id: str) -> AsyncIterator[list[EventRecord]]:
        check_parent_query(parent_id)
        query = _bounded(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE parent_id = %s"
            " AND (session_id, branch_id, sequence) > (%s, %s, %s)"
            f" ORDER BY session_id, branch_id, sequence LIMIT {MESSAGE_RECORDS}",
            "session_id, branch_id, sequence",
        )
        after: tuple[str, str, int] = ("", "", 0)
        while True:
            rows = await self._fetch(query, (parent_id.encode(), *after))
            if not rows:
                return
            after = (rows[-1][0], rows[-1][6], int(rows[-1][1]))
            records = []
            for row in rows:
                try:
                    records.append(record_of(row))
                except DataLossError as exc:  # that session's loss alone
                    self._report_damage(row[0], exc, "LoadChildren leaves out a child")
            if records:
                yield records

    async def read_feed(self, from_position: int) -> AsyncIterator[list[FeedItem]]:
        """Appended records by their positions; a fork's copies by their branch and
        sequence, their positions a range (see `_schema`)."""
        check_count(from_position, "from_position")
        low = max(min(from_position, MAX_BIGINT), 1)
        high = await self.last_position()  # the feed as it is now
        while low <= high:
            ranges = await self._fetch(_NEXT_FORK_RANGE, (low, high))
            fork = ranges[0] if ranges else None
            if fork is not None and int(fork[0]) <= low:
                first, last, session_id, branch_id = fork
                first, last = int(first), min(int(last), high)
                rows = await self._fetch(
                    _FORK_ROWS,
                    (first - 1, session_id, branch_id, low - first + 1, last - first + 1),
                )
                if not rows:
                    return
                upto = int(rows[-1][0])
            else:
                stop = int(fork[0]) - 1 if fork is not None else high
                rows = await self._fetch(_APPENDED_ROWS, (low, stop))
                # Positions of deleted records are holes; a deletion's marker fills one.
                upto = int(rows[-1][0]) if rows else stop
            markers = await self._fetch(_DELETIONS, (low, upto))
            items = self._feed_items(rows)
            if markers:
                items += [
                    SessionDeleted(int(p), str(s), str(b), int(n), int(t))
                    for p, s, b, n, t in markers
                ]
                items.sort(key=feed_end)
            if items:
                yield items
            low = upto + 1

    def _feed_items(self, rows: list[Any]) -> list[FeedItem]:
        """Feed rows as records; a row that does not decode becomes a FeedGap (joined
        with the gap before it when of the same session), so one damaged record never
        stops the feed for everyone, as in the JSONL store."""
        items: list[FeedItem] = []
        for row in rows:
            position = int(row[0])
            try:
                items.append(FeedRecord(position, record_of(row[1:])))
            except DataLossError as exc:
                last = items[-1] if items else None
                if (
                    isinstance(last, FeedGap)
                    and (last.session_id, last.branch_id) == (row[1], row[7])
                    and last.last_position == position - 1
                ):
                    items[-1] = dataclasses.replace(last, last_position=position)
                    continue
                reason = exc.reason or "DATA_LOSS"
                self._report_damage(row[1], exc, f"the feed skips position {position}")
                items.append(FeedGap(position, position, row[1], reason, exc.message, row[7]))
                metrics.FEED_UNDELIVERED.labels(reason=reason).inc()
        return items

    def _report_damage(self, session_id: str, error: DataLossError, what: str) -> None:
        """Log a damaged record once a session, reason and kind of read."""
        key = (session_id, f"{what.split(' ', maxsplit=1)[0]}:{error.reason}")
        if key not in self._reported_gaps:
            self._reported_gaps.add(key)
            log.error("%s (session %r): %s", what, session_id, error)

    async def last_position(self) -> int:
        rows = await self._fetch("SELECT last_position FROM agentlog_meta", ())
        return int(rows[0][0]) if rows else 0

    def figures(self) -> StoreFigures:
        return StoreFigures(feed_head=self._feed.heard)  # the last position heard of

    # -- lifecycle ------------------------------------------------------------

    def stop_writing(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        self._listener = None
        await self._feed.close()
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._pool.close()


# The SQLSTATE agentlog_fork raises when its new branch was made while it copied.
BRANCH_MADE_MEANWHILE = "AG001"
# A fork's statement timeout grows by this for each record it copies.
FORK_MS_PER_RECORD = 0.2


def _branch_of(row: Sequence[Any]) -> BranchInfo:
    """A BranchInfo from a row of agentlog_branches (as list_sessions selects it)."""
    forked = None if row[6] is None else ForkedFrom(str(row[6]), str(row[7]), int(row[8]))
    return BranchInfo(
        branch_id=str(row[1]),
        event_count=int(row[2]),
        first_timestamp_ns=int(row[3]),
        last_timestamp_ns=int(row[4]),
        head_id=str(row[5]),
        forked_from=forked,
    )


def _bounded(query: str, order: str, columns: str = RECORD_COLUMNS) -> str:
    """`query` (which selects `columns`, `event` among them, in `order`) cut so that its
    rows hold at most MESSAGE_BYTES of events, unless the first alone holds more: the
    database adds the sizes up, so a run of large records is never fetched whole."""
    return (
        f"SELECT {columns} FROM (SELECT q.*, sum(octet_length(q.event))"
        f" OVER (ORDER BY {order}) AS total FROM ({query}) AS q) AS r"
        f" WHERE r.total - octet_length(r.event) < {MESSAGE_BYTES} ORDER BY {order}"
    )


# The feed's queries: appended rows by position; the fork range at or after a
# position; a fork's copies by sequence, with their positions.
_APPENDED_ROWS = _bounded(
    f"SELECT position, {RECORD_COLUMNS} FROM agentlog_events"
    f" WHERE position BETWEEN %s AND %s ORDER BY position LIMIT {MESSAGE_RECORDS}",
    "position",
    f"position, {RECORD_COLUMNS}",
)
_DELETIONS = (
    "SELECT position, session_id, branch_id, last_sequence, deleted_ns FROM agentlog_deletions"
    " WHERE position BETWEEN %s AND %s ORDER BY position"
)
_NEXT_FORK_RANGE = (
    "SELECT first_position, last_position, session_id, branch_id FROM agentlog_fork_ranges"
    " WHERE last_position >= %s AND first_position <= %s ORDER BY last_position LIMIT 1"
)
_FORK_ROWS = _bounded(
    f"SELECT %s + sequence AS position, {RECORD_COLUMNS} FROM agentlog_events"
    " WHERE session_id = %s AND branch_id = %s AND sequence BETWEEN %s AND %s"
    f" ORDER BY sequence LIMIT {MESSAGE_RECORDS}",
    "position",
    f"position, {RECORD_COLUMNS}",
)
