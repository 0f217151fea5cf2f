"""The JSONL SessionRepository: arcan's on-disk format, one file per session.

`<root>/<stem>.jsonl` holds one arcan EventRecord per line. A directory
written by arcan is served as it is, and every line appended here is a line
arcan reads; agentlog adds the field `sequence`, which arcan's readers ignore.
A record's sequence is its position among the file's non-blank lines, so
lines arcan appends without the field fit in.

An append is staged, then acknowledged. Staging (under the store's lock, in
arrival order) decides it against the session (retry, id conflicts,
expectation) and writes its lines with one O_APPEND write to a descriptor kept
open, and a feed line. Acknowledging makes it visible to reads and
subscriptions and answers the caller: at once under the `interval` and
`never` policies; under `always`, once a sync thread has made everything staged
so far durable with one sync, so appends that arrive while a sync runs share
the next one (group commit). Reads only ever see acknowledged records. If a
sync fails, every unacknowledged line is cut back off and the store takes no
more appends until it is reopened: the kernel may have dropped written pages,
and only start-up recovery can say which.

Each session used recently has a state in memory: its record count, where its
records end, and the byte offset of every MARK_EVERY-th record (`marks`), so a
read from any sequence seeks. States are built from the index (`_index.py`),
which vouches for a file it has indexed to its end, or else by scanning the
file, and rebuilt whenever the file changed behind the store's back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from agentlog.errors import (
    AgentlogError,
    FailedPreconditionError,
    InvalidArgumentError,
)
from agentlog.server._labels import LabelIndex
from agentlog.server._listing import PageTokens
from agentlog.server.jsonl._acknowledge import Staging, Written, finish
from agentlog.server.jsonl._lifecycle import Lifecycle
from agentlog.server.jsonl._reader import decoders
from agentlog.server.jsonl._state import (
    CLEAN_FILE,
    MAX_CACHED_SESSIONS,
    SUFFIX,
    SessionState,
    file_identity,
)
from agentlog.server.jsonl.durability import Syncer, SyncPolicy, fsync_path
from agentlog.server.jsonl.feed import FEED_FILE, Feed
from agentlog.server.jsonl.files import (
    lock_directory,
    open_files_budget,
    page_token_key,
)
from agentlog.server.jsonl.index import StoreIndex
from agentlog.server.jsonl.layout import Layout, choose_layout
from agentlog.server.jsonl.sessions_db import SessionsDb

if TYPE_CHECKING:
    from agentlog.server.backend import Backend

log = logging.getLogger("agentlog.server")


class JsonlSessionRepository(Lifecycle):
    """Sessions as arcan JSONL files under one directory.

    `sync` says when appends reach the disk (`agentlog.server.SyncPolicy`):
    "always" (the default; an append returns once durable, concurrent appends
    sharing syncs), "interval" (synced every `sync_interval_ms`), or "never".
    True and False mean "always" and "never". `use_syncfs` picks how a sync is
    done (None: syncfs(2) where the kernel reports its errors; see `Syncer`).
    `clock` gives records their timestamps (nanoseconds since the epoch); a
    branch's never go backwards, whatever it says. `layout` is the layout of a new
    directory ("seed" or "branches", see `layout`; None: seed); an existing one's
    is read from its files, and one that differs from `layout` is refused.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sync: SyncPolicy | str | bool = SyncPolicy.ALWAYS,
        sync_interval_ms: int = 100,
        use_syncfs: bool | None = None,
        clock: Callable[[], int] = time.time_ns,
        read_only: bool = False,
        layout: Layout | str | None = None,
    ) -> None:
        super().__init__()
        try:
            asked = Layout(layout) if layout is not None else None
        except ValueError:
            raise InvalidArgumentError(
                f"layout must be one of {', '.join(Layout)}, not {layout!r}", field="layout"
            ) from None
        self.clock = clock
        self.read_only = read_only
        self.root = Path(root).resolve()
        self._root_text = os.path.join(self.root, "")
        _check_root(self.root, read_only)
        if isinstance(sync, bool):
            sync = SyncPolicy.ALWAYS if sync else SyncPolicy.NEVER
        try:
            self.sync_policy = SyncPolicy(sync)
        except ValueError:
            raise InvalidArgumentError(
                f"sync must be one of {', '.join(SyncPolicy)}, not {sync!r}", field="sync"
            ) from None
        # Whatever opening takes is given back if a later step fails: a store
        # that did not open holds nothing (no lock, descriptor or thread).
        with contextlib.ExitStack() as undo:
            self._directory_lock = lock_directory(self.root, shared=read_only)
            if self._directory_lock >= 0:
                undo.callback(os.close, self._directory_lock)
            self.page_tokens = PageTokens(page_token_key(self.root, keep=not read_only))
            self._lock = threading.Lock()  # the store's: states, writing, acknowledging
            self._cond = threading.Condition(self._lock)
            self._halted: AgentlogError | None = None
            self._closing = False
            self._catalog: list[str] | None = None
            self._catalog_mtime = -1
            self._syncer = Syncer(self.root, use_syncfs=use_syncfs)
            undo.callback(self._syncer.close)
            self.recovered_sessions: list[Path] = []  # session files cut at this open
            # A read-only store writes nothing in its directory: torn tails are left as
            # they are (reads stop before them), the index lives in a directory of its
            # own for the store's lifetime, and the feed is only read.
            self.recovered = [] if read_only else self._recover_tails()
            if not read_only:
                self._remove_partial_forks()
            self._feed = Feed(self.root / FEED_FILE, read_only=read_only)
            undo.callback(self._feed.close)
            if not read_only:
                self._finish_deletes()
            self._sessions_db = SessionsDb(self.root, read_only=read_only)
            undo.callback(self._sessions_db.close)
            self._labels = LabelIndex()
            self._labels_lock = threading.Lock()
            self._draining = False
            self._summaries = OrderedDict()
            self._heads = OrderedDict()
            self._index_dir: tempfile.TemporaryDirectory[str] | None = None
            if read_only:
                self._index_dir = tempfile.TemporaryDirectory(prefix="agentlog-index-")
                undo.callback(self._index_dir.cleanup)
            index_root = Path(self._index_dir.name) if self._index_dir else self.root
            self._index = StoreIndex(index_root, files=self._stem_files)
            undo.callback(self._index.close)
            present = self._stems_in_order()
            # Files the index knows that are gone stay known (a file cut to nothing: its
            # session is refused, not started over; see StoreIndex._look).
            for path in self.recovered_sessions:
                self._index.forget(path.name[: -len(SUFFIX)])  # cut here: index it anew
            # About 200 bytes a line: a first guess at how many ids the files hold.
            self._index.open_filter(sum(file_identity(self._path(s))[1] for s in present) // 200)
            try:
                self._index.catch_up_all((s, self._path(s)) for s in present)
            except sqlite3.OperationalError as exc:
                log.warning(
                    "%s: the index could not be brought up to date (%s); reads are served, "
                    "appends wait until it can be written",
                    self.root,
                    exc,
                )
            self._index.filter_indexed()
            on_disk = set(present)
            self.layout = choose_layout(
                self.root,
                ((s, first) for s, first in self._index.first_lines().items() if s in on_disk),
                asked,
                keep=not read_only,
            )
            self._branches = self.layout is Layout.BRANCHES
            self._records, self._fields = decoders(self._branches)
            self._places = None
            self._load_labels()
            if not read_only:
                self._check_feed()
            self._builders: dict[str, threading.Lock] = {}
            self._reported_gaps: set[tuple[str, str]] = set()  # (session, reason) logged
            # The states of the sessions used most recently (see MAX_CACHED_SESSIONS).
            self._states: OrderedDict[str, SessionState] = OrderedDict()
            self.max_cached_sessions = MAX_CACHED_SESSIONS
            self._files: OrderedDict[str, tuple[int, int]] = OrderedDict()  # session: (fd, inode)
            self.max_open_files = open_files_budget()  # session files kept open for appending
            self._elsewhere: set[Path] = set()  # session files on another file system
            # Ids of staged appends, to find a retry of one still in flight (an entry
            # whose append is no longer live is stale; cleared when nothing is staged).
            self._unacked_ids: dict[str, Written] = {}
            # Staged and not yet acknowledged, in order. Under `always`, those up to
            # ticket `_released` may be synced, those up to `_durable` are.
            self._queue: deque[Staging] = deque()
            self._on_durable: Callable[[], bool] | None = None
            self._dirty: set[Path] = set()  # written since the last sync
            self._tickets = 0
            self._released = self._durable = 0
            self._feed_durable_size = self._feed.size
            self._sync_thread: threading.Thread | None = None
            if self.sync_policy is not SyncPolicy.NEVER and not read_only:
                target = (
                    self._sync_staged
                    if self.sync_policy is SyncPolicy.ALWAYS
                    else self._sync_every(sync_interval_ms / 1000)
                )
                self._sync_thread = threading.Thread(
                    target=target, name="agentlog-sync", daemon=True
                )
                self._sync_thread.start()
            undo.pop_all()  # open: close() gives it all back from now on

    def _check_feed(self) -> None:
        """After a crash (no mark of a clean close), cut the feed where it names records
        the files lack (lost before they reached the disk)."""
        clean = self.root / CLEAN_FILE
        if clean.exists():
            # Closed cleanly: everything was synced, the feed matches the files.
            clean.unlink()
            fsync_path(self.root)
            return
        try:
            if self._feed.cut_beyond(self._record_counts()) is not None:
                fsync_path(self._feed.path)
        except (AgentlogError, OSError) as exc:  # a full disk
            log.warning("%s: could not check the feed against the files: %s", self.root, exc)

    def backend(self, executor: ThreadPoolExecutor) -> Backend:
        from agentlog.server.jsonl.backend import JsonlBackend

        return JsonlBackend(self, executor)

    def close(self) -> None:
        """Finish what is staged, sync, and release the data directory. Idempotent."""
        if self.read_only:
            self._close_read_only()
            return
        fd, self._directory_lock = self._directory_lock, -1
        if fd < 0:
            return
        with self._lock:
            self._closing = True
            self._cond.notify_all()
            # Under interval and never, appends held and not yet released.
            finished = (
                [] if self.sync_policy is SyncPolicy.ALWAYS else self._write_and_acknowledge()
            )
        finish(finished)
        if self._sync_thread is not None:
            self._sync_thread.join()
        with self._lock:
            # Made durable, but handed to an event loop that stopped before it
            # acknowledged them: acknowledge them here, so no caller waits on.
            self._on_durable = None
            finished = self._acknowledge_durable()
        finish(finished)
        clean = self._halted is None
        try:
            paths, self._dirty = self._dirty, set()
            self._syncer.sync(paths | {self.root}, elsewhere=paths & self._elsewhere)
        except OSError as exc:
            log.error("%s: the last sync failed: %s", self.root, exc)
            clean = False
        for stem in list(self._files):
            self._close_file(stem)
        self._feed.close()
        self._index.close()
        self._sessions_db.close()
        self._syncer.close()
        if clean:
            self._mark_clean()
        os.close(fd)  # closing the descriptor releases the flock

    def _close_read_only(self) -> None:
        fd, self._directory_lock = self._directory_lock, -1
        if fd == -1:
            return
        with self._lock:
            self._closing = True
        self._feed.close()
        self._index.close()
        self._sessions_db.close()
        self._syncer.close()
        if self._index_dir is not None:
            self._index_dir.cleanup()
        if fd >= 0:  # -2: there was no lock file to take
            os.close(fd)

    def _mark_clean(self) -> None:
        """Everything is synced: the next open may skip checking the feed."""
        clean = self.root / CLEAN_FILE
        try:
            clean.write_bytes(b"")
            fsync_path(clean)
            fsync_path(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                clean.unlink(missing_ok=True)  # the next open checks instead
            log.warning("%s: could not record a clean stop: %s", self.root, exc)


def _check_root(root: Path, read_only: bool) -> None:
    """Refuse a data directory this process cannot use (create it, unless read-only)."""
    if read_only:
        if not root.is_dir():
            raise FailedPreconditionError(
                f"{root} is not a directory (a read-only store is only read, never made)",
                reason="DATA_DIR_UNUSABLE",
            )
        if not os.access(root, os.R_OK | os.X_OK):
            raise FailedPreconditionError(
                f"the data directory {root} is not readable by this process",
                reason="DATA_DIR_UNUSABLE",
            )
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FailedPreconditionError(
            f"cannot use {root} as the data directory: {exc.strerror}",
            reason="DATA_DIR_UNUSABLE",
        ) from None
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        raise FailedPreconditionError(
            f"the data directory {root} is not readable and writable by this process",
            reason="DATA_DIR_UNUSABLE",
        )
