"""Append writers: one writer's events sent on an AppendStream without a round trip each.

`append` checks the event and queues it, returning a future of its record; the
events queued while the previous message was on its way go together in the next
message, and the server answers in order once they are durable. The writers
differ only in I/O (threads or asyncio); what was sent and not answered, and
what a failure does to each waiting append, is `_Book`'s, shared by both.

What a refusal does: the first append the server refuses (a wrong expectation, an
id with other content, a check) fails with its error; every append behind it fails
with AbortedError (reason EARLIER_APPEND_REFUSED) and is not stored, so a session
never has a gap behind a refusal; the writer is then done (later appends raise
AbortedError too), and closing it raises the refusal. When the server goes away
(UNAVAILABLE, or CANCELLED as it stops), the writer opens a new stream and sends
every unanswered append again, in order: their ids make that safe. It gives up after
`retries` attempts in a row that brought no answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc

from agentlog import _codec, _requests
from agentlog._client_streams import backoff
from agentlog._events import AgentEvent
from agentlog._records import AppendEvent, EventRecord
from agentlog._status import from_rpc_error
from agentlog.errors import (
    AbortedError,
    AgentlogError,
    InvalidArgumentError,
    ServerError,
    UnavailableError,
)
from agentlog.v1 import session_pb2 as pb

# How many appends may wait for their answers before `append` waits for room.
DEFAULT_WINDOW = 1000
# A message carries at most this many appends and about this many bytes of them.
MESSAGE_APPENDS = 500
MESSAGE_BYTES = 1 << 20

F = TypeVar("F", concurrent.futures.Future[EventRecord], asyncio.Future[EventRecord])


@dataclass(slots=True)
class _Entry(Generic[F]):
    request: pb.AppendRequest
    event: AgentEvent
    future: F


class _Book(Generic[F]):
    """The appends a writer has taken and not had answered, in order; the first
    `sent` of them went on the current stream."""

    def __init__(self) -> None:
        self.entries: deque[_Entry[F]] = deque()
        self.sent = 0
        self.failure: AgentlogError | None = None
        """What ended the writer: later appends are refused with it."""
        self.refused = False
        """Whether that was an append's refusal (then later appends are aborted)."""

    def take(self, request: pb.AppendRequest, event: AgentEvent, future: F) -> None:
        self.entries.append(_Entry(request, event, future))

    @property
    def unsent(self) -> bool:
        return self.sent < len(self.entries)

    def next_message(self) -> pb.AppendStreamRequest:
        """The next appends not yet sent on this stream, as one message."""
        appends: list[pb.AppendRequest] = []
        size = 0
        entries = self.entries
        while self.sent < len(entries) and len(appends) < MESSAGE_APPENDS:
            request = entries[self.sent].request
            request_size = request.ByteSize()
            if appends and size + request_size > MESSAGE_BYTES:
                break  # a large append goes alone, within the server's message limit
            appends.append(request)
            size += request_size
            self.sent += 1
        return pb.AppendStreamRequest(appends=appends)

    def answered(self, records: Sequence[pb.EventRecord]) -> list[tuple[F, EventRecord]]:
        """The futures the answer settles, with their records."""
        if len(records) > self.sent:
            raise ServerError(
                f"the server answered {len(records)} appends of a stream that had "
                f"{self.sent} waiting",
                reason="INTERNAL",
            )
        settled = []
        for record in records:
            entry = self.entries.popleft()
            settled.append((entry.future, _codec.record_from_proto(record, entry.event)))
        self.sent -= len(records)
        return settled

    def fail(self, error: AgentlogError) -> list[tuple[F, AgentlogError]]:
        """The writer ends with `error`: the futures it fails. A refusal (it names the
        append's place in the stream) fails the first unanswered append, and the ones
        behind it are aborted; any other error fails every unanswered append."""
        self.failure = error
        failed: list[tuple[F, AgentlogError]] = []
        refused = self.refused = "stream_index" in error.metadata
        for position, entry in enumerate(self.entries):
            if refused and position > 0:
                failed.append((entry.future, _behind(error)))
            else:
                failed.append((entry.future, error))
        self.entries.clear()
        self.sent = 0
        return failed


def _behind(error: AgentlogError) -> AbortedError:
    return AbortedError(
        f"not appended: an append before it on this writer failed ({error.message}); "
        "nothing after that append was stored",
        reason="EARLIER_APPEND_REFUSED",
        metadata={"refused_reason": error.reason},
    )


def _check_open(book: _Book[Any], closing: bool) -> None:
    """Refuse an append to a writer that failed or is closed: after a refusal with
    AbortedError, after the stream's own end (a lapsed credential, a server gone past
    the retries) with that error."""
    failure = book.failure
    if failure is not None:
        raise _behind(failure) if book.refused else failure
    if closing:
        raise InvalidArgumentError("the writer is closed: open a new one", reason="WRITER_CLOSED")


def _quietly(future: Any) -> None:
    """Mark a failed future's exception as seen: `close()` raises the failure, so an
    append whose future nobody awaits is not also reported as never retrieved."""
    future.exception()


def _retryable(error: grpc.RpcError) -> bool:
    """Whether to send the unanswered appends again on a new stream: the server went
    away, or cut the stream off while stopping (CANCELLED: the writer never cancels a
    stream it still reads)."""
    return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def _unexpected(exc: Exception) -> AgentlogError:
    """A failure that is not a status (the client's channel closed under the writer)."""
    return UnavailableError(
        f"the append stream failed ({type(exc).__name__}: {exc}); appends not answered "
        "may not be stored: send them again (their ids make that safe)",
        reason="UNAVAILABLE",
    )


class _BlockingWriter:
    """A blocking writer's `with` block: leaving it closes the writer, which waits for
    every answer and raises the first failure (unless the block raised: then what was
    appended is still answered, and the block's own exception goes on)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            with contextlib.suppress(AgentlogError):
                self.close()


class AppendWriter(_BlockingWriter):
    """Appends sent on one stream from a blocking program: `append` returns a future of
    the record at once (it waits only when `window` appends are unanswered). Use it as
    a context manager, or call `close()`, which waits for every answer and raises the
    first append's failure, if any (see the module's text for what a refusal does)."""

    def __init__(
        self,
        open_stream: Callable[[Any, Sequence[tuple[str, str]]], Any],
        metadata: Callable[[], Sequence[tuple[str, str]]],
        *,
        retries: int,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._open_stream = open_stream
        self._metadata = metadata
        self._retries = retries
        self._window = max(1, window)
        self._book: _Book[concurrent.futures.Future[EventRecord]] = _Book()
        self._changed = threading.Condition()
        self._closing = False
        self._stream = 0  # which stream the message iterators serve
        self._thread = threading.Thread(target=self._run, name="agentlog-writer", daemon=True)
        self._thread.start()

    def append(self, event: AppendEvent) -> concurrent.futures.Future[EventRecord]:
        """Send `event`; its future gives the stored record, or raises why it was not
        stored. A malformed event raises here, and nothing is sent."""
        request = _requests.append_to_proto(event)
        future: concurrent.futures.Future[EventRecord] = concurrent.futures.Future()
        with self._changed:
            while len(self._book.entries) >= self._window and self._book.failure is None:
                if not self._thread.is_alive():  # cannot happen; never wait for nothing
                    raise ServerError("the writer's thread has ended", reason="INTERNAL")
                self._changed.wait(1.0)
            _check_open(self._book, self._closing)
            self._book.take(request, event.event, future)
            self._changed.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every append so far is answered (or the writer failed); False if
        `timeout` seconds passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._book.entries, timeout)

    def close(self) -> None:
        """Send what is queued, wait for every answer, end the stream; raise the first
        append's failure, if one failed."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join()
        if self._book.failure is not None:
            raise self._book.failure

    def _messages(self, stream: int) -> Any:
        """The messages of one stream: the unanswered appends (sent again after a
        reconnect), then each new one; it ends (half-closing the stream) once the writer
        is closing and everything is sent, or when a newer stream replaced it."""
        while True:
            with self._changed:
                while stream == self._stream and not self._book.unsent:
                    if self._closing:
                        return
                    self._changed.wait()
                if stream != self._stream:
                    return
                message = self._book.next_message()
            yield message

    def _run(self) -> None:
        attempt = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._book.entries or self._closing)
                if not self._book.entries and self._closing:
                    return
                self._stream += 1
                self._book.sent = 0
                stream = self._stream
                self._changed.notify_all()  # ends the previous stream's messages
            try:
                call = self._open_stream(self._messages(stream), self._metadata())
                for response in call:
                    with self._changed:
                        settled = self._book.answered(response.records)
                        self._changed.notify_all()
                    attempt = 0
                    for future, record in settled:
                        future.set_result(record)
                with self._changed:
                    if not self._book.entries:
                        continue  # closing: every append answered; or an idle stream ended
                error: AgentlogError = ServerError(
                    "the server ended the append stream with appends unanswered",
                    reason="INTERNAL",
                )
            except grpc.RpcError as exc:
                with self._changed:
                    waiting = bool(self._book.entries)
                if _retryable(exc) and (not waiting or attempt < self._retries):
                    if waiting:
                        time.sleep(backoff(attempt))
                        attempt += 1
                    continue
                error = from_rpc_error(exc)
            except AgentlogError as exc:
                error = exc
            except Exception as exc:
                error = _unexpected(exc)
            with self._changed:
                failed = self._book.fail(error)
                self._stream += 1
                self._changed.notify_all()
            for future, failure in failed:
                future.set_exception(failure)
            with self._changed:
                self._closing = True
            return


class AsyncAppendWriter:
    """Appends sent on one stream from asyncio: `await writer.append(event)` returns a
    future of the record once the event is queued (it waits only when `window` appends
    are unanswered). Use it with `async with`, or await `close()`, which waits for
    every answer and raises the first append's failure, if any."""

    def __init__(
        self,
        open_stream: Callable[[Sequence[tuple[str, str]]], Any],
        metadata: Callable[[], Sequence[tuple[str, str]]],
        *,
        retries: int,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self._open_stream = open_stream
        self._metadata = metadata
        self._retries = retries
        self._window = max(1, window)
        self._book: _Book[asyncio.Future[EventRecord]] = _Book()
        self._changed = asyncio.Condition()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            with contextlib.suppress(AgentlogError):
                await self.close()

    async def append(self, event: AppendEvent) -> asyncio.Future[EventRecord]:
        """Send `event`; the future gives the stored record, or raises why it was not
        stored. A malformed event raises here, and nothing is sent."""
        request = _requests.append_to_proto(event)
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self._book.entries) < self._window or self._book.failure is not None
            )
            _check_open(self._book, self._closing)
            future: asyncio.Future[EventRecord] = asyncio.get_running_loop().create_future()
            self._book.take(request, event.event, future)
            self._changed.notify_all()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return future

    async def flush(self) -> None:
        """Wait until every append so far is answered (or the writer failed)."""
        async with self._changed:
            await self._changed.wait_for(lambda: not self._book.entries)

    async def close(self) -> None:
        """Send what is queued, wait for every answer, end the stream; raise the first
        append's failure, if one failed."""
        async with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._task is not None:
            await self._task
        if self._book.failure is not None:
            raise self._book.failure

    async def _send(self, call: Any) -> None:
        """Write the unanswered appends, then each new one; half-close once closing and
        everything is sent."""
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._book.unsent or self._closing)
                if not self._book.unsent:
                    break
                message = self._book.next_message()
            await call.write(message)
        await call.done_writing()

    async def _run(self) -> None:
        attempt = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._book.entries) or self._closing)
                if not self._book.entries and self._closing:
                    return
                self._book.sent = 0
            call = self._open_stream(self._metadata())
            sender = asyncio.ensure_future(self._send(call))
            try:
                async for response in call:
                    async with self._changed:
                        settled = self._book.answered(response.records)
                        self._changed.notify_all()
                    attempt = 0
                    for future, record in settled:
                        if not future.done():
                            future.set_result(record)
                if not self._book.entries:
                    continue
                error: AgentlogError = ServerError(
                    "the server ended the append stream with appends unanswered",
                    reason="INTERNAL",
                )
            except grpc.RpcError as exc:
                waiting = bool(self._book.entries)
                if _retryable(exc) and (not waiting or attempt < self._retries):
                    if waiting:
                        await asyncio.sleep(backoff(attempt))
                        attempt += 1
                    continue
                error = from_rpc_error(exc)
            except AgentlogError as exc:
                error = exc
            except Exception as exc:
                error = _unexpected(exc)
            finally:
                sender.cancel()
                call.cancel()
            async with self._changed:
                failed = self._book.fail(error)
                self._closing = True
                self._changed.notify_all()
            for future, failure in failed:
                if not future.done():
                    future.set_exception(failure)
                    future.add_done_callback(_quietly)
            return


class InlineWriter(_BlockingWriter):
    """The writer of an in-process store: each append is stored as it is made (there
    is no round trip to save), with the same futures, refusal rule and close."""

    def __init__(self, append: Callable[[AppendEvent], EventRecord]) -> None:
        self._append = append
        self._book: _Book[concurrent.futures.Future[EventRecord]] = _Book()
        self._closing = False

    def append(self, event: AppendEvent) -> concurrent.futures.Future[EventRecord]:
        """See `AppendWriter.append`."""
        _requests.append_to_proto(event)  # what a client checks before sending
        _check_open(self._book, self._closing)
        future: concurrent.futures.Future[EventRecord] = concurrent.futures.Future()
        try:
            future.set_result(self._append(event))
        except AgentlogError as exc:
            self._book.failure, self._book.refused = exc, True
            future.set_exception(exc)
        return future

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        self._closing = True
        if self._book.failure is not None:
            raise self._book.failure
