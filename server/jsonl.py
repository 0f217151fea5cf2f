"""The JSONL SessionRepository: arcan's on-disk format, one file per session.

`<root>/<session_id>.jsonl` holds one arcan EventRecord per line. A directory
written by arcan is served as it is, and every line appended here is a line
arcan reads. Within one process, each session has a lock: an append writes its
whole line with one O_APPEND write (looping only if the kernel takes part of
it), then syncs it to disk before it is acknowledged. A failed write is cut
back off, so a file never keeps half a line of ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import orjson

from agentlog._codec import DecodeError, record_from_line, record_line, validate_append
from agentlog._records import AppendEvent, EventRecord, format_timestamp
from agentlog._validation import check_record_id, check_session_id
from agentlog.errors import (
    AgentlogError,
    DataLossError,
    FailedPreconditionError,
    ResourceExhaustedError,
)

SUFFIX = ".jsonl"
_READ_BLOCK = 64 * 1024


class JsonlSessionRepository:
    """Sessions as arcan JSONL files under one directory.

    `sync=True` (the default) makes every append durable (fsync) before it
    returns; `sync=False` leaves flushing to the operating system, so a power
    loss may cost the last appends but a crash of this process costs nothing.
    """

    def __init__(self, root: str | os.PathLike[str], *, sync: bool = True) -> None:
        self.root = Path(root).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FailedPreconditionError(
                f"cannot use {self.root} as the data directory: {exc.strerror}",
                reason="DATA_DIR_UNUSABLE",
            ) from None
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            raise FailedPreconditionError(
                f"the data directory {self.root} is not readable and writable by this process",
                reason="DATA_DIR_UNUSABLE",
            )
        self._sync = sync
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # --- writing ---

    def append(self, event: AppendEvent) -> EventRecord:
        event_json = validate_append(event)
        path = self._path(event.session_id)
        record_id = str(uuid.uuid4())
        with self._lock(event.session_id):
            timestamp_ns = time.time_ns()
            line = record_line(
                {
                    "id": record_id,
                    "session_id": event.session_id,
                    "parent_id": event.parent_id,
                    "timestamp": format_timestamp(timestamp_ns),
                    "event": event_json,
                }
            )
            self._write_line(path, line)
        return EventRecord(
            id=record_id,
            session_id=event.session_id,
            parent_id=event.parent_id,
            timestamp_ns=timestamp_ns,
            event=event.event,
        )

    def _write_line(self, path: Path, line: bytes) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, path) from None
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                raise DataLossError(
                    f"{path} ends with an incomplete line (no newline after byte offset "
                    f"{size}); agentlog will not append after it. Move the partial line "
                    "out of the file to repair the session.",
                    reason="TORN_LAST_LINE",
                    metadata={"file": str(path), "offset": str(size)},
                )
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                if self._sync:
                    os.fsync(fd)
            except OSError as exc:
                # Never leave part of our line behind: cut the file back.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise _storage_error(exc, path) from None
        finally:
            os.close(fd)
        if size == 0 and self._sync:
            # A new file: its directory entry must be durable too.
            dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # --- reading ---

    def load_session(self, session_id: str) -> list[EventRecord]:
        check_session_id(session_id)
        path = self._path(session_id)
        with self._lock(session_id):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return []
            except OSError as exc:
                raise _storage_error(exc, path) from None
        return [record for _, record in _parse_lines(path, data)]

    def head(self, session_id: str) -> EventRecord | None:
        check_session_id(session_id)
        path = self._path(session_id)
        with self._lock(session_id):
            try:
                with path.open("rb") as file:
                    found = _last_line(file)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise _storage_error(exc, path) from None
        if found is None:
            return None
        line, offset = found
        return _decode(path, line, f"the line at byte offset {offset}", {"offset": str(offset)})

    def load_children(self, parent_id: str) -> list[EventRecord]:
        check_record_id(parent_id, "parent_id")
        # A line is only parsed when it could hold the id: when the id needs no
        # escaping in JSON, its JSON spelling is a substring of every line naming it.
        needle = orjson.dumps(parent_id)
        escaped = b"\\" in needle

        def may_match(line: bytes) -> bool:
            return escaped or needle in line

        children: list[EventRecord] = []
        for session_id in self.session_ids():
            path = self._path(session_id)
            with self._lock(session_id):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    raise _storage_error(exc, path) from None
            if not may_match(data):
                continue
            for number, line in enumerate(data.split(b"\n"), 1):
                if line.strip() and may_match(line):
                    record = _decode(path, line, f"line {number}", {"line": str(number)})
                    if record.parent_id == parent_id:
                        children.append(record)
        return children

    def session_ids(self) -> list[str]:
        """Ids of the sessions that have a file, in byte order."""
        ids = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(SUFFIX) or not entry.is_file():
                    continue
                try:
                    ids.append(check_session_id(name[: -len(SUFFIX)]))
                except AgentlogError:
                    continue  # not a file agentlog could have written or served
        return sorted(ids, key=str.encode)

    def close(self) -> None:
        """Nothing is held open between calls; present so every backend closes alike."""

    # --- helpers ---

    def _path(self, session_id: str) -> Path:
        # check_session_id has refused separators, NUL and dot-names, so this
        # is always a direct child of root.
        return self.root / f"{session_id}{SUFFIX}"

    def _lock(self, session_id: str) -> threading.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            with self._locks_guard:
                lock = self._locks.setdefault(session_id, threading.Lock())
        return lock


def _decode(path: Path, line: bytes, where: str, metadata: dict[str, str]) -> EventRecord:
    try:
        return record_from_line(line)
    except DecodeError as exc:
        raise DataLossError(
            f"{path}, {where}: not an arcan EventRecord ({exc}); the session cannot be "
            "read until the line is repaired or removed",
            reason="CORRUPT_LINE",
            metadata={"file": str(path), **metadata},
        ) from None


def _parse_lines(path: Path, data: bytes) -> Iterator[tuple[int, EventRecord]]:
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.strip():
            yield number, _decode(path, line, f"line {number}", {"line": str(number)})


def _last_line(file: BinaryIO) -> tuple[bytes, int] | None:
    """The last non-blank line of a file and its byte offset, read backwards from the end."""
    position = file.seek(0, os.SEEK_END)
    tail = b""
    while position > 0:
        step = min(_READ_BLOCK, position)
        position -= step
        file.seek(position)
        tail = file.read(step) + tail
        stripped = tail.rstrip()
        cut = stripped.rfind(b"\n")
        if cut >= 0 and stripped[cut + 1 :].strip():
            return stripped[cut + 1 :], position + cut + 1
    stripped = tail.rstrip()
    return (stripped, 0) if stripped.strip() else None


def _storage_error(exc: OSError, path: Path) -> AgentlogError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhaustedError(
            f"no space left to write {path}: free disk space, then retry",
            reason="DISK_FULL",
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return FailedPreconditionError(
            f"cannot write {path}: {exc.strerror}; check the data directory's permissions",
            reason="DATA_DIR_UNUSABLE",
        )
    raise exc
