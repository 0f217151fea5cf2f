"""The JSONL SessionRepository: arcan's on-disk format, one file per session.

`<root>/<session_id>.jsonl` holds one arcan EventRecord per line. A directory
written by arcan is served as it is, and every line appended here is a line
arcan reads; agentlog adds the field `sequence`, which arcan's readers ignore.
A record's sequence is its position among the file's non-blank lines, so
lines arcan appends without the field fit in.

An append is staged, then acknowledged. Staging (under the store's lock, in
arrival order) decides it against the session (retry, id conflicts,
expectation) and writes its lines with one O_APPEND write to a descriptor kept
open, and a feed line. Acknowledging makes it visible to reads and
subscriptions and answers the caller: at once under the `interval` and
`never` policies; under `always`, once a sync thread has made everything staged
so far durable with one sync, so appends that arrive while a sync runs share
the next one (group commit). Reads only ever see acknowledged records. If a
sync fails, every unacknowledged line is cut back off and the store takes no
more appends until it is reopened: the kernel may have dropped written pages,
and only start-up recovery can say which.

Each session used recently has a state in memory: its record count, where its
records end, and the byte offset of every MARK_EVERY-th record (`marks`), so a
read from any sequence seeks. States are built from the index (`_index.py`),
which vouches for a file it has indexed to its end, or else by scanning the
file, and rebuilt whenever the file changed behind the store's back.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import logging
import os
import sqlite3
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeAlias, TypeVar

import orjson

from agentlog._codec import (
    DecodeError,
    event_to_json,
    record_fields_from_line,
    record_fields_from_lines,
    record_from_line,
    record_line,
)
from agentlog._events import ReadDirection
from agentlog._records import (
    EventRecord,
    FeedGap,
    FeedRecord,
    SessionInfo,
    SessionPage,
    format_timestamp,
)
from agentlog._validation import (
    check_count,
    check_page_size,
    check_parent_query,
    check_stored_session_id,
)
from agentlog.errors import (
    AgentlogError,
    DataLossError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from agentlog.server import _rules, metrics
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
    Appended,
    PendingAppend,
    Prepared,
)
from agentlog.server.blocking import BlockingStore, Outcome
from agentlog.server.jsonl.durability import Syncer, SyncPolicy, fsync_path
from agentlog.server.jsonl.feed import FEED_FILE, Entry, Feed
from agentlog.server.jsonl.files import (
    FileScan,
    corrupt_line,
    describe,
    last_line,
    line_number,
    lock_directory,
    open_files_budget,
    page_token_key,
    read_line,
    scan_file,
    storage_error,
    torn_tail,
)
from agentlog.server.jsonl.index import MARK_EVERY, Located, Row, StoreIndex
from agentlog.server.jsonl.keys import key_of

if TYPE_CHECKING:
    from agentlog.server.backend import Backend

log = logging.getLogger("agentlog.server")

Answer: TypeAlias = Appended | Exception
"""What a submitted append is answered (see `JsonlSessionRepository.submit`)."""

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
_MISSING: Identity = (0, 0)
_STALE: Identity = (0, -1)  # matches no file: the state is rebuilt before it is used
# Every byte but the newline as a space: lines to blank out in place.
_BLANKED = bytes(10 if byte == 10 else 32 for byte in range(256))


@dataclass(eq=False)
class _Session:
    """What is known of one session file, valid while its identity is unchanged."""

    path: Path
    identity: Identity = _MISSING
    """Of the file as agentlog last saw or left it (its unacknowledged lines included)."""
    count: int = 0
    """Acknowledged records: what reads see."""
    end: int = 0
    last_offset: int = 0
    written: int = 0
    """Records in the file, acknowledged or not: what appends follow."""
    written_end: int = 0
    written_last_offset: int = 0
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

    @classmethod
    def of(cls, path: Path, identity: Identity, scan: FileScan) -> _Session:
        return cls(
            path,
            identity,
            scan.count,
            scan.end,
            scan.last_offset,
            scan.count,
            scan.end,
            scan.last_offset,
            scan.marks,
            scan.first_timestamp_ns,
            scan.last_timestamp_ns,
            scan.head_id,
            scan.damage,
            scan.started_here,
        )

    def view(self) -> _View:
        """What a read may see: the acknowledged records (hold the store's lock)."""
        return _View(self.path, self.marks, self.count, self.end)


@dataclass(frozen=True, slots=True)
class _View:
    """A read's snapshot of a session: its first `count` records, ending at byte `end`.

    `marks` is the state's own array: it only grows past what the snapshot
    uses, or is cut back to acknowledged records, so reading it needs no lock.
    """

    path: Path
    marks: array[int]
    count: int
    end: int


@dataclass(slots=True)
class _Written:
    """A staged append's lines (or, with no state, a feed entry alone)."""

    index: int  # its place in the staging's appends
    session_id: str
    state: _Session | None
    appended: Appended | None
    entry: Entry  # its feed entry
    rows: list[Row]
    start: int  # where its lines start
    end: int  # and end
    last_offset: int
    previous_last_offset: int
    inode: int
    new_file: bool
    live: bool = True  # staged, neither acknowledged nor taken back


@dataclass(slots=True)
class _Staging:
    """Appends staged together, acknowledged together."""

    ticket: int
    outcomes: list[Outcome | None]
    done: Callable[[list[Answer]], None]
    written: list[_Written] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)  # the index keys of its ids


@dataclass(frozen=True, slots=True)
class _Decoder(Generic[T]):
    """Turns a run of lines into records or messages; `one` words a line's error."""

    run: Callable[[list[bytes], int], list[T]]
    one: Callable[[bytes, int], T]


def _records_from_lines(lines: list[bytes], first: int) -> list[EventRecord]:
    return [record_from_line(line, first + k) for k, line in enumerate(lines)]


_RECORDS = _Decoder(_records_from_lines, record_from_line)
_FIELDS = _Decoder(record_fields_from_lines, record_fields_from_line)


class JsonlSessionRepository(BlockingStore):
    """Sessions as arcan JSONL files under one directory.

    `sync` says when appends reach the disk (`agentlog.server.SyncPolicy`):
    "always" (the default; an append returns once durable, concurrent appends
    sharing syncs), "interval" (synced every `sync_interval_ms`), or "never".
    True and False mean "always" and "never". `use_syncfs` picks how a sync is
    done (None: syncfs(2) where the kernel reports its errors; see `Syncer`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        sync: SyncPolicy | str | bool = SyncPolicy.ALWAYS,
        sync_interval_ms: int = 100,
        use_syncfs: bool | None = None,
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
        if isinstance(sync, bool):
            sync = SyncPolicy.ALWAYS if sync else SyncPolicy.NEVER
        try:
            self.sync_policy = SyncPolicy(sync)
        except ValueError:
            raise InvalidArgumentError(
                f"sync must be one of {', '.join(SyncPolicy)}, not {sync!r}", field="sync"
            ) from None
        self._directory_lock = lock_directory(self.root)
        self.page_tokens = _rules.PageTokens(page_token_key(self.root))
        self._lock = threading.Lock()  # the store's: states, writing, acknowledging
        self._cond = threading.Condition(self._lock)
        self._halted: AgentlogError | None = None
        self._closing = False
        self._catalog: list[str] | None = None
        self._catalog_mtime = -1
        self._syncer = Syncer(self.root, use_syncfs=use_syncfs)
        self.recovered_sessions: list[Path] = []  # session files cut at this open
        self.recovered = self._recover_tails()
        self._feed = Feed(self.root / FEED_FILE)
        self._index = StoreIndex(self.root, files=self._session_files)
        present = self._sessions_in_order()
        self._index.forget_missing(set(present))
        for path in self.recovered_sessions:
            self._index.forget(path.name[: -len(SUFFIX)])  # cut here: index it anew
        # About 200 bytes a line: a first guess at how many ids the files hold.
        self._index.open_filter(sum(_identity(self._path(s))[1] for s in present) // 200)
        try:
            self._index.catch_up_all((s, self._path(s)) for s in present)
        except sqlite3.OperationalError as exc:
            log.warning(
                "%s: the index could not be brought up to date (%s); reads are served, "
                "appends wait until it can be written",
                self.root,
                exc,
            )
        self._index.filter_indexed()
        clean = self.root / CLEAN_FILE
        if clean.exists():
            # Closed cleanly: everything was synced, the feed matches the files.
            clean.unlink()
            fsync_path(self.root)
        else:
            try:
                if self._feed.cut_beyond(self._record_counts()) is not None:
                    fsync_path(self._feed.path)
            except (AgentlogError, OSError) as exc:  # a full disk
                log.warning("%s: could not check the feed against the files: %s", self.root, exc)
        self._builders: dict[str, threading.Lock] = {}
        self._reported_gaps: set[tuple[str, str]] = set()  # (session, reason) logged
        # The states of the sessions used most recently (see MAX_CACHED_SESSIONS).
        self._states: OrderedDict[str, _Session] = OrderedDict()
        self.max_cached_sessions = MAX_CACHED_SESSIONS
        self._files: OrderedDict[str, tuple[int, int]] = OrderedDict()  # session: (fd, inode)
        self.max_open_files = open_files_budget()  # session files kept open for appending
        self._elsewhere: set[Path] = set()  # session files on another file system
        # Ids of staged appends, to find a retry of one still in flight (an entry
        # whose append is no longer live is stale; cleared when nothing is staged).
        self._unacked_ids: dict[str, _Written] = {}
        # Staged and not yet acknowledged, in order. Under `always`, those up to
        # ticket `_released` may be synced, those up to `_durable` are.
        self._queue: deque[_Staging] = deque()
        self._on_durable: Callable[[], bool] | None = None
        self._dirty: set[Path] = set()  # written since the last sync
        self._tickets = 0
        self._released = self._durable = 0
        self._feed_durable_size = self._feed.size
        self._sync_thread: threading.Thread | None = None
        if self.sync_policy is not SyncPolicy.NEVER:
            target = (
                self._sync_staged
                if self.sync_policy is SyncPolicy.ALWAYS
                else self._sync_every(sync_interval_ms / 1000)
            )
            self._sync_thread = threading.Thread(target=target, name="agentlog-sync", daemon=True)
            self._sync_thread.start()

    # --- writing ---

    def commit_answers(self, appends: Sequence[PendingAppend]) -> list[Answer]:
        done = threading.Event()
        box: list[list[Answer]] = []

        def finished(answers: list[Answer]) -> None:
            box.append(answers)
            done.set()

        self.submit(appends, finished)
        done.wait()
        return box[0]

    def backend(self, executor: ThreadPoolExecutor) -> Backend:
        from agentlog.server.jsonl.backend import JsonlBackend

        return JsonlBackend(self, executor)

    def submit(
        self,
        appends: Sequence[PendingAppend],
        done: Callable[[list[Answer]], None],
        *,
        block: bool = True,
        hold: bool = False,
    ) -> bool:
        """Store checked appends, each as if alone and in this order, and call
        `done(answers)` once they are acknowledged: at once, or later from another
        thread (the sync thread, or the one `on_durable` names).

        With block=False, decline (False, nothing done) when storing would first
        mean slow work, such as reading a session's file or catching the index up: a
        caller on an event loop then submits from a thread instead. With hold=True,
        the sync that makes these appends durable waits for `release()`: a caller
        that has more appends at hand submits them all, then releases them, and they
        share one sync (group commit)."""
        sessions = {append.session_id for append in appends}
        if self._index.behind:
            if not block:
                return False
            self._catch_up_index()
        while True:
            with self._lock:
                if self._closing:
                    raise UnavailableError(
                        "the store is closing; retry the append (here when it is back, or "
                        "elsewhere)",
                        reason="SHUTTING_DOWN",
                    )
                identities = {s: self._ready(s) for s in sessions}
                missing = [s for s, identity in identities.items() if identity is None]
                if not missing:
                    staging = self._stage(appends, done, identities)  # type: ignore[arg-type]
                    finished = self._settle(staging, hold=hold)
                    break
            if not block:
                return False
            for session_id in missing:
                self._state(session_id)
        _finish(finished)
        return True

    def _catch_up_index(self) -> None:
        """Bring the index up to date before an append (it fell behind on a full disk):
        until it knows every id in the files, a retried id could be stored twice."""
        try:
            self._index.catch_up_all(self._session_files())
        except sqlite3.OperationalError as exc:
            raise ResourceExhaustedError(
                f"no space to update the index in {self.root} ({exc}): appends are refused "
                "until there is; free disk space, then retry (reads are served meanwhile)",
                reason="DISK_FULL",
            ) from None

    def _ready(self, session_id: str) -> Identity | None:
        """The file's identity if the session's state is at hand to append to; None if
        it must be loaded first (hold the lock)."""
        state = self._states.get(session_id)
        path = state.path if state is not None else self._path(session_id)
        identity = self._identity_for_writing(session_id, path)
        if state is not None:
            if state.unacked or state.identity == identity:
                self._states.move_to_end(session_id)
                return identity
            del self._states[session_id]  # changed behind our back: rebuild it
            self._close_file(session_id)
            return None
        if identity == _MISSING and self._index.indexed(session_id) is None:
            # A new session: nothing to read. (Not evicting here: that could drop a
            # state readied for this same append; acknowledging evicts.)
            self._states[session_id] = _Session(path)
            return identity
        return None

    def _identity_for_writing(self, session_id: str, path: Path) -> Identity:
        """The file's identity, from its open descriptor if there is one (cheaper than
        by path; a file replaced or removed since it was opened has no links left)."""
        cached = self._files.get(session_id)
        if cached is not None:
            try:
                stat = os.fstat(cached[0])
            except OSError as exc:
                raise storage_error(exc, path) from None
            if stat.st_nlink > 0:
                return (stat.st_ino, stat.st_size)
            self._close_file(session_id)
        return _identity(path)

    def _stage(
        self,
        appends: Sequence[PendingAppend],
        done: Callable[[list[Answer]], None],
        identities: dict[str, Identity],
    ) -> _Staging:
        """Decide each append, in order, and write its lines (hold the lock)."""
        self._tickets += 1
        staging = _Staging(self._tickets, [None] * len(appends), done)
        ids = [item.id for append in appends for item in append.batch]
        keys = [key_of(record_id) for record_id in ids]
        holders = self._index.holders(ids, keys)
        staging.keys = dict(zip(ids, keys, strict=True))
        for index, append in enumerate(appends):
            try:
                outcome = self._stage_one(staging, index, append, holders, identities)
            except Exception as exc:  # this append fails alone
                outcome = exc
            if outcome is not None:
                staging.outcomes[index] = outcome
        return staging

    def _stage_one(
        self,
        staging: _Staging,
        index: int,
        append: PendingAppend,
        holders: dict[str, list[Located]],
        identities: dict[str, Identity],
    ) -> Outcome | None:
        """Decide one append and write its lines; None once written (acknowledged later)."""
        if self._halted is not None:
            raise self._halted
        session_id, batch = append.session_id, append.batch
        state = self._states[session_id]
        if state.damage is not None:
            raise state.damage  # never append after damage: it would bury it
        if state.sealed is not None:
            raise state.sealed
        if identities[session_id] != state.identity:
            # Another writer appended while our own appends were in flight.
            raise DataLossError(
                f"{state.path} changed while agentlog was appending to it; retry the append",
                reason="CONCURRENT_WRITER",
                metadata={"file": str(state.path)},
            )
        mine, others = self._holdings(session_id, batch, holders)
        if not mine and not others:  # new ids, the common case: only the expectation
            if append.expected is not None and append.expected != state.written:
                raise _rules.wrong_expected_sequence(session_id, append.expected, state.written)
            self._write_lines(staging, index, session_id, state, batch)
            identities[session_id] = state.identity
            return None

        def stored(record_id: str) -> tuple[int, bytes] | None:
            record = mine.get(record_id)
            if record is None:
                return None
            digest = _rules.content_digest(record.parent_id, event_to_json(record.event))
            return record.sequence, digest

        retried = _rules.check_append(
            session_id,
            batch,
            append.expected,
            state.written,
            stored=stored,
            elsewhere=lambda ids: {i: others[i] for i in ids if i in others},
        )
        if retried is not None:
            # If the first attempt stopped between the session file and the feed
            # (a crash), the feed learns of its records now.
            self._stage_feed_catch_up(staging, session_id, state)
            return Appended.stored(session_id, batch, [mine[item.id] for item in batch]), None
        self._write_lines(staging, index, session_id, state, batch)
        identities[session_id] = state.identity
        return None

    def _holdings(
        self, session_id: str, batch: list[Prepared], holders: dict[str, list[Located]]
    ) -> tuple[dict[str, EventRecord], dict[str, str]]:
        """The records this session holds with the batch's ids, and the session that
        holds each of the others, confirmed by reading them (rare: retries, reuse)."""
        mine: dict[str, EventRecord] = {}
        others: dict[str, str] = {}
        if not holders and not self._unacked_ids:
            return mine, others
        for item in batch:
            places = list(holders.get(item.id, ()))
            staged = self._unacked_ids.get(item.id)
            if staged is not None and staged.live:
                sequence, offset = next((r[2], r[3]) for r in staged.rows if r[0] == item.id)
                places.append(Located(staged.session_id, sequence, offset))
            for place in places:
                record = self._record_at(place)
                if record is None or record.id != item.id:
                    continue  # a key collision, or a row of a file since changed
                if place.session_id == session_id:
                    mine[item.id] = record
                else:
                    others.setdefault(item.id, place.session_id)
        return mine, others

    def _record_at(self, place: Located) -> EventRecord | None:
        """The record an index row points at, if it is still there."""
        path = self._path(place.session_id)
        try:
            with path.open("rb") as file:
                line = read_line(file, place.offset, file.seek(0, os.SEEK_END))
            return record_from_line(line, place.sequence)
        except (FileNotFoundError, DecodeError):
            return None
        except OSError as exc:  # not "absent": a retry must not be taken for a new id
            raise storage_error(exc, path) from None

    def _write_lines(
        self, staging: _Staging, index: int, session_id: str, state: _Session, batch: list[Prepared]
    ) -> None:
        last = state.written
        # Lines of a multi-event batch name the batch's last sequence, so a
        # batch cut short by a crash is recognised and never served in part.
        batch_end = last + len(batch) if len(batch) > 1 else None
        # One timestamp for the whole batch: it is one commit.
        timestamp_ns = time.time_ns()
        timestamp = format_timestamp(timestamp_ns)
        appended = Appended(session_id, batch, last + 1, timestamp_ns)
        lines = []
        for sequence, item in enumerate(batch, last + 1):
            fields: dict[str, Any] = {
                "id": item.id,
                "session_id": session_id,
                "parent_id": item.parent_id,
                "timestamp": timestamp,
                "event": item.event_json,
                "sequence": sequence,
            }
            if batch_end is not None:
                fields["batch_end"] = batch_end
            line = record_line(fields)
            if len(line) > _rules.MAX_RECORD_BYTES:
                _rules.check_record_size(len(line), sequence - last - 1 if batch_end else None)
            lines.append(line)
        data = b"".join(lines)
        new_file = state.identity == _MISSING
        fd = self._file(session_id, state)
        start = state.written_end
        try:
            if os.fstat(fd).st_size != start:
                raise _concurrent_writer(state.path)  # appended to since it was checked
            count = os.write(fd, data)
            end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: where this write ended
            if count < len(data) and end - count == start:
                raise OSError(errno.ENOSPC, "a short write")  # a full disk, say
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)  # never leave part of an append behind
            raise storage_error(exc, state.path) from None
        if end - count != start:
            # Another process appended between the check and the write, so these
            # lines landed after its lines and state the wrong sequences.
            self._blank_misplaced(session_id, state, end - count, data[:count])
            raise _concurrent_writer(state.path)
        rows: list[Row] = []
        offset, keys = start, staging.keys
        for sequence, (item, line) in enumerate(zip(batch, lines, strict=True), last + 1):
            if sequence % MARK_EVERY == 1:
                state.marks.append(offset)
            rows.append((item.id, item.parent_id, sequence, offset, keys[item.id]))
            offset += len(line)
        previous_last = state.written_last_offset
        inode = self._files[session_id][1]
        state.identity = (inode, offset)
        state.written += len(batch)
        state.written_end = offset
        state.written_last_offset = offset - len(lines[-1])
        state.unacked += 1
        entry = self._feed.reserve(session_id, last + 1, len(batch), start)
        written = _Written(
            index,
            session_id,
            state,
            appended,
            entry,
            rows,
            start,
            offset,
            state.written_last_offset,
            previous_last,
            inode,
            new_file,
        )
        staging.written.append(written)
        self._unacked_ids.update(dict.fromkeys([item.id for item in batch], written))
        self._dirty.add(state.path)
        if new_file:
            self._dirty.add(self.root)  # the new directory entry

    def _blank_misplaced(self, session_id: str, state: _Session, offset: int, data: bytes) -> None:
        """Turn lines this store just wrote at `offset`, after another writer's, into
        blank lines (which every reader skips), in place: cutting them off could cut
        that writer's next lines too. The append is then refused (hold the lock)."""
        log.warning(
            "%s: another process appended while agentlog did; its %d bytes at offset %d are "
            "blanked and the append is refused",
            state.path,
            len(data),
            offset,
        )
        self._close_file(session_id)
        state.identity = _STALE  # rebuilt from the file before the next append
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data.translate(_BLANKED), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("%s: could not blank the misplaced lines: %s", state.path, exc)
            state.sealed = _concurrent_writer(state.path)

    def _stage_feed_catch_up(self, staging: _Staging, session_id: str, state: _Session) -> None:
        """Give feed positions to records of a feed session that the feed lacks (hold
        the lock): an append a crash cut short between its session lines and its feed
        line, or lines another writer (arcan) added to a session agentlog writes.

        A session is in the feed once the feed knows it or if agentlog started it
        (sessions only arcan wrote are not).
        """
        covered = self._feed.covered(session_id)
        known = covered > 0 or state.started_here
        if known and covered < state.count and state.damage is None:
            entry = self._feed.reserve(session_id, covered + 1, state.count - covered, -1)
            staging.written.append(
                _Written(-1, session_id, None, None, entry, [], 0, 0, 0, 0, 0, False)
            )

    def _fail(self, stagings: list[_Staging], error: Exception) -> None:
        """Take back the lines of unacknowledged stagings (the newest there are) and
        fail their appends (hold the lock)."""
        for staging in reversed(stagings):
            for written in reversed(staging.written):
                self._take_back(written)
            staging.written.clear()
            staging.outcomes = [error] * len(staging.outcomes)
        self._feed.abandon()

    def _take_back(self, written: _Written) -> None:
        """Cut a staged append's lines back off its file (the newest of its session)."""
        state = written.state
        if state is None:
            return
        written.live = False
        state.written = written.entry[2] - 1
        state.written_end = written.start
        state.written_last_offset = written.previous_last_offset
        del state.marks[(state.written + MARK_EVERY - 1) // MARK_EVERY :]
        state.unacked -= 1
        try:
            os.truncate(state.path, written.start)
        except OSError as exc:
            log.error("%s: could not cut unacknowledged lines off: %s", state.path, exc)
        state.identity = _identity(state.path)
        self._close_file(written.session_id)

    def _settle(self, staging: _Staging, *, hold: bool = False) -> list[_Staging]:
        """Queue a staging, to be acknowledged in order once its lines are durable as
        the policy promises (hold the lock). Returns the stagings finished now (to
        answer once the lock is released)."""
        self._queue.append(staging)
        if self.sync_policy is SyncPolicy.ALWAYS:
            if not hold:
                self._release()
            return []
        return [] if hold else self._write_and_acknowledge()

    def release(self) -> None:
        """Let appends submitted with hold=True be made durable and acknowledged."""
        with self._lock:
            if self.sync_policy is SyncPolicy.ALWAYS:
                self._release()
                return
            finished = self._write_and_acknowledge()
        _finish(finished)

    def _release(self) -> None:
        if self._released < self._tickets:
            self._released = self._tickets
            self._cond.notify_all()

    def _write_and_acknowledge(self) -> list[_Staging]:
        """Under `interval` and `never`: write the feed lines of what is queued, in one
        write, and acknowledge it (hold the lock). Returns the stagings finished."""
        finished = list(self._queue)
        self._queue.clear()
        entries = [w.entry for staging in finished for w in staging.written]
        if entries:
            try:
                self._feed.write(entries)
            except AgentlogError as exc:  # a full disk, say: these appends fail
                self._fail(finished, exc)
                return finished
            self._dirty.add(self._feed.path)
        for staging in finished:
            self._acknowledge(staging)
        self._feed.acknowledged_size = self._feed.size
        return finished

    def on_durable(self, acknowledge: Callable[[], bool] | None) -> None:
        """Under `always`, have `acknowledge()` called (from the sync thread) when staged
        appends are durable, instead of acknowledging them on that thread; if it
        returns True, it sees to it that `acknowledge_durable()` runs. A server uses
        this to acknowledge on its event loop, where the answers go."""
        with self._lock:
            self._on_durable = acknowledge

    def acknowledge_durable(self) -> None:
        """Acknowledge, in order, the queued appends the last syncs made durable."""
        with self._lock:
            finished = self._acknowledge_durable()
        _finish(finished)

    def _acknowledge_durable(self) -> list[_Staging]:
        finished = []
        while self._queue and self._queue[0].ticket <= self._durable:
            staging = self._queue.popleft()
            self._acknowledge(staging)
            finished.append(staging)
        if finished:
            self._feed.acknowledged_size = self._feed_durable_size
        return finished

    def _acknowledge(self, staging: _Staging) -> None:
        """Make a staging's appends visible, in order, and tell listeners (hold the lock)."""
        for written in staging.written:
            self._feed.add(written.entry)
            state = written.state
            if state is None:
                continue  # a feed entry alone
            appended = written.appended
            assert appended is not None
            position, session_id = written.entry[:2]
            state.count = appended.last_sequence
            state.end = written.end
            state.last_offset = written.last_offset
            if appended.first_sequence == 1:
                state.first_timestamp_ns = appended.timestamp_ns
                state.started_here = True
            state.last_timestamp_ns = appended.timestamp_ns
            state.head_id = appended.batch[-1].id
            state.unacked -= 1
            self._index.record(
                session_id, written.rows, written.inode, written.end, state.last_offset
            )
            written.live = False
            staging.outcomes[written.index] = (appended, position)
            self._publish(appended, position)
            if written.new_file:
                self._add_to_catalog(session_id)
        if not self._queue:
            self._unacked_ids.clear()  # nothing staged: every entry is stale
        elif len(self._unacked_ids) > MAX_UNACKED_IDS:
            self._unacked_ids = {i: w for i, w in self._unacked_ids.items() if w.live}
        self._evict()

    def _sync_staged(self) -> None:
        """The sync thread under `always`: write the feed lines of what is released,
        sync it all, then acknowledge it (or have it acknowledged: `on_durable`)."""
        while True:
            with self._lock:
                while not self._closing and self._durable >= self._released:
                    self._cond.wait()
                if self._closing:
                    self._release()
                if self._durable >= self._released:
                    return
                after, upto = self._durable, self._released
                entries = [
                    w.entry
                    for staging in self._queue
                    if after < staging.ticket <= upto
                    for w in staging.written
                ]
                paths, self._dirty = self._dirty, set()
                elsewhere = paths & self._elsewhere
            failed: AgentlogError | None = None
            error: OSError | None = None
            try:
                if entries:
                    self._feed.write(entries)
                    paths.add(self._feed.path)
                if paths:
                    self._syncer.sync(paths, elsewhere=elsewhere)
            except AgentlogError as exc:  # the feed could not be written (a full disk)
                failed = exc
            except OSError as exc:
                error = exc
            handoff = None
            with self._lock:
                finished: list[_Staging] = []
                if error is not None:
                    finished = self._halt(error)
                elif failed is not None:
                    finished = list(self._queue)
                    self._queue.clear()
                    self._fail(finished, failed)
                    self._durable = self._released = self._tickets
                else:
                    self._durable = upto
                    self._feed_durable_size = self._feed.size
                    handoff = self._on_durable
                    if handoff is None or self._closing:
                        handoff = None
                        finished = self._acknowledge_durable()
            _finish(finished)
            if handoff is not None and not handoff():
                self.acknowledge_durable()  # nobody took it over

    def _sync_every(self, seconds: float) -> Callable[[], None]:
        def run() -> None:
            with self._lock:
                while not self._closing:
                    self._cond.wait(seconds)
                    paths, self._dirty = self._dirty, set()
                    if not paths or self._halted is not None:
                        continue
                    elsewhere = paths & self._elsewhere
                    self._lock.release()
                    try:
                        self._syncer.sync(paths, elsewhere=elsewhere)
                        error = None
                    except OSError as exc:
                        error = exc
                    finally:
                        self._lock.acquire()
                    if error is not None:
                        self._halt(error)

        return run

    def _halt(self, exc: Exception) -> list[_Staging]:
        """Refuse appends from now on: a failed sync may have dropped written pages.

        Every unacknowledged append fails and its lines are cut back off (hold the
        lock). Returns the stagings failed.
        """
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
        failed = list(self._queue)
        self._queue.clear()
        self._fail(failed, self._halted)
        self._durable = self._released = self._tickets
        for session_id in list(self._files):
            self._close_file(session_id)
        return failed

    def _file(self, session_id: str, state: _Session) -> int:
        """The session file's descriptor for appending, opened if need be (hold the lock)."""
        cached = self._files.get(session_id)
        if cached is not None:
            if cached[1] == state.identity[0]:
                self._files.move_to_end(session_id)
                return cached[0]
            self._close_file(session_id)
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            stat = os.fstat(fd)
        except OSError as exc:
            raise storage_error(exc, state.path) from None
        inode = stat.st_ino
        if (inode, stat.st_size) != (state.identity[0] or inode, state.written_end):
            os.close(fd)  # replaced, or created or grown by someone else, since our check
            raise DataLossError(
                f"{state.path} changed while agentlog was appending to it; retry the append",
                reason="CONCURRENT_WRITER",
                metadata={"file": str(state.path)},
            )
        if not self._syncer.on_this_device(fd):
            self._elsewhere.add(state.path)
        self._files[session_id] = (fd, inode)
        while len(self._files) > self.max_open_files:
            self._close_file(next(iter(self._files)))
        return fd

    def _close_file(self, session_id: str) -> None:
        cached = self._files.pop(session_id, None)
        if cached is not None:
            os.close(cached[0])

    # --- opening ---

    def _recover_tails(self) -> list[Path]:
        """Cut torn last lines and batches cut short off every session file (at open).

        The cut bytes are kept in `.agentlog-recovered/` for inspection. Returns
        the side files written.
        """
        kept = []
        for session_id in self._sessions_in_order():
            path = self._path(session_id)
            cut, why = torn_tail(path)
            if cut is None:
                continue
            side_dir = self.root / RECOVERED_DIR
            side = side_dir / f"{path.name}.{cut}"
            try:
                side_dir.mkdir(exist_ok=True)
                with path.open("rb") as file:
                    file.seek(cut)
                    side.write_bytes(file.read())
                fsync_path(side)
            except OSError as exc:
                # Not cut without a copy: the session refuses reads and appends until
                # a start with room for the copy.
                log.error("%s: cannot keep %s in %s (%s); not cut", path, why, side_dir, exc)
                continue
            os.truncate(path, cut)
            fsync_path(path)
            fsync_path(side_dir)
            self.recovered_sessions.append(path)
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
        """How many records each session file holds (at an open after a crash)."""
        counts = {}
        for session_id in self._sessions_in_order():
            path = self._path(session_id)
            identity, indexed = _identity(path), self._index.indexed(session_id)
            if indexed is not None and (
                (indexed.inode, indexed.size) == identity or self._index.shrunk(session_id)
            ):
                # A file cut behind agentlog's back keeps its feed entries: they are
                # reported as lost when read, not dropped unseen.
                counts[session_id] = indexed.records
            else:
                counts[session_id] = scan_file(path, MARK_EVERY).count
        return counts

    # --- reading ---

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[EventRecord]:
        chunks = self._read(session_id, from_sequence, limit, direction, _RECORDS)
        return itertools.chain.from_iterable(chunks)

    def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[list[Any]]:
        # Straight from each line's JSON to the message's fields: no Python
        # records or messages between.
        return self._read(session_id, from_sequence, limit, direction, _FIELDS)

    def _read(
        self,
        session_id: str,
        from_sequence: int,
        limit: int | None,
        direction: ReadDirection,
        decoder: _Decoder[T],
    ) -> Iterator[list[T]]:
        check_stored_session_id(session_id)
        selected = _rules.read_range(from_sequence, limit, direction)
        view = self._view(session_id)
        # A snapshot: appends made while the caller iterates are not part of this read.
        return self._chunks(view, selected.sequences(view.count), decoder)

    def _view(self, session_id: str) -> _View:
        """What reads may see of a session now; DataLossError if it is damaged."""
        state = self._state(session_id)
        if state.damage is not None:
            raise state.damage
        with self._lock:
            return state.view()

    def _chunks(self, view: _View, sequences: range, decoder: _Decoder[T]) -> Iterator[list[T]]:
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
        view: _View,
        low: int,
        high: int,
        decoder: _Decoder[T],
        start: tuple[int, int] | None = None,
    ) -> Iterator[list[T]]:
        """Records `low` to `high` in order: one seek to the mark before `low` (or to
        `start`, the known (offset, sequence) of a record at or before it), then
        reading on, a block at a time."""
        if low > high:
            return
        runs = _runs(self._lines(view, low, high, start))
        for first, lines in runs:
            try:
                yield decoder.run(lines, first)
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
        self, view: _View, low: int, high: int, start: tuple[int, int] | None
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
                block = file.read(min(_BLOCK, left))
                if not block:
                    raise DataLossError(
                        f"{view.path} ends before record {sequence}, which it held: it was "
                        "cut or replaced behind agentlog's back; read it again",
                        reason="CONCURRENT_WRITER",
                        metadata={"file": str(view.path)},
                    )
                left -= len(block)
                data = carry + block if carry else block
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

    def _offset_of(self, view: _View, sequence: int) -> int:
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

    def head(self, session_id: str) -> EventRecord | None:
        check_stored_session_id(session_id)
        with self._lock:
            cached = session_id in self._states
        if not cached:
            # Without the session's state at hand, read only the last line.
            found = self._head_from_index(session_id)
            if found is not None:
                return found
        view = self._view(session_id)
        if view.count == 0:
            return None
        return self._at(view, view.count, self._last_offset(session_id, view))

    def _last_offset(self, session_id: str, view: _View) -> int:
        with self._lock:
            state = self._states.get(session_id)
            if state is not None and state.count == view.count:
                return state.last_offset
        return self._offset_of(view, view.count)

    def _at(self, view: _View, sequence: int, offset: int) -> EventRecord:
        """The record `sequence`, whose line starts at `offset`."""
        try:
            with view.path.open("rb") as file:
                line = read_line(file, offset, view.end)
        except OSError as exc:
            raise storage_error(exc, view.path) from None
        try:
            return record_from_line(line, sequence)
        except DecodeError as exc:
            number = line_number(view.path, offset)
            error = corrupt_line(view.path, number, str(exc), sequence, offset)
            self._seal(view.path, error, sequence, offset)
            raise error from None

    def _seal(self, path: Path, error: DataLossError, sequence: int, offset: int) -> None:
        """Refuse appends to a session a read found a damaged line in (record
        `sequence`, at byte `offset`), from now on and after a restart."""
        session_id = path.name[: -len(SUFFIX)]
        with self._lock:
            state = self._states.get(session_id)
            if state is not None and state.path == path and state.sealed is None:
                state.sealed = error
        self._index.distrust(session_id, offset, sequence - 1)

    def _head_from_index(self, session_id: str) -> EventRecord | None:
        """The last record, read backwards from the end, when the index vouches for the file.

        None (use the full path) unless the file is exactly as last indexed and its
        last line is a whole record that does not end a batch cut short.
        """
        path = self._path(session_id)
        indexed = self._index.indexed(session_id)
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
            return record_from_line(line, indexed.records)
        except (orjson.JSONDecodeError, DecodeError, AttributeError):
            return None

    def read_all(
        self, from_position: int, limit: int | None = None
    ) -> Iterator[FeedRecord | FeedGap]:
        check_count(from_position, "from_position")
        if limit is not None:
            check_count(limit, "limit", minimum=1)
        return self._read_all(max(from_position, 1), limit)

    def _read_all(self, position: int, limit: int | None) -> Iterator[FeedRecord | FeedGap]:
        """The feed from `position`: each entry's records read from its session file.
        A session that cannot be read is that session's loss alone: its positions
        become a FeedGap and the feed goes on."""
        remaining = limit
        for entry_position, session_id, sequence, count, offset in self._feed.entries_from(
            position
        ):
            if not session_id:
                continue  # a gap
            skip = max(position - entry_position, 0)
            first, last = sequence + skip, sequence + count - 1
            if remaining is not None:
                last = min(last, first + remaining - 1)
                remaining -= last - first + 1
            shift = entry_position - sequence  # a record's position less its sequence
            delivered = first - 1
            try:
                view = self._view(session_id)
                if view.count < last:
                    raise _missing_records(view.path, view.count, last)
                start = (offset, sequence) if offset >= 0 else None
                for run in self._forward(view, first, last, _RECORDS, start):
                    for record in run:
                        yield FeedRecord(shift + record.sequence, record)
                    delivered = run[-1].sequence
            except DataLossError as exc:
                yield self._gap(shift + delivered + 1, shift + last, session_id, exc)
            if remaining is not None and remaining <= 0:
                return

    def _gap(self, first: int, last: int, session_id: str, error: DataLossError) -> FeedGap:
        """What the feed says in place of records it could not read; logged once a
        session and reason, counted every time."""
        reason = error.reason or "DATA_LOSS"
        metrics.FEED_UNDELIVERED.labels(reason=reason).inc(last - first + 1)
        if (session_id, reason) not in self._reported_gaps:
            self._reported_gaps.add((session_id, reason))
            log.error(
                "the all-sessions feed skips positions %d to %d (session %r): %s",
                first,
                last,
                session_id,
                error.message,
            )
        return FeedGap(first, last, session_id, reason, error.message)

    def last_position(self) -> int:
        with self._lock:
            return self._feed.last_position

    def load_children(self, parent_id: str) -> list[EventRecord]:
        check_parent_query(parent_id)
        children: list[EventRecord] = []
        views: dict[str, _View] = {}
        for place in self._index.children(parent_id):
            view = views.get(place.session_id)
            if view is None:
                view = views[place.session_id] = self._children_view(place.session_id)
            if place.sequence > view.count:
                continue  # the index ran ahead of a file cut since: nothing to serve
            record = self._at(view, place.sequence, place.offset)
            if record.parent_id == parent_id:
                children.append(record)
        return children

    def _children_view(self, session_id: str) -> _View:
        """A view for reading records at offsets the index gave: the session's state if
        at hand, or just what the index holds if it vouches for the file."""
        path = self._path(session_id)
        with self._lock:
            state = self._states.get(session_id)
            if state is not None and (state.unacked or state.identity == _identity(path)):
                return state.view()
        indexed = self._index.indexed(session_id)
        if indexed is not None and (indexed.inode, indexed.size) == _identity(path):
            return _View(path, array("Q"), indexed.records, indexed.size)
        return self._view(session_id)

    def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        size = check_page_size(page_size)
        after = self.page_tokens.decode(page_token)
        catalog = self._sessions_in_order()
        start = 0 if after is None else bisect.bisect_right(catalog, after.encode(), key=str.encode)
        infos: list[SessionInfo] = []
        index = start
        while index < len(catalog) and len(infos) < size:
            session_id = catalog[index]
            index += 1
            state = self._state(session_id)
            with self._lock:
                if state.count == 0:
                    continue  # an empty or vanished file is no session
                infos.append(
                    SessionInfo(
                        session_id=session_id,
                        event_count=state.count,
                        first_timestamp_ns=state.first_timestamp_ns,
                        last_timestamp_ns=state.last_timestamp_ns,
                        head_id=state.head_id,
                    )
                )
        more = index < len(catalog)
        token = self.page_tokens.encode(catalog[index - 1]) if more and infos else None
        return SessionPage(sessions=infos, next_page_token=token)

    def session_ids(self) -> list[str]:
        """Ids of the sessions that have a file, in byte order."""
        return list(self._sessions_in_order())

    # --- state ---

    def _state(self, session_id: str) -> _Session:
        """The session's state, rebuilt if its file changed since last seen."""
        path = self._path(session_id)
        while True:
            with self._lock:
                state = self._states.get(session_id)
                if state is not None and (state.unacked or state.identity == _identity(path)):
                    self._states.move_to_end(session_id)
                    return state
            with self._builder(session_id):
                with self._lock:  # built by another thread meanwhile?
                    state = self._states.get(session_id)
                    if state is not None and (state.unacked or state.identity == _identity(path)):
                        return state
                built = self._build(session_id, path)
                with self._lock:
                    current = self._states.get(session_id)
                    if current is not None and current.unacked:
                        return current  # a new session, being written: that state is the truth
                    if built.identity != _identity(path):
                        continue  # changed while we read it: again
                    self._close_file(session_id)  # it may be for a file since replaced
                    self._install(session_id, built)
                self._feed_catch_up(session_id, built)
                return built

    def _build(self, session_id: str, path: Path) -> _Session:
        """A session's state from the index, which vouches for a file it indexed to its
        end, reading only the first and last lines; else from a scan of the file."""
        identity = _identity(path)
        try:
            indexed = self._index.catch_up(session_id, path)
        except sqlite3.OperationalError as exc:  # a full disk: read the file itself
            log.warning("%s: not indexed (%s); reading it whole", path, exc)
            return _Session.of(path, identity, scan_file(path, MARK_EVERY))
        if identity == _MISSING or indexed is None:
            return _Session(path)
        shrunk = self._index.shrunk(session_id)
        if shrunk is not None:
            state = _Session.of(path, identity, scan_file(path, MARK_EVERY))
            state.damage = _shrunk_error(path, *shrunk)
            return state
        if indexed.inode == identity[0] and indexed.size < identity[1]:
            # The index stopped before the end: at a line that is no record (or a
            # torn last line, which the scan reports).
            state = _Session.of(path, identity, scan_file(path, MARK_EVERY))
            if state.damage is None:
                state.sealed = _unindexable_line(path, indexed.size, indexed.records + 1)
            return state
        if (indexed.inode, indexed.size) == identity:
            marks = self._index.marks(session_id)
            if len(marks) == (indexed.records + MARK_EVERY - 1) // MARK_EVERY:
                with contextlib.suppress(
                    OSError, ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError
                ):
                    scan = describe(path, indexed.records, indexed.size, indexed.last_offset, marks)
                    return _Session.of(path, identity, scan)
        return _Session.of(path, identity, scan_file(path, MARK_EVERY))

    def _feed_catch_up(self, session_id: str, state: _Session) -> None:
        """Stage feed positions for records of the session the feed lacks, and wait."""
        done = threading.Event()
        with self._lock:
            if self._halted is not None or self._closing:
                return
            self._tickets += 1
            staging = _Staging(self._tickets, [], lambda _: done.set())
            self._stage_feed_catch_up(staging, session_id, state)
            if not staging.written:
                return
            finished = self._settle(staging)
        _finish(finished)
        done.wait()

    def _install(self, session_id: str, state: _Session) -> None:
        """Keep a state (hold the lock), dropping the least recently used beyond the limit."""
        self._states[session_id] = state
        self._states.move_to_end(session_id)
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used states beyond the limit, except those being
        written (hold the lock). A thread using an evicted state still holds it."""
        states = self._states
        while len(states) > self.max_cached_sessions:
            evictable = (s for s, state in states.items() if not state.unacked)
            evicted = next(evictable, None)
            if evicted is None:
                return
            del states[evicted]

    def _builder(self, session_id: str) -> threading.Lock:
        with self._lock:
            return self._builders.setdefault(session_id, threading.Lock())

    def _sessions_in_order(self) -> list[str]:
        mtime = os.stat(self.root).st_mtime_ns
        if self._catalog is None or mtime != self._catalog_mtime:
            ids = []
            with os.scandir(self.root) as entries:
                for entry in entries:
                    name = entry.name
                    if not name.endswith(SUFFIX) or not entry.is_file():
                        continue
                    try:
                        ids.append(check_stored_session_id(name[: -len(SUFFIX)]))
                    except AgentlogError:
                        # Not UTF-8: no id a client can send names it.
                        log.warning("%s: skipped, its name is not UTF-8", self.root / name)
                        continue
            self._catalog = sorted(ids, key=str.encode)
            self._catalog_mtime = mtime
        return self._catalog

    def _add_to_catalog(self, session_id: str) -> None:
        if self._catalog is not None:
            index = bisect.bisect_left(self._catalog, session_id.encode(), key=str.encode)
            if index == len(self._catalog) or self._catalog[index] != session_id:
                self._catalog = [*self._catalog[:index], session_id, *self._catalog[index:]]
            self._catalog_mtime = os.stat(self.root).st_mtime_ns

    def _session_files(self) -> list[tuple[str, Path]]:
        return [(s, self._path(s)) for s in self._sessions_in_order()]

    def _path(self, session_id: str) -> Path:
        # check_stored_session_id has refused '/' and NUL, and the suffix keeps
        # '.' and '..' from naming directories: always a direct child of root.
        return self.root / f"{session_id}{SUFFIX}"

    # --- closing ---

    def close(self) -> None:
        """Finish what is staged, sync, and release the data directory. Idempotent."""
        fd, self._directory_lock = self._directory_lock, -1
        if fd < 0:
            return
        if hasattr(self, "_sync_thread"):
            with self._lock:
                self._closing = True
                self._cond.notify_all()
                # Under interval and never, appends held and not yet released.
                finished = (
                    [] if self.sync_policy is SyncPolicy.ALWAYS else self._write_and_acknowledge()
                )
            _finish(finished)
            if self._sync_thread is not None:
                self._sync_thread.join()
            with self._lock:
                # Made durable, but handed to an event loop that stopped before it
                # acknowledged them: acknowledge them here, so no caller waits on.
                self._on_durable = None
                finished = self._acknowledge_durable()
            _finish(finished)
            clean = self._halted is None
            try:
                paths, self._dirty = self._dirty, set()
                self._syncer.sync(paths | {self.root}, elsewhere=paths & self._elsewhere)
            except OSError as exc:
                log.error("%s: the last sync failed: %s", self.root, exc)
                clean = False
            for session_id in list(self._files):
                self._close_file(session_id)
            self._feed.close()
            self._index.close()
            self._syncer.close()
            if clean:
                self._mark_clean()
        elif hasattr(self, "_syncer"):
            self._syncer.close()
        os.close(fd)  # closing the descriptor releases the flock

    def _mark_clean(self) -> None:
        """Everything is synced: the next open may skip checking the feed."""
        clean = self.root / CLEAN_FILE
        try:
            clean.write_bytes(b"")
            fsync_path(clean)
            fsync_path(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                clean.unlink(missing_ok=True)  # the next open checks instead
            log.warning("%s: could not record a clean stop: %s", self.root, exc)

    def __enter__(self) -> JsonlSessionRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A repository dropped without close() must not keep the directory locked.
        if getattr(self, "_directory_lock", -1) >= 0:
            self.close()


def _finish(stagings: list[_Staging]) -> None:
    """Answer finished stagings (without the store's lock: `done` may take others)."""
    for staging in stagings:
        staging.done(
            [
                outcome if isinstance(outcome, Exception) else outcome[0]
                for outcome in staging.outcomes
                if outcome is not None
            ]
        )


def _missing_records(path: Path, count: int, wanted: int) -> DataLossError:
    return DataLossError(
        f"{path} holds {count} records, but the feed names record {wanted} of it: records "
        "acknowledged earlier are missing from the file",
        reason="MISSING_RECORDS",
        metadata={"file": str(path), "records": str(count)},
    )


def _concurrent_writer(path: Path) -> DataLossError:
    return DataLossError(
        f"{path} changed while agentlog was appending to it; retry the append",
        reason="CONCURRENT_WRITER",
        metadata={"file": str(path)},
    )


def _shrunk_error(path: Path, indexed: int, found: int) -> DataLossError:
    return DataLossError(
        f"{path} is {found} bytes long but held {indexed} bytes of acknowledged records: it "
        "was cut or rewritten behind agentlog's back. Its reads and appends are refused so "
        "that no sequence or id is handed out twice; restore the file (or, to accept it as it "
        "is now, stop agentlog and delete .agentlog.index, which is rebuilt from the files)",
        reason="FILE_SHRANK",
        metadata={"file": str(path), "indexed_bytes": str(indexed), "found_bytes": str(found)},
    )


def _unindexable_line(path: Path, offset: int, sequence: int) -> DataLossError:
    """Why a file whose line at `offset` is no record takes no appends."""
    try:
        with path.open("rb") as file:
            line = read_line(file, offset, offset + (1 << 20))
        record_from_line(line, sequence)
        why = "it does not parse"
    except DecodeError as exc:
        why = str(exc)
    except OSError as exc:
        why = exc.strerror or str(exc)
    error = corrupt_line(path, line_number(path, offset), why, sequence, offset)
    error.message += "; appends to it are refused meanwhile"
    return error


def _identity(path: Path) -> Identity:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return _MISSING
    except OSError as exc:
        raise storage_error(exc, path) from None
    return (stat.st_ino, stat.st_size)


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
