"""The JSONL SessionRepository: arcan's on-disk format, one file per session.

`<root>/<session_id>.jsonl` holds one arcan EventRecord per line. A directory
written by arcan is served as it is, and every line appended here is a line
arcan reads; agentlog adds the field `sequence`, which arcan's readers ignore.
A record's sequence is its position among the file's non-blank lines, so
lines arcan appends without the field fit in.

Each session has a lock and, once touched, an in-memory state: its last
sequence, the byte offset of every record, and its ids with a digest of their
content (for idempotent appends). The state is rebuilt whenever the file
changed behind our back (another writer, an operator's repair). An append or
a batch is written with one O_APPEND write of whole lines and synced to disk
before it is acknowledged; a failed write is cut back off. Appends that arrive
together are committed as a group (`commit`): each is decided and written in
turn, then all are synced in one round. If a sync fails, the group's lines are
cut off and the store takes no more appends until it is reopened: the kernel
may have dropped written pages, and only start-up recovery can say which.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from agentlog._codec import (
    DecodeError,
    event_to_json,
    record_fields_from_line,
    record_fields_from_lines,
    record_from_json,
    record_from_line,
    record_line,
)
from agentlog._events import ReadDirection
from agentlog._records import (
    EventRecord,
    FeedRecord,
    SessionInfo,
    SessionPage,
    format_timestamp,
    parse_timestamp,
)
from agentlog._validation import (
    check_count,
    check_page_size,
    check_record_id,
    check_session_id,
)
from agentlog.errors import (
    AgentlogError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from agentlog.server import _semantics
from agentlog.server._durability import Syncer, SyncPolicy, fsync_path
from agentlog.server._index import StoreIndex
from agentlog.server._semantics import MESSAGE_BYTES, MESSAGE_RECORDS, PendingAppend, Prepared

log = logging.getLogger("agentlog.server")

SUFFIX = ".jsonl"
# Sessions whose state (record offsets: 8 bytes a record) is kept in memory.
MAX_CACHED_SESSIONS = 4096
# ... and at most this many record offsets in all (128 MB), however long the sessions.
MAX_CACHED_OFFSETS = 16_000_000
# Feed entries read at a time.
_READ_CHUNK = 256
T = TypeVar("T")
# Turns one line (file, bytes, sequence, byte offset) into a record or a message.
_Decoder = Callable[[Path, bytes, int, int], T]


@dataclass
class _Session:
    """What is known of one session file, valid while the file's identity is unchanged."""

    identity: tuple[int, int, int] = (0, 0, 0)  # inode, size, mtime_ns
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    """Byte offset of each record's line, by sequence - 1; plus the end of the last line."""
    first_timestamp_ns: int = 0
    last_timestamp_ns: int = 0
    head_id: str = ""
    damage: DataLossError | None = None
    """Why the file cannot be read past its last good record, if it cannot."""
    started_here: bool = False
    """Whether agentlog wrote the first record (it states its sequence): then every
    record belongs in the feed, even if a crash kept the first from it."""

    @property
    def last_sequence(self) -> int:
        return len(self.offsets) - 1


class JsonlSessionRepository(_semantics.Store):
    """Sessions as arcan JSONL files under one directory.

    `sync` says when appends reach the disk (`agentlog.server.SyncPolicy`):
    "always" (the default; an append returns once durable, concurrent appends
    sharing fsyncs), "interval" (synced every `sync_interval_ms`), or "never".
    True and False mean "always" and "never".
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sync: SyncPolicy | str | bool = SyncPolicy.ALWAYS,
        sync_interval_ms: int = 100,
    ) -> None:
        super().__init__()
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
        self._directory_lock = _lock_directory(self.root)
        if isinstance(sync, bool):
            sync = SyncPolicy.ALWAYS if sync else SyncPolicy.NEVER
        try:
            self.sync_policy = SyncPolicy(sync)
        except ValueError:
            self.close()
            raise InvalidArgumentError(
                f"sync must be one of {', '.join(SyncPolicy)}, not {sync!r}", field="sync"
            ) from None
        self._syncer = Syncer(self.sync_policy, sync_interval_ms)
        self._halted: AgentlogError | None = None
        self._catalog: list[str] | None = None
        self._catalog_mtime = -1
        self._guard = threading.Lock()
        self.recovered = self._recover_tails()
        self._feed = _Feed(self.root / FEED_FILE)
        clean = self.root / CLEAN_FILE
        if clean.exists():
            # Closed cleanly: everything was synced, the feed matches the files.
            clean.unlink()
            fsync_path(self.root)
        else:
            self._feed.cut_beyond(self._record_counts())
        self._index = StoreIndex(self.root)
        present = self._sessions_in_order()
        self._index.forget_missing(set(present))
        for session_id in present:
            self._index.catch_up(session_id, self._path(session_id))
        self._locks: dict[str, threading.Lock] = {}
        # The states of the sessions used most recently; an evicted one is rebuilt
        # from its file when next needed, so memory stays bounded.
        self._states: OrderedDict[str, _Session] = OrderedDict()
        self._held_offsets = 0  # in all those states
        self.max_cached_sessions = MAX_CACHED_SESSIONS
        self.max_cached_offsets = MAX_CACHED_OFFSETS

    # --- writing ---

    def _append(
        self, session_id: str, batch: list[Prepared], expected: int | None
    ) -> tuple[list[EventRecord], int | None]:
        [outcome] = self._commit([PendingAppend(session_id, batch, expected)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _commit(self, appends: Sequence[PendingAppend]) -> list[_semantics.Outcome]:
        # Appends are written one after another, each under its session's lock,
        # then synced and indexed together: one sync round and one index
        # transaction for the group. The locks are held until the group is
        # durable, so nobody reads or extends a session past unacknowledged lines.
        outcomes: list[_semantics.Outcome | None] = [None] * len(appends)
        group = _Group(self._holders(appends))
        try:
            for index, append in enumerate(appends):
                if group.locks and not group.admits(append, self._lock(append.session_id)):
                    self._finish(group, outcomes)
                    # The index has the finished group's ids now.
                    group = _Group(self._holders(appends[index:]))
                try:
                    outcomes[index] = self._stage(group, index, append)
                except Exception as exc:  # this append fails alone
                    outcomes[index] = exc
        except BaseException:
            self._abandon(group)
            group.release()
            raise
        self._finish(group, outcomes)
        assert all(outcome is not None for outcome in outcomes)
        return outcomes  # type: ignore[return-value]

    def _holders(self, appends: Sequence[PendingAppend]) -> dict[str, list[tuple[str, int]]]:
        """Every id of `appends` the store holds: id -> [(session, sequence)], in one query."""
        holders: dict[str, list[tuple[str, int]]] = {}
        ids = [item.id for append in appends for item in append.batch]
        for record_id, session_id, sequence in self._index.holders(ids):
            holders.setdefault(record_id, []).append((session_id, int(sequence)))
        return holders

    def _stage(self, group: _Group, index: int, append: PendingAppend) -> _semantics.Outcome | None:
        """Decide one append and write its lines (not yet synced); None once written.

        A retry or a refused append is decided here and gets its outcome at once.
        """
        if self._halted is not None:
            raise self._halted
        session_id, batch = append.session_id, append.batch
        staged = group.sessions.get(session_id)
        if staged is None:
            if session_id not in group.locks:
                lock = self._lock(session_id)
                lock.acquire()
                group.locks[session_id] = lock
            staged = _Staged(self._path(session_id), self._state(session_id))
            group.sessions[session_id] = staged
        path, state = staged.path, staged.state
        if state.damage is not None:
            raise state.damage  # never append after damage: it would bury it
        last = staged.last

        known: dict[str, int] = {}
        taken: dict[str, str] = {}
        for item in batch:
            for holder, sequence in group.holders.get(item.id, ()):
                if holder == session_id:
                    known[item.id] = sequence
                else:
                    taken[item.id] = holder

        def stored(record_id: str) -> tuple[int, bytes] | None:
            # Rare (a retry or a reused id): compare with the record itself.
            # (Ids written earlier in this group are never here: see _Group.admits.)
            sequence = known.get(record_id)
            if sequence is None or sequence > state.last_sequence:
                return None
            [record] = self._records_at(path, state, [sequence])
            event_json = event_to_json(record.event)
            return sequence, _semantics.content_digest(record.parent_id, event_json)

        retried = _semantics.check_append(
            session_id, batch, append.expected, last, stored=stored, elsewhere=lambda ids: taken
        )
        if retried is not None:
            # A retry. If the first attempt stopped between the session file
            # and the feed (a crash), the feed learns of its records now.
            self._feed_catch_up(session_id, state)
            return self._records_at(path, state, retried), None
        # Lines of a multi-event batch name the batch's last sequence, so a
        # batch cut short by a crash is recognised and never served in part.
        batch_end = last + len(batch) if len(batch) > 1 else None
        # One timestamp for the whole batch: it is one commit.
        timestamp_ns = time.time_ns()
        timestamp = format_timestamp(timestamp_ns)
        records = _semantics.new_records(session_id, batch, last, timestamp_ns)
        lines = []
        for item, record in zip(batch, records, strict=True):
            fields: dict[str, Any] = {
                "id": item.id,
                "session_id": session_id,
                "parent_id": item.parent_id,
                "timestamp": timestamp,
                "event": item.event_json,
                "sequence": record.sequence,
            }
            if batch_end is not None:
                fields["batch_end"] = batch_end
            lines.append(record_line(fields))
        identity = self._write(path, b"".join(lines), staged.size)
        staged.add([len(line) for line in lines], identity)
        group.appended.append((index, session_id, records))
        group.ids.update(item.id for item in batch)
        return None

    def _finish(self, group: _Group, outcomes: list[_semantics.Outcome | None]) -> None:
        """Make a group's written lines durable and indexed, then acknowledge them."""
        written = {sid: s for sid, s in group.sessions.items() if s.lengths}
        try:
            if not written:
                return
            try:
                # The group's appends take their feed positions in the group's order.
                position = self._feed.commit(
                    [(sid, records[0].sequence, len(records)) for _, sid, records in group.appended]
                )
            except AgentlogError as exc:  # a full disk, say: these appends fail, later ones may not
                self._abandon(group)
                for index, _, _ in group.appended:
                    outcomes[index] = exc
                return
            paths = [s.path for s in written.values()] + [self._feed.path]
            if any(s.new_file for s in written.values()):
                paths.append(self.root)
            try:
                # The session lines and the feed lines are synced in one round. If
                # a crash cuts it short, the next (unclean) start drops feed
                # entries naming lines that did not reach the disk.
                self._syncer.sync(*paths)
                rows: dict[str, list[tuple[str, str | None, int]]] = {sid: [] for sid in written}
                for _, sid, records in group.appended:
                    rows[sid].extend((r.id, r.parent_id, r.sequence) for r in records)
                self._index.record([(sid, rows[sid], s.size, s.last) for sid, s in written.items()])
            except Exception as exc:
                self._abandon(group)
                error = self._halt(exc)
                for index, _, _ in group.appended:
                    outcomes[index] = error
                return
            with self._guard:  # the states grow: count their offsets (see _evict)
                for index, sid, records in group.appended:
                    written[sid].acknowledge(records)
                    outcomes[index] = (records, position)
                    position += len(records)
                    if self._states.get(sid) is written[sid].state:
                        self._held_offsets += len(records)
                self._evict()
        except BaseException:
            self._abandon(group)
            raise
        finally:
            group.release()
        for session_id, staged in written.items():
            if staged.new_file:
                self._add_to_catalog(session_id)

    def _abandon(self, group: _Group) -> None:
        """Take a group's unacknowledged lines back off their files."""
        for session_id, staged in group.sessions.items():
            if staged.lengths:
                self._forget_state(session_id)
                with contextlib.suppress(OSError):
                    os.truncate(staged.path, staged.state.offsets[-1])

    def _halt(self, exc: Exception) -> AgentlogError:
        """Refuse appends from now on: a failed sync may have dropped written pages."""
        log.critical(
            "%s: making appended lines durable failed (%s: %s); appends are refused until "
            "the server restarts and its start-up recovery has checked the files",
            self.root,
            type(exc).__name__,
            exc,
        )
        self._halted = UnavailableError(
            f"this server stopped taking appends: making them durable in {self.root} failed "
            f"({exc}); restart it (its start-up recovery checks every file), then retry",
            reason="STORAGE_HALTED",
        )
        return self._halted

    def _recover_tails(self) -> list[Path]:
        """Cut torn last lines and batches cut short off every session file (at open).

        The cut bytes are kept in `.agentlog-recovered/` for inspection. Returns
        the side files written.
        """
        kept = []
        for session_id in self._sessions_in_order():
            path = self._path(session_id)
            cut, why = _torn_tail(path)
            if cut is None:
                continue
            side_dir = self.root / RECOVERED_DIR
            side_dir.mkdir(exist_ok=True)
            side = side_dir / f"{path.name}.{cut}"
            with path.open("rb") as file:
                file.seek(cut)
                side.write_bytes(file.read())
            fsync_path(side)
            os.truncate(path, cut)
            fsync_path(path)
            fsync_path(side_dir)
            log.warning(
                "%s: cut %s at byte offset %d off the file (never acknowledged); "
                "the bytes are kept in %s",
                path,
                why,
                cut,
                side,
            )
            kept.append(side)
        return kept

    def _record_counts(self) -> dict[str, int]:
        """How many records each session file holds now (read once, at open)."""
        counts = {}
        for session_id in self._sessions_in_order():
            with self._path(session_id).open("rb") as file:
                counts[session_id] = sum(1 for line in file if line.strip())
        return counts

    def _feed_catch_up(self, session_id: str, state: _Session) -> None:
        """Give feed positions to records of a feed session that the feed lacks.

        A session is in the feed once the feed knows it or if agentlog started it
        (sessions only arcan wrote are not): a crash between a group's session
        lines and its feed lines can leave a new session's first append out.
        """
        covered = self._feed.covered(session_id)
        known = covered > 0 or state.started_here
        if known and covered < state.last_sequence and state.damage is None:
            self._feed.commit([(session_id, covered + 1, state.last_sequence - covered)])
            self._syncer.sync(self._feed.path)

    def _write(self, path: Path, data: bytes, expected_size: int) -> tuple[int, int, int]:
        """Append `data` whole or not at all; returns the file's new identity."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _storage_error(exc, path) from None
        try:
            size = os.fstat(fd).st_size
            if size != expected_size:
                # Changed between our check and now: let the caller see it next time.
                raise DataLossError(
                    f"{path} changed while agentlog was appending to it; retry the append",
                    reason="CONCURRENT_WRITER",
                    metadata={"file": str(path)},
                )
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # never leave part of an append behind
                raise _storage_error(exc, path) from None
            stat = os.fstat(fd)
        finally:
            os.close(fd)
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns)

    # --- reading ---

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[EventRecord]:
        chunks = self._read(session_id, from_sequence, limit, direction, _decode)
        return itertools.chain.from_iterable(chunks)

    def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[list[Any]]:
        # Straight from each line's JSON to the message's fields, in chunks
        # bounded by the lines' sizes: no Python records or messages between.
        return self._read(session_id, from_sequence, limit, direction, _decode_fields)

    def _read(
        self,
        session_id: str,
        from_sequence: int,
        limit: int | None,
        direction: ReadDirection,
        decode: _Decoder[T],
    ) -> Iterator[list[T]]:
        check_session_id(session_id)
        selected = _semantics.read_range(from_sequence, limit, direction)
        path = self._path(session_id)
        with self._lock(session_id):
            state = self._state(session_id)
            if state.damage is not None:
                raise state.damage
            # A snapshot: appends made while the caller iterates are not part of this read.
            sequences = selected.sequences(state.last_sequence)
            window = _window(state, sequences)
        return self._stream_chunks(path, window, sequences, decode)

    def _stream(
        self,
        path: Path,
        window: _Offsets,
        sequences: range,
        decode: _Decoder[T],
    ) -> Iterator[T]:
        return itertools.chain.from_iterable(self._stream_chunks(path, window, sequences, decode))

    def _stream_chunks(
        self,
        path: Path,
        window: _Offsets,
        sequences: range,
        decode: _Decoder[T],
    ) -> Iterator[list[T]]:
        """The records of `sequences`, in their order, in lists of at most
        MESSAGE_RECORDS records and (unless one record is larger) MESSAGE_BYTES of lines."""
        if not sequences:
            return
        try:
            file = path.open("rb")
        except OSError as exc:
            raise _storage_error(exc, path) from None
        with file:
            step = sequences.step
            for start in range(0, len(sequences), MESSAGE_RECORDS):
                chunk = sequences[start : start + MESSAGE_RECORDS]
                low, high = min(chunk[0], chunk[-1]), max(chunk[0], chunk[-1])
                file.seek(window.start(low))
                data = file.read(window.end(high) - window.start(low))
                if len(data) <= MESSAGE_BYTES:
                    records = _parse_span(path, data, low, high, window, decode=decode)
                    yield records if step > 0 else records[::-1]
                    continue
                base, size = window.start(low), 0
                run: list[T] = []
                for sequence in chunk:
                    begin, end = window.start(sequence) - base, window.end(sequence) - base
                    if run and size + end - begin > MESSAGE_BYTES:
                        yield run
                        run, size = [], 0
                    run.append(decode(path, data[begin:end], sequence, begin + base))
                    size += end - begin
                if run:
                    yield run

    def head(self, session_id: str) -> EventRecord | None:
        check_session_id(session_id)
        path = self._path(session_id)
        with self._lock(session_id):
            with self._guard:
                cached = session_id in self._states
            if not cached:
                # Without the session's state at hand, read only the last line.
                found = self._head_from_index(session_id, path)
                if found is not None:
                    return found
            state = self._state(session_id)
            if state.damage is not None:
                raise state.damage
            if state.last_sequence == 0:
                return None
            return self._records_at(path, state, [state.last_sequence])[0]

    def _head_from_index(self, session_id: str, path: Path) -> EventRecord | None:
        """The last record, read backwards from the end, when the index vouches for the file.

        None (use the full path) unless the file is exactly as last indexed and its
        last line is a whole record that does not end a batch cut short.
        """
        indexed = self._index.indexed(session_id)
        if indexed is None or indexed[1] == 0:
            return None
        size, count = indexed
        try:
            with path.open("rb") as file:
                if file.seek(0, os.SEEK_END) != size:
                    return None
                line = _last_line(file, size)
        except OSError:
            return None
        if line is None:
            return None
        try:
            obj = orjson.loads(line)
            batch_end = obj.get("batch_end")
            if isinstance(batch_end, int) and batch_end > count:
                return None
            return record_from_json(obj, count)
        except (orjson.JSONDecodeError, DecodeError, AttributeError):
            return None

    def _records_at(self, path: Path, state: _Session, sequences: list[int]) -> list[EventRecord]:
        wanted = range(sequences[0], sequences[-1] + 1)
        return list(self._stream(path, _window(state, wanted), wanted, _decode))

    def read_all(self, from_position: int, limit: int | None = None) -> Iterator[FeedRecord]:
        check_count(from_position, "from_position")
        if limit is not None:
            check_count(limit, "limit", minimum=1)
        return self._read_all(max(from_position, 1), limit)

    def _read_all(self, position: int, limit: int | None) -> Iterator[FeedRecord]:
        remaining = limit
        for entry_position, session_id, sequence, count in self._feed.entries_from(position):
            if not session_id:
                continue  # a gap
            skip = max(position - entry_position, 0)
            first, last = sequence + skip, sequence + count - 1
            if remaining is not None:
                last = min(last, first + remaining - 1)
            path = self._path(session_id)
            with self._lock(session_id):
                state = self._state(session_id)
                if state.damage is not None:
                    raise state.damage
                wanted = range(first, min(last, state.last_sequence) + 1)
                window = _window(state, wanted)
            for record in self._stream(path, window, wanted, _decode):
                yield FeedRecord(entry_position + record.sequence - sequence, record)
            if remaining is not None:
                remaining -= len(wanted)
                if remaining <= 0:
                    return

    def last_position(self) -> int:
        return self._feed.last_position

    def load_children(self, parent_id: str) -> list[EventRecord]:
        check_record_id(parent_id, "parent_id")
        children: list[EventRecord] = []
        for session_id, sequence in self._index.children(parent_id):
            path = self._path(session_id)
            with self._lock(session_id):
                state = self._state(session_id)
                if sequence > state.last_sequence:
                    continue  # the index ran ahead of a file cut since: nothing to serve
                wanted = range(sequence, sequence + 1)
                window = _window(state, wanted)
            for record in self._stream(path, window, wanted, _decode):
                if record.parent_id == parent_id:
                    children.append(record)
        return children

    def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        size = check_page_size(page_size)
        after = _semantics.decode_page_token(page_token)
        catalog = self._sessions_in_order()
        start = 0 if after is None else bisect.bisect_right(catalog, after.encode(), key=str.encode)
        infos: list[SessionInfo] = []
        index = start
        while index < len(catalog) and len(infos) < size:
            session_id = catalog[index]
            index += 1
            with self._lock(session_id):
                state = self._state(session_id)
                if state.last_sequence == 0:
                    continue  # an empty or vanished file is no session
                infos.append(
                    SessionInfo(
                        session_id=session_id,
                        event_count=state.last_sequence,
                        first_timestamp_ns=state.first_timestamp_ns,
                        last_timestamp_ns=state.last_timestamp_ns,
                        head_id=state.head_id,
                    )
                )
        more = index < len(catalog)
        token = _semantics.encode_page_token(catalog[index - 1]) if more and infos else None
        return SessionPage(sessions=infos, next_page_token=token)

    def session_ids(self) -> list[str]:
        """Ids of the sessions that have a file, in byte order."""
        return list(self._sessions_in_order())

    def close(self) -> None:
        """Release the data directory for another process. Idempotent."""
        fd, self._directory_lock = self._directory_lock, -1
        if fd >= 0:
            if hasattr(self, "_index"):
                self._syncer.close()
                self._feed.close()
                self._index.close()
                if self._halted is not None:
                    os.close(fd)  # not a clean stop: the next open checks everything
                    return
                # Everything is synced: the next open may skip checking the feed.
                clean = self.root / CLEAN_FILE
                try:
                    clean.write_bytes(b"")
                    fsync_path(clean)
                    fsync_path(self.root)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        clean.unlink(missing_ok=True)  # the next open checks instead
                    log.warning("%s: could not record a clean stop: %s", self.root, exc)
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> JsonlSessionRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A repository dropped without close() must not keep the directory locked.
        if getattr(self, "_directory_lock", -1) >= 0:
            self.close()

    # --- state ---

    def _state(self, session_id: str) -> _Session:
        """The session's state, rebuilt if its file changed since last seen. Hold its lock."""
        path = self._path(session_id)
        try:
            stat = os.stat(path)
            identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            identity = (0, 0, 0)
        except OSError as exc:
            raise _storage_error(exc, path) from None
        with self._guard:
            state = self._states.get(session_id)
            if state is not None:
                self._states.move_to_end(session_id)
        if state is None or state.identity != identity:
            state = _load_state(path, identity)
            with self._guard:
                replaced = self._states.pop(session_id, None)
                if replaced is not None:
                    self._held_offsets -= len(replaced.offsets)
                self._states[session_id] = state
                self._held_offsets += len(state.offsets)
                self._evict()
            self._index.catch_up(session_id, path)
            # Records the feed lacks: an append cut short by a crash, or lines
            # another writer (arcan) added to a session agentlog writes.
            self._feed_catch_up(session_id, state)
        return state

    def _evict(self) -> None:
        """Drop the least recently used states beyond the limits. Hold the guard.

        A thread using an evicted state still holds it; the next use rebuilds
        it (under that session's lock). The newest state always stays.
        """
        states = self._states
        while len(states) > 1 and (
            len(states) > self.max_cached_sessions or self._held_offsets > self.max_cached_offsets
        ):
            self._held_offsets -= len(states.popitem(last=False)[1].offsets)

    def _forget_state(self, session_id: str) -> None:
        with self._guard:
            forgotten = self._states.pop(session_id, None)
            if forgotten is not None:
                self._held_offsets -= len(forgotten.offsets)

    def _sessions_in_order(self) -> list[str]:
        mtime = os.stat(self.root).st_mtime_ns
        with self._guard:
            if self._catalog is None or mtime != self._catalog_mtime:
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
                self._catalog = sorted(ids, key=str.encode)
                self._catalog_mtime = mtime
            return self._catalog

    def _add_to_catalog(self, session_id: str) -> None:
        with self._guard:
            if self._catalog is not None:
                index = bisect.bisect_left(self._catalog, session_id.encode(), key=str.encode)
                if index == len(self._catalog) or self._catalog[index] != session_id:
                    self._catalog.insert(index, session_id)
                self._catalog_mtime = os.stat(self.root).st_mtime_ns

    def _path(self, session_id: str) -> Path:
        # check_session_id has refused separators, NUL and dot-names, so this
        # is always a direct child of root.
        return self.root / f"{session_id}{SUFFIX}"

    def _lock(self, session_id: str) -> threading.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            with self._guard:
                lock = self._locks.setdefault(session_id, threading.Lock())
        return lock


LOCK_FILE = ".agentlog.lock"


def _lock_directory(root: Path) -> int:
    """Take the data directory for this process (flock), or say who has it."""
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FailedPreconditionError(
            f"the data directory {root} is in use by another agentlog process (pid {holder}); "
            "one process may write a data directory at a time. Stop it, or use another "
            "--data-dir.",
            reason="DATA_DIR_LOCKED",
            metadata={"pid": holder},
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_LOAD_BLOCK = 4 << 20
_NEWLINE = re.compile(b"\n")


def _load_state(path: Path, identity: tuple[int, int, int]) -> _Session:
    """Read a session file once, a block at a time, finding where each record starts.

    Only the first and last records are parsed (for the timestamps and the
    head, and to see whether the file ends inside a batch); a damaged line in
    the middle is reported when it is read.
    """
    state = _Session(identity=identity)
    if identity == (0, 0, 0):
        state.offsets.append(0)
        return state
    offsets = state.offsets
    try:
        with path.open("rb") as file:
            carry, base = b"", 0  # bytes of an unfinished line, and their file offset
            while block := file.read(_LOAD_BLOCK):
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
            if carry.strip():
                state.damage = DataLossError(
                    f"{path}, line {_line_number(path, base)}: an incomplete last line (no "
                    f"newline) starts at byte offset {base}; the session cannot be read or "
                    "appended to until it is repaired",
                    reason="TORN_LAST_LINE",
                    metadata={"file": str(path), "offset": str(base)},
                )
            end = _check_tail(path, file, state, end)
    except FileNotFoundError:
        state = _Session()
        state.offsets.append(0)
        return state
    except OSError as exc:
        raise _storage_error(exc, path) from None
    offsets.append(end)
    return state


def _read_record_line(file: BinaryIO, offsets: array[int], index: int, end: int) -> Any:
    """The parsed JSON of record `index` (0-based); raises on damage."""
    file.seek(offsets[index])
    stop = offsets[index + 1] if index + 1 < len(offsets) else end
    return orjson.loads(file.read(stop - offsets[index]))


def _check_tail(path: Path, file: BinaryIO, state: _Session, end: int) -> int:
    """Head and timestamps from the first and last records, and a batch cut short.

    Returns where the readable records end.
    """
    offsets = state.offsets
    count = len(offsets)
    if count == 0:
        return end
    try:
        last = _read_record_line(file, offsets, count - 1, end)
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
            state.damage = DataLossError(
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
            end = cut
        state.first_timestamp_ns = parse_timestamp(first["timestamp"])
        state.started_here = "sequence" in first
        state.last_timestamp_ns = parse_timestamp(last["timestamp"])
        state.head_id = str(last["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        # The head itself is damaged: reads stop before it.
        offset = offsets.pop()
        if state.damage is None:
            state.damage = _damage(path, _line_number(path, offset), f"{type(exc).__name__}: {exc}")
        return offset
    return end


def _last_line(file: BinaryIO, size: int) -> bytes | None:
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


def _line_number(path: Path, offset: int) -> int:
    """The line number of the line starting at `offset` (on the error path only)."""
    lines = 1
    with path.open("rb") as file:
        remaining = offset
        while remaining > 0 and (block := file.read(min(_LOAD_BLOCK, remaining))):
            lines += block.count(b"\n")
            remaining -= len(block)
    return lines


def _parse_span(
    path: Path, data: bytes, first: int, last: int, window: _Offsets, *, decode: _Decoder[T]
) -> list[T]:
    """The records `first` to `last` from `data`, the file's bytes from record `first` on."""
    if decode is _decode_fields:
        lines = data.split(b"\n")
        if len(lines) == last - first + 2:  # no blank lines between: one line a record
            try:
                del lines[-1]
                return record_fields_from_lines(lines, first)  # type: ignore[return-value]
            except DecodeError:
                pass  # the line by line path says where
    base = window.start(first)
    return [
        decode(path, data[window.start(s) - base : window.end(s) - base], s, window.start(s))
        for s in range(first, last + 1)
    ]


@dataclass
class _Staged:
    """A session's part of a group: lines written to its file, not yet durable."""

    path: Path
    state: _Session
    lengths: list[int] = field(default_factory=list)
    """Of each line written, in order."""
    identity: tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self) -> None:
        self.last = self.state.last_sequence
        self.size = self.state.offsets[-1]
        self.new_file = self.last == 0 and self.state.identity == (0, 0, 0)
        self._acknowledged = 0

    def add(self, lengths: list[int], identity: tuple[int, int, int]) -> None:
        self.lengths.extend(lengths)
        self.last += len(lengths)
        self.size += sum(lengths)
        self.identity = identity

    def acknowledge(self, records: list[EventRecord]) -> None:
        """Make the next written records part of the session's state (in write order)."""
        state = self.state
        offset = state.offsets.pop()
        for length in self.lengths[self._acknowledged : self._acknowledged + len(records)]:
            state.offsets.append(offset)
            offset += length
        state.offsets.append(offset)
        self._acknowledged += len(records)
        if records[0].sequence == 1:
            state.first_timestamp_ns = records[0].timestamp_ns
        state.last_timestamp_ns = records[-1].timestamp_ns
        state.head_id = records[-1].id
        if self._acknowledged == len(self.lengths):
            state.identity = self.identity


@dataclass
class _Group:
    """Appends written together and made durable by one sync round."""

    holders: dict[str, list[tuple[str, int]]]
    """Where the store holds ids of the appends (fetched in one query)."""
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    sessions: dict[str, _Staged] = field(default_factory=dict)
    appended: list[tuple[int, str, list[EventRecord]]] = field(default_factory=list)
    """(index in the appends, session, records) of each append written, in order."""
    ids: set[str] = field(default_factory=set)

    def admits(self, append: PendingAppend, lock: threading.Lock) -> bool:
        """Whether `append` can join: False ends the group first.

        It cannot if it names an id written in the group (a retry must see the
        first attempt stored), or if its session's lock is busy: waiting for it
        while holding others could deadlock.
        """
        if any(item.id in self.ids for item in append.batch):
            return False
        if append.session_id in self.locks:
            return True
        if not lock.acquire(blocking=False):
            return False
        self.locks[append.session_id] = lock
        return True

    def release(self) -> None:
        for lock in self.locks.values():
            lock.release()
        self.locks.clear()


@dataclass(frozen=True, slots=True)
class _Offsets:
    """Where records `first`.. start in a file; the last entry is where the last one ends."""

    first: int
    offsets: array[int]

    def start(self, sequence: int) -> int:
        return self.offsets[sequence - self.first]

    def end(self, sequence: int) -> int:
        return self.offsets[sequence - self.first + 1]


def _window(state: _Session, sequences: range) -> _Offsets:
    """A copy of just the offsets a read of `sequences` needs (reads run without the lock)."""
    if not sequences:
        return _Offsets(1, array("Q"))
    low, high = min(sequences[0], sequences[-1]), max(sequences[0], sequences[-1])
    return _Offsets(low, state.offsets[low - 1 : high + 1])


FEED_FILE = ".agentlog.feed"
RECOVERED_DIR = ".agentlog-recovered"
CLEAN_FILE = ".agentlog.clean"
_TAIL_BLOCK = 1 << 12


def _torn_tail(path: Path) -> tuple[int | None, str]:
    """Where a file's unfinished tail starts (None: it has none) and what it is."""
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        if size == 0:
            return None, ""
        start = max(size - _TAIL_BLOCK, 0)
        file.seek(start)
        tail = file.read()
        while not tail.rstrip(b" \t\r").endswith(b"\n") and b"\n" not in tail and start > 0:
            start = max(start - _TAIL_BLOCK, 0)  # a long torn line: find where it starts
            file.seek(start)
            tail = file.read()
        if not tail.endswith(b"\n") and tail.strip():
            newline = tail.rfind(b"\n")
            return start + newline + 1, "an incomplete last line"
        # A batch cut short: its last line present names a later batch_end.
        lines = tail.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first may be a fragment of a longer line
        records = [line for line in lines if line.strip()]
        if not records:
            return None, ""
        try:
            last = orjson.loads(records[-1])
            batch_end, sequence = last.get("batch_end"), last.get("sequence")
        except (orjson.JSONDecodeError, AttributeError):
            return None, ""  # a damaged line is reported by reads, not cut
        if not isinstance(batch_end, int) or not isinstance(sequence, int):
            return None, ""
        if batch_end <= sequence:
            return None, ""
        first = sequence - (batch_end - sequence)  # a lower bound; find the batch's first line
        data = path.read_bytes()
        position = len(data)
        for line in reversed(data[:-1].split(b"\n")):
            position -= len(line) + 1
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                break
            if obj.get("batch_end") != batch_end:
                position += len(line) + 1
                break
            if obj.get("sequence", 0) <= first:
                break
        return max(position, 0), f"a batch cut short (sequences up to {batch_end} expected)"


class _Feed:
    """The store's commit log: one line per append, giving every record a global position.

    `<root>/.agentlog.feed` holds `{"position", "session_id", "sequence", "count"}`
    lines: records `sequence`.. of the session hold positions `position`.. in
    commit order. It is written under the session's lock right after the
    session's lines (and synced with them), so feed order keeps every
    session's order. Positions are never reused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.positions = array("Q")
        self.sequences = array("Q")
        self.counts = array("Q")
        self.sessions: list[str] = []
        self._covered: dict[str, int] = {}
        self.last_position = 0
        self._load()
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                entry = orjson.loads(line) if line.endswith(b"\n") else None
                if entry is None or entry["position"] != self.last_position + 1:
                    break
                self._add(entry["position"], entry["session_id"], entry["sequence"], entry["count"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break
            good += len(line)
        if good < len(data):
            # Our own index, cut short by a crash: its tail was never acknowledged.
            log.warning(
                "%s: dropping %d bytes after byte offset %d that are not whole feed entries",
                self.path,
                len(data) - good,
                good,
            )
            os.truncate(self.path, good)

    def _add(self, position: int, session_id: str, sequence: int, count: int) -> None:
        session_id = sys.intern(session_id)
        self.positions.append(position)
        self.sessions.append(session_id)
        self.sequences.append(sequence)
        self.counts.append(count)
        if session_id:  # "" marks a gap: positions dropped after a loss, never reused
            self._covered[session_id] = sequence + count - 1
        self.last_position = position + count - 1

    def commit(self, entries: list[tuple[str, int, int]]) -> int:
        """Give each `(session_id, sequence, count)` the next `count` positions, in order:
        records `sequence`.. of the session. Returns the first position; one write."""
        with self.lock:
            first = position = self.last_position + 1
            lines = []
            for session_id, sequence, count in entries:
                fields = {
                    "position": position,
                    "session_id": session_id,
                    "sequence": sequence,
                    "count": count,
                }
                lines.append(orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE))
                position += count
            size = os.fstat(self.fd).st_size
            try:
                view = memoryview(b"".join(lines))
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, size)
                raise _storage_error(exc, self.path) from None
            position = first
            for session_id, sequence, count in entries:
                self._add(position, session_id, sequence, count)
                position += count
            return first

    def cut_beyond(self, counts: dict[str, int]) -> None:
        """Drop the feed from its first entry naming records a session file does not hold.

        Possible after a power loss under the `interval` or `never` policies: the
        feed line reached the disk, the session's lines did not.
        """
        for index in range(len(self.positions)):
            end = self.sequences[index] + self.counts[index] - 1
            if end > counts.get(self.sessions[index], 0):
                keep = index
                break
        else:
            return
        log.warning(
            "%s: dropping feed entries from position %d on: they name records the session "
            "files do not hold (lost before they reached the disk)",
            self.path,
            self.positions[keep],
        )
        first_dropped, last_dropped = self.positions[keep], self.last_position
        with self.path.open("rb") as file:
            offset = sum(len(file.readline()) for _ in range(keep))
        os.truncate(self.path, offset)
        for column in (self.positions, self.sequences, self.counts):
            del column[keep:]
        del self.sessions[keep:]
        self._covered = {}
        for session_id, sequence, count in zip(
            self.sessions, self.sequences, self.counts, strict=True
        ):
            if session_id:
                self._covered[session_id] = sequence + count - 1
        # A gap entry (no session) keeps the dropped positions from being handed out
        # again: a consumer that stored one must not skip a new record.
        self.last_position = first_dropped - 1
        self.commit([("", 0, last_dropped - first_dropped + 1)])
        fsync_path(self.path)

    def covered(self, session_id: str) -> int:
        """The last sequence of a session that has a position (0: none)."""
        with self.lock:
            return self._covered.get(session_id, 0)

    def entries_from(self, position: int) -> Iterator[tuple[int, str, int, int]]:
        """(position, session_id, sequence, count) of the entries holding `position` on."""
        with self.lock:
            index = max(bisect.bisect_right(self.positions, position) - 1, 0)
            end = len(self.positions)
        while index < end:
            with self.lock:
                batch = [
                    (self.positions[i], self.sessions[i], self.sequences[i], self.counts[i])
                    for i in range(index, min(index + _READ_CHUNK, end))
                ]
            for entry in batch:
                if entry[0] + entry[3] > position:
                    yield entry
            index += len(batch)

    def close(self) -> None:
        os.close(self.fd)


def _damage(path: Path, line_number: int, why: str) -> DataLossError:
    return DataLossError(
        f"{path}, line {line_number}: not an arcan EventRecord ({why}); the session cannot be "
        "read until the line is repaired or removed",
        reason="CORRUPT_LINE",
        metadata={"file": str(path), "line": str(line_number)},
    )


def _decode(path: Path, line: bytes, sequence: int, offset: int) -> EventRecord:
    return _decoded(path, line, sequence, offset, record_from_line)


def _decode_fields(path: Path, line: bytes, sequence: int, offset: int) -> dict[str, Any]:
    return _decoded(path, line, sequence, offset, record_fields_from_line)


def _decoded(
    path: Path, line: bytes, sequence: int, offset: int, decode: Callable[[bytes, int], T]
) -> T:
    # Blank lines may sit between records; they belong to the span of the record before.
    try:
        return decode(line.strip(), sequence)
    except DecodeError as exc:
        number = _line_number(path, offset)
        raise DataLossError(
            f"{path}, line {number} (record {sequence}, byte offset {offset}): not an arcan "
            f"EventRecord ({exc}); the session cannot be read until the line is repaired "
            "or removed",
            reason="CORRUPT_LINE",
            metadata={
                "file": str(path),
                "line": str(number),
                "offset": str(offset),
                "sequence": str(sequence),
            },
        ) from None


def _storage_error(exc: OSError, path: Path) -> AgentlogError:
    """The agentlog error for a failed file operation; re-raises ones it has no status for."""
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
