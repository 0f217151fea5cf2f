"""The JSONL store's session states, catalog, names and open descriptors.

Inside the store a session file is named by its stem, the file name less `.jsonl`:
the session id in the seed layout, `<session_id>__<branch_id>` in the branch layout
(see `layout`). States, the index, the feed and open descriptors are all kept by
stem; the public methods turn (session, branch) into a stem, and a file's
(session, branch) comes from its first record (`_place_of`)."""

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

from agentlog._records import BranchInfo
from agentlog._validation import (
    MAIN,
    check_stored_session_id,
)
from agentlog.errors import (
    AgentlogError,
)
from agentlog.server._labels import LabelIndex
from agentlog.server._pauses import point
from agentlog.server._rules import Place
from agentlog.server.blocking import BlockingStore
from agentlog.server.jsonl._state import (
    MISSING,
    SUFFIX,
    Identity,
    LastRecord,
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
from agentlog.server.jsonl.layout import Layout, split_stem, stem_of, taken, unwritable
from agentlog.server.jsonl.sessions_db import SessionsDb

log = logging.getLogger("agentlog.server")


class SessionStates(BlockingStore):
    """The JSONL store's bottom layer: the states of session files used lately,
    rebuilt from the index or a scan whenever a file changed behind the store's back,
    the catalog of session files and their names, and the descriptors kept open for
    appending.

    The layers above (recovery, reading, the commit path, the sync loops) add
    methods over the same fields, which `JsonlSessionRepository.__init__` sets.
    """

    root: Path
    _root_text: str
    read_only: bool
    layout: Layout
    _branches: bool  # the branch layout: lines carry branch_id and sequence
    # The catalog by name: session ids in order, and each one's (branch, stem) pairs.
    _places: tuple[list[str], dict[str, list[tuple[str, str]]]] | None
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
    _sessions_db: SessionsDb  # labels, and the ids of deleted records
    _labels: LabelIndex  # every session's labels, as the sessions db holds them
    _draining: bool  # a delete waits for the commit queue to empty: appends wait
    _summaries: OrderedDict[str, tuple[Identity, BranchInfo]]  # listings' branch summaries
    # Last records Head read of files without a state in memory, by the files' identity.
    _heads: OrderedDict[str, tuple[Identity, LastRecord]]

    def _state(self, stem: str) -> SessionState:
        """The session's state, rebuilt if its file changed since last seen."""
        path = self._path(stem)
        while True:
            with self._lock:
                state = self._states.get(stem)
                if state is not None and (state.unacked or state.identity == file_identity(path)):
                    self._states.move_to_end(stem)
                    return state
            with self._builder(stem):
                with self._lock:  # built by another thread meanwhile?
                    state = self._states.get(stem)
                    if state is not None and (
                        state.unacked or state.identity == file_identity(path)
                    ):
                        return state
                built = self._build(stem, path)
                point("states.built")
                with self._lock:
                    current = self._states.get(stem)
                    if current is not None and current.unacked:
                        return current  # a new session, being written: that state is the truth
                    if built.identity != file_identity(path):
                        continue  # changed while we read it: again
                    self._close_file(stem)  # it may be for a file since replaced
                    self._install(stem, built)
                self._feed_catch_up(stem, built)
                return built

    def _build(self, stem: str, path: Path) -> SessionState:
        """A session's state from the index, which vouches for a file it indexed to its
        end, reading only the first and last lines; else from a scan of the file. In a
        read-only store, a torn tail (which start-up recovery would cut) is no damage:
        reads stop before it."""
        state = self._build_state(stem, path)
        damage = state.damage
        if self.read_only and damage is not None and damage.reason == "TORN_LAST_LINE":
            state.damage, state.sealed = None, damage
        return state

    def _build_state(self, stem: str, path: Path) -> SessionState:
        identity = file_identity(path)
        try:
            indexed = self._index.catch_up(stem, path)
        except sqlite3.OperationalError as exc:  # a full disk: read the file itself
            log.warning("%s: not indexed (%s); reading it whole", path, exc)
            return SessionState.of(path, identity, scan_file(path, MARK_EVERY))
        if indexed is None:
            return SessionState(path)
        shrunk = self._index.shrunk(stem)
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
                state.sealed = unindexable_line(
                    path, indexed.size, indexed.records + 1, self._branches
                )
            return state
        if (indexed.inode, indexed.size) == identity:
            marks = self._index.marks(stem)
            if len(marks) == (indexed.records + MARK_EVERY - 1) // MARK_EVERY:
                with contextlib.suppress(
                    OSError, ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError
                ):
                    scan = describe(path, indexed.records, indexed.size, indexed.last_offset, marks)
                    return SessionState.of(path, identity, scan)
        return SessionState.of(path, identity, scan_file(path, MARK_EVERY))

    def _feed_catch_up(self, stem: str, state: SessionState) -> None:
        """Give feed positions to records of a session the feed lacks (the commit
        path does; see `CommitPath._feed_catch_up`)."""

    def _install(self, stem: str, state: SessionState) -> None:
        """Keep a state (hold the lock), dropping the least recently used beyond the limit."""
        self._states[stem] = state
        self._states.move_to_end(stem)
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

    def _builder(self, stem: str) -> threading.Lock:
        with self._lock:
            return self._builders.setdefault(stem, threading.Lock())

    def _stems_in_order(self) -> list[str]:
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
            self._places = None
        return self._catalog

    def _place_of(self, stem: str) -> Place | None:
        """The (session, branch) a file holds: its first record's names, else (a file
        with no records) what its name says; None for a file the layout cannot name."""
        if not self._branches:
            return (stem, MAIN)
        first = self._index.first_line(stem)
        if first is not None:
            return (first.session_id, first.branch_id or MAIN)
        return split_stem(stem)

    def _stem_for(self, session_id: str, branch_id: str) -> str | None:
        """The file that holds a branch, for reading; None if none can."""
        stem = stem_of(self.layout, session_id, branch_id)
        if stem is None or not self._branches:
            return stem
        first = self._index.first_line(stem)
        if first is not None and (first.session_id, first.branch_id) != (session_id, branch_id):
            return None  # arcan named another branch so (its branch id holds "__")
        return stem

    def _stem_to_write(self, session_id: str, branch_id: str) -> str:
        """The file to append a branch's records to; an error if none may hold it."""
        stem = stem_of(self.layout, session_id, branch_id)
        if stem is None:
            raise unwritable(self.layout, self.root, session_id, branch_id)
        if self._branches:
            first = self._index.first_line(stem)
            holder = (first.session_id, first.branch_id or MAIN) if first is not None else None
            if holder is not None and holder != (session_id, branch_id):
                raise taken(self.root, stem, (session_id, branch_id), holder)
        return stem

    def _catalog_of_places(self) -> tuple[list[str], dict[str, list[tuple[str, str]]]]:
        """Session ids in byte order, and each one's (branch, stem) pairs in byte order
        of the branches: the catalog by name (rebuilt when the catalog changes)."""
        stems = self._stems_in_order()
        if self._places is not None:
            return self._places
        places: list[tuple[str, str, str]] = []
        for stem in stems:
            place = self._place_of(stem)
            if place is None:
                continue
            places.append((place[0], place[1], stem))
        places.sort(key=lambda p: (p[0].encode(), p[1].encode()))
        branches: dict[str, list[tuple[str, str]]] = {}
        for session_id, branch_id, stem in places:
            branches.setdefault(session_id, []).append((branch_id, stem))
        self._places = (list(branches), branches)
        return self._places

    def _remove_from_catalog(self, stem: str) -> None:
        if self._catalog is not None:
            index = bisect.bisect_left(self._catalog, stem.encode(), key=str.encode)
            if index < len(self._catalog) and self._catalog[index] == stem:
                self._catalog = [*self._catalog[:index], *self._catalog[index + 1 :]]
                self._places = None
            self._catalog_mtime = os.stat(self.root).st_mtime_ns

    def _add_to_catalog(self, stem: str) -> None:
        if self._catalog is not None:
            index = bisect.bisect_left(self._catalog, stem.encode(), key=str.encode)
            if index == len(self._catalog) or self._catalog[index] != stem:
                self._catalog = [*self._catalog[:index], stem, *self._catalog[index:]]
                self._places = None
            self._catalog_mtime = os.stat(self.root).st_mtime_ns

    def _stem_files(self) -> list[tuple[str, Path]]:
        return [(s, self._path(s)) for s in self._stems_in_order()]

    def _path(self, stem: str) -> Path:
        # check_stored_session_id has refused '/' and NUL, and the suffix keeps
        # '.' and '..' from naming directories: always a direct child of root.
        return self.root / f"{stem}{SUFFIX}"

    def _path_text(self, stem: str) -> str:
        """`_path` as text, without building a Path (a listing stats every file)."""
        return f"{self._root_text}{stem}{SUFFIX}"

    def _close_file(self, stem: str) -> None:
        cached = self._files.pop(stem, None)
        if cached is not None:
            os.close(cached[0])

    def _file(self, stem: str, state: SessionState) -> int:
        """The session file's descriptor for appending, opened if need be (hold the lock)."""
        cached = self._files.get(stem)
        if cached is not None:
            if cached[1] == state.identity[0]:
                self._files.move_to_end(stem)
                return cached[0]
            self._close_file(stem)
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
        self._files[stem] = (fd, inode)
        while len(self._files) > self.max_open_files:
            self._close_file(next(iter(self._files)))
        return fd
