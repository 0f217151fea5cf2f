"""Deletes, labels, filtered listing and retention on PostgreSQL (see `_schema`,
version 3). A mixin of `PostgresBackend`: it uses the backend's pool and its word
to subscribers.

Retention may run on every replica: a sweep holds an advisory lock for its length,
and a replica that does not get it leaves the sweep to the one that did.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import psycopg_pool

from agentlog._records import BranchInfo, SessionDeleted, SessionInfo, SessionLabels
from agentlog.errors import ServerError
from agentlog.server._lifecycle import DeletePlan, LabelChange, nothing_to_delete
from agentlog.server._listing import SessionList, SessionQuery, prefix_end
from agentlog.server._rules import Appended, PendingAppend, wrong_expected_sequence
from agentlog.server._tracing import store_span
from agentlog.server.backend import Growth
from agentlog.server.postgres._appends import MAX_BIGINT, closing_error
from agentlog.server.postgres._errors import translated
from agentlog.server.postgres._notify import FeedListener

# Held by the replica sweeping ("agentlog-retention", truncated to a bigint).
RETENTION_LOCK = 0x616C2D72657465
# A delete's statement may take longer than a read's: it removes every record.
DELETE_TIMEOUT_MS = 600_000

_BRANCH_COLUMNS = (
    "session_id, branch_id, last_sequence, first_timestamp_ns, last_timestamp_ns, head_id,"
    " forked_from_session, forked_from_branch, forked_from_sequence"
)


class PostgresLifecycle:
    """`delete`, `relabel`, `expire`, `list_sessions` and labels on appends."""

    _pool: psycopg_pool.AsyncConnectionPool[Any]
    _feed: FeedListener
    _stopping: bool
    _clock: Callable[[], int]
    _branch_of: Callable[[Sequence[Any]], BranchInfo]

    def _check_reachable(self) -> None:
        raise NotImplementedError

    def _announce(self, growth: Growth) -> None:
        raise NotImplementedError

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    # --- delete ---

    async def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        if self._stopping:
            raise closing_error()
        self._check_reachable()
        expected = plan.expected
        if expected is not None and expected > MAX_BIGINT:
            expected = -1  # can never hold
        now = self._clock()
        with store_span("agentlog.store.delete", **{"db.system": "postgresql"}):
            async with translated(), self._pool.connection() as conn, conn.transaction():
                await conn.execute(f"SET LOCAL statement_timeout = {DELETE_TIMEOUT_MS}")
                cursor = await conn.execute(
                    "SELECT outcome, deleted_branch, deleted_last, marker"
                    " FROM agentlog_delete(%s, %s, %s, %s)",
                    (plan.session_id, plan.branch_id, expected, now),
                )
                rows = await cursor.fetchall()
        if not rows:
            raise ServerError("agentlog_delete answered nothing")
        outcome, branch_id, last, _ = rows[0]
        if outcome == 1:
            raise nothing_to_delete(plan)
        if outcome == 2:
            raise wrong_expected_sequence(
                plan.session_id, plan.expected or 0, int(last), str(branch_id)
            )
        markers = [
            SessionDeleted(int(position), plan.session_id, str(branch), int(count), now)
            for _, branch, count, position in rows
        ]
        for marker in markers:
            self._feed.note(marker.position, marker.position, local=True)
            self._announce(
                Growth(
                    marker.session_id,
                    0,
                    marker.position,
                    marker.position,
                    branch_id=marker.branch_id,
                    deleted=marker,
                )
            )
        return markers

    async def expire(self, before_ns: int, limit: int) -> int:
        """Delete up to `limit` branches last appended to before `before_ns`, oldest
        first, each in a transaction of its own; 0 if another replica is sweeping."""
        self._check_reachable()
        async with translated(), self._pool.connection() as conn:
            await conn.set_autocommit(True)
            try:
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", (RETENTION_LOCK,))
                row = await cursor.fetchone()
                if row is None or not row[0]:
                    return 0
                try:
                    cursor = await conn.execute(
                        "SELECT session_id, branch_id FROM agentlog_branches"
                        " WHERE last_timestamp_ns < %s ORDER BY last_timestamp_ns LIMIT %s",
                        (before_ns, limit),
                    )
                    doomed = await cursor.fetchall()
                    deleted = 0
                    for session_id, branch_id in doomed:
                        try:
                            await self.delete(DeletePlan(str(session_id), str(branch_id), None))
                        except Exception as exc:
                            if getattr(exc, "reason", "") == "BRANCH_NOT_FOUND":
                                continue  # deleted meanwhile
                            raise
                        deleted += 1
                    return deleted
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(%s)", (RETENTION_LOCK,))
            finally:
                await conn.set_autocommit(False)

    # --- labels ---

    async def relabel(self, change: LabelChange) -> SessionLabels:
        if self._stopping:
            raise closing_error()
        self._check_reachable()
        async with translated(), self._pool.connection() as conn, conn.transaction():
            exists, current = await self._locked_labels(conn, change.session_id)
            labels = change.apply(current, exists=exists)
            await self._write_labels(conn, change.session_id, labels)
        return labels

    async def take_labels(self, append: PendingAppend, appended: Appended) -> None:
        """Labels an append carries, for a session that has none, if the append started
        its branch (or is a retry of the one that did)."""
        if not append.labels or appended.first_sequence != 1:
            return
        async with translated(), self._pool.connection() as conn, conn.transaction():
            exists, current = await self._locked_labels(conn, append.session_id)
            if exists and current is None:
                labels = SessionLabels(dict(append.labels), 1)
                await self._write_labels(conn, append.session_id, labels)

    @staticmethod
    async def _locked_labels(conn: Any, session_id: str) -> tuple[bool, SessionLabels | None]:
        """Whether the session exists, and its labels (None: never set), locked to the end
        of the transaction. A delete of the session's last branch holds that branch's row
        until it commits (then there is no session); the labels' row serializes editors."""
        cursor = await conn.execute(
            "SELECT 1 FROM agentlog_branches WHERE session_id = %s LIMIT 1 FOR KEY SHARE",
            (session_id,),
        )
        exists = await cursor.fetchone() is not None
        if exists:
            await conn.execute(
                "INSERT INTO agentlog_labels VALUES (%s, 0, '{}')"
                " ON CONFLICT (session_id) DO NOTHING",
                (session_id,),
            )
        cursor = await conn.execute(
            "SELECT version, labels FROM agentlog_labels WHERE session_id = %s FOR UPDATE",
            (session_id,),
        )
        row = await cursor.fetchone()
        return exists, SessionLabels(row[1], int(row[0])) if row and row[0] else None

    @staticmethod
    async def _write_labels(conn: Any, session_id: str, labels: SessionLabels) -> None:
        await conn.execute(
            "UPDATE agentlog_labels SET version = %s, labels = %s::jsonb WHERE session_id = %s",
            (labels.version, _json(labels.labels), session_id),
        )
        await conn.execute("DELETE FROM agentlog_label_pairs WHERE session_id = %s", (session_id,))
        pairs = [(k, v, session_id) for k, v in labels.labels.items()]
        if pairs:
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO agentlog_label_pairs VALUES (%s, %s, %s)", pairs
                )

    # --- listing ---

    async def list_sessions(self, query: SessionQuery) -> SessionList:
        infos: list[SessionInfo] = []
        for prefix in query.prefixes:
            ids = await self._session_ids(query, prefix, query.size - len(infos) + 1)
            if not ids:
                continue
            rows = await self._fetch(
                f"SELECT {_BRANCH_COLUMNS} FROM agentlog_branches WHERE session_id = ANY(%s)"
                " ORDER BY session_id, branch_id",
                (ids,),
            )
            labels = {
                str(session_id): SessionLabels(found, int(version))
                for session_id, version, found in await self._fetch(
                    "SELECT session_id, version, labels FROM agentlog_labels"
                    " WHERE session_id = ANY(%s) AND version > 0",
                    (ids,),
                )
            }
            for session_id, branches in itertools.groupby(rows, key=lambda row: str(row[0])):
                if len(infos) == query.size:
                    return SessionList(infos, infos[-1].session_id)
                infos.append(
                    SessionInfo.of(
                        session_id,
                        [self._branch_of(row) for row in branches],
                        labels.get(session_id),
                    )
                )
        return SessionList(infos, None)

    async def _session_ids(self, query: SessionQuery, prefix: str, limit: int) -> list[str]:
        """Up to `limit` ids of sessions the query takes within `prefix`, in order: one
        index range scan (of a label's rows, or of the branches)."""
        column = "p.session_id" if query.labels else "b.session_id"
        low = prefix if query.after is None or query.after < prefix else query.after
        where: list[str] = [f"{column} >= %s"]
        params: list[object] = [low]
        if query.after is not None:
            where.append(f"{column} > %s")
            params.append(query.after)
        end = prefix_end(prefix)
        if end is not None:
            where.append(f"{column} < %s")
            params.append(end)
        last_update = (
            f"(SELECT max(t.last_timestamp_ns) FROM agentlog_branches t"
            f" WHERE t.session_id = {column})"
        )
        if query.updated_after_ns is not None:
            where.append(f"{last_update} >= %s")
            params.append(query.updated_after_ns)
        if query.updated_before_ns is not None:
            where.append(f"{last_update} < %s")
            params.append(query.updated_before_ns)
        if query.labels:
            (key, value), *others = query.labels
            for other_key, other_value in others:
                where.append(
                    "EXISTS (SELECT 1 FROM agentlog_label_pairs q WHERE q.key = %s"
                    " AND q.value = %s AND q.session_id = p.session_id)"
                )
                params += [other_key, other_value]
            sql = (
                "SELECT p.session_id FROM agentlog_label_pairs p WHERE p.key = %s"
                f" AND p.value = %s AND {' AND '.join(where)} ORDER BY p.session_id LIMIT %s"
            )
            rows = await self._fetch(sql, (key, value, *params, limit))
        else:
            sql = (
                f"SELECT DISTINCT b.session_id FROM agentlog_branches b WHERE {' AND '.join(where)}"
                " ORDER BY b.session_id LIMIT %s"
            )
            rows = await self._fetch(sql, (*params, limit))
        return [str(row[0]) for row in rows]


def _json(labels: Mapping[str, str]) -> str:
    return orjson.dumps(dict(labels)).decode()
