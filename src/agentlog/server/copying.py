"""`agentlog copy FROM TO`: every session (every branch of it) of one store into another.

Each side is a JSONL data directory (in either of arcan's layouts; a new one takes
`layout`) or a PostgreSQL URL. The source is only
read (a JSONL source is opened read-only: nothing is written in it, and a
source being written by a running server is refused). Records keep their ids,
sequences, parents, timestamps and JSON values exactly as the source holds
them, whatever an append would check (a copy carries whatever its source
serves). A session is continued from what the destination already holds (its
head), each step appended with the expectation that the destination ends where
the copy left it, so running the copy again after an interruption, or once a
cause is fixed, finishes it without repeating a record; a destination written
meanwhile is refused rather than mixed. A session that cannot be copied (a
damaged line, a diverged destination) is reported, with its file and line where
there is one, and the others are copied.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from agentlog._records import BranchInfo, SessionInfo, StoredRecord
from agentlog._validation import MAIN
from agentlog.errors import AgentlogError, FailedPreconditionError, InvalidArgumentError
from agentlog.server._lifecycle import plan_label_change
from agentlog.server._listing import SessionQuery
from agentlog.server._rules import PendingAppend, Prepared, named
from agentlog.server.backend import Backend

# Records read from the source at a time; a destination append holds at most
# this many (records of one timestamp, as a batch was stored).
READ_STEP = 512
APPEND_STEP = 256
# Sessions copied at once: their appends share the destination's commits.
SESSIONS_AT_ONCE = 8
PROGRESS_SECONDS = 0.2


@dataclass
class Failure:
    """A branch the copy could not finish, and why (with the file and line, if any)."""

    session_id: str
    reason: str
    message: str
    branch_id: str = MAIN


@dataclass
class CopySummary:
    sessions: int = 0
    complete_already: int = 0
    records: int = 0
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False

    def stopped(self) -> bool:
        """Whether the copy was asked to stop (SIGINT): it does, between two appends."""
        return self.interrupted

    def describe(self) -> str:
        seconds = self.seconds or (time.monotonic() - self.started)
        rate = self.records / seconds if seconds > 0 else 0.0
        text = (
            f"copied {self.records:,} record(s) of {self.sessions:,} session(s) in "
            f"{seconds:.1f} s ({rate:,.0f} records/s); "
            f"{self.complete_already:,} session(s) were already complete"
        )
        if self.failures:
            text += f"; {self.failed_sessions():,} session(s) could not be copied"
        return text

    def failed_sessions(self) -> int:
        return len({failure.session_id for failure in self.failures})

    def describe_failures(self) -> str:
        """The sessions that could not be copied, each with why."""
        lines = [f"{self.failed_sessions():,} session(s) could not be copied:"]
        for failure in sorted(
            self.failures, key=lambda f: (f.session_id.encode(), f.branch_id.encode())
        ):
            name = named(failure.session_id, failure.branch_id)
            lines.append(f"  {name}: {failure.message} ({failure.reason})")
        lines.append("run the same copy again once they are fixed: it finishes them")
        return "\n".join(lines)


@asynccontextmanager
async def open_store(
    where: str, *, source: bool, connect_timeout: float = 30.0, layout: str | None = None
) -> AsyncIterator[Backend]:
    """The store `where` names (a postgresql:// URL or a JSONL directory), as a Backend;
    a JSONL `source` is opened read-only; a new JSONL directory takes `layout`."""
    from agentlog.server.postgres import PostgresBackend, check_store_path, is_postgres_url

    check_store_path(where)
    if is_postgres_url(where):
        backend = await PostgresBackend.open(where, connect_timeout=connect_timeout)
        try:
            yield backend
        finally:
            await backend.close()
        return
    from agentlog.server.jsonl import JsonlSessionRepository

    root = Path(where)
    if source:
        _check_source(root)
    store = JsonlSessionRepository(root, read_only=source, layout=None if source else layout)
    try:
        threaded = store.backend(ThreadPoolExecutor(4, thread_name_prefix="agentlog-copy"))
        try:
            yield threaded
        finally:
            await threaded.close()
    finally:
        store.close()


def _check_source(root: Path) -> None:
    """Refuse a source directory that holds no session files, naming the directories
    below it that do (a copy from their parent is a usual slip)."""
    if not root.is_dir():
        raise InvalidArgumentError(f"{root}: no such data directory to copy from")
    if any(path.is_file() for path in root.glob("*.jsonl")):
        return
    below = sorted(
        str(path)
        for path in root.iterdir()
        if path.is_dir() and any(child.is_file() for child in path.glob("*.jsonl"))
    )
    hint = f"; these directories below it have some: {', '.join(below[:10])}" if below else ""
    raise InvalidArgumentError(
        f"{root} holds no session files (*.jsonl), so there is nothing to copy{hint}",
        reason="NO_SESSIONS",
    )


async def _sessions(source: Backend) -> list[SessionInfo]:
    infos: list[SessionInfo] = []
    after: str | None = None
    while True:
        page = await source.list_sessions(SessionQuery.of(1000, after))
        infos.extend(page.sessions)
        after = page.after
        if after is None:
            return infos


def _runs(records: list[StoredRecord]) -> list[list[StoredRecord]]:
    """Consecutive records of one timestamp (a batch, or a single append), in order."""
    runs: list[list[StoredRecord]] = []
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

    def show(self, summary: CopySummary, *, final: bool = False) -> None:
        now = time.monotonic()
        if self._out is None or (not final and now - self._shown < PROGRESS_SECONDS):
            return
        self._shown = now
        width = 30
        done = summary.sessions
        filled = width * done // self._total if self._total else width
        bar = "#" * filled + "-" * (width - filled)
        self._out.write(
            f"\r[{bar}] {done:,}/{self._total:,} sessions, {summary.records:,} records"
            + ("\n" if final else "")
        )
        self._out.flush()


async def copy_store(
    source: str,
    destination: str,
    *,
    progress: TextIO | None,
    connect_timeout: float = 30.0,
    summary: CopySummary | None = None,
    layout: str | None = None,
) -> CopySummary:
    """Copy every session of `source` into `destination` (a new JSONL directory in
    `layout`); what was copied (into `summary`, if given, as it goes: an interrupted
    copy can still say it)."""
    if source.rstrip("/") == destination.rstrip("/"):
        raise InvalidArgumentError("FROM and TO are the same store")
    summary = summary if summary is not None else CopySummary()
    stopping = _stop_on_interrupt(summary)
    async with (
        open_store(source, source=True, connect_timeout=connect_timeout) as src,
        open_store(
            destination, source=False, connect_timeout=connect_timeout, layout=layout
        ) as dst,
    ):
        infos = await _sessions(src)
        shown = _Progress(progress, len(infos))
        waiting = iter(infos)

        async def worker() -> None:
            for info in waiting:  # shared: each session is taken by one worker
                if summary.stopped():
                    return
                complete = True
                for branch in info.branches:
                    try:
                        copied = await _copy_branch(
                            src, dst, info.session_id, branch, summary=summary, shown=shown
                        )
                    except AgentlogError as exc:  # that branch's alone: the others go on
                        failure = Failure(
                            info.session_id,
                            exc.reason or exc.status_name,
                            exc.message,
                            branch.branch_id,
                        )
                        summary.failures.append(failure)
                        copied = -1
                    complete = complete and copied == 0
                if info.labels:
                    try:
                        await _copy_labels(dst, info)
                    except AgentlogError as exc:
                        reason = exc.reason or exc.status_name
                        summary.failures.append(
                            Failure(info.session_id, reason, f"labels: {exc.message}", "")
                        )
                summary.sessions += 1
                summary.complete_already += complete
                shown.show(summary)

        try:
            await asyncio.gather(*(worker() for _ in range(min(SESSIONS_AT_ONCE, len(infos)))))
        finally:
            stopping()
        shown.show(summary, final=True)
    summary.seconds = time.monotonic() - summary.started
    return summary


async def _copy_labels(destination: Backend, info: SessionInfo) -> None:
    """The session's labels onto the copy (not changed if they are there already)."""
    query = SessionQuery(size=1, prefixes=(info.session_id,))
    there = (await destination.list_sessions(query)).sessions
    if there and there[0].session_id == info.session_id and there[0].labels == info.labels:
        return
    await destination.relabel(plan_label_change(info.session_id, dict(info.labels)))


def _stop_on_interrupt(summary: CopySummary) -> Callable[[], None]:
    """Have the first SIGINT stop the copy between two appends, so that what it says it
    copied is what the destination holds (a second one stops it at once); returns the
    undoing of that."""
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        summary.interrupted = True
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (RuntimeError, ValueError):  # not the main thread: Ctrl-C stops it at once
        return lambda: None

    def undo() -> None:
        loop.remove_signal_handler(signal.SIGINT)

    return undo


async def _copy_branch(
    src: Backend,
    dst: Backend,
    session_id: str,
    info: BranchInfo,
    *,
    summary: CopySummary,
    shown: _Progress,
) -> int:
    """Copy what `dst` lacks of one branch; how many records that was."""
    branch_id, last = info.branch_id, info.event_count
    head = await dst.head(session_id, branch_id)
    held = head.sequence if head is not None else 0
    if head is not None:
        mine = await src.read_stored(session_id, held, 1, branch_id)
        if held > last or not mine or mine[0].id != head.id:
            raise FailedPreconditionError(
                f"the destination holds {held} record(s) of it that are not the source's "
                "first ones: it was written by something other than this copy",
                reason="DESTINATION_DIVERGED",
            )
    copied = 0
    sequence = held + 1
    while sequence <= last and not summary.stopped():
        records = await src.read_stored(session_id, sequence, READ_STEP, branch_id)
        if not records:
            break
        for run in _runs(records):
            if summary.stopped():
                break
            batch = [Prepared(r.id, r.parent_id, r.event_json) for r in run]
            await dst.append(
                PendingAppend(
                    session_id,
                    batch,
                    sequence - 1,
                    timestamp_ns=run[0].timestamp_ns,
                    branch_id=branch_id,
                )
            )
            sequence += len(run)
            copied += len(run)
            summary.records += len(run)  # what the destination holds, as it grows
            shown.show(summary)
    return copied
