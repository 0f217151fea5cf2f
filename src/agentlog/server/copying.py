"""`agentlog copy FROM TO`: every session of one store into another.

Each side is a JSONL data directory or a PostgreSQL URL. Records keep their
ids, sequences, parents, timestamps and JSON values. A session is continued
from what the destination already holds (its head), each step appended with
the expectation that the destination ends where the copy left it, so running
the copy again after an interruption finishes it without repeating a record,
and a destination that was written meanwhile is refused rather than mixed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from agentlog._codec import event_to_json
from agentlog._records import EventRecord, SessionInfo
from agentlog.errors import FailedPreconditionError, InvalidArgumentError
from agentlog.server._listing import SessionQuery
from agentlog.server._rules import PendingAppend, Prepared
from agentlog.server.backend import Backend

# Records read from the source at a time; a destination append holds at most
# this many (records of one timestamp, as a batch was stored).
READ_STEP = 512
APPEND_STEP = 256
# Sessions copied at once: their appends share the destination's commits.
SESSIONS_AT_ONCE = 8
PROGRESS_SECONDS = 0.2


@dataclass
class CopySummary:
    sessions: int = 0
    complete_already: int = 0
    records: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        rate = self.records / self.seconds if self.seconds > 0 else 0.0
        return (
            f"copied {self.records:,} record(s) of {self.sessions:,} session(s) in "
            f"{self.seconds:.1f} s ({rate:,.0f} records/s); "
            f"{self.complete_already:,} session(s) were already complete"
        )


@asynccontextmanager
async def open_store(
    where: str, *, must_exist: bool, connect_timeout: float = 30.0
) -> AsyncIterator[Backend]:
    """The store `where` names (a postgresql:// URL or a JSONL directory), as a Backend."""
    from agentlog.server.postgres import PostgresBackend, is_postgres_url

    if is_postgres_url(where):
        backend = await PostgresBackend.open(where, connect_timeout=connect_timeout)
        try:
            yield backend
        finally:
            await backend.close()
        return
    from agentlog.server.jsonl import JsonlSessionRepository

    root = Path(where)
    if must_exist and not os.path.isdir(root):  # noqa: ASYNC240 - once, before anything runs
        raise InvalidArgumentError(f"{where}: no such data directory to copy from")
    store = JsonlSessionRepository(root)
    try:
        threaded = store.backend(ThreadPoolExecutor(4, thread_name_prefix="agentlog-copy"))
        try:
            yield threaded
        finally:
            await threaded.close()
    finally:
        store.close()


async def _sessions(source: Backend) -> list[SessionInfo]:
    infos: list[SessionInfo] = []
    after: str | None = None
    while True:
        page = await source.list_sessions(SessionQuery.of(1000, after))
        infos.extend(page.sessions)
        after = page.after
        if after is None:
            return infos


def _runs(records: list[EventRecord]) -> list[list[EventRecord]]:
    """Consecutive records of one timestamp (a batch, or a single append), in order."""
    runs: list[list[EventRecord]] = []
    for record in records:
        if (
            runs
            and runs[-1][-1].timestamp_ns == record.timestamp_ns
            and len(runs[-1]) < APPEND_STEP
        ):
            runs[-1].append(record)
        else:
            runs.append([record])
    return runs


class _Progress:
    def __init__(self, out: TextIO | None, total: int) -> None:
        self._out = out if out is not None and out.isatty() else None
        self._total = total
        self._shown = 0.0

    def show(self, summary: CopySummary, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if self._out is None or (not final and now - self._shown < PROGRESS_SECONDS):
            return
        self._shown = now
        width = 30
        filled = width * done // self._total if self._total else width
        bar = "#" * filled + "-" * (width - filled)
        self._out.write(
            f"\r[{bar}] {done:,}/{self._total:,} sessions, {summary.records:,} records"
            + ("\n" if final else "")
        )
        self._out.flush()


async def copy_store(
    source: str, destination: str, *, progress: TextIO | None, connect_timeout: float = 30.0
) -> CopySummary:
    """Copy every session of `source` into `destination`; what was copied."""
    if source.rstrip("/") == destination.rstrip("/"):
        raise InvalidArgumentError("FROM and TO are the same store")
    started = time.monotonic()
    summary = CopySummary()
    async with (
        open_store(source, must_exist=True, connect_timeout=connect_timeout) as src,
        open_store(destination, must_exist=False, connect_timeout=connect_timeout) as dst,
    ):
        infos = await _sessions(src)
        shown = _Progress(progress, len(infos))
        waiting = iter(infos)

        async def worker() -> None:
            for info in waiting:  # shared: each session is taken by one worker
                copied = await _copy_session(src, dst, info)
                summary.sessions += 1
                summary.records += copied
                summary.complete_already += copied == 0
                shown.show(summary, summary.sessions)

        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(min(SESSIONS_AT_ONCE, len(infos))):
                    workers.create_task(worker())
        except ExceptionGroup as failed:  # the first failure says what went wrong
            raise failed.exceptions[0] from None
        shown.show(summary, len(infos), final=True)
    summary.seconds = time.monotonic() - started
    return summary


async def _copy_session(src: Backend, dst: Backend, info: SessionInfo) -> int:
    """Copy what `dst` lacks of one session; how many records that was."""
    session_id, last = info.session_id, info.event_count
    head = await dst.head(session_id)
    held = head.sequence if head is not None else 0
    if head is not None:
        mine = await src.read_records(session_id, held, 1)
        if held > last or not mine or mine[0].id != head.id:
            raise FailedPreconditionError(
                f"session {session_id!r}: the destination holds {held} record(s) that are not "
                "the source's first ones; it was written by something other than this copy",
                reason="DESTINATION_DIVERGED",
            )
    copied = 0
    sequence = held + 1
    while sequence <= last:
        records = await src.read_records(session_id, sequence, READ_STEP)
        if not records:
            break
        for run in _runs(records):
            batch = [Prepared(r.id, r.parent_id, event_to_json(r.event)) for r in run]
            await dst.append(
                PendingAppend(session_id, batch, sequence - 1, timestamp_ns=run[0].timestamp_ns)
            )
            sequence += len(run)
            copied += len(run)
    return copied
