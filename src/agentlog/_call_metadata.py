"""What the clients add to every call's metadata, streams and their resumes included:
the caller's trace context (W3C `traceparent`, from the current OpenTelemetry
context, so the server's span joins the caller's trace) and a bearer token, fixed
or from a callable asked each time (a token that expires is refreshed by it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry.propagate import inject

if TYPE_CHECKING:  # generic in their stubs only
    _Unary = grpc.UnaryUnaryClientInterceptor[Any, Any]
    _Stream = grpc.UnaryStreamClientInterceptor[Any, Any]
    _AioUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _AioStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
else:
    _Unary = grpc.UnaryUnaryClientInterceptor
    _Stream = grpc.UnaryStreamClientInterceptor
    _AioUnary = grpc.aio.UnaryUnaryClientInterceptor
    _AioStream = grpc.aio.UnaryStreamClientInterceptor

Token = str | Callable[[], str]


def _metadata(token: Token | None, metadata: Any) -> tuple[tuple[str, str], ...]:
    added: dict[str, str] = {}
    inject(added)  # traceparent (and tracestate) when a span is current
    if token is not None:
        value = token() if callable(token) else token
        added["authorization"] = f"Bearer {value}"
    kept = tuple((k, v) for k, v in (metadata or ()) if k not in added)
    return (*kept, *added.items())


def call_metadata(token: Token | None) -> tuple[tuple[str, str], ...]:
    """The metadata of a call made without the interceptors (the append stream: an
    intercepted stream of requests costs every message)."""
    return _metadata(token, None)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class CallMetadata(_Unary, _Stream):
    """Adds the trace context and the token to each call of a blocking channel."""

    def __init__(self, token: Token | None) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, _metadata(self._token, details.metadata)), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, _metadata(self._token, details.metadata)), request)


def aio_interceptors(token: Token | None) -> list[Any]:
    """The same for an asyncio channel."""

    class Unary(_AioUnary):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            metadata = _metadata(token, details.metadata)
            return await continuation(details._replace(metadata=metadata), request)

    class Stream(_AioStream):
        async def intercept_unary_stream(
            self, continuation: Any, details: Any, request: Any
        ) -> Any:
            metadata = _metadata(token, details.metadata)
            return await continuation(details._replace(metadata=metadata), request)

    return [Unary(), Stream()]
