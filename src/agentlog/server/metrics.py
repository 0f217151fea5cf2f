"""What the server counts for its operator, as Prometheus metrics.

The metrics live in prometheus_client's default registry; `agentlog serve
--metrics-addr HOST:PORT` serves them over HTTP at /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


def serve_metrics(address: str) -> int:
    """Serve /metrics on `address` ("host:port"; port 0 picks one); the port bound."""
    host, _, port = address.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    return int(server.server_port)
