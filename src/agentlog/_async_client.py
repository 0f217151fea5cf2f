"""The asyncio client, `AsyncAgentlogClient` (see `agentlog.client`, which exports it
beside the blocking one: the two share the request builders, the converters and the
status mapping, and differ only in I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Collection,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Self

import grpc

from agentlog import _codec, _requests
from agentlog._call_metadata import Token, call_metadata
from agentlog._client_streams import (
    DEFAULT_RETRIES,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    FeedResume,
    SessionResume,
    backoff,
    open_channel,
    should_retry,
)
from agentlog._events import ReadDirection
from agentlog._records import (
    AppendEvent,
    BranchInfo,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedItem,
    NewEvent,
    SessionDeleted,
    SessionLabels,
    SessionPage,
)
from agentlog._status import from_rpc_error
from agentlog._tls import TlsConfig
from agentlog._validation import MAIN, check_page_size
from agentlog._writers import DEFAULT_WINDOW, AsyncAppendWriter
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc


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
        self._channel: grpc.aio.Channel = open_channel(
            grpc.aio, target, credentials, options, tls=tls, aio_token=token
        )
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self._token = token
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

    async def _unary(self, method: Any, request: Any, *, retry: bool = True) -> Any:
        attempt = 0
        while True:
            try:
                return await method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if not retry or not should_retry(exc, attempt, self.retries):
                    raise from_rpc_error(exc) from None
            await asyncio.sleep(backoff(attempt))
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
        branch_id: str = MAIN,
        labels: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        request = _requests.batch_to_proto(session_id, events, expected_sequence, branch_id, labels)
        response = await self._unary(self._stub.AppendBatch, request)
        return _codec.appended_from_proto(response.records, [e.event for e in events])

    def writer(self, *, window: int = DEFAULT_WINDOW) -> AsyncAppendWriter:
        """A writer that sends appends on one stream without waiting for each (see
        `AsyncSessionRepository.writer`); at most `window` wait for their answers."""
        return AsyncAppendWriter(
            lambda metadata: self._stub.AppendStream(metadata=metadata),
            lambda: call_metadata(self._token),
            retries=self.retries,
            window=window,
        )

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> AsyncIterator[EventRecord]:
        request = _requests.read_to_proto(session_id, from_sequence, limit, direction, branch_id)
        return self._stream(self._stub.LoadSession, request)

    async def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> list[EventRecord]:
        read = self.read_session(
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
            branch_id=branch_id,
        )
        return [record async for record in read]

    async def list_sessions(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        labels: Mapping[str, str] | None = None,
        session_id_prefix: str = "",
        updated_after_ns: int | None = None,
        updated_before_ns: int | None = None,
    ) -> SessionPage:
        """See `SessionRepository.list_sessions`."""
        request = _requests.list_to_proto(
            check_page_size(page_size),
            page_token,
            labels=labels,
            session_id_prefix=session_id_prefix,
            updated_after_ns=updated_after_ns,
            updated_before_ns=updated_before_ns,
        )
        return _requests.page_from_proto(await self._unary(self._stub.ListSessions, request))

    async def delete_session(
        self,
        session_id: str,
        branch_id: str = MAIN,
        *,
        all_branches: bool = False,
        expected_sequence: int | None = None,
    ) -> list[SessionDeleted]:
        """See `SessionRepository.delete_session`. Not retried (a retry after a lost
        answer would find nothing to delete, and fail with NotFoundError)."""
        request = _requests.delete_to_proto(session_id, branch_id, all_branches, expected_sequence)
        response = await self._unary(self._stub.DeleteSession, request, retry=False)
        return [_requests.deleted_from_proto(m) for m in response.deleted]

    async def update_session_labels(
        self,
        session_id: str,
        set_labels: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
        *,
        expected_version: int | None = None,
    ) -> SessionLabels:
        """See `SessionRepository.update_session_labels`. Retried only with an
        `expected_version` (which makes a repeat fail rather than apply twice)."""
        request = _requests.labels_to_proto(session_id, set_labels, remove, expected_version)
        retry = expected_version is not None
        response = await self._unary(self._stub.UpdateSessionLabels, request, retry=retry)
        return _requests.labels_from_proto(response)

    async def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = MAIN
    ) -> AsyncGenerator[EventRecord | CaughtUp, None]:
        """A branch's stored records from `from_sequence` (None: only new ones), CaughtUp,
        then live ones.

        Resumes after UNAVAILABLE exactly as AgentlogClient.subscribe_session does.
        """
        resume = SessionResume(session_id, from_sequence, branch_id)
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
        branch_id: str = "",
    ) -> AsyncGenerator[FeedItem | CaughtUp | Checkpoint, None]:
        """Every session's records in commit order; see AgentlogClient.subscribe_all."""
        resume = FeedResume(from_position, session_id_prefix, part_types, branch_id)
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

    async def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        request = _requests.head_to_proto(session_id, branch_id)
        response = await self._unary(self._stub.Head, request)
        return _codec.record_from_proto(response.record) if response.HasField("record") else None

    async def fork_session(
        self,
        session_id: str,
        up_to_sequence: int,
        *,
        branch_id: str = MAIN,
        expected_sequence: int | None = None,
        new_branch_id: str = "",
        new_session_id: str = "",
    ) -> BranchInfo:
        """See `AgentlogClient.fork_session` (not retried either)."""
        request = _requests.fork_to_proto(
            session_id,
            up_to_sequence,
            branch_id=branch_id,
            expected_sequence=expected_sequence,
            new_branch_id=new_branch_id,
            new_session_id=new_session_id,
        )
        response = await self._unary(self._stub.ForkSession, request, retry=False)
        return _requests.branch_from_proto(response.branch)
