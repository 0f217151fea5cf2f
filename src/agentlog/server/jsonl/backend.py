"""`JsonlBackend`: the JSONL store as a `Backend`, with group commit on the event loop.

Appends are staged from the event loop itself when that needs no slow work
(`JsonlSessionRepository.submit(block=False)`): their lines are written at
once, and those that arrive in one turn of the loop are released together
(see `_release`). Under `always` the sync thread syncs whatever is released
whenever it is free: while one sync runs, the next group forms and is written,
so a group is as large as the appends that came during one sync, with no timed
hold (a pipeline, as databases commit). It hands the acknowledgement back to
the loop, where the answers go out. Appends that need slow work first (reading
a session's file) are submitted from a storage thread instead. Reads are those
of every `ThreadedBackend`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from agentlog._records import EventRecord
from agentlog._validation import MAIN
from agentlog.server._rules import Appended, PendingAppend
from agentlog.server._threaded import ThreadedBackend
from agentlog.server._tracing import store_span
from agentlog.server.jsonl._acknowledge import Answer
from agentlog.server.jsonl.store import JsonlSessionRepository


class _Answers:
    """Settles appends' futures on the event loop from the thread that acknowledged
    them, with one wake-up of the loop for all that a sync round finished."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Answer], Answer]] = []
        self._scheduled = False

    def add(self, future: asyncio.Future[Answer], answer: Answer) -> None:
        with self._lock:
            self._ready.append((future, answer))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for future, answer in ready:
            if not future.cancelled():  # else the call went away; its append stands
                future.set_result(answer)


class JsonlBackend(ThreadedBackend):
    """A JsonlSessionRepository behind the Backend interface."""

    def __init__(self, store: JsonlSessionRepository, executor: ThreadPoolExecutor) -> None:
        super().__init__(store, executor)
        self._jsonl = store
        self._release_scheduled = False
        self._answers: _Answers | None = None

    async def append(self, append: PendingAppend) -> Appended:
        self._check_writing()
        loop = asyncio.get_running_loop()
        if self._answers is None:
            self._answers = _Answers(loop)
            # Acknowledge durable appends here, on the loop, where they are answered.
            acknowledge = self._jsonl.acknowledge_durable
            self._jsonl.on_durable(lambda: _answers_soon(loop, acknowledge))
        answers, on_loop = self._answers, threading.get_ident()
        future: asyncio.Future[Answer] = loop.create_future()

        def done(results: list[Answer]) -> None:
            if threading.get_ident() == on_loop:
                future.set_result(results[0])  # acknowledged at once
            else:
                answers.add(future, results[0])

        with store_span("agentlog.store.write", **{"agentlog.events": len(append.batch)}):
            if self._jsonl.submit([append], done, block=False, hold=True):
                if not self._release_scheduled:
                    self._release_scheduled = True
                    loop.call_soon(self._release)
            else:
                submit = functools.partial(self._jsonl.submit, [append], done)
                await loop.run_in_executor(self._executor, submit)
        with store_span("agentlog.store.sync", **{"agentlog.sync": self._jsonl.sync_policy}):
            answer = await future
        if isinstance(answer, Exception):
            raise answer
        if append.labels and answer.first_sequence == 1:
            await loop.run_in_executor(self._executor, self._jsonl.take_labels, append, answer)
        return answer

    async def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        # A branch appended to through this server answers from memory, on the loop:
        # no hop to a storage thread and back.
        known, record = self._jsonl.head_in_memory(session_id, branch_id)
        if known:
            return record
        return await super().head(session_id, branch_id)

    def _release(self) -> None:
        """Let the appends staged in this turn of the loop be synced (and, under
        `interval` and `never`, acknowledged) together."""
        self._release_scheduled = False
        self._jsonl.release()

    def stop_writing(self) -> None:
        super().stop_writing()
        self._jsonl.on_durable(None)  # the loop is going: the store answers itself


def _answers_soon(loop: asyncio.AbstractEventLoop, acknowledge: Callable[[], None]) -> bool:
    if not loop.is_running():
        return False  # stopped: it would never run (the store acknowledges instead)
    try:
        loop.call_soon_threadsafe(acknowledge)
    except RuntimeError:  # the loop is closed
        return False
    return True
