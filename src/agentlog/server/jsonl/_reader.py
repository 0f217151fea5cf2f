"""Reading the JSONL store: sessions, heads, children, listings and the feed."""

from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import orjson

from agentlog._codec import make_record
from agentlog._events import ReadDirection
from agentlog._lines import (
    record_fields_from_line,
    record_fields_from_lines,
    record_from_line,
    stored_from_line,
)
from agentlog._plans import (
    DecodeError,
)
from agentlog._records import (
    EventRecord,
    FeedGap,
    FeedItem,
    FeedRecord,
    SessionDeleted,
    StoredRecord,
)
from agentlog._validation import (
    MAIN,
    check_count,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import (
    DataLossError,
)
from agentlog.server import _rules, metrics
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
)
from agentlog.server.backend import StoreFigures
from agentlog.server.jsonl._recovery import Recovery
from agentlog.server.jsonl._state import (
    SUFFIX,
    LastRecord,
    View,
    file_identity,
    missing_records,
)
from agentlog.server.jsonl.feed import MARKER
from agentlog.server.jsonl.files import (
    KEPT_LINE_BYTES,
    corrupt_line,
    last_line,
    line_number,
    read_line,
    storage_error,
)
from agentlog.server.jsonl.index import MARK_EVERY

log = logging.getLogger("agentlog.server")

_BLOCK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Decoder(Generic[T]):
    """Turns a run of lines into records or messages; `one` words a line's error."""

    run: Callable[[list[bytes], int], list[T]]
    one: Callable[[bytes, int], T]


def decoders(branches: bool) -> tuple[_Decoder[EventRecord], _Decoder[dict[str, Any]]]:
    """The decoders of a layout's lines: into records, and into message fields."""

    def records(lines: list[bytes], first: int) -> list[EventRecord]:
        return [record_from_line(line, first + k, branches) for k, line in enumerate(lines)]

    return (
        _Decoder(records, functools.partial(_one_record, branches=branches)),
        _Decoder(
            functools.partial(_fields_of_lines, branches=branches),
            functools.partial(_fields_of_line, branches=branches),
        ),
    )


def _one_record(line: bytes, sequence: int, *, branches: bool) -> EventRecord:
    return record_from_line(line, sequence, branches)


def _fields_of_lines(lines: list[bytes], first: int, *, branches: bool) -> list[dict[str, Any]]:
    return record_fields_from_lines(lines, first, branches)


def _fields_of_line(line: bytes, sequence: int, *, branches: bool) -> dict[str, Any]:
    return record_fields_from_line(line, sequence, branches)


# Last lines Head keeps of files it read without building their state.
HEADS = 4096


class Reader(Recovery):
    """Ranged reads, heads, children, listing and the feed, from the files: each read
    takes a snapshot (`View`) of a session file under the lock and reads without it."""

    _reported_gaps: set[tuple[str, str]]  # (file, reason) logged
    _records: _Decoder[EventRecord]
    _fields: _Decoder[dict[str, Any]]

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[EventRecord]:
        stem = self._stem_to_read(session_id, branch_id)
        chunks = self._read(stem, from_sequence, limit, direction, self._records)
        return itertools.chain.from_iterable(chunks)

    def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[list[Any]]:
        # Straight from each line's JSON to the message's fields: no Python
        # records or messages between.
        stem = self._stem_to_read(session_id, branch_id)
        return self._read(stem, from_sequence, limit, direction, self._fields)

    def _stem_to_read(self, session_id: str, branch_id: str) -> str | None:
        """The file of a branch a read names (checked); None: it can have none."""
        check_stored_session_id(session_id)
        return self._stem_for(session_id, check_stored_branch_id(branch_id))

    def _read(
        self,
        stem: str | None,
        from_sequence: int,
        limit: int | None,
        direction: ReadDirection,
        decoder: _Decoder[T],
    ) -> Iterator[list[T]]:
        selected = _rules.read_range(from_sequence, limit, direction)
        if stem is None:
            return iter(())
        view = self._view(stem)
        # A snapshot: appends made while the caller iterates are not part of this read.
        return self._chunks(view, selected.sequences(view.count), decoder)

    def _view(self, stem: str) -> View:
        """What reads may see of a session now; DataLossError if it is damaged."""
        state = self._state(stem)
        if state.damage is not None:
            raise state.damage
        with self._lock:
            return state.view()

    def _chunks(self, view: View, sequences: range, decoder: _Decoder[T]) -> Iterator[list[T]]:
        """The records of `sequences`, in their order, in runs of at most MESSAGE_RECORDS
        records and (unless one record is larger) MESSAGE_BYTES of lines."""
        if not sequences:
            return
        if sequences.step > 0:
            yield from self._forward(view, sequences[0], sequences[-1], decoder)
            return
        high, low = sequences[0], sequences[-1]
        while high >= low:
            start = max(low, high - MESSAGE_RECORDS + 1)
            for run in reversed(list(self._forward(view, start, high, decoder))):
                yield run[::-1]
            high = start - 1

    def _forward(
        self,
        view: View,
        low: int,
        high: int,
        decoder: _Decoder[T],
        start: tuple[int, int] | None = None,
    ) -> Iterator[list[T]]:
        """Records `low` to `high` in order: one seek to the mark before `low` (or to
        `start`, the known (offset, sequence) of a record at or before it), then
        reading on, a block at a time."""
        for run, _ in self._forward_sized(view, low, high, decoder, start):
            yield run

    def _forward_sized(
        self,
        view: View,
        low: int,
        high: int,
        decoder: _Decoder[T],
        start: tuple[int, int] | None = None,
    ) -> Iterator[tuple[list[T], int]]:
        """`_forward`'s runs, each with the bytes of its lines."""
        if low > high:
            return
        runs = _runs(self._lines(view, low, high, start))
        for first, lines in runs:
            try:
                yield decoder.run(lines, first), sum(map(len, lines))
            except DecodeError:
                for number, line in enumerate(lines, first):
                    try:
                        decoder.one(line, number)
                    except DecodeError as exc:
                        offset = self._offset_of(view, number)
                        line_no = line_number(view.path, offset)
                        error = corrupt_line(view.path, line_no, str(exc), number, offset)
                        self._seal(view.path, error, number, offset)
                        raise error from None
                raise

    def _lines(
        self, view: View, low: int, high: int, start: tuple[int, int] | None
    ) -> Iterator[tuple[int, list[bytes]]]:
        """(sequence of the first, lines) for records `low` to `high`, a block at a time."""
        mark = (low - 1) // MARK_EVERY
        offset, sequence = view.marks[mark] if view.marks else 0, mark * MARK_EVERY + 1
        if start is not None and sequence <= start[1] <= low:
            offset, sequence = start
        # Read no further than the mark after `high`: a short read reads little.
        following = (high - 1) // MARK_EVERY + 1
        if following < len(view.marks) and following * MARK_EVERY + 1 <= view.count:
            stop = view.marks[following]
        else:
            stop = view.end
        try:
            file = view.path.open("rb")
        except OSError as exc:
            raise storage_error(exc, view.path) from None
        with file:
            file.seek(offset)
            left = stop - offset
            carry = b""
            while sequence <= high:
                block = file.read(min(_BLOCK, left)) if left > 0 else b""
                if block:
                    left -= len(block)
                    data = carry + block if carry else block
                elif carry.strip() and left == 0:
                    data = carry + b"\n"  # the last record, without its newline
                else:
                    raise DataLossError(
                        f"{view.path} ends before record {sequence}, which it held: it was "
                        "cut or replaced behind agentlog's back; read it again",
                        reason="CONCURRENT_WRITER",
                        metadata={"file": str(view.path)},
                    )
                cut = data.rfind(b"\n") + 1
                lines = data[:cut].split(b"\n")
                lines.pop()
                carry = data[cut:]
                if data[:1] != b"{" or data.count(b"\n{", 0, cut) != len(lines) - 1:
                    # Blank lines between records are no records.
                    lines = [line for line in lines if line[:1] == b"{" or line.strip()]
                if sequence < low:
                    skip = min(low - sequence, len(lines))
                    del lines[:skip]
                    sequence += skip
                del lines[high - sequence + 1 :]
                if lines:
                    yield sequence, lines
                    sequence += len(lines)

    def _offset_of(self, view: View, sequence: int) -> int:
        """Where record `sequence` starts (on the error path only)."""
        mark = (sequence - 1) // MARK_EVERY
        offset, number = view.marks[mark], mark * MARK_EVERY + 1
        with view.path.open("rb") as file:
            file.seek(offset)
            for line in file:
                if line[:1] == b"{" or line.strip():
                    if number == sequence:
                        return offset
                    number += 1
                offset += len(line)
        return offset

    def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        stem = self._stem_to_read(session_id, branch_id)
        if stem is None:
            return None
        with self._lock:
            cached = stem in self._states
        if not cached:
            # Without the session's state at hand, read only the last line.
            found = self._head_from_index(stem)
            if found is not None:
                return found
        view = self._view(stem)
        if view.count == 0:
            return None
        return self._at(view, view.count, self._last_offset(stem, view))

    def head_in_memory(self, session_id: str, branch_id: str) -> tuple[bool, EventRecord | None]:
        """Head without reading a file, when the branch's state knows its last record (or
        a Head read it lately) and the file is as it was then: (True, the record).
        (False, None): ask `head`, from a thread."""
        stem = self._stem_to_read(session_id, branch_id)
        if stem is None:
            return True, None
        path = self._path_text(stem)
        with self._lock:
            state = self._states.get(stem)
            if state is None:
                read = self._heads.get(stem)
                if read is None or read[0] != file_identity(path):
                    return False, None
                last: LastRecord | None = read[1]
            elif state.damage is not None:
                return False, None
            else:
                last = state.last_record
            if state is not None and (
                last is None
                or last.sequence != state.count
                or (not state.unacked and state.identity != file_identity(path))
            ):
                return False, None  # not known, or changed behind the store's back
        if last is None:
            return False, None
        item = last.item
        if item is None:
            try:
                return True, record_from_line(cast(bytes, last.line), last.sequence, self._branches)
            except DecodeError:
                return False, None  # the slow path says what is wrong
        record = make_record(
            item.id,
            session_id,
            last.sequence,
            item.parent_id,
            last.timestamp_ns,
            item.to_event(),
            check_stored_branch_id(branch_id),
        )
        return True, record

    def _last_offset(self, stem: str, view: View) -> int:
        with self._lock:
            state = self._states.get(stem)
            if state is not None and state.count == view.count:
                return state.last_offset
        return self._offset_of(view, view.count)

    def _at(self, view: View, sequence: int, offset: int) -> EventRecord:
        """The record `sequence`, whose line starts at `offset`."""
        try:
            with view.path.open("rb") as file:
                line = read_line(file, offset, view.end)
        except OSError as exc:
            raise storage_error(exc, view.path) from None
        try:
            return record_from_line(line, sequence, self._branches)
        except DecodeError as exc:
            number = line_number(view.path, offset)
            error = corrupt_line(view.path, number, str(exc), sequence, offset)
            self._seal(view.path, error, sequence, offset)
            raise error from None

    def _seal(self, path: Path, error: DataLossError, sequence: int, offset: int) -> None:
        """Refuse appends to a session a read found a damaged line in (record
        `sequence`, at byte `offset`), from now on and after a restart."""
        stem = path.name[: -len(SUFFIX)]
        with self._lock:
            state = self._states.get(stem)
            if state is not None and state.path == path and state.sealed is None:
                state.sealed = error
        self._index.distrust(stem, offset, sequence - 1)

    def _head_from_index(self, stem: str) -> EventRecord | None:
        """The last record, read backwards from the end, when the index vouches for the file.

        None (use the full path) unless the file is exactly as last indexed and its
        last line is a whole record that does not end a batch cut short.
        """
        path = self._path(stem)
        indexed = self._index.indexed(stem)
        if indexed is None or indexed.records == 0:
            return None
        try:
            with path.open("rb") as file:
                if os.fstat(file.fileno()).st_ino != indexed.inode:
                    return None
                if file.seek(0, os.SEEK_END) != indexed.size:
                    return None
                line = last_line(file, indexed.size)
        except OSError:
            return None
        if line is None:
            return None
        try:
            obj = orjson.loads(line)
            batch_end = obj.get("batch_end")
            if isinstance(batch_end, int) and batch_end > indexed.records:
                return None
            record = record_from_line(line, indexed.records, self._branches)
        except (orjson.JSONDecodeError, DecodeError, AttributeError):
            return None
        if len(line) <= KEPT_LINE_BYTES:  # the next Head answers from memory
            with self._lock:
                known = LastRecord(indexed.records, line=line)
                self._heads[stem] = ((indexed.inode, indexed.size), known)
                self._heads.move_to_end(stem)
                while len(self._heads) > HEADS:
                    self._heads.popitem(last=False)
        return record

    def read_stored(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[StoredRecord]:
        """The records up to the first that does not parse (a copy takes those, then
        is told, reading on from there, which line is damaged)."""
        stem = self._stem_to_read(session_id, branch_id)
        if stem is None:
            return []
        view = self._view(stem)
        first = max(from_sequence, 1)
        found: list[StoredRecord] = []
        last = min(view.count, first + limit - 1)
        for sequence, lines in self._lines(view, first, last, None):
            for number, line in enumerate(lines, sequence):
                try:
                    found.append(stored_from_line(line, number, self._branches))
                except DecodeError as exc:
                    if found:
                        return found
                    offset = self._offset_of(view, number)
                    error = corrupt_line(
                        view.path, line_number(view.path, offset), str(exc), number, offset
                    )
                    self._seal(view.path, error, number, offset)
                    raise error from None
        return found

    def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        stem = self._stem_to_read(session_id, branch_id)
        if stem is None:
            return []
        view = self._view(stem)
        first = max(from_sequence, 1)
        for run in self._forward(view, first, min(view.count, first + limit - 1), self._records):
            return run  # the first run: at most MESSAGE_RECORDS, and MESSAGE_BYTES
        return []

    def read_feed_runs(self, from_position: int) -> Iterator[list[FeedItem]]:
        check_count(from_position, "from_position")
        return self._read_feed_runs(max(from_position, 1))

    def _read_feed_runs(self, position: int) -> Iterator[list[FeedItem]]:
        """The feed from `position`: each entry's records read from its session file,
        gathered into runs of at most MESSAGE_RECORDS items and MESSAGE_BYTES (unless one
        record is larger). A session that cannot be read is that session's loss alone:
        its positions become a FeedGap and the feed goes on."""
        pending: list[FeedItem] = []
        size = 0
        feed = self._feed
        for entry_position, stem, sequence, count, offset in feed.entries_from(position):
            if not stem:
                continue  # a gap
            if offset == MARKER:
                session_id, branch_id, time_ns = feed.markers[entry_position]
                pending.append(
                    SessionDeleted(entry_position, session_id, branch_id, sequence, time_ns)
                )
                continue
            if feed.dead(entry_position, stem):
                continue  # deleted
            skip = max(position - entry_position, 0)
            first, last = sequence + skip, sequence + count - 1
            shift = entry_position - sequence  # a record's position less its sequence
            delivered = first - 1
            try:
                view = self._view(stem)
                if view.count < last:
                    raise missing_records(view.path, view.count, last)
                start = (offset, sequence) if offset >= 0 else None
                for run, run_size in self._forward_sized(view, first, last, self._records, start):
                    if pending and (
                        len(pending) + len(run) > MESSAGE_RECORDS or size + run_size > MESSAGE_BYTES
                    ):
                        yield pending
                        pending, size = [], 0
                    if feed.dead(entry_position, stem):
                        break  # deleted while read: what was read may be a new file's
                    pending += [FeedRecord(shift + record.sequence, record) for record in run]
                    size += run_size
                    delivered = run[-1].sequence
            except DataLossError as exc:
                if not feed.dead(entry_position, stem):
                    pending.append(self._gap(shift + delivered + 1, shift + last, stem, exc))
            if len(pending) >= MESSAGE_RECORDS:
                yield pending
                pending, size = [], 0
        if pending:
            yield pending

    def _gap(self, first: int, last: int, stem: str, error: DataLossError) -> FeedGap:
        """What the feed says in place of records it could not read; logged once a
        session and reason, counted every time."""
        reason = error.reason or "DATA_LOSS"
        metrics.FEED_UNDELIVERED.labels(reason=reason).inc(last - first + 1)
        session_id, branch_id = self._place_of(stem) or (stem, MAIN)
        if (stem, reason) not in self._reported_gaps:
            self._reported_gaps.add((stem, reason))
            log.error(
                "the all-sessions feed skips positions %d to %d (session %s): %s",
                first,
                last,
                _rules.named(session_id, branch_id),
                error.message,
            )
        return FeedGap(first, last, session_id, reason, error.message, branch_id)

    def last_position(self) -> int:
        with self._lock:
            return self._feed.last_position

    def figures(self) -> StoreFigures:
        with self._lock:
            return StoreFigures(
                feed_head=self._feed.last_position,
                cached_sessions=len(self._states),
                open_files=len(self._files),
            )


def _runs(blocks: Iterator[tuple[int, list[bytes]]]) -> Iterator[tuple[int, list[bytes]]]:
    """Blocks of lines regrouped into runs of at most MESSAGE_RECORDS lines and
    (unless one line is larger) MESSAGE_BYTES."""
    pending: list[bytes] = []
    first = 0
    for sequence, lines in blocks:
        if not pending:
            first = sequence
        pending.extend(lines)
        while len(pending) >= MESSAGE_RECORDS:
            run = pending[:MESSAGE_RECORDS]
            del pending[:MESSAGE_RECORDS]
            yield from _by_size(first, run)
            first += len(run)
    if pending:
        yield from _by_size(first, pending)


def _by_size(first: int, lines: list[bytes]) -> Iterator[tuple[int, list[bytes]]]:
    if sum(map(len, lines)) <= MESSAGE_BYTES:
        yield first, lines
        return
    start, size = 0, 0
    for index, line in enumerate(lines):
        if index > start and size + len(line) > MESSAGE_BYTES:
            yield first + start, lines[start:index]
            start, size = index, 0
        size += len(line)
    yield first + start, lines[start:]
