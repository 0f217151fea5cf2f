"""What the server counts for its operator, as Prometheus metrics.

The metrics live in prometheus_client's default registry; `agentlog serve
--metrics-addr HOST:PORT` serves them over HTTP at /metrics.
"""

from __future__ import annotations

import contextlib
import functools
import io
import queue
import socket
import threading
import time
from http.server import HTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

if TYPE_CHECKING:
    from agentlog.server._live import LiveSubscriptions
    from agentlog.server.backend import Backend

FEED_UNDELIVERED = Counter(
    "agentlog_feed_undelivered_records_total",
    "Records the all-sessions feed skipped because their session's file is damaged, "
    "counted each time a reader skipped them, by the reason the session reports.",
    ["reason"],
)

# Per call, under the names of go-grpc-prometheus / grpc-ecosystem, which
# dashboards and alerts for gRPC services already use.
_CALL = ["grpc_type", "grpc_service", "grpc_method"]
GRPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _CALL)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, whatever their status.",
    [*_CALL, "grpc_code"],
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from an RPC's start to its end on the server (streams: their whole life).",
    _CALL,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
)
GRPC_SENT = Counter(
    "grpc_server_msg_sent_total", "Messages the server sent (stream messages each).", _CALL
)

# The store, whichever backend.
APPENDED_EVENTS = Counter("agentlog_appended_events_total", "Events stored by appends.")
APPENDED_BYTES = Counter(
    "agentlog_appended_bytes_total", "Bytes of the append requests that stored events."
)
SUBSCRIBERS = Gauge(
    "agentlog_subscribers", "Live subscriptions, by kind (session or feed).", ["kind"]
)
SUBSCRIBER_LAG = Gauge(
    "agentlog_subscriber_lag_records",
    "How far the furthest-behind live subscription of each kind is behind what is "
    "stored: records of its session (session) or feed positions (feed) not yet sent.",
    ["kind"],
)
FEED_HEAD = Gauge(
    "agentlog_feed_head_position",
    "The all-sessions feed's last position as this server knows it.",
)
CACHED_SESSIONS = Gauge(
    "agentlog_cached_sessions", "Sessions whose state the JSONL store holds in memory."
)
OPEN_FILES = Gauge(
    "agentlog_open_session_files", "Session files the JSONL store keeps open for appending."
)
INDEX_FLUSH_SECONDS = Histogram(
    "agentlog_index_flush_seconds",
    "Time one flush of the JSONL store's index (SQLite) took.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
)
# The JSONL store's syncs (group commit: each sync makes a group of appends durable).
SYNC_SECONDS = Histogram(
    "agentlog_sync_seconds",
    "Time one sync of the JSONL store took (feed lines written, files synced).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
)
SYNC_GROUP = Histogram(
    "agentlog_sync_group_appends",
    "Appends one sync of the JSONL store made durable together.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
# The PostgreSQL store's connection pool (psycopg_pool's own statistics).
RETENTION_SWEEPS = Counter(
    "agentlog_retention_sweeps_total", "Retention sweeps run (see --retention)."
)
RETENTION_DELETED = Counter(
    "agentlog_retention_deleted_branches_total", "Branches retention deleted as expired."
)
RETENTION_SWEEP_SECONDS = Histogram(
    "agentlog_retention_sweep_seconds",
    "How long a retention sweep took.",
    buckets=(0.01, 0.1, 1, 10, 60, 600),
)
POSTGRES_POOL = Gauge(
    "agentlog_postgres_pool_connections",
    "The PostgreSQL pool: connections open (size), idle (available), and calls "
    "waiting for one (waiting).",
    ["state"],
)


def watch_server(backend: Backend, live: LiveSubscriptions) -> None:
    """Have the gauges read this server's subscriptions and store at each scrape (the
    last server made in a process wins: one server a process is the rule)."""
    SUBSCRIBERS.labels("session").set_function(lambda: live.subscribers()[0])
    SUBSCRIBERS.labels("feed").set_function(lambda: live.subscribers()[1])
    SUBSCRIBER_LAG.labels("session").set_function(lambda: live.lag()[0])
    SUBSCRIBER_LAG.labels("feed").set_function(lambda: live.lag()[1])
    known = backend.figures()
    for gauge, name in (
        (FEED_HEAD, "feed_head"),
        (CACHED_SESSIONS, "cached_sessions"),
        (OPEN_FILES, "open_files"),
    ):
        if getattr(known, name) is not None:  # a store without such a thing leaves it out
            gauge.set_function(functools.partial(_figure, backend, name))


def _figure(backend: Backend, name: str) -> float:
    value = getattr(backend.figures(), name)
    return float(value) if value is not None else 0.0


# The metrics port serves scrapes with a few threads, and gives each connection a few
# seconds to send its request: idle or slow connections (thousands of them) wait in a
# short queue or are closed, and never cost the gRPC service threads or CPU.
METRICS_THREADS = 4
METRICS_QUEUE = 4
METRICS_TIMEOUT_SECONDS = 2.0


class _Scrape(MetricsHandler):
    timeout = METRICS_TIMEOUT_SECONDS  # for writing the answer

    def setup(self) -> None:
        super().setup()
        # The whole request head within the timeout, however slowly it is sent: a
        # connection that drips bytes cannot hold a thread longer.
        self.rfile = io.BytesIO(_request_head(self.connection, METRICS_TIMEOUT_SECONDS))


def _request_head(connection: socket.socket, seconds: float) -> bytes:
    """The request line and headers (a scrape has no body), read within `seconds`;
    TimeoutError if they take longer, ValueError if they are larger than 16 KiB."""
    deadline = time.monotonic() + seconds
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head took too long")
        connection.settimeout(left)
        data = connection.recv(4096)
        if not data:
            break
        head += data
        if len(head) > 16384:
            raise ValueError("the request head is too large")
    connection.settimeout(seconds)
    return head


class MetricsServer(HTTPServer):
    """/metrics over HTTP: connections are handled by METRICS_THREADS daemon threads from
    a queue of METRICS_QUEUE; a connection that finds the queue full is closed."""

    request_queue_size = 256  # connections the kernel holds while one is accepted

    def __init__(self, address: tuple[str, int]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Scrape)
        self.port = int(self.server_port)
        self._queue: queue.Queue[tuple[Any, Any] | None] = queue.Queue(METRICS_QUEUE)
        self._threads = [
            threading.Thread(target=self._work, name="agentlog-metrics", daemon=True)
            for _ in range(METRICS_THREADS)
        ]
        self._threads.append(
            threading.Thread(target=self.serve_forever, name="agentlog-metrics", daemon=True)
        )
        for thread in self._threads:
            thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self._queue.put_nowait((request, client_address))
        except queue.Full:
            self.shutdown_request(request)  # too many at once: this one is dropped

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that misbehaves (timed out, went away) is closed quietly."""

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        for _ in range(METRICS_THREADS):
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)


def serve_metrics(address: str) -> MetricsServer:
    """Serve /metrics on `address` ("host:port"; port 0 picks one), on threads of its own."""
    host, _, port = address.rpartition(":")
    return MetricsServer((host.strip("[]") or "0.0.0.0", int(port)))
