"""What every call does, seen from outside the service: Prometheus metrics under the
names gRPC users know, and an optional access log. A server interceptor, so health
and reflection calls count too, and no method of the service has to remember it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from agentlog.server import metrics
from agentlog.server._auth import open_caller_slot
from agentlog.server._tracing import CallTracer

access = logging.getLogger("agentlog.access")


def _names(full_method: str) -> tuple[str, str]:
    """("agentlog.v1.SessionRepository", "Append") for "/agentlog.v1.SessionRepository/Append"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


if TYPE_CHECKING:  # generic in its stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class Rewraps:
    """Each method's wrapped handler, made once: wrapping builds a new method handler,
    which would otherwise cost every call. Only handlers the server has are kept (a
    caller naming unknown methods cannot grow it)."""

    def __init__(
        self, unary: Callable[[Any, str], Any], stream: Callable[[Any, str, str], Any]
    ) -> None:
        self._unary = unary
        self._stream = stream
        self._made: dict[str, tuple[Any, Any]] = {}

    def of(self, method: str, handler: Any) -> Any:
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = rewrap(
            handler,
            lambda behavior: self._unary(behavior, method),
            lambda behavior, kind: self._stream(behavior, method, kind),
        )
        if handler is not None:
            self._made[method] = (handler, wrapped)
        return wrapped


def rewrap(handler: Any, unary: Callable[[Any], Any], stream: Callable[[Any, str], Any]) -> Any:
    """`handler` (a method's, or None) with its behavior wrapped by `unary` or by
    `stream(behavior, grpc_type)`, as the method answers once or streams its answers
    (this server has no method that takes a stream and answers once)."""
    if handler is None:
        return None
    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **codecs)
    if handler.unary_stream is not None:
        behavior = stream(handler.unary_stream, "server_stream")
        return grpc.unary_stream_rpc_method_handler(behavior, **codecs)
    if handler.stream_stream is not None:
        behavior = stream(handler.stream_stream, "bidi_stream")
        return grpc.stream_stream_rpc_method_handler(behavior, **codecs)
    return handler


class CallObserver(_Interceptor):
    """Counts and times every call; logs each one when `access_log` is on; with
    `tracer`, gives each a span (see `_tracing.CallTracer`)."""

    def __init__(self, *, access_log: bool = False, tracer: CallTracer | None = None) -> None:
        self.access_log = access_log
        self._tracer = tracer
        # Each method's metric children, looked up once: labels() costs a lookup a call.
        self._children: dict[tuple[str, str, str], _MethodMetrics] = {}
        self._rewraps = Rewraps(
            lambda behavior, name: self._unary(behavior, *_names(name)),
            lambda behavior, name, kind: self._stream(behavior, *_names(name), kind),
        )

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        return self._rewraps.of(details.method, await continuation(details))

    def wrap(self, behavior: Any, full_method: str, streaming: bool) -> Any:
        """`behavior` counted and timed as this interceptor does it for gRPC calls (for
        the same service served over HTTP, see `_http_calls`)."""
        service, method = _names(full_method)
        if streaming:  # over HTTP no method takes a stream (see _http_calls._grpc_only)
            return self._stream(behavior, service, method, "server_stream")
        return self._unary(behavior, service, method)

    def _begin(self, kind: str, service: str, method: str, context: Any) -> list[int]:
        """Count a call in and arrange for its end to be counted; its message count."""
        key = (kind, service, method)
        counted = self._children.get(key)
        if counted is None:
            counted = self._children[key] = _MethodMetrics(*key)
        counted.started.inc()
        started = time.perf_counter()
        sent = [0]
        caller = open_caller_slot() if self.access_log else None

        def done(finished: Any) -> None:
            code = finished.code()
            if code is None:
                code = grpc.StatusCode.CANCELLED if finished.cancelled() else grpc.StatusCode.OK
            seconds = time.perf_counter() - started
            counted.handled(code.name).inc()
            counted.seconds.observe(seconds)
            if sent[0]:
                counted.sent.inc(sent[0])
            if caller is not None:
                _log_access(
                    service, method, code.name, seconds, finished, sent=sent[0], caller=caller[0]
                )

        context.add_done_callback(done)
        return sent

    def _spanned(self, name: str, context: Any) -> contextlib.AbstractContextManager[None]:
        """The call's span when tracing is on, else nothing."""
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.span(name, context)

    def _unary(self, behavior: Any, service: str, method: str) -> Any:
        name = f"{service}/{method}"

        async def observed(request: Any, context: Any) -> Any:
            sent = self._begin("unary", service, method, context)
            with self._spanned(name, context):
                answer = await behavior(request, context)
            sent[0] = 1
            return answer

        return observed

    def _stream(self, behavior: Any, service: str, method: str, kind: str) -> Any:
        name = f"{service}/{method}"

        async def observed(request: Any, context: Any) -> AsyncIterator[Any]:
            sent = self._begin(kind, service, method, context)
            with self._spanned(name, context):
                async for message in behavior(request, context):
                    sent[0] += 1
                    yield message

        return observed


class _MethodMetrics:
    """One method's children of the per-call metrics."""

    def __init__(self, kind: str, service: str, method: str) -> None:
        self._labels = (kind, service, method)
        self.started = metrics.GRPC_STARTED.labels(*self._labels)
        self.seconds = metrics.GRPC_SECONDS.labels(*self._labels)
        self.sent = metrics.GRPC_SENT.labels(*self._labels)
        self._handled: dict[str, Any] = {}

    def handled(self, code: str) -> Any:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = metrics.GRPC_HANDLED.labels(*self._labels, code)
        return child


def _log_access(
    service: str, method: str, code: str, seconds: float, context: Any, *, sent: int, caller: str
) -> None:
    metadata = dict(context.invocation_metadata() or ())
    access.info(
        "%s/%s %s %.1f ms from %s (%s)",
        service,
        method,
        code,
        seconds * 1000,
        context.peer(),
        caller or "-",
        extra={
            "access": {
                "method": f"/{service}/{method}",
                "code": code,
                "duration_ms": round(seconds * 1000, 3),
                "peer": context.peer(),
                "caller": caller or None,
                "user_agent": metadata.get("user-agent"),
                "messages_sent": sent,
            }
        },
    )
