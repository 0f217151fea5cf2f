"""The JSONL store's indexes on disk: record ids and parent ids -> (session, sequence).

It lives in `<root>/.agentlog.index` (SQLite, the standard library's), so its
memory stays bounded whatever the store's size. It is derived data: for each
session file it records how many bytes and records it has indexed, in the
same transaction as the rows, so it can always be brought up to date from the
files (new bytes are indexed; a file that shrank or vanished is re-indexed or
dropped) and deleting it only costs a rebuild.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import orjson

INDEX_FILE = ".agentlog.index"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    session_id TEXT PRIMARY KEY,
    indexed_bytes INTEGER NOT NULL,
    indexed_records INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS children (
    parent_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    sequence INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS children_by_parent ON children (parent_id, session_id, sequence);
CREATE TABLE IF NOT EXISTS ids (
    session_id TEXT NOT NULL,
    id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    PRIMARY KEY (session_id, id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ids_by_id ON ids (id);
"""
_BLOCK = 4 << 20
# How long appended rows may wait in memory before they are written.
FLUSH_SECONDS = 0.2


class StoreIndex:
    """Where each record id and each record's children are, kept in step with the files."""

    def __init__(self, root: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(root / INDEX_FILE, check_same_thread=False)
        # Derived data: speed over durability; it is checked against the files at open.
        self._db.executescript(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF; PRAGMA cache_size=-8192;" + _SCHEMA
        )
        self._pending: list[tuple[str, list[tuple[str, str | None, int]], int, int]] = []
        self._pending_ids: dict[str, list[tuple[str, int]]] = {}
        self._flushed_at = time.monotonic()

    def record(
        self, appended: Iterable[tuple[str, list[tuple[str, str | None, int]], int, int]]
    ) -> None:
        """Add appends' rows: for each session, its new `(id, parent_id, sequence)` rows,
        and the file's new size and record count.

        Rows wait in memory (where `holders` finds them) and are written in one
        transaction every FLUSH_SECONDS, or before any other read: a commit per
        append would cost more than the append. A crash loses only rows the
        files still hold, and the next open indexes those again.
        """
        with self._lock:
            for session_id, rows, size, count in appended:
                self._pending.append((session_id, rows, size, count))
                for record_id, _, sequence in rows:
                    self._pending_ids.setdefault(record_id, []).append((session_id, sequence))
            if time.monotonic() - self._flushed_at >= FLUSH_SECONDS:
                self._flush()

    def flush(self) -> None:
        """Write the rows waiting in memory."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        self._flushed_at = time.monotonic()
        if not self._pending:
            return
        with self._db:
            for session_id, rows, size, count in self._pending:
                self._insert(session_id, rows)
                self._set(session_id, size, count)
        self._pending.clear()
        self._pending_ids.clear()

    def _set(self, session_id: str, size: int, count: int) -> None:
        self._db.execute(
            "INSERT INTO files VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE SET "
            "indexed_bytes = excluded.indexed_bytes, indexed_records = excluded.indexed_records",
            (session_id, size, count),
        )

    def catch_up(self, session_id: str, path: Path) -> None:
        """Index what the file holds beyond what was indexed (all of it if it shrank)."""
        with self._lock:
            self._flush()
            row = self._db.execute(
                "SELECT indexed_bytes, indexed_records FROM files WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            start, count = row if row else (0, 0)
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if size == start:
                return
            with self._db:
                if size < start:  # rewritten or removed: start over
                    self._drop(session_id)
                    start, count = 0, 0
                    if size < 0:
                        return
                end, count = self._index_file(session_id, path, start, count)
                self._set(session_id, end, count)

    def _index_file(self, session_id: str, path: Path, start: int, count: int) -> tuple[int, int]:
        """Index complete lines from byte `start`; stops at a line that does not parse."""
        position = start
        with path.open("rb") as file:
            file.seek(start)
            carry = b""
            while block := file.read(_BLOCK):
                data = carry + block
                cut = data.rfind(b"\n") + 1
                rows: list[tuple[str, str | None, int]] = []
                for line in data[:cut].split(b"\n")[:-1]:
                    if line.strip():
                        try:
                            obj = orjson.loads(line)
                            record_id, parent = obj["id"], obj.get("parent_id")
                            if not isinstance(record_id, str):
                                raise TypeError
                        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                            self._insert(session_id, rows)
                            return position, count
                        count += 1
                        rows.append((record_id, parent if isinstance(parent, str) else None, count))
                    position += len(line) + 1
                self._insert(session_id, rows)
                carry = data[cut:]
        return position, count

    def _insert(self, session_id: str, rows: Iterable[tuple[str, str | None, int]]) -> None:
        rows = list(rows)
        self._db.executemany(
            "INSERT OR REPLACE INTO ids VALUES (?, ?, ?)",
            ((session_id, record_id, sequence) for record_id, _, sequence in rows),
        )
        self._db.executemany(
            "INSERT INTO children VALUES (?, ?, ?)",
            ((parent, session_id, sequence) for _, parent, sequence in rows if parent is not None),
        )

    def _drop(self, session_id: str) -> None:
        for table in ("children", "ids", "files"):
            self._db.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))

    def forget_missing(self, present: set[str]) -> None:
        """Drop what is indexed for session files that no longer exist."""
        with self._lock:
            self._flush()
            with self._db:
                gone = [
                    session_id
                    for (session_id,) in self._db.execute("SELECT session_id FROM files")
                    if session_id not in present
                ]
                for session_id in gone:
                    self._drop(session_id)

    def holders(self, record_ids: list[str]) -> list[tuple[str, str, int]]:
        """(id, session_id, sequence) of every stored record with one of `record_ids`."""
        found: list[tuple[str, str, int]] = []
        with self._lock:
            for start in range(0, len(record_ids), 500):
                chunk = record_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.extend(
                    self._db.execute(
                        f"SELECT id, session_id, sequence FROM ids WHERE id IN ({marks})",
                        chunk,
                    )
                )
            for record_id in record_ids:
                for session_id, sequence in self._pending_ids.get(record_id, ()):
                    found.append((record_id, session_id, sequence))
        return found

    def indexed(self, session_id: str) -> tuple[int, int] | None:
        """(bytes, records) of a session file as last indexed, if it was."""
        with self._lock:
            self._flush()
            row = self._db.execute(
                "SELECT indexed_bytes, indexed_records FROM files WHERE session_id = ?",
                (session_id,),
            ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]))

    def children(self, parent_id: str) -> list[tuple[str, int]]:
        """(session_id, sequence) of every child, sessions in byte order, then by sequence."""
        with self._lock:
            self._flush()
            return self._db.execute(
                "SELECT session_id, sequence FROM children WHERE parent_id = ? "
                "ORDER BY session_id, sequence",
                (parent_id,),
            ).fetchall()

    def close(self) -> None:
        with self._lock:
            self._flush()
            self._db.close()
