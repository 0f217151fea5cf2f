"""OpenTelemetry traces: a server span per call, joined to the caller's trace through
its W3C `traceparent` metadata, with spans for the store's write and sync beneath.

Off unless OTEL_* settings ask for it (`configure_from_environment`), and then free:
no span is started and `store_span` is a context variable lookup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, Status, StatusCode

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


class CallTracer:
    """A SERVER span per call, as a child of the caller's span when its metadata carries
    one, ended with the call's status. `_observe.CallObserver` opens it, in the same
    wrapper as the call's metrics (one interceptor, one coroutine layer a call)."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._tracer = provider.get_tracer("agentlog.server")

    @contextlib.contextmanager
    def span(self, name: str, context: Any) -> Iterator[None]:
        """The call's span (`name`: "service/method"). A call the sampler leaves out
        costs its sampling decision: its span is not made current, since nothing
        beneath it would be recorded."""
        metadata = context.invocation_metadata() or ()
        parent = None
        for key, _ in metadata:
            if key in _PROPAGATED:  # only then is there a caller's context to read
                parent = extract({k: v for k, v in metadata})
                break
        service, _, method = name.rpartition("/")
        span = self._tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        if not span.is_recording():
            yield
            return
        token = _current_tracer.set(self._tracer)
        try:
            with trace.use_span(
                span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield
        finally:
            _current_tracer.reset(token)
            code = context.code()
            if code is not None and code != grpc.StatusCode.OK:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                span.set_status(Status(StatusCode.ERROR, code.name))
            span.end()


# The metadata keys of W3C trace context and baggage (the default propagators').
_PROPAGATED = frozenset({"traceparent", "tracestate", "baggage"})


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
