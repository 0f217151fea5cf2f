"""When written bytes reach the disk: the sync policies, and how a sync is done.

- `always`: an append is acknowledged only once its bytes are on disk. Appends
  that arrive while a sync runs are synced together by the next one (group
  commit), so one sync covers many appends.
- `interval`: appends are acknowledged once written; a background thread syncs
  every `interval_ms`. A power loss or kernel crash can lose up to that long of
  acknowledged appends; a crash of the agentlog process loses nothing.
- `never`: the operating system decides (typically within 30 s); a power loss
  can lose any acknowledged append not yet flushed.

A sync is one syncfs(2) of the data directory's file system on Linux 5.8 and
later (it writes back every file written, in one journal commit, and reports
any write-back error since the last call), else fsync(2) of each file written
(in parallel: files synced together share the file system's journal commits).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import platform
import sys
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path

log = logging.getLogger("agentlog.server")


class SyncPolicy(StrEnum):
    """When appended bytes are synced to disk (see the module's doc)."""

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


_FSYNC_THREADS = 8


def fsync_path(path: Path) -> None:
    """Sync a file's or a directory's contents and metadata to disk."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_syncfs() -> ctypes._NamedFuncPointer | None:
    """libc's syncfs, where the kernel reports write-back errors through it; looked
    up on first use, not at import."""
    if sys.platform != "linux":
        return None
    try:
        release = tuple(int(part) for part in platform.release().split(".")[:2])
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (ValueError, AttributeError, OSError):
        return None
    # Before 5.8, syncfs(2) did not report write-back errors: a failed sync
    # would pass for a good one.
    return function if release >= (5, 8) else None


def syncfs_available() -> bool:
    """Whether syncs can be one syncfs(2) here (Linux 5.8 or later)."""
    return _libc_syncfs() is not None


def _syncfs(fd: int) -> None:
    """syncfs(2); the calling thread alone waits for it (ctypes lets others run)."""
    function = _libc_syncfs()
    if function is None:
        raise OSError(errno.ENOSYS, "syncfs(2) is not available here")
    if function(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class Syncer:
    """Makes what was written under a data directory durable, in one call."""

    def __init__(self, root: Path, *, use_syncfs: bool | None = None) -> None:
        self.root = root
        if use_syncfs is None:
            use_syncfs = syncfs_available()
        self.method = "syncfs" if use_syncfs else "fsync"
        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._device = os.fstat(self._root_fd).st_dev
        self._pool: ThreadPoolExecutor | None = None

    def on_this_device(self, fd: int) -> bool:
        """Whether a file (a session file may be a link elsewhere) is on the data
        directory's file system, where syncfs reaches it."""
        return os.fstat(fd).st_dev == self._device

    def sync(self, paths: Collection[Path], *, elsewhere: Collection[Path] = ()) -> None:
        """Make `paths` (files and directories written under the root; `elsewhere`:
        those on another file system) durable; OSError if the disk refused."""
        if self.method == "syncfs":
            _syncfs(self._root_fd)
            paths = elsewhere
        if len(paths) <= 1:
            for path in paths:
                _fsync_existing(path)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="agentlog-fsync")
        for _ in self._pool.map(_fsync_existing, paths):
            pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        os.close(self._root_fd)


def _fsync_existing(path: Path) -> None:
    # A file removed since (an operator's repair) has nothing left to sync.
    with contextlib.suppress(FileNotFoundError):
        fsync_path(path)
