"""What the server counts for its operator, as Prometheus metrics.

The metrics live in prometheus_client's default registry; `agentlog serve
--metrics-addr HOST:PORT` serves them over HTTP at /metrics.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from agentlog.server._live import LiveSubscriptions
    from agentlog.server.backend import Backend

FEED_UNDELIVERED = Counter(
    "agentlog_feed_undelivered_records",
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


def serve_metrics(address: str) -> int:
    """Serve /metrics on `address` ("host:port"; port 0 picks one); the port bound."""
    host, _, port = address.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    return int(server.server_port)
