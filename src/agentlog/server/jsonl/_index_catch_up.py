"""Bringing the JSONL store's index up to date with the session files: what a file
holds beyond what was indexed is indexed (all of it if it was replaced); a file found
shorter than indexed, or gone, is remembered as cut. A layer of `StoreIndex`."""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from agentlog.server._pauses import point
from agentlog.server.jsonl.files import index_lines
from agentlog.server.jsonl.index_tables import IndexedFile
from agentlog.server.jsonl.keys import Row

# Rows indexed from files per transaction, when many files are indexed at once.
_ROWS_A_TRANSACTION = 1 << 18


class CatchUp:
    """`catch_up` and what it needs; the fields are `StoreIndex`'s."""

    _db: sqlite3.Connection
    _write_lock: threading.Lock
    _lock: threading.Lock
    _files: dict[str, IndexedFile]
    _shrunk: dict[str, tuple[int, int]]
    _pending: dict[str, list[Row]]
    _dirty: set[str]
    _uncommitted_keys: list[int]
    _next_session: int
    behind: bool

    def _flush(self) -> bool:
        raise NotImplementedError

    def _set(self, stem: str, entry: IndexedFile) -> None:
        raise NotImplementedError

    def _forget(self, stem: str) -> None:
        raise NotImplementedError

    def _new_entry(self, stem: str, inode: int) -> IndexedFile:
        raise NotImplementedError

    def _insert(self, session: int, rows: Iterable[Row], *, new_keys: bool = False) -> None:
        raise NotImplementedError

    def catch_up(self, stem: str, path: Path) -> IndexedFile | None:
        """Index what the file holds beyond what was indexed (all of it if it shrank or
        was replaced); drop the session if the file is gone. Returns what is indexed:
        whole record lines up to the first that does not parse (reads report it)."""
        return self.catch_up_all([(stem, path)])[stem]

    def catch_up_all(self, files: Iterable[tuple[str, Path]]) -> dict[str, IndexedFile | None]:
        """catch_up for many files, in transactions of many files each (at open). A
        failure to write (a full disk) leaves `behind` set, and raises."""
        try:
            with self._write_lock:
                found = self._catch_up_all(files)
        except sqlite3.OperationalError:
            self.behind = True
            raise
        return found

    def _catch_up_all(self, files: Iterable[tuple[str, Path]]) -> dict[str, IndexedFile | None]:
        indexed: dict[str, IndexedFile | None] = {}
        # First what waits in memory: a file's entry is never written ahead of its rows.
        self._flush()
        written: list[tuple[str, IndexedFile]] = []
        rows = 0
        try:
            for stem, path in files:
                current = self._look(stem, path, indexed)
                point("index.catch_up.looked")
                if current is None:
                    continue
                if not self._db.in_transaction:
                    self._db.execute("BEGIN")
                before = current.records
                try:
                    self._index_file(path, current)
                except FileNotFoundError:  # removed since: look again
                    self._look(stem, path, indexed)
                    continue
                self._set(stem, current)
                written.append((stem, current))
                rows += current.records - before
                if rows >= _ROWS_A_TRANSACTION:
                    point("index.catch_up.scanned")
                    self._commit_catch_up(written, indexed)
                    written, rows = [], 0
            if written:
                point("index.catch_up.scanned")
                self._commit_catch_up(written, indexed)
                written = []
        finally:
            if self._db.in_transaction:  # cut short by an error
                self._db.execute("ROLLBACK")
            with self._lock:
                self._uncommitted_keys.clear()
        self.behind = False
        return indexed

    def _look(
        self, stem: str, path: Path, indexed: dict[str, IndexedFile | None]
    ) -> IndexedFile | None:
        """Compare a file with its entry, at one moment (under the lock: an append's
        lines are written before its rows are recorded, under this lock, so the file is
        never found shorter than the entry unless it shrank). Returns a copy of the
        entry to index the file's new lines into, or None (and sets `indexed`) when there
        is nothing to index: the file is as indexed, cut short, or gone."""
        with self._lock:
            try:
                stat = path.stat()
            except FileNotFoundError:
                stat = None
            entry = self._files.get(stem)
            if stat is None:
                if entry is not None and entry.known_records > 0:
                    # Vanished: a file cut to nothing. Its ids stay known, and its
                    # session refuses reads and appends, rather than starting over.
                    self._shrunk[stem] = (entry.size, 0)
                    indexed[stem] = entry.copy()
                else:
                    self._forget(stem)
                    indexed[stem] = None
                return None
            if entry is not None and entry.inode == stat.st_ino:
                if stat.st_size < entry.size:
                    self._shrunk[stem] = (entry.size, stat.st_size)
                    indexed[stem] = entry.copy()
                    return None
            else:
                entry = self._new_entry(stem, stat.st_ino)
            self._shrunk.pop(stem, None)
            indexed[stem] = entry.copy()
            return entry.copy() if stat.st_size != entry.size else None

    def distrust(self, stem: str, offset: int, records: int) -> None:
        """Vouch for a session's file only up to byte `offset`, its first `records`
        records: a damaged line starts there. Kept on disk, so the session stays
        sealed across restarts until the line is repaired (and indexed again)."""
        with self._lock:
            entry = self._files.get(stem)
            if entry is None or entry.size <= offset:
                return
            entry.size, entry.records = offset, min(entry.records, records)
            if entry.last_offset >= offset:
                entry.last_offset = 0
            self._dirty.add(stem)

    def shrunk(self, stem: str) -> tuple[int, int] | None:
        """(bytes indexed, bytes found) if the session's file was last found shorter
        than the index knew it: cut behind agentlog's back."""
        with self._lock:
            return self._shrunk.get(stem)

    def _commit_catch_up(
        self, written: list[tuple[str, IndexedFile]], indexed: dict[str, IndexedFile | None]
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('next_session', ?)", (self._next_session,)
        )
        self._db.execute("COMMIT")
        with self._lock:
            for stem, current in written:
                live = self._files.get(stem)
                if live is None or live.session != current.session:
                    continue  # forgotten or replaced since: these rows name nothing
                # Appends may have been acknowledged while the file was read: the entry
                # joins what was read to what they recorded, never going back.
                before = (live.size, live.records)
                live.extend(0, current.size, current.records, current.last_offset)
                if live.first is None and current.first is not None:
                    live.first = current.first
                    self._dirty.add(stem)
                if (live.size, live.records) != before or stem in self._pending:
                    self._dirty.add(stem)
                elif live.size == current.size:
                    self._dirty.discard(stem)  # written: no flush needed
                indexed[stem] = live.copy()
            self._uncommitted_keys.clear()

    def _index_file(self, path: Path, entry: IndexedFile) -> None:
        """Index `path`'s complete records from `entry.size` on (see `index_lines`),
        updating `entry`."""
        start = (entry.size, entry.records, entry.last_offset)
        rows = functools.partial(self._insert, entry.session, new_keys=True)
        (entry.size, entry.records, entry.last_offset), first = index_lines(path, start, rows)
        if first is not None:
            entry.first = first
