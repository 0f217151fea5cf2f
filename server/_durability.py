"""When written bytes reach the disk: the sync policies and group commit.

- `always`: an append returns only after its bytes are on disk. Appends that
  wait at the same time share fsyncs (group commit): one of them, the leader,
  syncs every file written since the last round while the others wait for it.
- `interval`: appends return at once; a background thread syncs what was
  written every `interval_ms`. A power loss or kernel crash can lose up to that
  long of acknowledged appends; a crash of the agentlog process loses nothing.
- `never`: the operating system decides (typically within 30 s); a power loss
  can lose any acknowledged append not yet flushed.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path

log = logging.getLogger("agentlog.server")


class SyncPolicy(StrEnum):
    """When appended bytes are synced to disk (see the module's doc)."""

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


SYNC_THREADS = 8


def _sync(path: Path) -> OSError | None:
    try:
        fsync_path(path)
    except FileNotFoundError:
        pass  # removed since (an operator's repair): nothing left to sync
    except OSError as exc:
        return exc
    return None


def fsync_path(path: Path) -> None:
    """Sync a file's or a directory's contents and metadata to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syncer:
    """Makes written files durable according to a SyncPolicy."""

    def __init__(self, policy: SyncPolicy, interval_ms: int = 100) -> None:
        self.policy = SyncPolicy(policy)
        self._cond = threading.Condition()
        self._dirty: set[Path] = set()
        self._requested = 0  # tickets handed out
        self._synced = 0  # every ticket up to this one is durable
        self._failed: tuple[int, int, OSError] | None = None  # tickets (after, upto] failed
        self._leading = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._syncers: ThreadPoolExecutor | None = None
        if self.policy is SyncPolicy.INTERVAL:
            self._interval = interval_ms / 1000
            self._thread = threading.Thread(
                target=self._flush_periodically, name="agentlog-sync", daemon=True
            )
            self._thread.start()

    def sync(self, *paths: Path) -> None:
        """Return once `paths` are as durable as the policy promises; OSError if not."""
        if self.policy is SyncPolicy.NEVER:
            return
        with self._cond:
            self._dirty.update(paths)
            self._requested += 1
            ticket = self._requested
            if self.policy is SyncPolicy.INTERVAL:
                return
            while self._synced < ticket:
                failed = self._failed
                if failed is not None and failed[0] < ticket <= failed[1]:
                    raise failed[2]
                if self._leading:
                    self._cond.wait()
                    continue
                self._lead()
            failed = self._failed
            if failed is not None and failed[0] < ticket <= failed[1]:
                raise failed[2]

    def _lead(self) -> None:
        """Sync everything dirty for every waiter; called and returns holding the condition."""
        self._leading = True
        batch, upto, after = self._dirty, self._requested, self._synced
        self._dirty = set()
        self._cond.release()
        error: OSError | None = None
        try:
            # Files synced at the same time share the file system's journal
            # commits: many files sync in far less time together than in turn.
            syncs = self._pool().map(_sync, batch) if len(batch) > 1 else map(_sync, batch)
            error = next((e for e in syncs if e is not None), None)
        finally:
            self._cond.acquire()
            self._leading = False
            if error is not None:
                self._failed = (after, upto, error)
            self._synced = max(self._synced, upto)
            self._cond.notify_all()

    def _pool(self) -> ThreadPoolExecutor:
        if self._syncers is None:
            self._syncers = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="agentlog-fsync")
        return self._syncers

    def _flush_periodically(self) -> None:
        while not self._stopped.wait(self._interval):
            self.flush()

    def flush(self) -> None:
        """Sync everything written so far, whatever the policy (at shutdown)."""
        with self._cond:
            batch, self._dirty = self._dirty, set()
        for path in batch:
            try:
                fsync_path(path)
            except OSError as exc:
                log.error("could not sync %s: %s", path, exc)

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        if self._syncers is not None:
            self._syncers.shutdown()
