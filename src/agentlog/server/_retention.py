"""Retention: branches whose last record is older than `--retention` are deleted, in
the background, the way DeleteSession deletes them.

A sweep runs every `interval` seconds: it asks the backend for a bounded batch of
expired branches at a time (`Backend.expire`), pausing twice as long as each batch
took, so appends never wait behind a whole sweep and keep most of the machine; it
counts and logs what it did. On PostgreSQL
every replica may sweep: one at a time holds the sweep's advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

from agentlog.errors import AgentlogError
from agentlog.server import metrics
from agentlog.server.backend import Backend

log = logging.getLogger("agentlog.server")

# Branches deleted by one call of Backend.expire, at most; after each call the sweep
# pauses PACE times as long as the call took (at least PAUSE_SECONDS): it is
# background work, and takes at most a third of the time while appends go on.
SWEEP_BATCH = 64
PAUSE_SECONDS = 0.02
PACE = 2.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_duration(text: str) -> float:
    """Seconds in `30d`, `12h`, `90m`, `45s`, `2w` (a bare number: seconds). ValueError
    for anything else, or for zero."""
    found = _DURATION.fullmatch(text or "")
    if found is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit, s, m, h, d or w "
            "(such as 30d or 12h)"
        )
    seconds = float(found.group(1)) * _UNITS[found.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a retention must be longer than nothing")
    return seconds


class RetentionSweeper:
    """Runs retention sweeps over a backend on the event loop until stopped."""

    def __init__(self, backend: Backend, retention_seconds: float, interval_seconds: float) -> None:
        self._backend = backend
        self.retention_seconds = retention_seconds
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except AgentlogError as exc:  # the store is down, say: next time
                log.warning("retention sweep stopped early: %s", exc.message)
            except Exception:  # a bug must not end retention for good
                log.exception("retention sweep failed")
            await asyncio.sleep(self._interval)

    async def sweep(self) -> int:
        """Delete every branch expired now, a batch at a time; how many were."""
        started = time.monotonic()
        before_ns = time.time_ns() - int(self.retention_seconds * 1e9)
        deleted = 0
        while True:
            called = time.monotonic()
            count = await self._backend.expire(before_ns, SWEEP_BATCH)
            deleted += count
            metrics.RETENTION_DELETED.inc(count)
            if count < SWEEP_BATCH:
                break
            # Appends go first.
            await asyncio.sleep(max(PAUSE_SECONDS, (time.monotonic() - called) * PACE))
        took = time.monotonic() - started
        metrics.RETENTION_SWEEPS.inc()
        metrics.RETENTION_SWEEP_SECONDS.observe(took)
        log.info(
            "retention sweep: deleted %d branch(es) last appended to more than %s ago, in %.2f s",
            deleted,
            _spoken(self.retention_seconds),
            took,
        )
        return deleted


def _spoken(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
