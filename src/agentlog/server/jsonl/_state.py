"""What the JSONL store knows of one session file, and the errors about files."""

from __future__ import annotations

import logging
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agentlog._lines import (
    record_from_line,
)
from agentlog._plans import (
    DecodeError,
)
from agentlog._records import ForkedFrom
from agentlog.errors import (
    DataLossError,
)
from agentlog.server._rules import Prepared
from agentlog.server.jsonl.files import (
    FileScan,
    corrupt_line,
    line_number,
    read_line,
    storage_error,
)

log = logging.getLogger("agentlog.server")

SUFFIX = ".jsonl"
RECOVERED_DIR = ".agentlog-recovered"
CLEAN_FILE = ".agentlog.clean"
# Sessions whose state is kept in memory (a few hundred bytes each, plus 8
# bytes per MARK_EVERY records); an evicted one is rebuilt when next used.
MAX_CACHED_SESSIONS = 4096
# Entries of _unacked_ids beyond which the stale ones are dropped.
MAX_UNACKED_IDS = 1 << 16
_BLOCK = 1 << 20
T = TypeVar("T")
# A file's inode and size: session files only grow, so a change of either is a
# change behind the store's back (a rewrite to the very same size is not seen).
Identity = tuple[int, int]
MISSING: Identity = (0, 0)
STALE: Identity = (0, -1)  # matches no file: the state is rebuilt before it is used
# Every byte but the newline as a space: lines to blank out in place.
_BLANKED = bytes(10 if byte == 10 else 32 for byte in range(256))


@dataclass(frozen=True, slots=True)
class LastRecord:
    """A branch's last record, kept for Head: as its append had it (the checked event
    and its timestamp), or its line as read from the file."""

    sequence: int
    item: Prepared | None = None
    timestamp_ns: int = 0
    line: bytes | None = None


@dataclass(eq=False)
class SessionState:
    """What is known of one session file, valid while its identity is unchanged."""

    path: Path
    identity: Identity = MISSING
    """Of the file as agentlog last saw or left it (its unacknowledged lines included)."""
    count: int = 0
    """Acknowledged records: what reads see."""
    end: int = 0
    last_offset: int = 0
    written: int = 0
    """Records in the file, acknowledged or not: what appends follow."""
    written_end: int = 0
    written_last_offset: int = 0
    written_timestamp_ns: int = 0
    """The latest timestamp of its records, acknowledged or not: new ones are no earlier."""
    marks: array[int] = field(default_factory=lambda: array("Q"))
    """Byte offsets of records 1, 1 + MARK_EVERY, ... (written ones included)."""
    first_timestamp_ns: int = 0
    last_timestamp_ns: int = 0
    head_id: str = ""
    damage: DataLossError | None = None
    """Why the file cannot be read or appended to, if it cannot."""
    started_here: bool = False
    """Whether agentlog wrote the first record (it states its sequence): then every
    record belongs in the feed, even if a crash kept the first from it."""
    unacked: int = 0
    """Appends written and not yet acknowledged: the state stays in memory meanwhile."""
    sealed: DataLossError | None = None
    """Why the file takes no more appends though its first records can be read: a
    damaged line in it (an append after it would bury it)."""
    open_line: bool = False
    """Its last record lacks the newline that ends it (arcan died between the two
    writes): the next append writes that newline first."""
    forked_from: ForkedFrom | None = None
    """Where the branch it holds was forked from (its first line says), if it was."""
    last_record: LastRecord | None = None
    """The branch's last record, if known (Head answers from it, on the event loop,
    without reading the file)."""

    @classmethod
    def of(cls, path: Path, identity: Identity, scan: FileScan) -> SessionState:
        return cls(
            path,
            identity,
            scan.count,
            scan.end,
            scan.last_offset,
            scan.count,
            scan.end,
            scan.last_offset,
            scan.last_timestamp_ns,
            scan.marks,
            scan.first_timestamp_ns,
            scan.last_timestamp_ns,
            scan.head_id,
            scan.damage,
            scan.started_here,
            open_line=scan.open_line,
            forked_from=scan.first.forked_from if scan.first is not None else None,
            last_record=(
                LastRecord(scan.count, line=scan.last_line) if scan.last_line is not None else None
            ),
        )

    def view(self) -> View:
        """What a read may see: the acknowledged records (hold the store's lock)."""
        return View(self.path, self.marks, self.count, self.end)


@dataclass(frozen=True, slots=True)
class View:
    """A read's snapshot of a session: its first `count` records, ending at byte `end`.

    `marks` is the state's own array: it only grows past what the snapshot
    uses, or is cut back to acknowledged records, so reading it needs no lock.
    """

    path: Path
    marks: array[int]
    count: int
    end: int


def missing_records(path: Path, count: int, wanted: int) -> DataLossError:
    return DataLossError(
        f"{path} holds {count} records, but the feed names record {wanted} of it: records "
        "acknowledged earlier are missing from the file",
        reason="MISSING_RECORDS",
        metadata={"file": str(path), "records": str(count)},
    )


def concurrent_writer(path: Path) -> DataLossError:
    return DataLossError(
        f"{path} changed while agentlog was appending to it; retry the append",
        reason="CONCURRENT_WRITER",
        metadata={"file": str(path)},
    )


def shrunk_error(path: Path, indexed: int, found: int, *, missing: bool = False) -> DataLossError:
    what = (
        "was removed behind agentlog's back, though it held"
        if missing
        else f"is {found} bytes long but held"
    )
    how = "cut, removed or rewritten" if missing else "cut or rewritten"
    return DataLossError(
        f"{path} {what} {indexed} bytes of acknowledged records: it was {how} outside "
        "agentlog. Its reads and appends are refused so that no sequence or id is handed out "
        "twice; restore the file (or, to accept it as it is now, stop agentlog and delete "
        ".agentlog.index, which is rebuilt from the files)",
        reason="FILE_SHRANK",
        metadata={"file": str(path), "indexed_bytes": str(indexed), "found_bytes": str(found)},
    )


def unindexable_line(
    path: Path, offset: int, sequence: int, branches: bool = False
) -> DataLossError:
    """Why a file whose line at `offset` is no record takes no appends."""
    try:
        with path.open("rb") as file:
            line = read_line(file, offset, offset + (1 << 20))
        record_from_line(line, sequence, branches)
        why = "it does not parse"
    except DecodeError as exc:
        why = str(exc)
    except OSError as exc:
        why = exc.strerror or str(exc)
    error = corrupt_line(path, line_number(path, offset), why, sequence, offset)
    error.message += "; appends to it are refused meanwhile"
    return error


def file_identity(path: Path | str) -> Identity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return MISSING
    except OSError as exc:
        raise storage_error(exc, Path(path)) from None
    return (stat.st_ino, stat.st_size)
