"""The JSONL store's session states, catalog and open descriptors."""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path

import orjson

from agentlog._validation import (
    check_stored_session_id,
)
from agentlog.errors import (
    AgentlogError,
)
from agentlog.server._pauses import point
from agentlog.server.blocking import BlockingStore
from agentlog.server.jsonl._state import (
    MISSING,
    SUFFIX,
    SessionState,
    concurrent_writer,
    file_identity,
    shrunk_error,
    unindexable_line,
)
from agentlog.server.jsonl.durability import Syncer
from agentlog.server.jsonl.feed import Feed
from agentlog.server.jsonl.files import (
    describe,
    scan_file,
    storage_error,
)
from agentlog.server.jsonl.index import MARK_EVERY, StoreIndex

log = logging.getLogger("agentlog.server")


class SessionStates(BlockingStore):
    """The JSONL store's bottom layer: the states of sessions used lately, rebuilt
    from the index or a scan whenever a file changed behind the store's back, the
    catalog of session files, and the descriptors kept open for appending.

    The layers above (recovery, reading, the commit path, the sync loops) add
    methods over the same fields, which `JsonlSessionRepository.__init__` sets.
    """

    root: Path
    read_only: bool
    _lock: threading.Lock  # the store's: states, writing, acknowledging
    _cond: threading.Condition
    _halted: AgentlogError | None
    _closing: bool
    _catalog: list[str] | None
    _catalog_mtime: int
    _feed: Feed
    _index: StoreIndex
    _builders: dict[str, threading.Lock]
    _states: OrderedDict[str, SessionState]
    max_cached_sessions: int
    _files: OrderedDict[str, tuple[int, int]]  # session: (fd, inode)
    _syncer: Syncer
    max_open_files: int  # session files kept open for appending
    _elsewhere: set[Path]  # session files on another file system

    def _state(self, session_id: str) -> SessionState:
        """The session's state, rebuilt if its file changed since last seen."""
        path = self._path(session_id)
        while True:
            with self._lock:
                state = self._states.get(session_id)
                if state is not None and (state.unacked or state.identity == file_identity(path)):
                    self._states.move_to_end(session_id)
                    return state
            with self._builder(session_id):
                with self._lock:  # built by another thread meanwhile?
                    state = self._states.get(session_id)
                    if state is not None and (
                        state.unacked or state.identity == file_identity(path)
                    ):
                        return state
                built = self._build(session_id, path)
                point("states.built")
                with self._lock:
                    current = self._states.get(session_id)
                    if current is not None and current.unacked:
                        return current  # a new session, being written: that state is the truth
                    if built.identity != file_identity(path):
                        continue  # changed while we read it: again
                    self._close_file(session_id)  # it may be for a file since replaced
                    self._install(session_id, built)
                self._feed_catch_up(session_id, built)
                return built

    def _build(self, session_id: str, path: Path) -> SessionState:
        """A session's state from the index, which vouches for a file it indexed to its
        end, reading only the first and last lines; else from a scan of the file. In a
        read-only store, a torn tail (which start-up recovery would cut) is no damage:
        reads stop before it."""
        state = self._build_state(session_id, path)
        damage = state.damage
        if self.read_only and damage is not None and damage.reason == "TORN_LAST_LINE":
            state.damage, state.sealed = None, damage
        return state

    def _build_state(self, session_id: str, path: Path) -> SessionState:
        identity = file_identity(path)
        try:
            indexed = self._index.catch_up(session_id, path)
        except sqlite3.OperationalError as exc:  # a full disk: read the file itself
            log.warning("%s: not indexed (%s); reading it whole", path, exc)
            return SessionState.of(path, identity, scan_file(path, MARK_EVERY))
        if indexed is None:
            return SessionState(path)
        shrunk = self._index.shrunk(session_id)
        if shrunk is not None:  # cut short, or removed (a file cut to nothing)
            state = SessionState.of(path, identity, scan_file(path, MARK_EVERY))
            state.damage = shrunk_error(path, *shrunk, missing=identity == MISSING)
            return state
        if identity == MISSING:
            return SessionState(path)
        if indexed.inode == identity[0] and indexed.size < identity[1]:
            # The index stopped before the end: at a line that is no record (or a
            # torn last line, which the scan reports).
            state = SessionState.of(path, identity, scan_file(path, MARK_EVERY))
            if state.damage is None:
                state.sealed = unindexable_line(path, indexed.size, indexed.records + 1)
            return state
        if (indexed.inode, indexed.size) == identity:
            marks = self._index.marks(session_id)
            if len(marks) == (indexed.records + MARK_EVERY - 1) // MARK_EVERY:
                with contextlib.suppress(
                    OSError, ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError
                ):
                    scan = describe(path, indexed.records, indexed.size, indexed.last_offset, marks)
                    return SessionState.of(path, identity, scan)
        return SessionState.of(path, identity, scan_file(path, MARK_EVERY))

    def _feed_catch_up(self, session_id: str, state: SessionState) -> None:
        """Give feed positions to records of a session the feed lacks (the commit
        path does; see `CommitPath._feed_catch_up`)."""

    def _install(self, session_id: str, state: SessionState) -> None:
        """Keep a state (hold the lock), dropping the least recently used beyond the limit."""
        self._states[session_id] = state
        self._states.move_to_end(session_id)
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used states beyond the limit, except those being
        written (hold the lock). A thread using an evicted state still holds it."""
        states = self._states
        while len(states) > self.max_cached_sessions:
            evictable = (s for s, state in states.items() if not state.unacked)
            evicted = next(evictable, None)
            if evicted is None:
                return
            del states[evicted]

    def _builder(self, session_id: str) -> threading.Lock:
        with self._lock:
            return self._builders.setdefault(session_id, threading.Lock())

    def _sessions_in_order(self) -> list[str]:
        mtime = os.stat(self.root).st_mtime_ns
        if self._catalog is None or mtime != self._catalog_mtime:
            ids = []
            with os.scandir(self.root) as entries:
                for entry in entries:
                    name = entry.name
                    if not name.endswith(SUFFIX) or not entry.is_file():
                        continue
                    try:
                        ids.append(check_stored_session_id(name[: -len(SUFFIX)]))
                    except AgentlogError as exc:  # no id a client can send names it
                        log.warning("%s: skipped: %s", self.root / name, exc)
                        continue
            self._catalog = sorted(ids, key=str.encode)
            self._catalog_mtime = mtime
        return self._catalog

    def _add_to_catalog(self, session_id: str) -> None:
        if self._catalog is not None:
            index = bisect.bisect_left(self._catalog, session_id.encode(), key=str.encode)
            if index == len(self._catalog) or self._catalog[index] != session_id:
                self._catalog = [*self._catalog[:index], session_id, *self._catalog[index:]]
            self._catalog_mtime = os.stat(self.root).st_mtime_ns

    def _session_files(self) -> list[tuple[str, Path]]:
        return [(s, self._path(s)) for s in self._sessions_in_order()]

    def _path(self, session_id: str) -> Path:
        # check_stored_session_id has refused '/' and NUL, and the suffix keeps
        # '.' and '..' from naming directories: always a direct child of root.
        return self.root / f"{session_id}{SUFFIX}"

    def _close_file(self, session_id: str) -> None:
        cached = self._files.pop(session_id, None)
        if cached is not None:
            os.close(cached[0])

    def _file(self, session_id: str, state: SessionState) -> int:
        """The session file's descriptor for appending, opened if need be (hold the lock)."""
        cached = self._files.get(session_id)
        if cached is not None:
            if cached[1] == state.identity[0]:
                self._files.move_to_end(session_id)
                return cached[0]
            self._close_file(session_id)
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            stat = os.fstat(fd)
        except OSError as exc:
            raise storage_error(exc, state.path) from None
        inode = stat.st_ino
        if (inode, stat.st_size) != (state.identity[0] or inode, state.written_end):
            os.close(fd)  # replaced, or created or grown by someone else, since our check
            raise concurrent_writer(state.path)
        if not self._syncer.on_this_device(fd):
            self._elsewhere.add(state.path)
        self._files[session_id] = (fd, inode)
        while len(self._files) > self.max_open_files:
            self._close_file(next(iter(self._files)))
        return fd
