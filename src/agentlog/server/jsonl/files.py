"""What the JSONL store knows of files as bytes: taking the data directory, cutting
torn tails at open, scanning a file for its records or for the index's rows,
reading one line, and the errors a file can cause."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import resource
import secrets
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from agentlog._records import parse_timestamp
from agentlog.errors import (
    AgentlogError,
    DataLossError,
    FailedPreconditionError,
    ResourceExhaustedError,
)
from agentlog.server.jsonl.keys import Row, key_of
from agentlog.server.jsonl.layout import FirstLine

log = logging.getLogger("agentlog.server")

LOCK_FILE = ".agentlog.lock"
KEY_FILE = ".agentlog.key"
KEY_BYTES = 32
_BLOCK = 4 << 20
_TAIL_BLOCK = 1 << 12
_NEWLINE = re.compile(b"\n")


def lock_directory(root: Path, *, shared: bool = False) -> int:
    """Take the data directory for this process (flock), or say who has it.

    `shared`: only to read it (a read-only store or a copy's source), which writes no
    lock file: its lock, if there is one, is taken shared, so no agentlog may write the
    directory meanwhile, and others may read it too. Returns -2 when there is no lock
    file to take (a directory no agentlog ever wrote)."""
    path = root / LOCK_FILE
    if shared:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return -2
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        doing = "read" if shared else "write"
        raise FailedPreconditionError(
            f"the data directory {root} is in use by another agentlog process (pid {holder}), "
            f"so this one may not {doing} it; stop that process first (one process may "
            "write a data directory at a time)",
            reason="DATA_DIR_LOCKED",
            metadata={"pid": holder},
        ) from None
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def page_token_key(root: Path, *, keep: bool = True) -> bytes:
    """The key of page tokens, kept in the data directory so that tokens outlive a
    restart (a new one if it cannot be read; kept there unless `keep` is False)."""
    path = root / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == KEY_BYTES:
            return key
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot read the page token key (%s); using a new one", path, exc)
    key = secrets.token_bytes(KEY_BYTES)
    if not keep:
        return key
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # Tokens given out now stop working at the next start: a nuisance, not a loss.
        log.warning(
            "%s: cannot keep the page token key (%s); tokens last until a restart", path, exc
        )
        with contextlib.suppress(OSError):
            path.unlink()
    return key


def open_files_budget() -> int:
    """How many session files to keep open for appending: an eighth of the process's
    open-file limit, at most 256, leaving the rest to connections, reads and SQLite."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(4, min(256, soft // 8))


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one (each connection and open file
    takes one); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
    return soft


def storage_error(exc: OSError, path: Path) -> AgentlogError:
    """The agentlog error for a failed file operation; re-raises ones it has no status for."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(
            f"no space left to write {path}: free disk space, then retry",
            reason="DISK_FULL",
        )
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return ResourceExhaustedError(
            f"cannot open {path}: the server has too many files open ({exc.strerror}); retry "
            "shortly, and raise the server's open-file limit (ulimit -n) if this persists",
            reason="TOO_MANY_OPEN_FILES",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPreconditionError(
            f"cannot write {path}: {exc.strerror}; check the data directory's permissions",
            reason="DATA_DIR_UNUSABLE",
        )
    raise exc


def corrupt_line(
    path: Path, number: int, why: str, sequence: int | None = None, offset: int | None = None
) -> DataLossError:
    """The error for line `number` (record `sequence`, at byte `offset`, where known),
    which is not an arcan EventRecord."""
    metadata = {"file": str(path), "line": str(number)}
    where = ""
    if sequence is not None and offset is not None:
        where = f" (record {sequence}, byte offset {offset})"
        metadata |= {"offset": str(offset), "sequence": str(sequence)}
    return DataLossError(
        f"{path}, line {number}{where}: not an arcan EventRecord ({why}); the session cannot "
        "be read until the line is repaired or removed",
        reason="CORRUPT_LINE",
        metadata=metadata,
    )


def line_number(path: Path, offset: int) -> int:
    """The line number of the line starting at `offset` (on the error path only)."""
    lines = 1
    with path.open("rb") as file:
        remaining = offset
        while remaining > 0 and (block := file.read(min(_BLOCK, remaining))):
            lines += block.count(b"\n")
            remaining -= len(block)
    return lines


def read_line(file: BinaryIO, offset: int, end: int) -> bytes:
    """The line starting at `offset` (without its newline); records end by `end`."""
    file.seek(offset)
    size = min(_TAIL_BLOCK, end - offset)
    data = file.read(size)
    while b"\n" not in data and offset + len(data) < end:
        more = file.read(min(len(data), end - offset - len(data)))
        if not more:
            break
        data += more
    return data.split(b"\n", 1)[0]


def first_and_last_lines(path: str, size: int, last_offset: int) -> tuple[bytes, bytes]:
    """A file's first line and the line at `last_offset` (records end by `size`), read
    with two preads: a listing summarises thousands of files this way."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        last = os.pread(fd, size - last_offset, last_offset).split(b"\n", 1)[0]
        if last_offset == 0:
            return last, last
        head = os.pread(fd, min(_TAIL_BLOCK, size), 0)
        cut = head.find(b"\n")
        if cut < 0:  # a first line longer than a block
            with os.fdopen(os.dup(fd), "rb") as file:
                return read_line(file, 0, size), last
        return head[:cut], last
    finally:
        os.close(fd)


def last_line(file: BinaryIO, size: int) -> bytes | None:
    """The last non-blank line of a file that ends with a newline, read backwards."""
    start, tail = size, b""
    while start > 0:
        start = max(start - _TAIL_BLOCK, 0)
        file.seek(start)
        tail = file.read(size - start)
        if not tail.endswith(b"\n"):
            return None
        body = tail.rstrip()
        cut = body.rfind(b"\n")
        if cut >= 0 or start == 0:
            line = body[cut + 1 :]
            return line if line.strip() else None
    return None


@dataclass
class FileScan:
    """What a session file holds, as far as it can be read."""

    count: int = 0
    end: int = 0  # where the readable records end
    marks: array[int] = field(default_factory=lambda: array("Q"))
    last_offset: int = 0
    first_timestamp_ns: int = 0
    last_timestamp_ns: int = 0
    head_id: str = ""
    started_here: bool = False
    first: FirstLine | None = None
    """What the first record says of the file (its names; see `FirstLine`)."""
    damage: DataLossError | None = None
    last_line: bytes | None = None
    """The last record's line, when small enough to keep (Head answers from it)."""
    open_line: bool = False
    """The last record lacks its newline (arcan died between the two writes; it reads
    the record): the next append writes the newline first."""


def scan_file(path: Path, mark_every: int) -> FileScan:
    """Read a session file once, a block at a time, finding where each record starts.

    For a file the index cannot vouch for (never indexed, or damaged). Only the
    first and last records are parsed (timestamps, head, a batch cut short); a
    damaged line in the middle is reported when it is read.
    """
    offsets = array("Q")
    scan = FileScan()
    try:
        with path.open("rb") as file:
            carry, base = b"", 0  # bytes of an unfinished line, and their file offset
            while block := file.read(_BLOCK):
                data = carry + block
                cut = data.rfind(b"\n") + 1
                start = 0
                for match in _NEWLINE.finditer(data, 0, cut):
                    end = match.end()
                    if data[start : start + 1] == b"{" or data[start:end].strip():
                        offsets.append(base + start)
                    start = end
                carry, base = data[cut:], base + cut
            end = base
            if carry.strip() and _whole_record(carry.strip()) is not None:
                offsets.append(base)  # a whole last record without its newline
                end = base + len(carry)
                scan.open_line = True
            elif carry.strip():
                scan.damage = DataLossError(
                    f"{path}, line {line_number(path, base)}: an incomplete last line (no "
                    f"newline) starts at byte offset {base}: another process may be writing "
                    "it (retry), or died mid-line (agentlog's next start cuts it off and keeps "
                    "it aside); the session cannot be read or appended to meanwhile",
                    reason="TORN_LAST_LINE",
                    metadata={"file": str(path), "offset": str(base)},
                )
            end = _check_tail(path, file, offsets, end, scan)
    except FileNotFoundError:
        return FileScan()
    except OSError as exc:
        raise storage_error(exc, path) from None
    scan.count, scan.end = len(offsets), end
    scan.marks = offsets[::mark_every]
    scan.last_offset = offsets[-1] if offsets else 0
    return scan


def _read_record_line(file: BinaryIO, offsets: array[int], index: int, end: int) -> Any:
    """The parsed JSON of record `index` (0-based); raises on damage."""
    return orjson.loads(_record_line_bytes(file, offsets, index, end))


def _record_line_bytes(file: BinaryIO, offsets: array[int], index: int, end: int) -> bytes:
    stop = offsets[index + 1] if index + 1 < len(offsets) else end
    file.seek(offsets[index])
    return file.read(stop - offsets[index])


# A last line up to this size is kept with a session's state, for Head.
KEPT_LINE_BYTES = 1 << 16


def _check_tail(path: Path, file: BinaryIO, offsets: array[int], end: int, scan: FileScan) -> int:
    """Head and timestamps from the first and last records, and a batch cut short
    (its lines are dropped from `offsets`). Returns where the readable records end."""
    count = len(offsets)
    if count == 0:
        return end
    try:
        last_bytes = _record_line_bytes(file, offsets, count - 1, end)
        last = orjson.loads(last_bytes)
        first = last if count == 1 else _read_record_line(file, offsets, 0, end)
        batch_end = last.get("batch_end")
        if isinstance(batch_end, int) and batch_end > count:
            # The file ends inside a batch: its first lines landed, the rest did not.
            index = count - 1
            while (
                index > 0
                and _read_record_line(file, offsets, index - 1, end).get("batch_end") == batch_end
            ):
                index -= 1
            cut = offsets[index]
            scan.damage = DataLossError(
                f"{path}: the batch of sequences {index + 1} to {batch_end} was cut short after "
                f"sequence {count}, from byte offset {cut}; the session cannot be read or "
                "appended to until the partial batch is removed",
                reason="TORN_LAST_LINE",
                metadata={"file": str(path), "offset": str(cut)},
            )
            del offsets[index:]
            if not offsets:
                return cut
            last = _read_record_line(file, offsets, index - 1, cut)
            last_bytes = b""  # not the line read above: not kept
            end = cut
        scan.first_timestamp_ns = parse_timestamp(first["timestamp"])
        scan.first = FirstLine.of(first)
        scan.started_here = scan.first is not None and scan.first.started_here
        scan.last_timestamp_ns = parse_timestamp(last["timestamp"])
        scan.head_id = str(last["id"])
        if last_bytes and len(last_bytes) <= KEPT_LINE_BYTES:
            scan.last_line = last_bytes.rstrip(b"\n")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # The head itself is damaged: reads stop before it.
        offset = offsets.pop()
        if scan.damage is None:
            scan.damage = corrupt_line(
                path, line_number(path, offset), f"{type(exc).__name__}: {exc}"
            )
        return offset
    return end


def describe(path: Path, count: int, end: int, last_offset: int, marks: array[int]) -> FileScan:
    """A FileScan from what the index holds of a file, reading only its first and
    last lines; ValueError if the file is not as indexed, or ends inside a batch
    (then scan it)."""
    scan = FileScan(count=count, end=end, marks=marks, last_offset=last_offset)
    if count == 0:
        return scan
    if not marks:
        raise ValueError("no marks")
    with path.open("rb") as file:
        first = orjson.loads(read_line(file, marks[0], end))
        last_bytes = read_line(file, last_offset, end)
        last = orjson.loads(last_bytes)
        file.seek(end - 1)
        scan.open_line = file.read(1) != b"\n"
    batch_end = last.get("batch_end")
    if isinstance(batch_end, int) and batch_end > count:
        raise ValueError("ends inside a batch")
    scan.first_timestamp_ns = parse_timestamp(first["timestamp"])
    scan.first = FirstLine.of(first)
    scan.started_here = scan.first is not None and scan.first.started_here
    scan.last_timestamp_ns = parse_timestamp(last["timestamp"])
    scan.head_id = str(last["id"])
    if len(last_bytes) <= KEPT_LINE_BYTES:
        scan.last_line = last_bytes
    return scan


@dataclass(frozen=True)
class Tail:
    """What start-up recovery does to the end of a session file (see `torn_tail`)."""

    cut: int | None = None
    """Where the never-acknowledged tail starts (cut it off there), or None."""
    why: str = ""
    """What the tail is, for the log."""
    complete: bool = False
    """The last line is a whole record that lacks only its newline (what arcan leaves
    when it dies between the two writes, and reads as a record): add the newline."""


def _whole_record(line: bytes) -> dict[str, Any] | None:
    """The line's JSON if it is one whole arcan record (a torn line never is: no proper
    prefix of one JSON object is itself one), else None."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or type(obj.get("id")) is not str or "event" not in obj:
        return None
    return obj


def torn_tail(path: Path) -> Tail:
    """What a file's end needs after a crash, found in one look, so that one open
    finishes recovery: an incomplete last line is cut, and so is the rest of a batch
    cut short (one that line belonged to, or one whose last lines never landed),
    never acknowledged since its last line is missing. A last line that is a whole
    record without its newline is kept. A damaged line before the end is left to
    reads to report."""
    data = _tail_lines(path)
    if data is None:
        return Tail()
    size, start, tail = data
    cut: int | None = None
    whys: list[str] = []
    end = len(tail)  # the whole lines of `tail` end here
    complete = False
    if tail and not tail.endswith(b"\n"):
        newline = tail.rfind(b"\n")
        fragment = tail[newline + 1 :]
        if fragment.strip() and _whole_record(fragment.strip()) is not None:
            complete = True  # kept: arcan reads it
        elif fragment.strip():
            cut = start + newline + 1
            whys.append("an incomplete last line")
            end = newline + 1
        else:
            end = newline + 1  # trailing blanks
    batch = _batch_cut_short(path, start, tail[:end] if not complete else tail + b"\n")
    if batch is not None:
        cut = batch if cut is None else min(cut, batch)
        whys.append("the rest of a batch cut short (its last line never reached the disk)")
        complete = False
    if cut is None:
        return Tail(complete=complete, why="a last record without its newline" if complete else "")
    return Tail(cut=min(cut, size), why=" and ".join(whys))


def _tail_lines(path: Path) -> tuple[int, int, bytes] | None:
    """(file size, where the returned bytes start, the file's last bytes: enough to hold
    its last line whole), or None for an empty file."""
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None
        start = max(size - _TAIL_BLOCK, 0)
        file.seek(start)
        tail = file.read()
        while start > 0 and tail.rstrip(b" \t\r\n").find(b"\n") < 0:
            start = max(start - _TAIL_BLOCK, 0)  # a long last line: find where it starts
            file.seek(start)
            tail = file.read()
        if start > 0:  # drop the first line: it may be a fragment of a longer one
            first = tail.find(b"\n") + 1
            start, tail = start + first, tail[first:]
        return size, start, tail


def _batch_cut_short(path: Path, start: int, tail: bytes) -> int | None:
    """Where a batch cut short begins, if the last whole record of `tail` (bytes of the
    file from offset `start`, ending with a newline) belongs to a batch whose last
    line is missing; else None."""
    lines = tail.split(b"\n")[:-1]
    records = [line for line in lines if line.strip()]
    if not records:
        return None
    last = _whole_record(records[-1].strip())
    if last is None:
        return None  # a damaged line is reported by reads, not cut
    batch_end, sequence = last.get("batch_end"), last.get("sequence")
    if type(batch_end) is not int or type(sequence) is not int or batch_end <= sequence:
        return None
    # Walk back over the lines of the same batch (they name the same batch_end, which
    # no other batch of the session does).
    data = path.read_bytes()[: start + len(tail)]
    if not data.endswith(b"\n"):
        data += b"\n"  # a whole last record without its newline
    position = len(data)
    for line in reversed(data[:-1].split(b"\n")):
        position -= len(line) + 1
        if not line.strip():
            continue
        obj = _whole_record(line.strip())
        if obj is None or obj.get("batch_end") != batch_end:
            position += len(line) + 1
            break
    return max(position, 0)


def index_lines(
    path: Path, start: tuple[int, int, int], insert: Callable[[list[Row]], None]
) -> tuple[tuple[int, int, int], FirstLine | None]:
    """Index a session file's complete lines from `start` (byte offset, records before
    it, offset of the last of those) on, handing the rows to `insert` a block at a
    time. Returns where indexing stopped, in the same terms: at a line that is no
    record in its place, or before a batch whose last line is missing (never
    acknowledged: start-up recovery or an operator cuts it off); and, when indexing
    started at the first record, what that record says of the file."""
    position, count, last = start
    first: FirstLine | None = None
    looking = count == 0
    done = (position, count, last)  # whole records and whole batches up to here
    held: list[Row] = []  # the rows of a batch not seen whole yet
    loads = orjson.loads
    open_end: int | None = None  # the file's size, if it ends in a record without "\n"
    with path.open("rb") as file:
        file.seek(position)
        carry = b""
        while True:
            block = file.read(_BLOCK)
            if block:
                data = carry + block
                cut = data.rfind(b"\n") + 1
            elif carry.strip() and _whole_record(carry.strip()) is not None:
                # The end of the file: a whole last record without its newline (read as
                # if it had one; where it ends is the file's end).
                open_end = file.tell()
                data, cut = carry + b"\n", len(carry) + 1
            else:
                break
            carry = data[cut:]
            rows: list[Row] = []
            append = rows.append
            for line in data[:cut].split(b"\n")[:-1]:
                if line[:1] == b"{" or line.strip():
                    try:
                        obj = loads(line)
                        record_id, parent = obj["id"], obj.get("parent_id")
                        if type(record_id) is not str:
                            raise TypeError
                        stated = obj.get("sequence", count + 1)
                        if stated != count + 1 or type(stated) is not int:
                            raise TypeError  # a line out of place: reads say so
                        batch_end = obj.get("batch_end")
                        if looking:
                            first, looking = FirstLine.of(obj), False
                    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                        insert(rows)
                        return done, first
                    count += 1
                    if parent is not None and type(parent) is not str:
                        parent = None
                    row = (record_id, parent, count, position, key_of(record_id))
                    last = position
                    position += len(line) + 1
                    if type(batch_end) is int and batch_end > count:
                        held.append(row)
                        continue
                    if held:
                        rows.extend(held)
                        held.clear()
                    append(row)
                else:
                    position += len(line) + 1
                if not held:
                    done = (position, count, last)
            insert(rows)
    if open_end is not None and done[0] > open_end:
        done = (open_end, done[1], done[2])
    return done, first
