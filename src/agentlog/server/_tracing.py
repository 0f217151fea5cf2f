"""OpenTelemetry traces: a server span per call, joined to the caller's trace through
its W3C `traceparent` metadata, with spans for the store's write and sync beneath.

Off unless OTEL_* settings ask for it (`configure_from_environment`), and then free:
no interceptor is installed and `store_span` is a context variable lookup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

from agentlog.server._observe import Rewraps

if TYPE_CHECKING:  # generic in its stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

# The tracer of the call being served, while tracing is on.
_current_tracer: ContextVar[trace.Tracer | None] = ContextVar("agentlog_tracer", default=None)


@contextlib.contextmanager
def store_span(name: str, **attributes: Any) -> Iterator[None]:
    """A span `name` beneath the call's span, if the call is traced; else nothing."""
    tracer = _current_tracer.get()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(name, attributes=attributes):
        yield


class TracingInterceptor(_Interceptor):
    """Starts a SERVER span per call, as a child of the caller's span when its
    metadata carries one, and ends it with the call's status."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer("agentlog.server")
        self._rewraps = Rewraps(
            lambda behavior, method: self._unary(behavior, method.lstrip("/")),
            lambda behavior, method: self._stream(behavior, method.lstrip("/")),
        )

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        return self._rewraps.of(details.method, await continuation(details))

    def wrap(self, behavior: Any, full_method: str, streaming: bool) -> Any:
        """`behavior` with a span as gRPC calls get one (for HTTP, see `_http_calls`)."""
        name = full_method.lstrip("/")
        return self._stream(behavior, name) if streaming else self._unary(behavior, name)

    @contextlib.contextmanager
    def _span(self, name: str, context: Any) -> Iterator[trace.Span]:
        carrier = {key: value for key, value in context.invocation_metadata() or ()}
        service, _, method = name.rpartition("/")
        with self._tracer.start_as_current_span(
            name,
            context=extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            # The store's spans only under a span that is recorded: a call the sampler
            # left out costs one span, not three.
            token = _current_tracer.set(self._tracer if span.is_recording() else None)
            try:
                yield span
            finally:
                _current_tracer.reset(token)
                code = context.code()
                if code is not None and code != grpc.StatusCode.OK:
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    span.set_status(Status(StatusCode.ERROR, code.name))

    def _unary(self, behavior: Any, name: str) -> Any:
        async def traced(request: Any, context: Any) -> Any:
            with self._span(name, context):
                return await behavior(request, context)

        return traced

    def _stream(self, behavior: Any, name: str) -> Any:
        async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
            with self._span(name, context):
                async for message in behavior(request, context):
                    yield message

        return traced


def configure_from_environment() -> trace.TracerProvider | None:
    """A tracer provider exporting spans as the standard OTEL_* variables say, or None
    when they do not ask for traces (OTEL_TRACES_EXPORTER unset or `none` and no
    OTLP endpoint set, or OTEL_SDK_DISABLED)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter_name == "none" or (not exporter_name and not endpoint):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:  # otlp, the default: endpoint, headers, TLS... from OTEL_EXPORTER_OTLP_*
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    service = os.environ.get("OTEL_SERVICE_NAME", "agentlog")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
