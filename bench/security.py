"""What security and observability cost (`python -m bench --only security`).

Append at 64 clients and LoadSession on the same kind of server, plain and with each
of: TLS, bearer tokens checked against an access file, metrics served, every trace
exported (OTLP, to a sink in this process), one trace in ten exported, and TLS,
tokens, metrics and tracing together (every trace, and one in ten). The
configurations are measured in interleaved rounds and each figure is the median of
its rounds, so a machine whose speed drifts affects them alike.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from agentlog import AgentlogClient, NewEvent, TlsConfig
from bench.common import Results, append_rate_c64, delta, load_rate, server
from tests.certs import CertificateAuthority

TOKEN = "bench-token"
LOAD_RECORDS = 20_000


class _Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP collector that takes spans and drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def otlp_sink() -> Iterator[tuple[str, _Sink]]:
    sink = _Sink()
    sink_server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, sink_server)  # type: ignore[no-untyped-call]
    port = sink_server.add_insecure_port("127.0.0.1:0")
    sink_server.start()
    try:
        yield f"http://127.0.0.1:{port}", sink
    finally:
        sink_server.stop(1)


def run(results: Results, scale: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        tmp = Path(scratch)
        ca = CertificateAuthority(tmp / "ca", "bench-ca")
        issued = ca.server()
        access = tmp / "access.json"
        digest = hashlib.sha256(TOKEN.encode()).hexdigest()
        access.write_text(
            json.dumps(
                {"callers": [{"name": "bench", "token_sha256": digest, "permissions": ["admin"]}]}
            )
        )
        endpoint, sink = stack.enter_context(otlp_sink())
        tls_args = ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]
        observe_args = ["--metrics-addr", "127.0.0.1:0"]
        traces = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true"}
        # The SDK's standard sampler settings: keep one trace in ten (a caller's
        # sampling decision, when it sends one, is followed).
        sampled = {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
        tls_client = {"tls": TlsConfig(ca=ca.pem, server_name="localhost")}
        setups: dict[str, tuple[list[str], dict[str, str], dict[str, Any]]] = {
            "plain": ([], {}, {}),
            "tls": (tls_args, {}, tls_client),
            "tokens": (["--auth-file", str(access)], {}, {"token": TOKEN}),
            "metrics": (observe_args, {}, {}),
            "traced": ([], traces, {}),
            "traced_10pct": ([], {**traces, **sampled}, {}),
            "all": (
                [*tls_args, "--auth-file", str(access), *observe_args],
                traces,
                {**tls_client, "token": TOKEN},
            ),
            "all_10pct": (
                [*tls_args, "--auth-file", str(access), *observe_args],
                {**traces, **sampled},
                {**tls_client, "token": TOKEN},
            ),
        }
        targets = {}
        for name, (args, env, options) in setups.items():
            target, _ = stack.enter_context(server(tmp / name, *args, env=env))
            targets[name] = target
            with AgentlogClient(target, **options) as client:
                events = [NewEvent(event=delta("load", n)) for n in range(500)]
                for _ in range(LOAD_RECORDS // 500):
                    client.append_batch("load", events)
            append_rate_c64(target, options, scale)  # warm
        appends: dict[str, list[float]] = {name: [] for name in setups}
        loads: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(rounds):
            for name, (_, _, options) in setups.items():
                appends[name].append(append_rate_c64(targets[name], options, scale * 4))
                loads[name].append(load_rate(targets[name], options))
        for name in setups:
            results[f"security_append_rps_c64_{name}"] = (statistics.median(appends[name]), "1/s")
            results[f"security_load_session_records_per_s_{name}"] = (
                statistics.median(loads[name]),
                "1/s",
            )
        time.sleep(6)  # the batch span processors export every 5 s
        results["security_spans_exported"] = (float(sink.spans), "")


CEILINGS = {
    **{
        f"security_append_rps_c64_{name}": "security_append_rps_c64_plain"
        for name in ("tls", "tokens", "metrics", "traced", "traced_10pct", "all", "all_10pct")
    },
    **{
        f"security_load_session_records_per_s_{name}": "security_load_session_records_per_s_plain"
        for name in ("tls", "tokens", "metrics", "traced", "traced_10pct", "all", "all_10pct")
    },
}
