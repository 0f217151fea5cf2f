"""Traces: the client's span is the parent of the server's, and the store's spans
are beneath that; off unless OTEL_* settings ask for it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from agentlog import AgentlogClient, AppendEvent, AsyncAgentlogClient
from agentlog.server import JsonlSessionRepository
from agentlog.server._tracing import configure_from_environment
from agentlog.server.postgres import PostgresBackend
from tests.contract import delta
from tests.pg import database
from tests.servers import LoopThread, running_server

APPEND = "agentlog.v1.SessionRepository/Append"


@pytest.fixture
def traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def named(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, [span.name for span in spans]
    return found[0]


def finished(exporter: InMemorySpanExporter, *names: str) -> tuple[ReadableSpan, ...]:
    """The finished spans once those named are among them: a server span ends just
    after its answer is sent, so the client may be answered first."""
    deadline = time.monotonic() + 10
    while True:
        spans = exporter.get_finished_spans()
        if {span.name for span in spans} >= set(names) or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def check_family(spans: tuple[ReadableSpan, ...], store_spans: list[str]) -> None:
    client = named(spans, "agent-step")
    server = named(spans, APPEND)
    assert server.kind == SpanKind.SERVER
    assert server.context is not None
    assert client.context is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.attributes is not None
    assert server.attributes["rpc.method"] == "Append"
    for name in store_spans:
        store = named(spans, name)
        assert store.parent is not None
        assert store.parent.span_id == server.context.span_id


@pytest.fixture
def jsonl_target(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> Iterator[str]:
    store = JsonlSessionRepository(tmp_path / "data")
    with running_server(store, tracer_provider=traced[0]) as target:
        yield target
    store.close()


def test_a_client_span_is_the_parent_of_the_server_span_and_the_store_spans(
    jsonl_target: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    with AgentlogClient(jsonl_target) as client:
        client.head("warm")
        exporter.clear()
        with tracer.start_as_current_span("agent-step"):
            client.append(AppendEvent(session_id="t", event=delta("t", "x")))
    check_family(finished(exporter, APPEND), ["agentlog.store.write", "agentlog.store.sync"])


def test_the_async_client_propagates_the_context_too(
    jsonl_target: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")

    async def call() -> None:
        async with AsyncAgentlogClient(jsonl_target) as client:
            with tracer.start_as_current_span("agent-step"):
                await client.append(AppendEvent(session_id="t", event=delta("t", "y")))

    loop = LoopThread()
    try:
        exporter.clear()
        loop.run(call())
    finally:
        loop.close()
    check_family(finished(exporter, APPEND), ["agentlog.store.write"])


def test_postgres_appends_have_a_commit_span(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("test")
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with (
            running_server(open_backend, tracer_provider=provider) as target,
            AgentlogClient(target) as client,
        ):
            exporter.clear()
            with tracer.start_as_current_span("agent-step"):
                client.append(AppendEvent(session_id="t", event=delta("t", "z")))
    check_family(finished(exporter, APPEND), ["agentlog.store.commit"])


def test_a_failed_call_marks_its_span(
    jsonl_target: str, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    _, exporter = traced
    with AgentlogClient(jsonl_target, retries=0) as client:
        exporter.clear()
        with pytest.raises(ValueError, match="session_id"):
            client.head("")
    head = "agentlog.v1.SessionRepository/Head"
    span = named(finished(exporter, head), head)
    assert span.status.status_code.name == "ERROR"
    assert span.attributes is not None
    assert span.attributes["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT


def test_tracing_is_off_unless_the_environment_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert configure_from_environment() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure_from_environment() is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    provider = configure_from_environment()
    assert isinstance(provider, TracerProvider)
    provider.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert configure_from_environment() is None
