"""What the JSONL store's index keeps on disk (`.agentlog.index`, SQLite): its tables,
the entry it keeps for each session file, and the connection and transaction helpers
(see `index` for what it is for)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from agentlog._records import ForkedFrom
from agentlog.server.jsonl.layout import FirstLine

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    session INTEGER PRIMARY KEY,
    stem TEXT NOT NULL UNIQUE,
    inode INTEGER NOT NULL,
    indexed_bytes INTEGER NOT NULL,
    indexed_records INTEGER NOT NULL,
    last_offset INTEGER NOT NULL,
    first_line TEXT
);
CREATE TABLE IF NOT EXISTS ids (
    key INTEGER NOT NULL,
    session INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (key, session, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS children (
    key INTEGER NOT NULL,
    session INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (key, session, sequence)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS marks (
    session INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    PRIMARY KEY (session, sequence)
) WITHOUT ROWID;
"""


@dataclass(slots=True)
class IndexedFile:
    """What the index holds of one session file."""

    session: int  # the file's number in the index's tables
    inode: int
    size: int  # bytes indexed: every whole record line up to here
    records: int
    last_offset: int  # where the last indexed record starts
    first: FirstLine | None = None
    """What its first record says of it, once indexed."""
    ahead: tuple[int, int, int, int] | None = None
    """Rows of acknowledged appends that do not follow on from `size` (start, end,
    records, last offset): recorded while a catch-up or rebuild was reading the file's
    earlier lines, joined to the rest when it commits. Memory only."""

    @property
    def known_records(self) -> int:
        """Records whose rows the index holds (on disk or waiting in memory)."""
        return self.records if self.ahead is None else max(self.records, self.ahead[2])

    def extend(self, start: int, end: int, records: int, last_offset: int) -> None:
        """The rows of the lines from byte `start` to `end` (the file's first `records`
        records, the last at `last_offset`) are held now."""
        if start <= self.size:
            if end > self.size:
                self.size, self.records, self.last_offset = end, records, last_offset
        elif self.ahead is not None and self.ahead[1] == start:
            self.ahead = (self.ahead[0], end, records, last_offset)
        elif self.ahead is None or end > self.ahead[1]:
            self.ahead = (start, end, records, last_offset)
        if self.ahead is not None and self.ahead[0] <= self.size:
            ahead, self.ahead = self.ahead, None
            self.extend(self.size, *ahead[1:])

    def copy(self) -> IndexedFile:
        return IndexedFile(
            self.session, self.inode, self.size, self.records, self.last_offset, self.first
        )


@dataclass(frozen=True, slots=True)
class Located:
    """Where a record is: found by its id's or its parent's key (confirm before use)."""

    stem: str
    sequence: int
    offset: int


# The index's write-ahead log: checkpointed every 2,048 pages (8 MB) of commits, and
# its file truncated to 16 MB after a checkpoint. While serving it stays below about
# 16 MB plus one flush's rows (0.2 s of appends), unless a query holds a snapshot
# across a checkpoint (queries are short).
WAL_CHECKPOINT_PAGES = 2048
WAL_LIMIT_BYTES = 16 * 1024 * 1024


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # Derived data: WAL with synchronous=NORMAL never corrupts, and a crash
    # only loses rows the files still hold (re-indexed at the next open). The
    # write-ahead log stays small while serving: the writing connection (the flush
    # thread, off the append path) folds it into the main file once a commit leaves
    # it past WAL_CHECKPOINT_PAGES, and the file is cut back to WAL_LIMIT_BYTES after.
    db.executescript(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-65536; "
        f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}; "
        f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}; PRAGMA secure_delete=ON;"
    )
    return db


def first_to_text(first: FirstLine | None) -> str | None:
    if first is None:
        return None
    forked = first.forked_from
    return orjson.dumps(
        {
            "session_id": first.session_id,
            "branch_id": first.branch_id,
            "started_here": first.started_here,
            "forked_from": None
            if forked is None
            else [forked.session_id, forked.branch_id, forked.sequence],
        }
    ).decode()


def first_from_text(text: str | None) -> FirstLine | None:
    if text is None:
        return None
    try:
        obj = orjson.loads(text)
        forked = obj["forked_from"]
        return FirstLine(
            obj["session_id"],
            obj["branch_id"],
            None if forked is None else ForkedFrom(*forked),
            bool(obj["started_here"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """Whether an error says the index file is damaged (not busy, full or read-only)."""
    return getattr(exc, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or (
        "malformed" in str(exc) or "not a database" in str(exc)
    )
