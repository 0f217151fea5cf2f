"""AppendStream: a writer's appends taken as they arrive and committed in groups.

A task reads the stream's messages into a bounded queue, so the next appends
arrive while a group is being made durable. Each turn takes everything queued (up
to `GROUP_EVENTS` appends), checks each append as Append does, joins consecutive
appends to one branch into one batch (`_Group`), and commits the batches in order,
one at a time, answering each once durable: one writer sending 10,000 events
costs a few dozen commits, not 10,000.

A batch is all or nothing, and a stream's promise is per append: a batch that
fails is committed again one append at a time, so the appends before the one at
fault are stored and answered (retries among them answer the stored records), the
one at fault ends the stream with its status (its ErrorInfo says its
`stream_index`), and nothing after it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agentlog.errors import AgentlogError, InvalidArgumentError, UnavailableError
from agentlog.server._answers import answer_fields, count_appended
from agentlog.server._rules import MESSAGE_BYTES, MESSAGE_RECORDS, PendingAppend, prepare_request
from agentlog.server.backend import Backend
from agentlog.v1 import session_pb2 as pb

# A turn commits at most this many appends (and batches of at most GROUP_BYTES of
# requests), so one turn's answer is never late by more than one large commit.
GROUP_EVENTS = 1000
GROUP_BYTES = 1 << 20
# Messages read ahead of the commits; beyond this the client waits (HTTP/2 flow
# control), so a fast writer cannot grow the server's memory.
QUEUED_MESSAGES = 64

_END = object()  # the client half-closed: nothing more will come


@dataclass(slots=True)
class _Taken:
    """One append of the stream, checked."""

    request: pb.AppendRequest
    pending: PendingAppend
    index: int
    """Its place in the stream, from 0."""
    size: int


@dataclass(slots=True)
class _Group:
    """Consecutive appends to one branch, committed as one batch: what one Append
    each would do, as long as each later expectation is the one the batch implies."""

    appends: list[_Taken] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    size: int = 0

    def takes(self, taken: _Taken) -> bool:
        if not self.appends:
            return True
        first = self.appends[0].pending
        pending = taken.pending
        expected = pending.expected
        return (
            pending.session_id == first.session_id
            and pending.branch_id == first.branch_id
            and len(self.appends) < GROUP_EVENTS
            and self.size + taken.size <= GROUP_BYTES
            and pending.batch[0].id not in self.ids
            and (
                expected is None
                or (first.expected is not None and expected == first.expected + len(self.appends))
            )
        )

    def add(self, taken: _Taken) -> None:
        self.appends.append(taken)
        self.ids.add(taken.pending.batch[0].id)
        self.size += taken.size

    def batch(self) -> PendingAppend:
        """The group as one append: the first append's expectation and labels (a later
        append's labels would be ignored anyway: only a session's first append sets them)."""
        first = self.appends[0].pending
        if len(self.appends) == 1:
            return first
        return PendingAppend(
            first.session_id,
            [taken.pending.batch[0] for taken in self.appends],
            first.expected,
            branch_id=first.branch_id,
            labels=first.labels,
        )


def _at(error: AgentlogError, index: int) -> AgentlogError:
    """`error` saying which append of the stream it refused."""
    placed = copy.copy(error)
    placed.metadata = {**error.metadata, "stream_index": str(index)}
    if error.redacted is not None:  # what a caller who may not read the session is told
        placed.redacted = _at(error.redacted, index)
    return placed


class StreamEnd:
    """Ends one append stream from outside (its credential lapsed: see `_guard`): the
    stream answers its current commit, then ends with `error`."""

    def __init__(self) -> None:
        self.error: AgentlogError | None = None
        self._stop: Callable[[], None] | None = None

    def end(self, error: AgentlogError) -> None:
        self.error = error
        if self._stop is not None:
            self._stop()

    def stops(self, stop: Callable[[], None]) -> None:
        """What ending the stream calls."""
        self._stop = stop


class AppendStreams:
    """Serves the append streams of one server, and ends them when it stops."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._stopping = False
        self._open: set[Callable[[], None]] = set()

    def stop(self) -> None:
        """End every stream once its current commit is answered (UNAVAILABLE: the
        client sends what was not answered again, to this server's successor)."""
        self._stopping = True
        for stop in list(self._open):
            stop()

    async def serve(
        self,
        messages: AsyncIterator[pb.AppendStreamRequest],
        allowed: Callable[[str], None],
        ending: StreamEnd,
    ) -> AsyncIterator[pb.AppendStreamResponse]:
        """Answer the appends of `messages`; `allowed(session_id)` raises if the caller
        may not append to a session (asked at each append, so a narrower grant counts
        from the next append); `ending` ends the stream from outside."""
        queue: asyncio.Queue[Any] = asyncio.Queue(QUEUED_MESSAGES)
        reader = asyncio.ensure_future(_read(messages, queue))
        stopped = [False]

        def stop() -> None:
            stopped[0] = True
            reader.cancel()  # the reader then queues _END, waking a turn that waits

        ending.stops(stop)
        self._open.add(stop)
        if self._stopping or ending.error is not None:
            stop()
        index = 0
        try:
            while True:
                first = await queue.get()
                if stopped[0]:
                    raise ending.error or _stopping_error()
                turn = [first]
                appends = len(first.appends) if isinstance(first, pb.AppendStreamRequest) else 0
                while appends < GROUP_EVENTS and not queue.empty():
                    item = queue.get_nowait()
                    turn.append(item)
                    if isinstance(item, pb.AppendStreamRequest):
                        appends += len(item.appends)
                groups, refusal, ended = _plan(turn, allowed, index)
                for group in groups:
                    fields, error = await self._commit(group)
                    for chunk in _chunks(fields, group):
                        yield pb.AppendStreamResponse(records=chunk)
                    if error is not None:
                        raise error
                    index += len(group.appends)
                if refusal is not None:
                    raise refusal
                if ended:
                    return
        finally:
            self._open.discard(stop)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _commit(self, group: _Group) -> tuple[list[dict[str, Any]], AgentlogError | None]:
        """Commit a group; the answers of its stored appends, and the error of the one
        at fault (None when all were stored)."""
        try:
            return self._answers(group.appends, await self._backend.append(group.batch())), None
        except AgentlogError as exc:
            if len(group.appends) == 1:
                return [], _at(exc, group.appends[0].index)
        fields: list[dict[str, Any]] = []
        for taken in group.appends:  # one at a time, to store those before the fault
            try:
                appended = await self._backend.append(taken.pending)
            except AgentlogError as exc:
                return fields, _at(exc, taken.index)
            fields.extend(self._answers([taken], appended))
        return fields, None

    @staticmethod
    def _answers(appends: list[_Taken], appended: Any) -> list[dict[str, Any]]:
        count_appended(appended, sum(taken.size for taken in appends))
        if all(taken.request.omit_event for taken in appends):
            return answer_fields(appended, None)
        fields = answer_fields(appended, [taken.request.event for taken in appends])
        for taken, answer in zip(appends, fields, strict=True):
            if taken.request.omit_event:
                answer.pop("event", None)
        return fields


async def _read(messages: AsyncIterator[pb.AppendStreamRequest], queue: asyncio.Queue[Any]) -> None:
    """Queue the stream's messages, then _END; an error reading them (a message that
    does not parse, an empty one) is queued in their place and ends the reading."""
    try:
        async for message in messages:
            if not message.appends:
                raise InvalidArgumentError(
                    "appends: a message of an append stream needs at least one append",
                    field="appends",
                    reason="INVALID_EVENT",
                )
            message.DiscardUnknownFields()  # as Append does: what is unknown is not stored
            await queue.put(message)
    except AgentlogError as exc:
        await queue.put(exc)
        return
    except asyncio.CancelledError:
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(_END)
        raise
    except Exception as exc:  # the transport failed under the stream
        await queue.put(UnavailableError(f"reading the append stream failed: {exc}"))
        return
    await queue.put(_END)


def _plan(
    turn: list[Any], allowed: Callable[[str], None], index: int
) -> tuple[list[_Group], AgentlogError | None, bool]:
    """A turn's appends in groups, up to the first that is refused before storing
    (checks, credentials); that refusal; whether the client has half-closed."""
    groups: list[_Group] = []
    group = _Group()
    for item in turn:
        if item is _END:
            return _close(groups, group), None, True
        if isinstance(item, AgentlogError):
            return _close(groups, group), _at(item, index), False
        for request in item.appends:
            try:
                pending = prepare_request(request)
                allowed(pending.session_id)
            except AgentlogError as exc:
                return _close(groups, group), _at(exc, index), False
            taken = _Taken(request, pending, index, request.ByteSize())
            if not group.takes(taken):
                groups.append(group)
                group = _Group()
            group.add(taken)
            index += 1
    return _close(groups, group), None, False


def _close(groups: list[_Group], group: _Group) -> list[_Group]:
    if group.appends:
        groups.append(group)
    return groups


def _chunks(fields: list[dict[str, Any]], group: _Group) -> Iterator[list[dict[str, Any]]]:
    """The answers in messages of at most MESSAGE_RECORDS records and about
    MESSAGE_BYTES (an answer is never larger than its request)."""
    start, size = 0, 0
    for offset, taken in enumerate(group.appends[: len(fields)]):
        if offset > start and (
            offset - start >= MESSAGE_RECORDS or size + taken.size > MESSAGE_BYTES
        ):
            yield fields[start:offset]
            start, size = offset, 0
        size += taken.size
    if start < len(fields):
        yield fields[start:]


def _stopping_error() -> UnavailableError:
    return UnavailableError(
        "the server is stopping: appends not answered were not stored; send them again "
        "on a new stream (their ids make that safe)",
        reason="SHUTTING_DOWN",
    )
