"""What an operator sees: gRPC metrics scraped over HTTP during real traffic, and
logs as JSON lines with an access log."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from agentlog import (
    AgentlogClient,
    AppendEvent,
    CaughtUp,
    InvalidArgumentError,
    NewEvent,
    UnauthenticatedError,
)
from agentlog.server import MemorySessionRepository
from tests.contract import delta
from tests.servers import running_server
from tests.test_command import stop
from tests.test_server import agentlog, wait_for_port

SERVICE = "agentlog.v1.SessionRepository"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, str, subprocess.Popen[str]]]:
    """`agentlog serve` with metrics, JSON logs and the access log; (target, metrics URL)."""
    process = agentlog(
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path),
        "--metrics-addr",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--access-log",
    )
    try:
        port, _ = wait_for_port(process)
        assert process.stderr is not None
        found = re.search(r"metrics at (http://\S+?)\"", process.stderr.readline())
        assert found
        yield f"127.0.0.1:{port}", found.group(1), process
    finally:
        if process.poll() is None:
            stop(process)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def test_grpc_metrics_move_with_the_calls(served: tuple[str, str, subprocess.Popen[str]]) -> None:
    target, url, _ = served
    with AgentlogClient(target, retries=0) as client:
        client.append(AppendEvent(session_id="m", event=delta("m", "warm")))
        # A call is counted handled when grpc says it is done, which may be just after
        # its client has the answer: take `before` once the warm-up call is counted.
        handled = {"grpc_service": SERVICE, "grpc_method": "Append", "grpc_code": "OK"}
        deadline = time.monotonic() + 10
        while value(before := scrape(url), "grpc_server_handled_total", **handled) < 1:
            assert time.monotonic() < deadline, "the warm-up append was never counted"
            time.sleep(0.02)
        for n in range(5):
            client.append(AppendEvent(session_id="m", event=delta("m", f"{n}")))
        with pytest.raises(InvalidArgumentError):
            client.append_batch("m", [])
        client.append_batch("m", [NewEvent(event=delta("m", "b")) for _ in range(600)])
        loaded = client.load_session("m")  # 606 records: 3 stream messages of at most 256
        after = scrape(url)
    assert len(loaded) == 606

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    append = {"grpc_service": SERVICE, "grpc_method": "Append", "grpc_type": "unary"}
    assert moved("grpc_server_started_total", **append) == 5
    assert moved("grpc_server_handled_total", grpc_code="OK", **append) == 5
    assert moved("grpc_server_handling_seconds_count", **append) == 5
    assert moved("grpc_server_handling_seconds_sum", **append) > 0
    batch = {"grpc_service": SERVICE, "grpc_method": "AppendBatch"}
    assert moved("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **batch) == 1
    assert moved("grpc_server_handled_total", grpc_code="OK", **batch) == 1
    load = {"grpc_service": SERVICE, "grpc_method": "LoadSession", "grpc_type": "server_stream"}
    assert moved("grpc_server_handled_total", grpc_code="OK", **load) == 1
    assert moved("grpc_server_msg_sent_total", **load) == 3
    # The store: events and bytes appended, syncs and the appends each made durable.
    assert moved("agentlog_appended_events_total") == 5 + 600
    assert moved("agentlog_appended_bytes_total") > 600 * 50
    assert moved("agentlog_sync_seconds_count") >= 1
    assert moved("agentlog_sync_group_appends_sum") == 6
    assert value(after, "agentlog_subscribers", kind="session") == 0


def test_the_subscriber_gauges_follow_live_subscriptions(
    served: tuple[str, str, subprocess.Popen[str]],
) -> None:
    target, url, _ = served
    with AgentlogClient(target) as client:
        feed = iter(client.subscribe_all())
        sessions = [iter(client.subscribe_session(f"g{n}")) for n in range(3)]
        for stream in [feed, *sessions]:
            next(stream)  # CaughtUp: the subscription is live
        during = scrape(url)
        for stream in [feed, *sessions]:
            stream.close()
    assert value(during, "agentlog_subscribers", kind="session") == 3
    assert value(during, "agentlog_subscribers", kind="feed") == 1


def test_json_logs_carry_an_access_log(served: tuple[str, str, subprocess.Popen[str]]) -> None:
    target, _, process = served
    with AgentlogClient(target, retries=0) as client:
        client.append(AppendEvent(session_id="logged", event=delta("logged", "x")))
        with pytest.raises(InvalidArgumentError):
            client.head("")
    log = stop(process)
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    access = [e for e in entries if e["logger"] == "agentlog.access"]
    by_method = {e["method"]: e for e in access}
    appended = by_method[f"/{SERVICE}/Append"]
    assert appended["code"] == "OK"
    assert appended["duration_ms"] > 0
    assert appended["peer"].startswith("ipv4:127.0.0.1:")
    assert by_method[f"/{SERVICE}/Head"]["code"] == "INVALID_ARGUMENT"
    assert any("stopped after" in e["message"] for e in entries)  # the server's own lines too


def test_the_store_gauges_show_the_feed_head_cache_and_files(
    served: tuple[str, str, subprocess.Popen[str]],
) -> None:
    target, url, _ = served
    with AgentlogClient(target, retries=0) as client:
        before = scrape(url)
        for n in range(4):
            client.append_batch(f"s{n}", [NewEvent(event=delta(f"s{n}", "x")) for _ in range(3)])
        after = scrape(url)
        deadline = time.monotonic() + 10
        while value(scrape(url), "agentlog_index_flush_seconds_count") == 0:
            assert time.monotonic() < deadline, "the index was never flushed"
            time.sleep(0.05)
    assert value(before, "agentlog_feed_head_position") == 0
    assert value(after, "agentlog_feed_head_position") == 12
    assert value(after, "agentlog_cached_sessions") == 4
    assert value(after, "agentlog_open_session_files") == 4


def test_the_lag_gauges_show_a_subscriber_that_stopped_reading(
    served: tuple[str, str, subprocess.Popen[str]],
) -> None:
    target, url, _ = served
    text = "z" * 4000
    with AgentlogClient(target) as client:
        feed = iter(client.subscribe_all())
        follower = iter(client.subscribe_session("lagging"))
        assert isinstance(next(feed), CaughtUp)
        assert isinstance(next(follower), CaughtUp)
        for _ in range(40):  # 8 MB: more than the transport buffers for a stream
            client.append_batch("lagging", [NewEvent(event=delta("lagging", text))] * 50)
        deadline = time.monotonic() + 10
        while True:  # the subscriptions fill their windows, then stop
            behind = scrape(url)
            if (
                value(behind, "agentlog_subscriber_lag_records", kind="feed") > 0
                and value(behind, "agentlog_subscriber_lag_records", kind="session") > 0
            ):
                break
            assert time.monotonic() < deadline, "no lag while nobody reads"
            time.sleep(0.05)
        for stream in (feed, follower):
            received = 0
            while received < 2000:
                item = next(stream)
                received += 0 if isinstance(item, CaughtUp) else 1
        caught_up = scrape(url)
        feed.close()
        follower.close()
    assert value(behind, "agentlog_subscriber_lag_records", kind="feed") <= 2000
    assert value(caught_up, "agentlog_subscriber_lag_records", kind="feed") == 0
    assert value(caught_up, "agentlog_subscriber_lag_records", kind="session") == 0


def test_the_access_log_names_the_caller(tmp_path: Path) -> None:
    token = "an-agent-token"
    access = tmp_path / "access.json"
    access.write_text(
        json.dumps(
            {
                "callers": [
                    {
                        "name": "agent-7",
                        "token_sha256": hashlib.sha256(token.encode()).hexdigest(),
                        "permissions": ["read", "append"],
                        "sessions": [""],
                    }
                ]
            }
        )
    )
    process = agentlog(
        "serve",
        "--addr",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
        "--auth-file",
        str(access),
        "--log-format",
        "json",
        "--access-log",
    )
    try:
        port, _ = wait_for_port(process)
        with AgentlogClient(f"127.0.0.1:{port}", token=token, retries=0) as client:
            client.append(AppendEvent(session_id="who", event=delta("who", "x")))
        with (
            AgentlogClient(f"127.0.0.1:{port}", retries=0) as stranger,
            pytest.raises(UnauthenticatedError),
        ):
            stranger.head("who")
    finally:
        log = stop(process)
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    by_method = {e["method"]: e for e in entries if e["logger"] == "agentlog.access"}
    assert by_method[f"/{SERVICE}/Append"]["caller"] == "agent-7"
    assert by_method[f"/{SERVICE}/Head"]["caller"] is None
    assert by_method[f"/{SERVICE}/Head"]["code"] == "UNAUTHENTICATED"


def test_idle_and_slow_connections_to_the_metrics_port_cost_the_service_nothing() -> None:
    import socket as sockets

    from agentlog.server.metrics import METRICS_TIMEOUT_SECONDS, serve_metrics

    metrics_server = serve_metrics("127.0.0.1:0")
    threads_before = threading.active_count()
    idle = []
    try:
        with running_server(MemorySessionRepository()) as target:
            for _ in range(500):  # each sends half a request, then nothing
                connection = sockets.create_connection(("127.0.0.1", metrics_server.port))
                connection.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                idle.append(connection)
            with grpc.insecure_channel(target) as channel:
                started = time.monotonic()
                answer = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1.0
            assert threading.active_count() <= threads_before + 8
            time.sleep(METRICS_TIMEOUT_SECONDS + 1)  # the slow ones are let go
            for connection in idle:
                connection.close()
            deadline = time.monotonic() + 15
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{metrics_server.port}/metrics", timeout=5
                    ) as scraped:
                        assert b"grpc_server_started_total" in scraped.read()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the metrics port did not recover"
                    time.sleep(0.5)
    finally:
        for connection in idle:
            connection.close()
        metrics_server.close()
