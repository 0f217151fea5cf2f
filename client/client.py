"""gRPC clients for an agentlog server: `AgentlogClient` and `AsyncAgentlogClient`.

Both satisfy the SessionRepository protocols, take Python types in and give
Python types out, and raise `agentlog.errors` exceptions, never grpc's. Every
call carries a deadline (`timeout` seconds, the whole stream for streaming
calls). They share the request builders and response converters of
`_codec`, and the status mapping of `_status`; they differ only in I/O.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import grpc

from agentlog import _codec
from agentlog._records import AppendEvent, EventRecord
from agentlog._status import from_rpc_error
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Records come back with an id and timestamp added, so a reply may be a
    # little larger than the largest request a server accepts.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Keep idle connections alive through proxies and notice dead ones.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def _open_channel(
    channels: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    extra_options: Sequence[tuple[str, Any]],
) -> Any:
    """A channel from `channels` (the grpc or grpc.aio module): both have the same factories."""
    given = {name for name, _ in extra_options}
    options = [opt for opt in _CHANNEL_OPTIONS if opt[0] not in given] + list(extra_options)
    if credentials is not None:
        return channels.secure_channel(target, credentials, options=options)
    return channels.insecure_channel(target, options=options)


class AgentlogClient:
    """A blocking client; use it as a context manager or call `close()`.

    `target` is "host:port" (or any gRPC target string); `credentials` turns on
    TLS; `timeout` is each call's deadline in seconds (None: no deadline);
    `options` are extra gRPC channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel: grpc.Channel = _open_channel(grpc, target, credentials, options)
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self.timeout = timeout

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

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
        response = self._unary(self._stub.Append, _codec.append_to_proto(event))
        return _codec.record_from_proto(response.record)

    def iter_session(self, session_id: str) -> Iterator[EventRecord]:
        """A session's records as they stream in, without holding them all."""
        return self._stream(self._stub.LoadSession, pb.LoadSessionRequest(session_id=session_id))

    def load_session(self, session_id: str) -> list[EventRecord]:
        return list(self.iter_session(session_id))

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
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._channel: grpc.aio.Channel = _open_channel(grpc.aio, target, credentials, options)
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self.timeout = timeout

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

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
        response = await self._unary(self._stub.Append, _codec.append_to_proto(event))
        return _codec.record_from_proto(response.record)

    def iter_session(self, session_id: str) -> AsyncIterator[EventRecord]:
        """A session's records as they stream in, without holding them all."""
        return self._stream(self._stub.LoadSession, pb.LoadSessionRequest(session_id=session_id))

    async def load_session(self, session_id: str) -> list[EventRecord]:
        return [record async for record in self.iter_session(session_id)]

    def iter_children(self, parent_id: str) -> AsyncIterator[EventRecord]:
        """The children of a record as they stream in."""
        return self._stream(self._stub.LoadChildren, pb.LoadChildrenRequest(parent_id=parent_id))

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        return [record async for record in self.iter_children(parent_id)]

    async def head(self, session_id: str) -> EventRecord | None:
        response = await self._unary(self._stub.Head, pb.HeadRequest(session_id=session_id))
        return _codec.record_from_proto(response.record) if response.HasField("record") else None
