"""The JSONL store's index on disk: where each record id, each parent's children
and every MARK_EVERY-th record of a session file are, by file, sequence and byte
offset; and what each file's first record says of it (its session and branch).

Files are named by their stem, the file name less `.jsonl` (the session id in the
seed layout, `<session_id>__<branch_id>` in the branch layout; see `layout`).

It lives in `<root>/.agentlog.index` (SQLite, the standard library's), so its
memory stays bounded whatever the store's size. It is derived data: for each
session file it records which file (inode) it indexed and how many bytes and
records, in the same transaction as the rows, so it can always be brought up to
date from the files (new bytes are indexed; a file that shrank, was replaced or
vanished is indexed anew or dropped) and deleting it only costs a rebuild.

Ids and parent ids are keyed by a 63-bit hash (integer keys keep the B-trees
small and their inserts cheap); the store confirms a match by reading the
record, so a collision costs a read, never a wrong answer.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from agentlog.server import metrics
from agentlog.server._pauses import point
from agentlog.server.jsonl._index_catch_up import CatchUp
from agentlog.server.jsonl.index_tables import (
    SCHEMA,
    SCHEMA_VERSION,
    IndexedFile,
    Located,
    connect,
    first_from_text,
    first_to_text,
    is_damage,
    transaction,
)
from agentlog.server.jsonl.keys import FilteredIds, KeyFilter, Row, key_of
from agentlog.server.jsonl.layout import FirstLine

log = logging.getLogger("agentlog.server")

INDEX_FILE = ".agentlog.index"
# A session's every MARK_EVERY-th record (1, 1 + MARK_EVERY, ...) has its byte
# offset indexed, so a read from any sequence seeks, then skips fewer records.
MARK_EVERY = 64
# How long acknowledged rows may wait in memory before they are written.
FLUSH_SECONDS = 0.2
T = TypeVar("T")


class StoreIndex(CatchUp, FilteredIds):
    """Where records are, kept in step with the files.

    Rows of acknowledged appends wait in memory, where every query sees them,
    and a background thread writes them in one transaction every
    FLUSH_SECONDS; queries use a second connection, so they never wait for a
    write (SQLite's WAL mode).
    """

    def __init__(
        self, root: Path, files: Callable[[], Iterable[tuple[str, Path]]] = lambda: ()
    ) -> None:
        path = root / INDEX_FILE
        self._path = path
        self._files_source = files  # every session file, for a rebuild
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._lock = threading.Lock()  # guards what follows
        self._files: dict[str, IndexedFile] = {}
        self._names: dict[int, str] = {}
        # Files found shorter than indexed (same inode): session -> (indexed, found) bytes.
        self._shrunk: dict[str, tuple[int, int]] = {}
        # Whether the last catch-up could not be written (a full disk): then the index
        # may not know every id in the files, and appends must wait for it.
        self.behind = False
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            log.warning(
                "%s is damaged (%s); it is derived data, so it is rebuilt from the session files",
                path,
                exc,
            )
            self._wipe()
            self._open()
        # Acknowledged rows not yet written: by session id, and by id / parent id.
        self._pending: dict[str, list[Row]] = {}
        self._flushing: dict[str, list[Row]] = {}  # being written: not on disk yet
        self._pending_children: dict[str, list[Located]] = {}
        self._dirty: set[str] = set()  # files entries changed since the last flush
        self._uncommitted_keys: list[int] = []  # of the rows a catch_up is writing
        self._stop = threading.Event()
        # Every id key the index holds, for "certainly absent" without a query; from
        # open_filter() on (until then, and until it is filled, lookups query).
        self._filter = KeyFilter(0)
        self._filter_started = False
        self._had_rows = True  # rows the filter was not built with (see open_filter)
        self._next_filter: KeyFilter | None = None
        self._fillers: list[threading.Thread] = []
        self._flusher = threading.Thread(
            target=self._flush_periodically, name="agentlog-index", daemon=True
        )
        self._flusher.start()

    def _open(self) -> None:
        """Open both connections and load what the index holds of files (DatabaseError
        if the file is damaged; then nothing stays open)."""
        path = self._path
        opened: list[sqlite3.Connection] = []
        try:
            db = connect(path)
            opened.append(db)
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # Derived data in an older layout: start over, it is rebuilt from the files.
                db.close()
                self._wipe()
                db = connect(path)
                opened.append(db)
                with db:
                    db.executescript(SCHEMA)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Damage that no query has met yet would give wrong rows, not errors:
            # check every page now (about 0.2 s a million records).
            problems = db.execute("PRAGMA quick_check(1)").fetchone()
            if problems is None or problems[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {problems}")
            reader = connect(path)
            opened.append(reader)
            files: dict[str, IndexedFile] = {}
            names: dict[int, str] = {}
            for session, stem, inode, size, records, last, first in db.execute(
                "SELECT session, stem, inode, indexed_bytes, indexed_records, last_offset, "
                "first_line FROM files"
            ):
                files[stem] = IndexedFile(
                    session, inode, size, records, last, first_from_text(first)
                )
                names[session] = stem
            # Session numbers are never reused: rows of a dropped file keep theirs.
            stored = db.execute("SELECT value FROM meta WHERE name = 'next_session'").fetchone()
        except sqlite3.DatabaseError:
            for connection in opened:
                with contextlib.suppress(sqlite3.Error):
                    connection.close()
            raise
        with self._lock:
            self._db, self._reader = db, reader
            self._files, self._names = files, names
            self._next_session = max(max(names, default=0) + 1, stored[0] if stored else 1)

    def _close_connections(self) -> None:
        for db in (self._db, self._reader):
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _wipe(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self._path}{suffix}").unlink(missing_ok=True)

    def _rebuild(self, exc: sqlite3.DatabaseError) -> None:
        """Start the index over from the session files, after finding it damaged at
        run time (hold no index lock). Queries wait until every file is read again:
        none is answered from the damaged file or from a half-built one (a retried id
        would look new). Appends acknowledged meanwhile keep their rows in memory
        (`record`), and files known to have been cut or removed stay so."""
        with self._write_lock:
            log.error(
                "%s is damaged (%s); rebuilding it from the session files (derived data: "
                "nothing is lost, and queries wait until it is done)",
                self._path,
                exc,
            )
            with self._read_lock:
                self._close_connections()
                self._wipe()
                with self._lock:
                    self._pending, self._flushing, self._pending_children = {}, {}, {}
                    self._dirty = set()
                    cut = {
                        s: (self._files[s], found)
                        for s, found in self._shrunk.items()
                        if s in self._files
                    }
                    self._shrunk = {}
                self._open()
                with self._lock:
                    for stem, (old, found) in cut.items():
                        entry = self._new_entry(stem, old.inode)
                        entry.size, entry.records = old.size, old.records
                        entry.last_offset, entry.first = old.last_offset, old.first
                        self._shrunk[stem] = found
                point("index.rebuild.wiped")
                self._catch_up_all(self._files_source())
        log.warning("%s: rebuilt", self._path)

    def _queried(self, run: Callable[[], T]) -> T:
        """`run()`'s answer; a damaged index is rebuilt once and asked again."""
        try:
            return run()
        except sqlite3.DatabaseError as exc:
            if not is_damage(exc):
                raise
            self._rebuild(exc)
        return run()

    # --- what the index holds of files ---

    def indexed(self, stem: str) -> IndexedFile | None:
        with self._lock:
            found = self._files.get(stem)
            return None if found is None else found.copy()

    def stems(self) -> list[str]:
        with self._lock:
            return list(self._files)

    def first_lines(self) -> dict[str, FirstLine]:
        """What the first record of each indexed file says of it."""
        with self._lock:
            return {s: e.first for s, e in self._files.items() if e.first is not None}

    def first_line(self, stem: str) -> FirstLine | None:
        with self._lock:
            entry = self._files.get(stem)
            return entry.first if entry is not None else None

    # --- acknowledged appends ---

    def record(
        self,
        stem: str,
        rows: list[Row],
        inode: int,
        size: int,
        last: int,
        *,
        first: FirstLine | None = None,
    ) -> None:
        """Add an acknowledged append's rows; the file now has `size` bytes, its last
        record (sequence `rows[-1][2]`) starting at byte `last`; `first`: what its
        first record says (given with the append that wrote it).

        The entry advances only over lines that follow on from what it holds: an
        append acknowledged while a catch-up (or a rebuild) is still reading the
        file's earlier lines is kept `ahead`, joined when that catch-up commits, so
        the entry never claims lines whose rows the index does not hold."""
        with self._lock:
            entry = self._files.get(stem)
            if entry is None or entry.inode != inode:
                entry = self._new_entry(stem, inode)
            self._pending.setdefault(stem, []).extend(rows)
            self._add_keys([row[4] for row in rows])
            children = self._pending_children
            for _, parent_id, sequence, offset, _ in rows:
                if parent_id is not None:
                    children.setdefault(parent_id, []).append(Located(stem, sequence, offset))
            entry.extend(rows[0][3], size, rows[-1][2], last)
            if first is not None and entry.first is None:
                entry.first = first
            self._dirty.add(stem)

    def cut_back(self, stem: str, inode: int, size: int, records: int, last: int) -> None:
        """The session's file was cut back to `size` bytes (its first `records` records,
        the last at `last`): lines written and never acknowledged were taken back. A
        catch-up may have indexed them meanwhile; the entry forgets them, or the file
        would seem to have shrunk behind agentlog's back."""
        with self._lock:
            entry = self._files.get(stem)
            if entry is None or entry.inode != inode:
                return
            if entry.size > size:
                entry.size, entry.records, entry.last_offset = size, records, last
                self._dirty.add(stem)
            if entry.ahead is not None and entry.ahead[1] > size:
                entry.ahead = None

    def _new_entry(self, stem: str, inode: int) -> IndexedFile:
        """A fresh numbering for a session (hold the lock): rows of an earlier file
        of the same name keep their old number, which no longer names a file."""
        old = self._files.get(stem)
        if old is not None:
            self._names.pop(old.session, None)
        entry = IndexedFile(self._next_session, inode, 0, 0, 0)
        self._next_session += 1
        self._files[stem] = entry
        self._names[entry.session] = stem
        self._drop_pending(stem)
        self._dirty.add(stem)
        return entry

    def _drop_pending(self, stem: str) -> None:
        self._unpend(stem, self._pending.pop(stem, []))

    def _unpend(self, stem: str, rows: list[Row]) -> None:
        """Take rows out of the in-memory lookup of children (hold the lock)."""
        children = self._pending_children
        for _, parent_id, sequence, _, _ in rows:
            if parent_id is None or (found := children.get(parent_id)) is None:
                continue
            found[:] = [x for x in found if x.sequence != sequence or x.stem != stem]
            if not found:
                del children[parent_id]

    def _flush_periodically(self) -> None:
        wrote = False
        while not self._stop.wait(FLUSH_SECONDS):
            try:
                if self.flush():
                    wrote = True
                elif wrote:  # quiet again: fold the log into the main file, cut it back
                    wrote = False
                    self._checkpoint()
            except sqlite3.DatabaseError as exc:
                if is_damage(exc):
                    self._rebuild(exc)
                else:  # a full disk, say: the rows wait in memory for the next try
                    log.warning("writing %s failed (%s); trying again", self._path, exc)

    def flush(self) -> bool:
        """Write the rows waiting in memory; whether there were any."""
        with self._write_lock:
            return self._flush()

    def _checkpoint(self) -> None:
        """Fold the write-ahead log into the main file and truncate it (a query that
        holds an older snapshot meanwhile makes this a no-op: the next quiet spell
        tries again)."""
        with self._write_lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _flush(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flushing = pending
            dirty, self._dirty = self._dirty, set()
            entries = {s: self._files[s].copy() for s in dirty if s in self._files}
            gone = [s for s in dirty if s not in self._files]
            next_session = self._next_session
        point("index.flush.taken")
        try:
            if entries or gone:
                started = time.perf_counter()
                with transaction(self._db) as db:
                    for stem, rows in pending.items():
                        entry = entries.get(stem)
                        if entry is not None:
                            self._insert(entry.session, rows)
                    for stem, entry in entries.items():
                        self._set(stem, entry)
                    for stem in gone:
                        db.execute("DELETE FROM files WHERE stem = ?", (stem,))
                    db.execute(
                        "INSERT OR REPLACE INTO meta VALUES ('next_session', ?)", (next_session,)
                    )
                metrics.INDEX_FLUSH_SECONDS.observe(time.perf_counter() - started)
        except BaseException:
            with self._lock:  # not written: they wait for the next flush
                for stem, rows in pending.items():
                    self._pending[stem] = rows + self._pending.get(stem, [])
                self._dirty |= dirty
                self._flushing = {}
            raise
        with self._lock:
            # Written: queries find them on disk now (they look in memory first).
            self._flushing = {}
            for stem, rows in pending.items():
                self._unpend(stem, rows)
        return bool(entries or gone)

    def _insert(self, session: int, rows: Iterable[Row], *, new_keys: bool = False) -> None:
        """Write rows (hold the write lock); `new_keys`: their ids are new to the filter."""
        rows = list(rows)
        ids = [(key, session, seq, offset) for _, _, seq, offset, key in rows]
        children = [
            (key_of(parent), session, seq, offset)
            for _, parent, seq, offset, _ in rows
            if parent is not None
        ]
        marks = [(session, seq, offset) for _, _, seq, offset, _ in rows if seq % MARK_EVERY == 1]
        if new_keys:
            with self._lock:
                keys = [key for key, _, _, _ in ids]
                self._add_keys(keys)
                self._uncommitted_keys.extend(keys)
        db = self._db
        db.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?)", ids)
        db.executemany("INSERT OR REPLACE INTO children VALUES (?, ?, ?, ?)", children)
        db.executemany("INSERT OR REPLACE INTO marks VALUES (?, ?, ?)", marks)

    def _set(self, stem: str, entry: IndexedFile) -> None:
        self._db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (stem) DO UPDATE SET "
            "session = excluded.session, inode = excluded.inode, "
            "indexed_bytes = excluded.indexed_bytes, indexed_records = excluded.indexed_records, "
            "last_offset = excluded.last_offset, first_line = excluded.first_line",
            (
                entry.session,
                stem,
                entry.inode,
                entry.size,
                entry.records,
                entry.last_offset,
                first_to_text(entry.first),
            ),
        )

    # --- files indexed from their bytes ---

    def erase(self, files: list[tuple[int, list[int], list[int]]]) -> None:
        """Remove for good the rows of deleted files (each: its number, forgotten; its
        records' ids' keys; their parents' keys), and their marks; then fold the
        write-ahead log into the database, so no copy of the rows is left in it."""
        if not files:
            return
        with self._write_lock:
            self._flush()
            with transaction(self._db) as db:
                for session, keys, parent_keys in files:
                    db.executemany(
                        "DELETE FROM ids WHERE key = ? AND session = ?",
                        [(k, session) for k in keys],
                    )
                    db.executemany(
                        "DELETE FROM children WHERE key = ? AND session = ?",
                        [(k, session) for k in parent_keys],
                    )
                    db.execute("DELETE FROM marks WHERE session = ?", (session,))
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def forget(self, stem: str) -> None:
        """Drop what is indexed of a session whose file is gone."""
        with self._lock:
            self._forget(stem)

    def _forget(self, stem: str) -> None:
        entry = self._files.pop(stem, None)
        if entry is not None:
            self._names.pop(entry.session, None)
            self._drop_pending(stem)
            self._dirty.add(stem)
        self._shrunk.pop(stem, None)

    # --- queries ---

    def holders(
        self, record_ids: list[str], keys: list[int] | None = None
    ) -> dict[str, list[Located]]:
        """Where records with these ids (whose `keys`, if given) may be: candidates to
        confirm by reading."""
        found: dict[str, list[Located]] = {}
        if keys is None:
            keys = [key_of(record_id) for record_id in record_ids]
        by_key: dict[int, list[str]] = {}
        with self._lock:
            might_hold = self._filter.might_hold if self._filter.ready else None
            for record_id, key in zip(record_ids, keys, strict=True):
                if might_hold is None or might_hold(key):
                    by_key.setdefault(key, []).append(record_id)
            if not by_key:
                return found  # all new: the common case
            # Rows not on disk yet (rare: the filter let few ids through).
            wanted = {record_id for same_key in by_key.values() for record_id in same_key}
            for pending in (self._pending, self._flushing):
                for stem, rows in pending.items():
                    for record_id, _, sequence, offset, _ in rows:
                        if record_id in wanted:
                            where = Located(stem, sequence, offset)
                            found.setdefault(record_id, []).append(where)
        for key, session, sequence, offset in self._query(
            "SELECT key, session, sequence, offset FROM ids WHERE key IN ", list(by_key)
        ):
            for record_id in by_key[key]:
                self._add_found(found, record_id, session, sequence, offset)
        return found

    def children(self, parent_id: str) -> list[Located]:
        """Where the children of `parent_id` may be (confirm by reading), sessions in
        byte order, then by sequence."""
        found: dict[str, list[Located]] = {}
        with self._lock:
            found[parent_id] = list(self._pending_children.get(parent_id, ()))
        for _, session, sequence, offset in self._query(
            "SELECT key, session, sequence, offset FROM children WHERE key IN ",
            [key_of(parent_id)],
        ):
            self._add_found(found, parent_id, session, sequence, offset)
        unique = {(c.stem, c.sequence): c for c in found[parent_id]}
        return sorted(unique.values(), key=lambda c: (c.stem.encode(), c.sequence))

    def _add_found(
        self, found: dict[str, list[Located]], name: str, session: int, sequence: int, offset: int
    ) -> None:
        with self._lock:
            stem = self._names.get(session)
            entry = self._files.get(stem) if stem is not None else None
            known = entry.known_records if entry is not None else 0
        # Rows of a file since replaced, or beyond what is indexed now (a file
        # cut short since), name nothing.
        if stem is not None and sequence <= known:
            found.setdefault(name, []).append(Located(stem, sequence, offset))

    def marks(self, stem: str) -> array[int]:
        """Byte offsets of records 1, 1 + MARK_EVERY, ... as far as the file is indexed."""
        with self._lock:
            entry = self._files.get(stem)
            if entry is None:
                return array("Q")
            session, records = entry.session, entry.records
            found = {r[2]: r[3] for r in self._pending.get(stem, ()) if r[2] % MARK_EVERY == 1}

        def query() -> list[tuple[int, int]]:
            with self._read_lock:
                return self._reader.execute(
                    "SELECT sequence, offset FROM marks WHERE session = ? AND sequence <= ?",
                    (session, records),
                ).fetchall()

        found.update(self._queried(query))
        return array("Q", (found[sequence] for sequence in sorted(found)))

    def _query(self, sql: str, keys: list[int]) -> list[tuple[int, int, int, int]]:
        def query() -> list[tuple[int, int, int, int]]:
            found: list[tuple[int, int, int, int]] = []
            with self._read_lock:
                for start in range(0, len(keys), 500):
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    found.extend(self._reader.execute(f"{sql}({marks})", chunk))
            return found

        return self._queried(query)

    def close(self) -> None:
        """Write what waits in memory and close. A failure to write (a full disk) is
        logged, not raised: the rows are in the session files, and the next open
        indexes them again."""
        self._stop.set()
        self._flusher.join()
        for filler in self._fillers:
            filler.join()
        try:
            self.flush()
        except sqlite3.Error as exc:
            log.warning(
                "%s: could not write the last rows (%s); the next start indexes them from "
                "the session files",
                self._path,
                exc,
            )
        else:
            self._save_filter()
        with self._write_lock, self._read_lock:
            self._close_connections()
