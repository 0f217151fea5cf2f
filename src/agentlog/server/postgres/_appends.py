"""Group commit of appends to PostgreSQL: what concurrent calls on one replica
append goes to the database together, in one call of `agentlog_append` (see
`_schema`): one round trip, one transaction, one commit. Each append in a group
is still decided alone, and each caller gets its own answer.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import psycopg_pool

from agentlog._codec import event_to_json
from agentlog._records import EventRecord
from agentlog.errors import AgentlogError, ServerError, UnavailableError
from agentlog.server import _rules
from agentlog.server._rules import (
    Appended,
    PendingAppend,
    check_append,
    content_digest,
    wrong_expected_sequence,
)
from agentlog.server.postgres._errors import translated
from agentlog.server.postgres._rows import RECORD_COLUMNS, record_of

log = logging.getLogger("agentlog.postgres")

# A group commit sends at most this many events, and this many groups go to
# the database at once (the counter lock serialises them there; two keep one
# being prepared while the other commits).
GROUP_EVENTS = 2048
GROUP_LANES = 2
# bigint's largest value: sequences and positions never pass it.
MAX_BIGINT = 2**63 - 1

# Parameters in binary (%b): a third of the time text arrays of bytes take.
_APPEND_SQL = (
    "SELECT outcome, first_sequence, first_position, stored_ns FROM agentlog_append("
    "%b::text[], %b::text[], %b::bigint[], %b::integer[], %b::bigint[], %b::integer[], "
    "%b::text[], %b::bytea[], %b::bytea[], %b::bigint)"
)
STORED, KNOWN, NOT_EXPECTED, ERASED = 0, 1, 2, 3


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
            # The size of its line in a JSONL store, so both refuse the same records
            # (a copy, which keeps its source's timestamps, carries any size).
            size = len(event) + overhead + (len(item.parent_id) if item.parent_id else 0)
            if size > _rules.MAX_RECORD_BYTES and append.timestamp_ns is None:
                _rules.check_record_size(size, index if len(batch) > 1 else None)
        expected = append.expected
        # An expectation past bigint's range can never hold: -1 never does either.
        self.expected = None if expected is None else (expected if expected <= MAX_BIGINT else -1)


def closing_error() -> UnavailableError:
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


class GroupCommit:
    """Appends queued by callers on the event loop, sent a group at a time."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        *,
        stored: Callable[[Appended, int], None],
        read_records: Callable[[str, int, int, str], Awaitable[list[EventRecord]]],
        spawn: Callable[[Any], None],
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._pool = pool
        self._clock = clock  # the replica's time: the database never lets it go back
        self._stored = stored  # called with each stored append and its first position
        self._read_records = read_records
        self._spawn = spawn
        self._queue: deque[tuple[_Encoded, asyncio.Future[Appended]]] = deque()
        self._lanes = 0

    async def submit(self, append: PendingAppend) -> Appended:
        """Store a checked append with whatever else is queued; what it came to."""
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
                answers: Sequence[Appended | Exception] = [closing_error()] * len(group)
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
                appended = Appended(
                    append.session_id,
                    append.batch,
                    first_sequence,
                    stored_ns,
                    branch_id=append.branch_id,
                )
                self._stored(appended, first_position)
                answers.append(appended)
            elif outcome == NOT_EXPECTED:
                expected = append.expected if append.expected is not None else 0
                answers.append(
                    wrong_expected_sequence(
                        append.session_id, expected, first_sequence, append.branch_id
                    )
                )
            elif outcome == ERASED:
                answers.append(await self._erased(append))
            else:  # KNOWN: ids already stored, a retry or a conflict
                try:
                    answers.append(await self._known(append, first_sequence))
                except AgentlogError as exc:
                    answers.append(exc)
        return answers

    async def _call_append(self, group: list[_Encoded]) -> list[tuple[int, int, int, int]]:
        sessions, branches, expected, counts, kept = [], [], [], [], []
        append_of: list[int] = []
        ids: list[str] = []
        parents: list[bytes | None] = []
        events: list[bytes] = []
        for number, encoded in enumerate(group, 1):
            append = encoded.append
            sessions.append(append.session_id)
            branches.append(append.branch_id)
            expected.append(encoded.expected)
            counts.append(len(append.batch))
            kept.append(append.timestamp_ns)
            append_of.extend([number] * len(append.batch))
            ids.extend(item.id for item in append.batch)
            parents.extend(encoded.parents)
            events.extend(encoded.events)
        params = (
            sessions,
            branches,
            expected,
            counts,
            kept,
            append_of,
            ids,
            parents,
            events,
            self._clock(),
        )
        async with self._pool.connection() as conn:
            cursor = await conn.execute(_APPEND_SQL, params, binary=True)
            rows = await cursor.fetchall()
        return [(int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def _erased(self, append: PendingAppend) -> AgentlogError:
        """An append that reuses a deleted record's id: which one."""
        ids = [item.id for item in append.batch]
        async with translated(), self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT x FROM unnest(%s::text[]) AS x WHERE sha256(convert_to(x, 'UTF8'))"
                " IN (SELECT digest FROM agentlog_erased) LIMIT 1",
                (ids,),
            )
            row = await cursor.fetchone()
        return _rules.record_id_deleted(str(row[0]) if row else ids[0])

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
        place = (append.session_id, append.branch_id)
        # "The same content" as the JSONL store decides it: parent and event, re-encoded.
        here = {
            r.id: (r.sequence, content_digest(r.parent_id, event_to_json(r.event)))
            for r in found
            if (r.session_id, r.branch_id) == place
        }
        there = {
            r.id: (r.session_id, r.branch_id) for r in found if (r.session_id, r.branch_id) != place
        }
        stored = check_append(
            append.session_id,
            append.batch,
            append.expected,
            last_sequence,
            stored=here.get,
            elsewhere=lambda wanted: {i: there[i] for i in wanted if i in there},
            branch_id=append.branch_id,
        )
        if stored is None:  # cannot happen: an id was found, so check_append raised or matched
            raise ServerError("an append found its ids stored, then not")
        records = await self._read_records(
            append.session_id, stored[0], len(stored), append.branch_id
        )
        return Appended.stored(append.session_id, append.batch, records)

    # -- reads ----------------------------------------------------------------
