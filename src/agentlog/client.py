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

import time
from collections.abc import (
    Collection,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import Any, Self

import grpc

from agentlog import _codec, _requests
from agentlog._async_client import AsyncAgentlogClient
from agentlog._call_metadata import CallMetadata, Token, call_metadata
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
from agentlog._writers import DEFAULT_WINDOW, AppendWriter
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc


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
        channel = open_channel(grpc, target, credentials, options, tls=tls)
        self._channel: grpc.Channel = grpc.intercept_channel(channel, CallMetadata(token))
        self._stub: Any = session_pb2_grpc.SessionRepositoryStub(self._channel)
        self._token = token
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

    def _unary(self, method: Any, request: Any, *, retry: bool = True) -> Any:
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                if not retry or not should_retry(exc, attempt, self.retries):
                    raise from_rpc_error(exc) from None
            time.sleep(backoff(attempt))
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

    def writer(self, *, window: int = DEFAULT_WINDOW) -> AppendWriter:
        """A writer that sends appends on one stream without waiting for each (see
        `SessionRepository.writer`); at most `window` wait for their answers."""
        return AppendWriter(
            lambda messages, metadata: self._stub.AppendStream(messages, metadata=metadata),
            lambda: call_metadata(self._token),
            retries=self.retries,
            window=window,
        )

    def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
        branch_id: str = MAIN,
        labels: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        request = _requests.batch_to_proto(session_id, events, expected_sequence, branch_id, labels)
        response = self._unary(self._stub.AppendBatch, request)
        return _codec.appended_from_proto(response.records, [e.event for e in events])

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[EventRecord]:
        request = _requests.read_to_proto(session_id, from_sequence, limit, direction, branch_id)
        return self._stream(self._stub.LoadSession, request)

    def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> list[EventRecord]:
        return list(
            self.read_session(
                session_id,
                from_sequence=from_sequence,
                limit=limit,
                direction=direction,
                branch_id=branch_id,
            )
        )

    def list_sessions(
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
        return _requests.page_from_proto(self._unary(self._stub.ListSessions, request))

    def delete_session(
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
        response = self._unary(self._stub.DeleteSession, request, retry=False)
        return [_requests.deleted_from_proto(m) for m in response.deleted]

    def update_session_labels(
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
        response = self._unary(self._stub.UpdateSessionLabels, request, retry=retry)
        return _requests.labels_from_proto(response)

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = MAIN
    ) -> Generator[EventRecord | CaughtUp, None, None]:
        """A branch's stored records from `from_sequence` (None: only new ones), CaughtUp,
        then live ones.

        Has no deadline. After UNAVAILABLE it resubscribes from the sequence after
        the last one delivered (up to `retries` times in a row), so the caller sees
        no gap and no duplicate; a CaughtUp follows each reconnect.
        """
        resume = SessionResume(session_id, from_sequence, branch_id)
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
        branch_id: str = "",
    ) -> Generator[FeedItem | CaughtUp | Checkpoint, None, None]:
        """Every session's records in commit order, as FeedRecord(position, record);
        a FeedGap where records of a followed session could not be read (its file is
        damaged: the feed goes on after them).

        Stored ones from `from_position` (None: only new ones), CaughtUp, then live
        ones; optionally only sessions whose id starts with `session_id_prefix`,
        branches named `branch_id` ("": every branch) and events of the given
        `part_types`. Resumes after UNAVAILABLE from the
        position after the last one served, like `subscribe_session`.
        """
        resume = FeedResume(from_position, session_id_prefix, part_types, branch_id)
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

    def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        response = self._unary(self._stub.Head, _requests.head_to_proto(session_id, branch_id))
        return _codec.record_from_proto(response.record) if response.HasField("record") else None

    def fork_session(
        self,
        session_id: str,
        up_to_sequence: int,
        *,
        branch_id: str = MAIN,
        expected_sequence: int | None = None,
        new_branch_id: str = "",
        new_session_id: str = "",
    ) -> BranchInfo:
        """See `SessionRepository.fork_session`. Not retried (a retry after a lost
        answer would find the branch made, and fail): after UNAVAILABLE, look with
        `head(new_session_id, new_branch_id)` whether it was made."""
        request = _requests.fork_to_proto(
            session_id,
            up_to_sequence,
            branch_id=branch_id,
            expected_sequence=expected_sequence,
            new_branch_id=new_branch_id,
            new_session_id=new_session_id,
        )
        response = self._unary(self._stub.ForkSession, request, retry=False)
        return _requests.branch_from_proto(response.branch)


__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TARGET",
    "DEFAULT_TIMEOUT",
    "AgentlogClient",
    "AsyncAgentlogClient",
]
