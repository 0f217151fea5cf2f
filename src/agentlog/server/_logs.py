"""The server's logs: text for a person, or one JSON object per line for a collector."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, the
    access log's fields when present, and the exception's text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="microseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


# gRPC core's own lines (abseil's format): "I1207 19:00:00.123456  4242 file.cc:12] text".
_NATIVE_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([^\]]+)\] ?(.*)$")
_NATIVE_LEVELS = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}


def route_native_stderr() -> None:
    """Have what native code writes to file descriptor 2 (gRPC core's own lines, which
    bypass Python's logging) logged as records of the `grpc.core` logger, so that a
    JSON log stream stays one JSON object a line. File descriptor 2 becomes a pipe a
    thread reads; Python's own stderr (`sys.stderr`, the log handler) keeps the real one."""
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    native = logging.getLogger("grpc.core")

    def relay() -> None:
        with open(read_end, "rb") as lines:
            for raw in lines:
                text = raw.decode(errors="replace").rstrip("\n")
                if not text.strip():
                    continue
                found = _NATIVE_LINE.match(text)
                if found is None:
                    native.warning("%s", text)
                else:
                    level = _NATIVE_LEVELS[found.group(1)]
                    native.log(level, "%s (%s)", found.group(3), found.group(2).strip())

    threading.Thread(target=relay, name="agentlog-native-stderr", daemon=True).start()


def configure(log_format: str) -> None:
    """Send the server's logs to stderr as `text` or `json` (and, as `json`, gRPC
    core's own lines too, see `route_native_stderr`)."""
    if log_format == "json":
        route_native_stderr()  # first: the handler then writes to the real stderr
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
