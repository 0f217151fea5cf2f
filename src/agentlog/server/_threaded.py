"""`ThreadedBackend`: a blocking store (memory, JSONL) as a `Backend`.

Its blocking calls run on a thread pool, so the event loop serves other calls
meanwhile; a long read is advanced a run at a time, so it holds one run in
memory, not the session. The store's append listener becomes `Growth`, handed
to the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agentlog._events import ReadDirection
from agentlog._records import (
    BranchInfo,
    EventRecord,
    FeedItem,
    SessionDeleted,
    SessionLabels,
    StoredRecord,
)
from agentlog._validation import MAIN
from agentlog.errors import UnavailableError
from agentlog.server._forks import ForkPlan
from agentlog.server._lifecycle import DeletePlan, LabelChange
from agentlog.server._listing import PageTokens, SessionList, SessionQuery
from agentlog.server._rules import Appended, PendingAppend, Place
from agentlog.server._tracing import store_span
from agentlog.server.backend import Backend, Growth, GrowthListener, StoreFigures
from agentlog.server.blocking import BlockingStore, Published


class ThreadedBackend(Backend):
    """A BlockingStore behind the Backend interface."""

    def __init__(self, store: BlockingStore, executor: ThreadPoolExecutor) -> None:
        self.store = store
        self._executor = executor
        self._stopping = False
        self._listener: GrowthListener | None = None
        self._following: Callable[[Place], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        store.add_listener(self._on_append)

    def watch(
        self, listener: GrowthListener, following: Callable[[Place], bool] | None = None
    ) -> None:
        # Growth nobody follows is not handed over. (A subscriber registers before it
        # reads storage, so one that registers just after that check still reads
        # those records.)
        self._listener, self._following = listener, following
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _on_append(self, published: Published) -> None:
        # Runs on the thread that acknowledged the append.
        listener, loop = self._listener, self._loop
        if listener is None or loop is None or loop.is_closed():
            return
        place = (published.session_id, published.branch_id)
        if self._following is not None and not self._following(place):
            return
        first = published.first_position
        growth = Growth(
            published.session_id,
            published.last_sequence,
            first,
            first + published.last_sequence - published.first_sequence,
            published.records(),
            published.branch_id,
            published.deleted,
        )
        if threading.get_ident() == self._loop_thread:
            # On the loop (a store that acknowledges there): subscribers are woken
            # before the writer is answered, so a record reaches them no later.
            listener(growth)
        else:
            loop.call_soon_threadsafe(listener, growth)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _check_writing(self) -> None:
        if self._stopping:
            raise UnavailableError(
                "the server is shutting down; retry the append (here when it is back, or "
                "elsewhere)",
                reason="SHUTTING_DOWN",
            )

    async def append(self, append: PendingAppend) -> Appended:
        self._check_writing()
        with store_span("agentlog.store.write", **{"agentlog.events": len(append.batch)}):
            answer: Appended | Exception = await self._run(self._commit_one, append)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _commit_one(self, append: PendingAppend) -> Appended | Exception:
        return self.store.commit_answers([append])[0]

    async def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> AsyncIterator[list[Any]]:
        open_read = functools.partial(
            self.store.read_session_chunks,
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
            branch_id=branch_id,
        )
        chunks: Iterator[list[Any]] = await self._run(open_read)
        while chunk := await self._run(next, chunks, None):
            yield chunk

    async def read_records(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        read = functools.partial(
            self.store.read_session,
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            branch_id=branch_id,
        )
        records: list[EventRecord] = await self._run(lambda: list(read()))
        return records

    async def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        record: EventRecord | None = await self._run(self.store.head, session_id, branch_id)
        return record

    async def read_stored(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[StoredRecord]:
        records: list[StoredRecord] = await self._run(
            self.store.read_stored, session_id, from_sequence, limit, branch_id
        )
        return records

    async def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        records: list[EventRecord] = await self._run(
            self.store.read_run, session_id, from_sequence, limit, branch_id
        )
        return records

    async def fork(self, plan: ForkPlan) -> BranchInfo:
        self._check_writing()
        with store_span("agentlog.store.fork", **{"agentlog.records": plan.up_to_sequence}):
            info: BranchInfo = await self._run(self.store.fork, plan)
        return info

    async def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        self._check_writing()
        with store_span("agentlog.store.delete"):
            markers: list[SessionDeleted] = await self._run(self.store.delete, plan)
        return markers

    async def relabel(self, change: LabelChange) -> SessionLabels:
        self._check_writing()
        labels: SessionLabels = await self._run(self.store.relabel, change)
        return labels

    async def expire(self, before_ns: int, limit: int) -> int:
        self._check_writing()
        return int(await self._run(self.store.expire, before_ns, limit))

    async def read_children(self, parent_id: str) -> AsyncIterator[list[EventRecord]]:
        runs: Iterator[list[EventRecord]] = await self._run(self.store.read_children, parent_id)
        while run := await self._run(next, runs, None):
            yield run

    @property
    def page_tokens(self) -> PageTokens:
        return self.store.page_tokens

    async def list_sessions(self, query: SessionQuery) -> SessionList:
        found: SessionList = await self._run(self.store.session_page, query)
        return found

    async def read_feed(self, from_position: int) -> AsyncIterator[list[FeedItem]]:
        runs: Iterator[list[FeedItem]] = await self._run(self.store.read_feed_runs, from_position)
        while run := await self._run(next, runs, None):
            yield run

    async def last_position(self) -> int:
        position: int = await self._run(self.store.last_position)
        return position

    def figures(self) -> StoreFigures:
        return self.store.figures()

    def stop_writing(self) -> None:
        self._stopping = True

    async def close(self) -> None:
        """Let the storage threads go (after the server stopped): queued work is
        dropped, a call still running ends on its own."""
        self._listener = None
        self._executor.shutdown(wait=False, cancel_futures=True)
