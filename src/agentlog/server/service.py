"""The SessionRepository gRPC service: requests in, storage calls, records out.

Each method only converts (`agentlog._codec`) and delegates to the `Backend`
(or, for subscriptions, to `LiveSubscriptions`); `_translate_errors` is the one place where storage
errors become gRPC statuses, so no method formats an error of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from agentlog import _codec, _requests
from agentlog._records import CaughtUp, Checkpoint, FeedGap, SessionDeleted, SessionPage
from agentlog._status import to_grpc_status
from agentlog._validation import (
    check_parent_query,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import AgentlogError, InvalidArgumentError, PermissionDeniedError, ServerError
from agentlog.server._answers import answer_fields, count_appended
from agentlog.server._append_stream import AppendStreams, StreamEnd
from agentlog.server._auth import (
    EVERYONE,
    Authenticator,
    Grant,
    Permission,
    name_caller,
    peer_of,
)
from agentlog.server._forks import plan_fork
from agentlog.server._guard import StreamGuard, Watched
from agentlog.server._lifecycle import plan_delete, plan_label_change
from agentlog.server._listing import (
    SessionList,
    SessionMessages,
    SessionQuery,
    scope_of,
    within,
)
from agentlog.server._live import Interrupt, LiveSubscriptions
from agentlog.server._rules import (
    prepare_batch_request,
    prepare_request,
)
from agentlog.server._streams import (
    EncodedRuns,
    deleted_message,
    feed_messages,
    feed_runs,
    gap_message,
    record_messages,
    session_messages,
)
from agentlog.server.backend import Backend
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc

log = logging.getLogger("agentlog.server")


F = TypeVar("F", bound=Callable[..., Any])


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: AgentlogError) -> None:
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


def _unexpected(method: str, exc: BaseException) -> AgentlogError:
    log.exception("%s failed unexpectedly", method, exc_info=exc)
    return ServerError(
        f"{method} failed inside the server ({type(exc).__name__}); the server log has details",
        reason="INTERNAL",
    )


class _Malformed:
    """A request whose bytes did not parse as its message (see `add_to_server`)."""

    def __init__(self, message_name: str, error: Exception) -> None:
        self.error = InvalidArgumentError(
            f"the request is not a valid {message_name} message ({error}); "
            "it may come from a client built from another .proto",
            reason="MALFORMED_REQUEST",
        )


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that hands bytes which do not parse to the method as
    `_Malformed`, so they are answered INVALID_ARGUMENT rather than grpc's UNKNOWN."""
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return _Malformed(name, exc)

    return deserialize


def _serialize(message: Any) -> bytes:
    """A response's bytes; a response already encoded (shared by many streams, see
    `_streams.EncodedRuns`) as is."""
    if isinstance(message, bytes):
        return message
    data: bytes = message.SerializeToString()
    return data


def add_to_server(service: SessionRepositoryService, server: grpc.aio.Server) -> None:
    """Register the service's methods, as the generated `add_..._to_server` does, but
    with the deserializer and serializer above."""
    descriptor = pb.DESCRIPTOR.services_by_name["SessionRepository"]
    handlers = {}
    for method in descriptor.methods:
        request_class = getattr(pb, method.input_type.name)
        if method.client_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=_lenient(request_class),
            response_serializer=_serialize,
        )
    generic = grpc.method_handlers_generic_handler(descriptor.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))


class CallsInFlight:
    """How many calls the service is serving, subscriptions apart: at shutdown,
    subscriptions end once the other calls (appends whose records they would
    deliver) are done."""

    def __init__(self) -> None:
        self.calls = 0
        self.subscriptions = 0
        self._quiet: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None

    def started(self, subscription: bool) -> None:
        if self._idle is not None:
            self._idle.clear()
        if subscription:
            self.subscriptions += 1
        else:
            self.calls += 1
            if self._quiet is not None:
                self._quiet.clear()

    def ended(self, subscription: bool) -> None:
        if subscription:
            self.subscriptions -= 1
        else:
            self.calls -= 1
            if self.calls == 0 and self._quiet is not None:
                self._quiet.set()
        if self._idle is not None and not (self.calls or self.subscriptions):
            self._idle.set()

    async def idle(self, seconds: float) -> None:
        """Return once no call at all is in flight (subscriptions included), or after
        `seconds`."""
        if self._idle is None:
            self._idle = asyncio.Event()
        if not (self.calls or self.subscriptions):
            self._idle.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)

    async def quiet(self) -> None:
        """Return once no call but subscriptions is in flight."""
        if self._quiet is None:
            self._quiet = asyncio.Event()
        if self.calls == 0:
            self._quiet.set()
        await self._quiet.wait()


def _translate_errors(method: F) -> F:
    """Turn AgentlogError into its status, and anything else into INTERNAL (logged);
    count the call in flight meanwhile."""
    name = method.__name__
    subscription = name.startswith("Subscribe")
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await _abort(context, request.error)
                return
            self.in_flight.started(subscription)
            _calling.set(None)
            try:
                async for item in method(self, request, context):
                    if type(item) is list:  # messages encoded once, shared
                        for message in item:
                            yield message
                    else:
                        yield item
            except AgentlogError as exc:
                await _abort(context, _as_seen(exc))
            except Exception as exc:
                await _abort(context, _unexpected(name, exc))
            finally:
                self.in_flight.ended(subscription)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        if isinstance(request, _Malformed):
            await _abort(context, request.error)
        self.in_flight.started(subscription)
        _calling.set(None)
        try:
            return await method(self, request, context)
        except AgentlogError as exc:
            await _abort(context, _as_seen(exc))
        except Exception as exc:
            await _abort(context, _unexpected(name, exc))
        finally:
            self.in_flight.ended(subscription)

    return unary  # type: ignore[return-value]


# The caller of the call being served (None until known), so that an error is told
# only what that caller may read (see AgentlogError.seen_by).
_calling: ContextVar[Grant | None] = ContextVar("agentlog_calling", default=None)


def _as_seen(error: AgentlogError) -> AgentlogError:
    """`error` as the caller may be told it: a session it may not read is not named."""
    grant = _calling.get()
    return error.seen_by(grant.may_read if grant is not None else _nothing)


def _nothing(_: str) -> bool:
    return False


class SessionRepositoryService(session_pb2_grpc.SessionRepositoryServicer):
    """Serves a Backend over gRPC."""

    def __init__(
        self,
        backend: Backend,
        live: LiveSubscriptions,
        authenticator: Authenticator | None = None,
    ) -> None:
        self._backend = backend
        self._live = live
        self._authenticator = authenticator
        self._guard = StreamGuard(authenticator) if authenticator is not None else None
        self.in_flight = CallsInFlight()
        self._encoded = EncodedRuns()
        self._append_streams = AppendStreams(backend)
        self._session_messages = SessionMessages()

    def stop_append_streams(self) -> None:
        """At shutdown: end append streams once their current commits are answered."""
        self._append_streams.stop()

    @_translate_errors
    async def Append(self, request: pb.AppendRequest, context: Any) -> pb.AppendResponse:
        # The answer may copy the request's event (see appended_fields), less
        # fields this server does not know: they are not stored.
        request.DiscardUnknownFields()
        caller = self._caller(context)
        pending = prepare_request(request)
        caller.require(Permission.APPEND, pending.session_id)
        appended = await self._backend.append(pending)
        count_appended(appended, request.ByteSize())
        sent = None if request.omit_event else [request.event]
        return pb.AppendResponse(record=answer_fields(appended, sent)[0])

    @_translate_errors
    async def AppendBatch(
        self, request: pb.AppendBatchRequest, context: Any
    ) -> pb.AppendBatchResponse:
        request.DiscardUnknownFields()  # as in Append
        caller = self._caller(context)
        pending = prepare_batch_request(request)
        caller.require(Permission.APPEND, pending.session_id)
        appended = await self._backend.append(pending)
        count_appended(appended, request.ByteSize())
        sent = None if request.omit_events else [item.event for item in request.events]
        return pb.AppendBatchResponse(records=answer_fields(appended, sent))

    @_translate_errors
    async def AppendStream(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[pb.AppendStreamResponse]:
        caller = [self._caller(context)]
        ending = StreamEnd()

        def allowed(session_id: str) -> None:
            grant = caller[0]
            _calling.set(grant)  # errors are told as the grant that stands now allows
            grant.require(Permission.APPEND, session_id)

        def still_allowed(grant: Grant) -> None:
            # Each append is checked against the caller's grant as it stands now.
            caller[0] = grant

        messages = _parsed(request_iterator)
        with self._watching(context, ending.end, still_allowed):
            async for response in self._append_streams.serve(messages, allowed, ending):
                yield response

    @_translate_errors
    async def LoadSession(
        self, request: pb.LoadSessionRequest, context: Any
    ) -> AsyncIterator[pb.LoadSessionResponse]:
        caller = self._caller(context)
        session_id, branch_id, from_sequence, limit, direction = _requests.read_from_proto(request)
        caller.require(Permission.READ, session_id)
        chunks = self._backend.read_session_chunks(
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
            branch_id=branch_id,
        )
        async for chunk in chunks:
            yield pb.LoadSessionResponse(records=chunk)

    @_translate_errors
    async def LoadChildren(
        self, request: pb.LoadChildrenRequest, context: Any
    ) -> AsyncIterator[pb.LoadChildrenResponse]:
        caller = self._caller(context)
        everything = caller.reads_everything
        async for run in self._backend.read_children(check_parent_query(request.parent_id)):
            records = run if everything else [r for r in run if caller.may_read(r.session_id)]
            for messages in record_messages(records):  # only the children it may see
                yield pb.LoadChildrenResponse(records=messages)

    @_translate_errors
    async def Head(self, request: pb.HeadRequest, context: Any) -> pb.HeadResponse:
        caller = self._caller(context)
        session_id = check_stored_session_id(request.session_id)
        branch_id = check_stored_branch_id(request.branch_id)
        caller.require(Permission.READ, session_id)
        record = await self._backend.head(session_id, branch_id)
        if record is None:
            return pb.HeadResponse()
        return pb.HeadResponse(record=_codec.record_to_proto(record))

    @_translate_errors
    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Any
    ) -> pb.ForkSessionResponse:
        caller = self._caller(context)
        plan = plan_fork(
            request.session_id,
            request.branch_id,
            request.up_to_sequence,
            expected_sequence=(
                request.expected_sequence if request.HasField("expected_sequence") else None
            ),
            new_branch_id=request.new_branch_id,
            new_session_id=request.new_session_id,
        )
        # A fork reads its source and appends to its target: it needs both.
        caller.require(Permission.READ, plan.session_id)
        caller.require(Permission.APPEND, plan.new_session_id)
        info = await self._backend.fork(plan)
        return pb.ForkSessionResponse(
            session_id=plan.new_session_id, branch=_requests.branch_to_proto(info)
        )

    @_translate_errors
    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Any
    ) -> pb.DeleteSessionResponse:
        caller = self._caller(context)
        plan = plan_delete(
            request.session_id,
            request.branch_id,
            all_branches=request.all_branches,
            expected_sequence=(
                request.expected_sequence if request.HasField("expected_sequence") else None
            ),
        )
        caller.require(Permission.DELETE, plan.session_id)
        markers = await self._backend.delete(plan)
        for marker in markers:
            log.info(
                "deleted branch %r of session %r (%d records; feed position %d)",
                marker.branch_id,
                marker.session_id,
                marker.last_sequence,
                marker.position,
            )
        return pb.DeleteSessionResponse(deleted=[_requests.deleted_to_proto(m) for m in markers])

    @_translate_errors
    async def UpdateSessionLabels(
        self, request: pb.UpdateSessionLabelsRequest, context: Any
    ) -> pb.UpdateSessionLabelsResponse:
        caller = self._caller(context)
        change = plan_label_change(
            request.session_id,
            dict(request.set),
            list(request.remove),
            request.expected_version if request.HasField("expected_version") else None,
        )
        caller.require(Permission.APPEND, change.session_id)
        labels = await self._backend.relabel(change)
        return pb.UpdateSessionLabelsResponse(labels=labels.labels, version=labels.version)

    @_translate_errors
    async def SubscribeSession(
        self, request: pb.SubscribeSessionRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeSessionResponse | list[bytes]]:
        caller = self._caller(context)
        session_id = check_stored_session_id(request.session_id)
        branch_id = check_stored_branch_id(request.branch_id)
        caller.require(Permission.READ, session_id)
        start = request.from_sequence if request.HasField("from_sequence") else None
        interrupt = Interrupt()

        def still_allowed(grant: Grant) -> None:
            grant.require(Permission.READ, session_id)

        chunks = self._live.session_chunks(
            session_id, from_sequence=start, interrupt=interrupt, branch_id=branch_id
        )
        with self._watching(context, interrupt.end, still_allowed):
            async for item in chunks:
                if isinstance(item, CaughtUp):
                    yield pb.SubscribeSessionResponse(caught_up=pb.CaughtUp(sequence=item.sequence))
                else:
                    key = ("s", session_id, branch_id)
                    yield self._encoded.get(key, item, session_messages)

    @_translate_errors
    async def SubscribeAll(
        self, request: pb.SubscribeAllRequest, context: Any
    ) -> AsyncIterator[pb.SubscribeAllResponse | list[bytes]]:
        caller = self._caller(context)
        everything = caller.reads_everything
        start = request.from_position if request.HasField("from_position") else None
        interrupt = Interrupt()
        visibility = None if everything else (caller.permissions, caller.prefixes)
        chunks = self._live.feed_chunks(
            from_position=start,
            session_id_prefix=request.session_id_prefix,
            part_types=list(request.part_types),
            visible=None if everything else caller.may_read,  # only sessions it may read
            scope=visibility,
            interrupt=interrupt,
            branch_id=request.branch_id,
        )
        # Encoded runs are shared only between subscribers with the same filters (and
        # scope): two filters can keep different records between the same first and last.
        scope = (
            "a",
            request.session_id_prefix,
            tuple(sorted(set(request.part_types))),
            request.branch_id,
            visibility,
        )

        def still_allowed(grant: Grant) -> None:
            if not grant.covers(caller):
                raise PermissionDeniedError(
                    f"caller {grant.name!r} may no longer read every session this feed "
                    "delivers (its grant changed); subscribe again to follow what it may "
                    "read now",
                    reason="PERMISSION_DENIED",
                    metadata={"caller": grant.name},
                )

        with self._watching(context, interrupt.end, still_allowed):
            async for item in chunks:
                if isinstance(item, CaughtUp):
                    yield pb.SubscribeAllResponse(caught_up=pb.CaughtUp(position=item.position))
                    continue
                if isinstance(item, Checkpoint):
                    yield pb.SubscribeAllResponse(checkpoint=pb.Checkpoint(position=item.position))
                    continue
                for run in feed_runs(item):
                    if isinstance(run, FeedGap):
                        yield gap_message(run)
                    elif isinstance(run, SessionDeleted):
                        yield deleted_message(run)
                    else:
                        yield self._encoded.get(scope, run, feed_messages)

    @_translate_errors
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Any
    ) -> pb.ListSessionsResponse:
        caller = self._caller(context)
        tokens = self._backend.page_tokens
        # Only the sessions it may see, looked up as such: a page never spans others.
        prefixes = within(caller.readable_prefixes(), request.session_id_prefix)
        filters = SessionQuery.of(
            request.page_size or None,
            None,
            prefixes or ("",),
            **_requests.list_from_proto(request),
        )
        # A token serves the caller and filters it was issued for, and no other.
        scope = scope_of(
            "list",
            caller.name,
            sorted(caller.permissions),
            caller.prefixes,
            request.session_id_prefix,
            *filters.filters,
        )
        after = tokens.decode(request.page_token or None, scope)
        query = dataclasses.replace(filters, after=after)
        found = await self._backend.list_sessions(query) if prefixes else SessionList()
        token = tokens.encode(found.after, scope) if found.after is not None else None
        page = SessionPage(sessions=found.sessions, next_page_token=token)
        return _requests.page_to_proto(page, self._session_messages)

    @contextlib.contextmanager
    def _watching(
        self,
        context: Any,
        end: Callable[[AgentlogError], None],
        still_allowed: Callable[[Grant], None],
    ) -> Iterator[None]:
        """Have the stream's credential rechecked while it runs (see `_guard`)."""
        if self._guard is None:
            yield
            return
        watched = Watched(_metadata(context), peer_of(context.auth_context()), still_allowed, end)
        with self._guard.watching(watched):
            yield

    def _caller(self, context: Any) -> Grant:
        """Who is calling (UnauthenticatedError if the call carries no credential this
        server accepts); with no authentication set up, anyone may do anything."""
        if self._authenticator is None:
            grant = EVERYONE
        else:
            grant = self._authenticator.grant(_metadata(context), peer_of(context.auth_context()))
        _calling.set(grant)
        return name_caller(grant)

    async def close(self) -> None:
        if self._guard is not None:
            await self._guard.close()


async def _parsed(messages: AsyncIterator[Any]) -> AsyncIterator[pb.AppendStreamRequest]:
    """A stream's messages; one whose bytes did not parse is its refusal."""
    async for message in messages:
        if isinstance(message, _Malformed):
            raise message.error
        yield message


def _metadata(context: Any) -> list[tuple[str, str]]:
    return list(context.invocation_metadata() or ())
