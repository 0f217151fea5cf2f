"""What the JSONL store keeps of sessions besides their records: `.agentlog.sessions`.

An SQLite database beside the session files (which arcan reads: it reads
`*.jsonl` only, so this file changes nothing it reads), holding

- each session's labels and their version (primary data: not derived from the
  session files, so not in the index, which may be deleted and rebuilt), and
- the ids of deleted records, as one-way digests (see `_lifecycle`), so an old
  append retried after a delete cannot bring its record back.

Every change is one transaction, synced before it returns (`synchronous=FULL`,
a rollback journal that is deleted at commit, `secure_delete` so that what a
delete removes is overwritten, not left in free pages): a crash leaves each
change whole or not made. A directory whose database is missing (an arcan
directory, or one whose file was lost) serves its sessions with no labels.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import orjson

from agentlog._records import SessionLabels
from agentlog.errors import AgentlogError, FailedPreconditionError, UnavailableError
from agentlog.server._lifecycle import erased_digest

SESSIONS_DB = ".agentlog.sessions"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    session_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    labels TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS erased (
    digest BLOB PRIMARY KEY
) WITHOUT ROWID;
"""
_BATCH = 10_000


class SessionsDb:
    """The store's sessions database; its methods may be called from any thread."""

    def __init__(self, root: Path, *, read_only: bool = False) -> None:
        self.path = root / SESSIONS_DB
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.has_erased = False
        if read_only and not self.path.exists():
            return  # nothing to read, and nothing may be written
        try:
            if read_only:
                uri = f"{self.path.as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._db.executescript(
                    "PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL; "
                    "PRAGMA secure_delete=ON;" + _SCHEMA
                )
            found = self._db.execute("SELECT 1 FROM erased LIMIT 1").fetchone()
            self.has_erased = found is not None
        except sqlite3.Error as exc:
            raise _unusable(self.path, exc) from None

    def labels(self) -> Iterator[tuple[str, SessionLabels]]:
        """Every session's labels."""
        if self._db is None:
            return
        with self._lock:
            rows = self._db.execute("SELECT session_id, version, labels FROM labels").fetchall()
        for session_id, version, text in rows:
            yield session_id, SessionLabels(orjson.loads(text), version)

    def put_labels(self, session_id: str, labels: SessionLabels) -> None:
        """Give a session these labels (durable when this returns)."""
        text = orjson.dumps(dict(labels.labels), option=orjson.OPT_SORT_KEYS).decode()
        self._write(
            [
                (
                    "INSERT INTO labels VALUES (?, ?, ?) ON CONFLICT (session_id) DO UPDATE "
                    "SET version = excluded.version, labels = excluded.labels",
                    [(session_id, labels.version, text)],
                )
            ]
        )

    def drop_labels(self, session_ids: Iterable[str]) -> None:
        """Forget sessions' labels (erased: overwritten on disk)."""
        rows = [(s,) for s in session_ids]
        if rows:
            self._write([("DELETE FROM labels WHERE session_id = ?", rows)])

    def add_erased(self, record_ids: Iterable[str]) -> None:
        """Reserve deleted records' ids for good (durable when this returns)."""
        batch: list[tuple[bytes]] = []
        statements: list[tuple[str, Sequence[tuple[object, ...]]]] = []
        for record_id in record_ids:
            batch.append((erased_digest(record_id),))
            if len(batch) == _BATCH:
                statements.append(("INSERT OR IGNORE INTO erased VALUES (?)", batch))
                batch = []
        if batch:
            statements.append(("INSERT OR IGNORE INTO erased VALUES (?)", batch))
        if statements:
            self._write(statements)
            self.has_erased = True

    def erased_among(self, record_ids: list[str]) -> set[str]:
        """Those of these ids that were deleted records'."""
        if self._db is None or not record_ids:
            return set()
        digests = {erased_digest(i): i for i in record_ids}
        found: set[str] = set()
        keys = list(digests)
        with self._lock:
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT digest FROM erased WHERE digest IN ({marks})",
                    part,
                ).fetchall()
                found.update(digests[row[0]] for row in rows)
        return found

    def _write(self, statements: Sequence[tuple[str, Sequence[tuple[object, ...]]]]) -> None:
        if self._db is None:
            raise FailedPreconditionError(
                f"{self.path.parent} is served read-only: changes are refused", reason="READ_ONLY"
            )
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, rows in statements:
                        self._db.executemany(sql, rows)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _unusable(self.path, exc) from None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.close()
                self._db = None


def _unusable(path: Path, exc: sqlite3.Error) -> AgentlogError:
    return UnavailableError(
        f"cannot use {path} ({exc}); free disk space or repair the file's permissions, then retry",
        reason="SESSIONS_DB_UNUSABLE",
    )
