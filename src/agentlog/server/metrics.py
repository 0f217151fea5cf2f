"""What the server counts for its operator, as Prometheus metrics.

The metrics live in prometheus_client's default registry; `agentlog serve
--metrics-addr HOST:PORT` serves them over HTTP at /metrics.
"""

from __future__ import annotations

from prometheus_client import Counter, start_http_server

FEED_UNDELIVERED = Counter(
    "agentlog_feed_undelivered_records",
    "Records the all-sessions feed skipped because their session's file is damaged, "
    "counted each time a reader skipped them, by the reason the session reports.",
    ["reason"],
)


def serve_metrics(address: str) -> int:
    """Serve /metrics on `address` ("host:port"; port 0 picks one); the port bound."""
    host, _, port = address.rpartition(":")
    server, _ = start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0")
    return int(server.server_port)
