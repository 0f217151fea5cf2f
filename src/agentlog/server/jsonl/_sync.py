"""The JSONL store's sync thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from agentlog.errors import (
    AgentlogError,
    UnavailableError,
)
from agentlog.server import metrics
from agentlog.server._pauses import point
from agentlog.server.jsonl._acknowledge import Staging, finish
from agentlog.server.jsonl._commit import CommitPath

log = logging.getLogger("agentlog.server")


class SyncLoops(CommitPath):
    """The sync thread: under `always` it syncs what is released and has it
    acknowledged; under `interval` it syncs every so often. A failed sync halts
    appends (`_halt`)."""

    _sync_thread: threading.Thread | None

    def _sync_staged(self) -> None:
        """The sync thread under `always`: write the feed lines of what is released,
        sync it all, then acknowledge it (or have it acknowledged: `on_durable`)."""
        while True:
            with self._lock:
                while not self._closing and self._durable >= self._released:
                    self._cond.wait()
                if self._closing:
                    self._release()
                if self._durable >= self._released:
                    return
                after, upto = self._durable, self._released
                entries = [
                    w.entry
                    for staging in self._queue
                    if after < staging.ticket <= upto
                    for w in staging.written
                ]
                paths, self._dirty = self._dirty, set()
                elsewhere = paths & self._elsewhere
            failed: AgentlogError | None = None
            error: OSError | None = None
            point("commit.syncing")
            started = time.perf_counter()
            try:
                if entries:
                    self._feed.write(entries)
                    paths.add(self._feed.path)
                if paths:
                    self._syncer.sync(paths, elsewhere=elsewhere)
                metrics.SYNC_SECONDS.observe(time.perf_counter() - started)
                metrics.SYNC_GROUP.observe(upto - after)
            except AgentlogError as exc:  # the feed could not be written (a full disk)
                failed = exc
            except OSError as exc:
                error = exc
            handoff = None
            with self._lock:
                finished: list[Staging] = []
                if error is not None:
                    finished = self._halt(error)
                elif failed is not None:
                    finished = list(self._queue)
                    self._queue.clear()
                    self._fail(finished, failed)
                    self._durable = self._released = self._tickets
                else:
                    self._durable = upto
                    self._feed_durable_size = self._feed.size
                    handoff = self._on_durable
                    if handoff is None or self._closing:
                        handoff = None
                        finished = self._acknowledge_durable()
            finish(finished)
            if handoff is not None and not handoff():
                self.acknowledge_durable()  # nobody took it over

    def _sync_every(self, seconds: float) -> Callable[[], None]:
        def run() -> None:
            with self._lock:
                while not self._closing:
                    self._cond.wait(seconds)
                    paths, self._dirty = self._dirty, set()
                    if not paths or self._halted is not None:
                        continue
                    elsewhere = paths & self._elsewhere
                    self._lock.release()
                    try:
                        self._syncer.sync(paths, elsewhere=elsewhere)
                        error = None
                    except OSError as exc:
                        error = exc
                    finally:
                        self._lock.acquire()
                    if error is not None:
                        self._halt(error)

        return run

    def _halt(self, exc: Exception) -> list[Staging]:
        """Refuse appends from now on: a failed sync may have dropped written pages.

        Every unacknowledged append fails and its lines are cut back off (hold the
        lock). Returns the stagings failed.
        """
        log.critical(
            "%s: making appended lines durable failed (%s: %s); appends are refused until "
            "the server restarts and its start-up recovery has checked the files",
            self.root,
            type(exc).__name__,
            exc,
        )
        self._halted = UnavailableError(
            f"this server stopped taking appends: making them durable in {self.root} failed "
            f"({exc}); restart it (its start-up recovery checks every file), then retry",
            reason="STORAGE_HALTED",
        )
        failed = list(self._queue)
        self._queue.clear()
        self._fail(failed, self._halted)
        self._durable = self._released = self._tickets
        for stem in list(self._files):
            self._close_file(stem)
        return failed
