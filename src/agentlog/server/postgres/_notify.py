"""Word of appends made through other replicas: LISTEN/NOTIFY plus a periodic poll.

A dedicated connection LISTENs on `agentlog_feed` (each stored append notifies
its positions, its session's new last sequence and the session id, delivered
at commit). Notifications only wake subscribers, who then read the table by
sequence or position; so a notification that is lost, late or repeated costs a
read or a delay, never a record. To bound that delay, the listener also looks
at the feed's last position every `poll_seconds`, and announces whatever it has
not heard of. The same connection is the backend's view of the database's
health: while it cannot connect, the backend reports itself unavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import psycopg

from agentlog._records import SessionDeleted
from agentlog.server.backend import Growth
from agentlog.server.postgres._errors import redact

log = logging.getLogger("agentlog.postgres")

CHANNEL = "agentlog_feed"
# The listener's application_name, so operators (and tests) can tell it apart.
LISTENER_NAME = "agentlog-listener"
# Between reconnection attempts while the database is unreachable, at most.
MAX_RECONNECT_SECONDS = 2.0


class FeedListener:
    """Turns notifications (and the poll) into `Growth` for the backend's listener."""

    def __init__(
        self,
        conninfo: str,
        announce: Callable[[Growth], None],
        on_availability: Callable[[bool], None],
        *,
        poll_seconds: float,
        connect_timeout: float,
    ) -> None:
        self._conninfo = conninfo
        self._announce = announce
        self._on_availability = on_availability
        self._poll_seconds = poll_seconds
        self._connect_timeout = connect_timeout
        # Every position up to `heard` has been announced; ranges above it that
        # have been (out of order) wait in `_ahead` (first -> last).
        self.heard = 0
        self._ahead: dict[int, int] = {}
        # First positions of appends made here and announced with their records:
        # their notifications would only repeat them.
        self._local: set[int] = set()
        self._local_horizon = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self, last_position: int) -> None:
        self.heard = last_position
        self._task = asyncio.ensure_future(self._run())

    def note(self, first: int, last: int, *, local: bool = False) -> None:
        """Positions first..last have been announced."""
        if local:
            self._local.add(first)
        if first <= self.heard + 1:
            self.heard = max(self.heard, last)
            while (following := self._ahead.pop(self.heard + 1, None)) is not None:
                self.heard = following
        else:
            self._ahead[first] = last

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.1
        available = True
        while not self._closing:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo,
                    application_name=LISTENER_NAME,
                    autocommit=True,
                    connect_timeout=max(1, int(self._connect_timeout)),
                )
            except (psycopg.Error, OSError) as exc:
                if available:
                    log.warning("PostgreSQL is unreachable (%s); retrying", redact(str(exc)))
                    available = False
                    self._on_availability(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RECONNECT_SECONDS)
                continue
            try:
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if not available:
                        log.info("PostgreSQL is reachable again")
                        available = True
                        self._on_availability(True)
                    delay = 0.1
                    await self._poll(conn)  # what was appended while not listening
                    while True:
                        async for notice in conn.notifies(timeout=self._poll_seconds):
                            self._notified(notice.payload)
                        await self._poll(conn)
            except (psycopg.Error, OSError) as exc:
                if not self._closing:
                    log.warning("lost the notification connection (%s)", redact(str(exc)))
                    await asyncio.sleep(delay)  # not a busy loop if the database keeps refusing
            except Exception:  # a bug here must not end live updates for good
                log.exception("the notification listener failed; starting it again")
                await asyncio.sleep(MAX_RECONNECT_SECONDS)

    def _notified(self, payload: str) -> None:
        try:
            # "first last last_sequence branch_length branch||session" (see _schema);
            # last_sequence 0: the branch was deleted, its marker at `first`.
            first_text, last_text, sequence_text, length_text, names = payload.split(" ", 4)
            first, last, sequence = int(first_text), int(last_text), int(sequence_text)
            length = int(length_text)
            branch_id, session_id = names[:length], names[length:]
        except ValueError:
            log.warning("ignoring a notification not from agentlog: %.80r", payload)
            return
        if first in self._local:
            self._local.discard(first)
        else:
            self._announce(_growth(session_id, branch_id, sequence, first, last))
        self.note(first, last)

    async def _poll(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> None:
        """Announce appends committed past what has been heard (lost notifications)."""
        # A local append's notification may have come before its answer (then its
        # entry would wait forever): forget entries older than a poll interval.
        self._local = {first for first in self._local if first > self._local_horizon}
        self._local_horizon = self.heard
        row = await (await conn.execute("SELECT last_position FROM agentlog_meta")).fetchone()
        last = int(row[0]) if row else 0
        if last <= self.heard:
            return
        # Appended records by their positions; forks' copies by their ranges.
        summaries = await conn.execute(
            "SELECT session_id, branch_id, max(sequence), min(position) AS first,"
            " max(position) FROM agentlog_events WHERE position > %s AND position <= %s"
            " GROUP BY session_id, branch_id"
            " UNION ALL SELECT session_id, branch_id, last_position - first_position + 1,"
            " first_position, last_position FROM agentlog_fork_ranges"
            " WHERE last_position > %s AND first_position <= %s"
            " UNION ALL SELECT session_id, branch_id, 0, position, position"
            " FROM agentlog_deletions WHERE position > %s AND position <= %s ORDER BY first",
            (self.heard, last, self.heard, last, self.heard, last),
        )
        for session_id, branch_id, sequence, first, end in await summaries.fetchall():
            self._announce(
                _growth(str(session_id), str(branch_id), int(sequence), int(first), int(end))
            )
        self.heard = last
        self._ahead = {f: e for f, e in self._ahead.items() if f > last}


def _growth(session_id: str, branch_id: str, sequence: int, first: int, last: int) -> Growth:
    """The Growth a notification or the poll names: sequence 0 marks a deletion."""
    if sequence == 0:
        marker = SessionDeleted(first, session_id, branch_id, 0, 0)
        return Growth(session_id, 0, first, first, branch_id=branch_id, deleted=marker)
    return Growth(session_id, sequence, first, last, branch_id=branch_id)
