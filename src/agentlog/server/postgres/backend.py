"""`PostgresBackend`: the store on a PostgreSQL database shared by many replicas.

A replica holds nothing but a connection pool and a listener: every record,
session and the feed's position counter live in the database, so replicas can
be added, killed and replaced freely. Appends from concurrent calls are sent
together (one round trip, one transaction, one commit: a group commit) to
`agentlog_append` (see `_schema`), which takes the feed's counter row lock,
decides each append and stores it. Holding that lock to the commit gives the
feed positions in commit order without holes, and gapless session sequences.
Reads are plain indexed queries on immutable rows, paged by key.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import orjson
import psycopg_pool
from psycopg.conninfo import make_conninfo

from agentlog._codec import event_to_json
from agentlog._events import ReadDirection
from agentlog._records import EventRecord, FeedGap, FeedRecord, SessionInfo, SessionPage
from agentlog._validation import (
    check_count,
    check_page_size,
    check_parent_query,
    check_stored_session_id,
)
from agentlog.errors import AgentlogError, DataLossError, ServerError, UnavailableError
from agentlog.server import _rules, metrics
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
    Appended,
    PageTokens,
    PendingAppend,
    check_append,
    content_digest,
    wrong_expected_sequence,
)
from agentlog.server.backend import Backend, Growth, GrowthListener
from agentlog.server.postgres._errors import redact, translated
from agentlog.server.postgres._notify import FeedListener
from agentlog.server.postgres._rows import (
    RECORD_COLUMNS,
    message_fields_of,
    record_of,
    row_bytes,
)
from agentlog.server.postgres._schema import migrate

log = logging.getLogger("agentlog.postgres")

DEFAULT_POOL_SIZE = 10
DEFAULT_STATEMENT_TIMEOUT_MS = 30_000
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_POLL_SECONDS = 0.5
# Rows one read query fetches; reads page through longer ranges by key.
READ_ROWS = 1024
# A group commit sends at most this many events, and this many groups go to
# the database at once (the counter lock serialises them there; two keep one
# being prepared while the other commits).
GROUP_EVENTS = 2048
GROUP_LANES = 2
MAX_BIGINT = 2**63 - 1
POOL_WAIT_SECONDS = 10.0

# Parameters in binary (%b): a third of the time text arrays of bytes take.
_APPEND_SQL = (
    "SELECT outcome, first_sequence, first_position, stored_ns FROM agentlog_append("
    "%b::text[], %b::bigint[], %b::integer[], %b::bigint[], %b::integer[], %b::text[], "
    "%b::bytea[], %b::bytea[], %b::bigint)"
)
STORED, KNOWN, NOT_EXPECTED = 0, 1, 2


def _is_url(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


def is_postgres_url(store: str | None) -> bool:
    """Whether `--store` names a PostgreSQL database (else it is a JSONL directory)."""
    return store is not None and _is_url(store)


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


class _Encoded:
    """A checked append as the append function's arrays take it."""

    __slots__ = ("append", "events", "expected", "parents")

    def __init__(self, append: PendingAppend) -> None:
        self.append = append
        batch = append.batch
        self.events = [orjson.dumps(item.event_json) for item in batch]
        self.parents = [None if i.parent_id is None else i.parent_id.encode() for i in batch]
        overhead = len(orjson.dumps(append.session_id)) + 180
        for index, (item, event) in enumerate(zip(batch, self.events, strict=True)):
            # The size of its line in a JSONL store, so both refuse the same records.
            size = len(event) + overhead + (len(item.parent_id) if item.parent_id else 0)
            if size > _rules.MAX_RECORD_BYTES:
                _rules.check_record_size(size, index if len(batch) > 1 else None)
        expected = append.expected
        # An expectation past bigint's range can never hold: -1 never does either.
        self.expected = None if expected is None else (expected if expected <= MAX_BIGINT else -1)


def _closing() -> UnavailableError:
    return UnavailableError(
        "the server is shutting down; retry the append (here when it is back, or elsewhere)",
        reason="SHUTTING_DOWN",
    )


def _settle(
    group: list[tuple[_Encoded, asyncio.Future[Appended]]],
    answers: Sequence[Appended | Exception],
) -> None:
    """Answer each waiting caller (each error its own copy: they are raised apart)."""
    for (_, future), answer in zip(group, answers, strict=True):
        if future.done():
            continue  # the caller gave up (its deadline)
        if isinstance(answer, Exception):
            future.set_exception(copy.copy(answer))
        else:
            future.set_result(answer)


class PostgresBackend(Backend):
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
    ) -> None:
        self._pool = pool
        self.page_tokens = PageTokens(page_key)
        self._listener: GrowthListener | None = None
        self._following: Callable[[str], bool] | None = None
        self._stopping = False
        self._available = True
        self._availability: list[Callable[[bool], None]] = []
        self._queue: deque[tuple[_Encoded, asyncio.Future[Appended]]] = deque()
        self._lanes = 0
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

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
    ) -> PostgresBackend:
        """Connect (waiting up to `connect_timeout` seconds for the database), migrate
        the schema, and start listening. UnavailableError if the database does not
        answer in time; FailedPreconditionError if its schema is newer than ours."""
        conninfo = connection_string(url, statement_timeout_ms)
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
        )

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
        self, listener: GrowthListener, following: Callable[[str], bool] | None = None
    ) -> None:
        self._listener, self._following = listener, following

    def _announce(self, growth: Growth) -> None:
        listener = self._listener
        if listener is None:
            return
        if self._following is not None and not self._following(growth.session_id):
            return
        listener(growth)

    # -- appends --------------------------------------------------------------

    async def append(self, append: PendingAppend) -> Appended:
        if self._stopping:
            raise _closing()
        self._check_reachable()
        encoded = _Encoded(append)
        future: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        self._queue.append((encoded, future))
        if self._lanes < GROUP_LANES:
            self._lanes += 1
            self._spawn(self._drain())
        return await future

    async def _drain(self) -> None:
        """Send what is queued, a group at a time, until nothing is."""
        try:
            while self._queue:
                group: list[tuple[_Encoded, asyncio.Future[Appended]]] = []
                events = 0
                ids: set[str] = set()
                while self._queue and (not group or events < GROUP_EVENTS):
                    batch = self._queue[0][0].append.batch
                    if any(item.id in ids for item in batch):
                        break  # an id twice in one call: the later append goes next
                    ids.update(item.id for item in batch)
                    group.append(self._queue.popleft())
                    events += len(batch)
                # If this task is cancelled (closing), its callers hear UNAVAILABLE.
                answers: Sequence[Appended | Exception] = [_closing()] * len(group)
                try:
                    answers = await self._commit_group([encoded for encoded, _ in group])
                except Exception as exc:  # a bug: fail these appends, never strand them
                    log.exception("storing a group of appends failed")
                    failed = ServerError(f"the append failed inside the server ({exc!r})")
                    answers = [failed] * len(group)
                finally:
                    _settle(group, answers)
        finally:
            self._lanes -= 1

    async def _commit_group(self, group: list[_Encoded]) -> list[Appended | Exception]:
        try:
            async with translated():
                rows = await self._call_append(group)
        except AgentlogError as exc:
            if len(group) == 1 or isinstance(exc, UnavailableError):
                return [exc] * len(group)
            # Something in one append upset the database: decide each on its
            # own, so that only that append fails.
            return [answer for encoded in group for answer in await self._commit_group([encoded])]
        answers: list[Appended | Exception] = []
        for encoded, (outcome, first_sequence, first_position, stored_ns) in zip(
            group, rows, strict=True
        ):
            append = encoded.append
            if outcome == STORED:
                appended = Appended(append.session_id, append.batch, first_sequence, stored_ns)
                self._stored(appended, first_position)
                answers.append(appended)
            elif outcome == NOT_EXPECTED:
                expected = append.expected if append.expected is not None else 0
                answers.append(wrong_expected_sequence(append.session_id, expected, first_sequence))
            else:
                try:
                    answers.append(await self._known(append, first_sequence))
                except AgentlogError as exc:
                    answers.append(exc)
        return answers

    async def _call_append(self, group: list[_Encoded]) -> list[tuple[int, int, int, int]]:
        sessions, expected, counts, kept = [], [], [], []
        append_of: list[int] = []
        ids: list[str] = []
        parents: list[bytes | None] = []
        events: list[bytes] = []
        for number, encoded in enumerate(group, 1):
            append = encoded.append
            sessions.append(append.session_id)
            expected.append(encoded.expected)
            counts.append(len(append.batch))
            kept.append(append.timestamp_ns)
            append_of.extend([number] * len(append.batch))
            ids.extend(item.id for item in append.batch)
            parents.extend(encoded.parents)
            events.extend(encoded.events)
        params = (
            sessions,
            expected,
            counts,
            kept,
            append_of,
            ids,
            parents,
            events,
            time.time_ns(),
        )
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_APPEND_SQL, params, binary=True)
            rows = await cursor.fetchall()
        return [(int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def _stored(self, appended: Appended, first_position: int) -> None:
        """Announce an append stored here, records at hand, before its caller hears."""
        last_position = first_position + len(appended.batch) - 1
        self._feed.note(first_position, last_position, local=True)
        listener = self._listener
        if listener is None:
            return
        if self._following is not None and not self._following(appended.session_id):
            return
        listener(
            Growth(
                appended.session_id,
                appended.last_sequence,
                first_position,
                last_position,
                appended.records(),
            )
        )

    async def _known(self, append: PendingAppend, last_sequence: int) -> Appended:
        """An append some of whose ids are stored: a retry (answer the stored records)
        or a conflict, as `_rules.check_append` decides. Stored rows never change, so
        deciding after the transaction that found them decides the same."""
        ids = [item.id for item in append.batch]
        async with translated(), self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE id = ANY(%s)",
                (ids,),
                binary=True,
            )
            found = [record_of(row) for row in await cursor.fetchall()]
        session_id = append.session_id
        # "The same content" as the JSONL store decides it: parent and event, re-encoded.
        here = {
            r.id: (r.sequence, content_digest(r.parent_id, event_to_json(r.event)))
            for r in found
            if r.session_id == session_id
        }
        there = {r.id: r.session_id for r in found if r.session_id != session_id}
        stored = check_append(
            append.session_id,
            append.batch,
            append.expected,
            last_sequence,
            stored=here.get,
            elsewhere=lambda wanted: {i: there[i] for i in wanted if i in there},
        )
        if stored is None:  # cannot happen: an id was found, so check_append raised or matched
            raise ServerError("an append found its ids stored, then not")
        records = await self.read_records(append.session_id, stored[0], len(stored))
        return Appended.stored(append.session_id, append.batch, records)

    # -- reads ----------------------------------------------------------------

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

    async def _last_sequence(self, session_id: str) -> int:
        rows = await self._fetch(
            "SELECT last_sequence FROM agentlog_sessions WHERE session_id = %s", (session_id,)
        )
        return int(rows[0][0]) if rows else 0

    async def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> AsyncIterator[list[Any]]:
        check_stored_session_id(session_id)
        selected = _rules.read_range(from_sequence, limit, direction)
        # The session as it is now: later appends are not part of this read.
        wanted = selected.sequences(await self._last_sequence(session_id))
        if not wanted:
            return
        low, high = min(wanted[0], wanted[-1]), max(wanted[0], wanted[-1])
        order = "DESC" if selected.backwards else "ASC"
        query = (
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            f" AND sequence BETWEEN %s AND %s ORDER BY sequence {order} LIMIT {READ_ROWS}"
        )
        while low <= high:
            rows = await self._fetch(query, (session_id, low, high))
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
        self, session_id: str, from_sequence: int, limit: int
    ) -> list[EventRecord]:
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " AND sequence >= %s ORDER BY sequence LIMIT %s",
            (session_id, min(from_sequence, MAX_BIGINT), min(limit, MAX_BIGINT)),
        )
        return [record_of(row) for row in rows]

    async def head(self, session_id: str) -> EventRecord | None:
        check_stored_session_id(session_id)
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE session_id = %s"
            " ORDER BY sequence DESC LIMIT 1",
            (session_id,),
        )
        return record_of(rows[0]) if rows else None

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        check_parent_query(parent_id)
        rows = await self._fetch(
            f"SELECT {RECORD_COLUMNS} FROM agentlog_events WHERE parent_id = %s"
            " ORDER BY session_id, sequence",
            (parent_id.encode(),),
        )
        return [record_of(row) for row in rows]

    async def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        size = check_page_size(page_size)
        after = self.page_tokens.decode(page_token)
        rows = await self._fetch(
            "SELECT session_id, last_sequence, first_timestamp_ns, last_timestamp_ns, head_id"
            " FROM agentlog_sessions WHERE %s::text IS NULL OR session_id > %s"
            " ORDER BY session_id LIMIT %s",
            (after, after, size + 1),
        )
        infos = [
            SessionInfo(
                session_id=row[0],
                event_count=int(row[1]),
                first_timestamp_ns=int(row[2]),
                last_timestamp_ns=int(row[3]),
                head_id=row[4],
            )
            for row in rows[:size]
        ]
        token = self.page_tokens.encode(infos[-1].session_id) if len(rows) > size else None
        return SessionPage(sessions=infos, next_page_token=token)

    async def read_feed(self, from_position: int) -> AsyncIterator[list[FeedRecord | FeedGap]]:
        check_count(from_position, "from_position")
        low = max(min(from_position, MAX_BIGINT), 1)
        high = await self.last_position()  # the feed as it is now
        query = (
            f"SELECT position, {RECORD_COLUMNS} FROM agentlog_events"
            f" WHERE position BETWEEN %s AND %s ORDER BY position LIMIT {MESSAGE_RECORDS}"
        )
        while low <= high:
            rows = await self._fetch(query, (low, high))
            if not rows:
                return
            yield self._feed_items(rows)
            low = int(rows[-1][0]) + 1

    def _feed_items(self, rows: list[Any]) -> list[FeedRecord | FeedGap]:
        """Feed rows as records; a row that does not decode becomes a FeedGap (joined
        with the gap before it when of the same session), so one damaged record never
        stops the feed for everyone, as in the JSONL store."""
        items: list[FeedRecord | FeedGap] = []
        for row in rows:
            position = int(row[0])
            try:
                items.append(FeedRecord(position, record_of(row[1:])))
            except DataLossError as exc:
                last = items[-1] if items else None
                if (
                    isinstance(last, FeedGap)
                    and last.session_id == row[1]
                    and last.last_position == position - 1
                ):
                    items[-1] = dataclasses.replace(last, last_position=position)
                    continue
                reason = exc.reason or "DATA_LOSS"
                if (row[1], reason) not in self._reported_gaps:
                    self._reported_gaps.add((row[1], reason))
                    log.error("the feed skips position %d (session %r): %s", position, row[1], exc)
                items.append(FeedGap(position, position, row[1], reason, exc.message))
                metrics.FEED_UNDELIVERED.labels(reason=reason).inc()
        return items

    async def last_position(self) -> int:
        rows = await self._fetch("SELECT last_position FROM agentlog_meta", ())
        return int(rows[0][0]) if rows else 0

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
