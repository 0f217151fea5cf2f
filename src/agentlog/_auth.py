"""Client side of authentication: a bearer token on every call, streams and their
resumes included, from a fixed string or a callable asked each time (a token that
expires is refreshed by the callable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

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


def _metadata(token: Token, metadata: Any) -> tuple[tuple[str, str], ...]:
    value = token() if callable(token) else token
    kept = tuple((k, v) for k, v in (metadata or ()) if k != "authorization")
    return (*kept, ("authorization", f"Bearer {value}"))


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class BearerToken(_Unary, _Stream):
    """Adds `authorization: Bearer <token>` to each call of a blocking channel."""

    def __init__(self, token: Token) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, _metadata(self._token, details.metadata)), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_Details(details, _metadata(self._token, details.metadata)), request)


def aio_interceptors(token: Token) -> list[Any]:
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
