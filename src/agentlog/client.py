"""gRPC clients for an agentlog server: `AgentlogClient` and `AsyncAgentlogClient`.

Both satisfy the SessionRepository protocols, take Python types in and give
Python types out, and raise `agentlog.errors` exceptions, never grpc's. Every
call carries a deadline (`timeout` seconds per attempt, the whole stream for
streaming calls). Appends carry ids made here, so retrying them after
UNAVAILABLE or DEADLINE_EXCEEDED (up to `retries` times, with jittered
exponential backoff) can never store an event twice; unary reads retry the
same way. The two clients share the request builders and response converters
of `_codec` and the status mapping of `_status`; they differ only in I/O.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Collection,
    Generator,
    Iterator,
    Sequence,
)
from types import TracebackType
from typing import Any, Self

import grpc

from agentlog import _codec, _requests
from agentlog._call_metadata import CallMetadata, Token, aio_interceptors
from agentlog._events import ReadDirection
from agentlog._records import (
    AppendEvent,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedGap,
    FeedRecord,
    NewEvent,
    SessionPage,
)
from agentlog._status import from_rpc_error
from agentlog._tls import TlsConfig
from agentlog._validation import check_page_size
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Records come back with an id and timestamp added, so a reply may be a
    # little larger than the largest request a server accepts.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a server restart, so retries find it back up.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Keep idle connections alive through proxies and notice dead ones.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): full jitter, capped."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


def _should_retry(exc: grpc.RpcError, attempt: int, retries: int) -> bool:
    return attempt < retries and exc.code() in _RETRYABLE


class _Reconnects:
    """Counts a subscription's reconnects in a row and paces them."""

    attempt = 0

    def retry(self, exc: grpc.RpcError, retries: int) -> float:
        """Seconds to wait before resuming, or raise the error when it is not to be retried."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or self.attempt >= retries:
            raise from_rpc_error(exc) from None
        self.attempt += 1
        return _backoff(self.attempt - 1)


class _Resume(_Reconnects):
    """Where a subscription stands, so that a reconnect continues exactly after it."""

    def __init__(self, session_id: str, from_sequence: int | None) -> None:
        self.session_id = session_id
        self.next_sequence = from_sequence

    def request(self) -> pb.SubscribeSessionRequest:
        return pb.SubscribeSessionRequest(
            session_id=self.session_id, from_sequence=self.next_sequence
        )

    def items(self, response: pb.SubscribeSessionResponse) -> list[EventRecord | CaughtUp]:
        self.attempt = 0  # the stream works again: a later failure gets all its retries
        if response.HasField("caught_up"):
            sequence = response.caught_up.sequence
            self.next_sequence = sequence + 1
            return [CaughtUp(sequence)]
        records = [_codec.record_from_proto(r) for r in response.records.records]
        if records:
            self.next_sequence = records[-1].sequence + 1
        return list(records)


class _FeedResume(_Reconnects):
    """Where an all-sessions subscription stands (its next position) across reconnects."""

    def __init__(
        self, from_position: int | None, session_id_prefix: str, part_types: Collection[str]
    ) -> None:
        self.next_position = from_position
        self.prefix = session_id_prefix
        self.part_types = list(part_types)

    def request(self) -> pb.SubscribeAllRequest:
        return pb.SubscribeAllRequest(
            from_position=self.next_position,
            session_id_prefix=self.prefix,
            part_types=self.part_types,
        )

    def items(
        self, response: pb.SubscribeAllResponse
    ) -> list[FeedRecord | FeedGap | CaughtUp | Checkpoint]:
        self.attempt = 0
        if response.HasField("caught_up"):
            position = response.caught_up.position
            self.next_position = position + 1
            return [CaughtUp(position=position)]
        if response.HasField("checkpoint"):
            position = response.checkpoint.position
            self.next_position = position + 1
            return [Checkpoint(position)]
        if response.HasField("gap"):
            gap = response.gap
            self.next_position = gap.last_position + 1
            return [
                FeedGap(
                    gap.first_position, gap.last_position, gap.session_id, gap.reason, gap.message
                )
            ]
        items = [
            FeedRecord(f.position, _codec.record_from_proto(f.record))
            for f in response.records.records
        ]
        if items:
            self.next_position = items[-1].position + 1
        return list(items)


def _open_channel(
    channels: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    extra_options: Sequence[tuple[str, Any]],
    *,
    tls: TlsConfig | None = None,
    aio_token: Token | None = None,
) -> Any:
    """A channel from `channels` (the grpc or grpc.aio module): both have the same factories
    (an asyncio channel takes its bearer-token interceptors here; a blocking one is
    wrapped by the caller)."""
    if tls is not None:
        if credentials is not None:
            raise ValueError("give tls or credentials, not both")
        credentials = tls.credentials()
        extra_options = [*tls.options(), *extra_options]
    given = {name for name, _ in extra_options}
    options = [opt for opt in _CHANNEL_OPTIONS if opt[0] not in given] + list(extra_options)
    extra: dict[str, Any] = {}
    if channels is grpc.aio:
        extra["interceptors"] = aio_interceptors(aio_token)
    if credentials is not None:
        return channels.secure_channel(target, credentials, options=options, **extra)
    return channels.insecure_channel(target, options=options, **extra)


class AgentlogClient:
    """A blocking client; use it as a context manager or call `close()`.

    `target` is "host:port" (or any gRPC target string); `credentials` turns on
    TLS (or `tls`, a `TlsConfig` of files: the server's CA, a client certificate);
    `token` is sent as `authorization: Bearer <token>` on every call (a callable is
    asked for it each time, so it may refresh an expiring one);
    `timeout` is each call's deadline in seconds (None: no deadline);
    `retries` bounds the retries after UNAVAILABLE or DEADLINE_EXCEEDED;
    `options` are extra gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TlsConfig | None = None,
        token: Token | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        channel = _open_channel(grpc, target, credentials, options, tls=tls)
        self._channel: grpc.Channel = grpc.intercept_channel(channel, CallMetadata(token))
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self.timeout = timeout
        self.retries = retries

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    def wait_for_server(self, timeout: float) -> bool:
        """Whether a connection to the server is up within `timeout` seconds (it keeps
        being tried meanwhile); calls do not need this, it is for telling a person."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        return True

    def _unary(self, method: Any, request: Any) -> Any:
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if not _should_retry(exc, attempt, self.retries):
                    raise from_rpc_error(exc) from None
            time.sleep(_backoff(attempt))
            attempt += 1

    def _stream(self, method: Any, request: Any) -> Iterator[EventRecord]:
        call = method(request, timeout=self.timeout)
        try:
            for response in call:
                for record in response.records:
                    yield _codec.record_from_proto(record)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()  # a no-op when the stream ended; frees it when the caller stopped early

    def append(self, event: AppendEvent) -> EventRecord:
        response = self._unary(self._stub.Append, _requests.append_to_proto(event))
        return _codec.record_from_proto(response.record, event.event)

    def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
    ) -> list[EventRecord]:
        request = _requests.batch_to_proto(session_id, events, expected_sequence)
        response = self._unary(self._stub.AppendBatch, request)
        return _codec.appended_from_proto(response.records, [e.event for e in events])

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[EventRecord]:
        request = _requests.read_to_proto(session_id, from_sequence, limit, direction)
        return self._stream(self._stub.LoadSession, request)

    def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> list[EventRecord]:
        return list(
            self.read_session(
                session_id, from_sequence=from_sequence, limit=limit, direction=direction
            )
        )

    def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        request = pb.ListSessionsRequest(
            page_size=check_page_size(page_size), page_token=page_token or ""
        )
        return _requests.page_from_proto(self._unary(self._stub.ListSessions, request))

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None
    ) -> Generator[EventRecord | CaughtUp, None, None]:
        """Stored records from `from_sequence` (None: only new ones), CaughtUp, then live ones.

        Has no deadline. After UNAVAILABLE it resubscribes from the sequence after
        the last one delivered (up to `retries` times in a row), so the caller sees
        no gap and no duplicate; a CaughtUp follows each reconnect.
        """
        resume = _Resume(session_id, from_sequence)
        while True:
            call = self._stub.SubscribeSession(resume.request())
            try:
                for response in call:
                    yield from resume.items(response)
                return
            except grpc.RpcError as exc:
                delay = resume.retry(exc, self.retries)
            finally:
                call.cancel()
            time.sleep(delay)

    def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
    ) -> Generator[FeedRecord | FeedGap | CaughtUp | Checkpoint, None, None]:
        """Every session's records in commit order, as FeedRecord(position, record);
        a FeedGap where records of a followed session could not be read (its file is
        damaged: the feed goes on after them).

        Stored ones from `from_position` (None: only new ones), CaughtUp, then live
        ones; optionally only sessions whose id starts with `session_id_prefix`
        and events of the given `part_types`. Resumes after UNAVAILABLE from the
        position after the last one served, like `subscribe_session`.
        """
        resume = _FeedResume(from_position, session_id_prefix, part_types)
        while True:
            call = self._stub.SubscribeAll(resume.request())
            try:
                for response in call:
                    yield from resume.items(response)
                return
            except grpc.RpcError as exc:
                delay = resume.retry(exc, self.retries)
            finally:
                call.cancel()
            time.sleep(delay)

    def iter_children(self, parent_id: str) -> Iterator[EventRecord]:
        """The children of a record as they stream in."""
        return self._stream(self._stub.LoadChildren, pb.LoadChildrenRequest(parent_id=parent_id))

    def load_children(self, parent_id: str) -> list[EventRecord]:
        return list(self.iter_children(parent_id))

    def head(self, session_id: str) -> EventRecord | None:
        response = self._unary(self._stub.Head, pb.HeadRequest(session_id=session_id))
        return _codec.record_from_proto(response.record) if response.HasField("record") else None


class AsyncAgentlogClient:
    """An asyncio client; use it with `async with` or await `close()`.

    Takes the same arguments as AgentlogClient and raises the same exceptions.
    Create and use it inside one running event loop.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        credentials: grpc.ChannelCredentials | None = None,
        tls: TlsConfig | None = None,
        token: Token | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel: grpc.aio.Channel = _open_channel(
            grpc.aio, target, credentials, options, tls=tls, aio_token=token
        )
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self.timeout = timeout
        self.retries = retries

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)

    async def wait_for_server(self, seconds: float) -> bool:
        """Whether a connection to the server is up within `seconds` (see
        AgentlogClient.wait_for_server)."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), seconds)
        except TimeoutError:
            return False
        return True

    async def _unary(self, method: Any, request: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if not _should_retry(exc, attempt, self.retries):
                    raise from_rpc_error(exc) from None
            await asyncio.sleep(_backoff(attempt))
            attempt += 1

    async def _stream(self, method: Any, request: Any) -> AsyncIterator[EventRecord]:
        call = method(request, timeout=self.timeout)
        try:
            async for response in call:
                for record in response.records:
                    yield _codec.record_from_proto(record)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def append(self, event: AppendEvent) -> EventRecord:
        request = _requests.append_to_proto(event)
        response = await self._unary(self._stub.Append, request)
        return _codec.record_from_proto(response.record, event.event)

    async def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
    ) -> list[EventRecord]:
        request = _requests.batch_to_proto(session_id, events, expected_sequence)
        response = await self._unary(self._stub.AppendBatch, request)
        return _codec.appended_from_proto(response.records, [e.event for e in events])

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> AsyncIterator[EventRecord]:
        request = _requests.read_to_proto(session_id, from_sequence, limit, direction)
        return self._stream(self._stub.LoadSession, request)

    async def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> list[EventRecord]:
        read = self.read_session(
            session_id, from_sequence=from_sequence, limit=limit, direction=direction
        )
        return [record async for record in read]

    async def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        request = pb.ListSessionsRequest(
            page_size=check_page_size(page_size), page_token=page_token or ""
        )
        return _requests.page_from_proto(await self._unary(self._stub.ListSessions, request))

    async def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None
    ) -> AsyncGenerator[EventRecord | CaughtUp, None]:
        """Stored records from `from_sequence` (None: only new ones), CaughtUp, then live ones.

        Resumes after UNAVAILABLE exactly as AgentlogClient.subscribe_session does.
        """
        resume = _Resume(session_id, from_sequence)
        while True:
            call = self._stub.SubscribeSession(resume.request())
            try:
                async for response in call:
                    for item in resume.items(response):
                        yield item
                return
            except grpc.RpcError as exc:
                delay = resume.retry(exc, self.retries)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
    ) -> AsyncGenerator[FeedRecord | FeedGap | CaughtUp | Checkpoint, None]:
        """Every session's records in commit order; see AgentlogClient.subscribe_all."""
        resume = _FeedResume(from_position, session_id_prefix, part_types)
        while True:
            call = self._stub.SubscribeAll(resume.request())
            try:
                async for response in call:
                    for item in resume.items(response):
                        yield item
                return
            except grpc.RpcError as exc:
                delay = resume.retry(exc, self.retries)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    def iter_children(self, parent_id: str) -> AsyncIterator[EventRecord]:
        """The children of a record as they stream in."""
        return self._stream(self._stub.LoadChildren, pb.LoadChildrenRequest(parent_id=parent_id))

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        return [record async for record in self.iter_children(parent_id)]

    async def head(self, session_id: str) -> EventRecord | None:
        response = await self._unary(self._stub.Head, pb.HeadRequest(session_id=session_id))
        return _codec.record_from_proto(response.record) if response.HasField("record") else None
