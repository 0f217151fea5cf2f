"""The JSONL store's commit path, its first half: appends decided and staged under the
store's lock (their lines written with one O_APPEND write, feed positions handed out);
`_acknowledge` makes them visible once durable."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentlog._codec import (
    event_to_json,
    record_line,
)
from agentlog._lines import (
    record_from_line,
)
from agentlog._plans import (
    DecodeError,
)
from agentlog._records import (
    EventRecord,
    format_timestamp,
)
from agentlog.errors import (
    AgentlogError,
    FailedPreconditionError,
    ResourceExhaustedError,
    UnavailableError,
)
from agentlog.server import _rules
from agentlog.server._pauses import point
from agentlog.server._rules import (
    Appended,
    PendingAppend,
    Place,
    Prepared,
)
from agentlog.server.blocking import Outcome
from agentlog.server.jsonl._acknowledge import (
    Acknowledging,
    Answer,
    Staging,
    Written,
    finish,
)
from agentlog.server.jsonl._state import (
    MISSING,
    STALE,
    Identity,
    SessionState,
    concurrent_writer,
    file_identity,
)
from agentlog.server.jsonl.files import (
    read_line,
    storage_error,
)
from agentlog.server.jsonl.index import MARK_EVERY
from agentlog.server.jsonl.index_tables import Located
from agentlog.server.jsonl.keys import Row, key_of

log = logging.getLogger("agentlog.server")

_BLANKED = bytes(10 if byte == 10 else 32 for byte in range(256))


class CommitPath(Acknowledging):
    """Appends: staged under the lock in arrival order (decided, written with one
    O_APPEND write, given feed positions), then acknowledged in order once
    durable as the policy promises, which makes them visible and publishes them."""

    def commit_answers(self, appends: Sequence[PendingAppend]) -> list[Answer]:
        done = threading.Event()
        box: list[list[Answer]] = []

        def finished(answers: list[Answer]) -> None:
            box.append(answers)
            done.set()

        self.submit(appends, finished)
        done.wait()
        return box[0]

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
        if self.read_only:
            raise FailedPreconditionError(
                f"{self.root} is served read-only: appends are refused; serve it without "
                "--read-only (or copy it into a store that is not) to append",
                reason="READ_ONLY",
            )
        # The file of each append's branch, or why there is none (that append fails).
        stems: list[str | Exception] = []
        for append in appends:
            try:
                stems.append(self._stem_to_write(append.session_id, append.branch_id))
            except AgentlogError as exc:
                stems.append(exc)
        files = {stem for stem in stems if isinstance(stem, str)}
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
                if self._draining:  # a delete is settling the feed: wait for it
                    if not block:
                        return False
                    self._cond.wait(0.05)
                    continue
                identities = {s: self._ready(s) for s in files}
                missing = [s for s, identity in identities.items() if identity is None]
                if not missing:
                    staging = self._stage(appends, stems, done, identities)  # type: ignore[arg-type]
                    finished = self._settle(staging, hold=hold)
                    break
            if not block:
                return False
            for stem in missing:
                self._state(stem)
        point("commit.staged")
        finish(finished)
        return True

    def _catch_up_index(self) -> None:
        """Bring the index up to date before an append (it fell behind on a full disk):
        until it knows every id in the files, a retried id could be stored twice."""
        try:
            self._index.catch_up_all(self._stem_files())
        except sqlite3.OperationalError as exc:
            raise ResourceExhaustedError(
                f"no space to update the index in {self.root} ({exc}): appends are refused "
                "until there is; free disk space, then retry (reads are served meanwhile)",
                reason="DISK_FULL",
            ) from None

    def _ready(self, stem: str) -> Identity | None:
        """The file's identity if the session's state is at hand to append to; None if
        it must be loaded first (hold the lock)."""
        state = self._states.get(stem)
        path = state.path if state is not None else self._path(stem)
        identity = self._identity_for_writing(stem, path)
        if state is not None:
            if state.unacked or state.identity == identity:
                self._states.move_to_end(stem)
                return identity
            del self._states[stem]  # changed behind our back: rebuild it
            self._close_file(stem)
            return None
        if identity == MISSING and self._index.indexed(stem) is None:
            # A new session: nothing to read. (Not evicting here: that could drop a
            # state readied for this same append; acknowledging evicts.)
            self._states[stem] = SessionState(path)
            return identity
        return None

    def _identity_for_writing(self, stem: str, path: Path) -> Identity:
        """The file's identity, from its open descriptor if there is one (cheaper than
        by path; a file replaced or removed since it was opened has no links left)."""
        cached = self._files.get(stem)
        if cached is not None:
            try:
                stat = os.fstat(cached[0])
            except OSError as exc:
                raise storage_error(exc, path) from None
            if stat.st_nlink > 0:
                return (stat.st_ino, stat.st_size)
            self._close_file(stem)
        return file_identity(path)

    def _stage(
        self,
        appends: Sequence[PendingAppend],
        stems: list[str | Exception],
        done: Callable[[list[Answer]], None],
        identities: dict[str, Identity],
    ) -> Staging:
        """Decide each append, in order, and write its lines (hold the lock)."""
        self._tickets += 1
        staging = Staging(self._tickets, [None] * len(appends), done)
        ids = [item.id for append in appends for item in append.batch]
        keys = [key_of(record_id) for record_id in ids]
        holders = self._index.holders(ids, keys)
        staging.keys = dict(zip(ids, keys, strict=True))
        # Ids of deleted records among these (kept, so none is used again).
        erased = self._sessions_db.erased_among(ids) if self._sessions_db.has_erased else set()
        for index, (append, stem) in enumerate(zip(appends, stems, strict=True)):
            try:
                if isinstance(stem, Exception):
                    raise stem
                outcome = self._stage_one(
                    staging,
                    index,
                    append,
                    stem,
                    holders=holders,
                    identities=identities,
                    erased=erased,
                )
            except Exception as exc:  # this append fails alone
                outcome = exc
            if outcome is not None:
                staging.outcomes[index] = outcome
        return staging

    def _stage_one(
        self,
        staging: Staging,
        index: int,
        append: PendingAppend,
        stem: str,
        *,
        holders: dict[str, list[Located]],
        identities: dict[str, Identity],
        erased: set[str],
    ) -> Outcome | None:
        """Decide one append and write its lines to file `stem`; None once written
        (acknowledged later)."""
        if self._halted is not None:
            raise self._halted
        batch = append.batch
        state = self._states[stem]
        if state.damage is not None:
            raise state.damage  # never append after damage: it would bury it
        if state.sealed is not None:
            raise state.sealed
        if identities[stem] != state.identity:
            # Another writer appended while our own appends were in flight.
            raise concurrent_writer(state.path)
        mine, others = self._holdings(stem, batch, holders)
        if not mine and not others:  # new ids, the common case: only the expectation
            if erased:
                gone = next((item.id for item in batch if item.id in erased), None)
                if gone is not None:
                    raise _rules.record_id_deleted(gone)
            if append.expected is not None and append.expected != state.written:
                raise _rules.wrong_expected_sequence(
                    append.session_id, append.expected, state.written, append.branch_id
                )
            self._write_lines(staging, index, stem, state, append)
            identities[stem] = state.identity
            return None

        def stored(record_id: str) -> tuple[int, bytes] | None:
            record = mine.get(record_id)
            if record is None:
                return None
            digest = _rules.content_digest(record.parent_id, event_to_json(record.event))
            return record.sequence, digest

        retried = _rules.check_append(
            append.session_id,
            batch,
            append.expected,
            state.written,
            stored=stored,
            elsewhere=lambda ids: {i: others[i] for i in ids if i in others},
            branch_id=append.branch_id,
            deleted=lambda ids: next((i for i in ids if i in erased), None),
        )
        if retried is not None:
            # If the first attempt stopped between the session file and the feed
            # (a crash), the feed learns of its records now.
            self._stage_feed_catch_up(staging, stem, state)
            stored_records = [mine[item.id] for item in batch]
            return Appended.stored(append.session_id, batch, stored_records), None
        self._write_lines(staging, index, stem, state, append)
        identities[stem] = state.identity
        return None

    def _holdings(
        self, stem: str, batch: list[Prepared], holders: dict[str, list[Located]]
    ) -> tuple[dict[str, EventRecord], dict[str, Place]]:
        """The records file `stem` holds with the batch's ids, and the branch that holds
        each of the others, confirmed by reading them (rare: retries, reuse)."""
        mine: dict[str, EventRecord] = {}
        others: dict[str, Place] = {}
        if not holders and not self._unacked_ids:
            return mine, others
        for item in batch:
            places = list(holders.get(item.id, ()))
            staged = self._unacked_ids.get(item.id)
            if staged is not None and staged.live:
                sequence, offset = next((r[2], r[3]) for r in staged.rows if r[0] == item.id)
                places.append(Located(staged.stem, sequence, offset))
            for place in places:
                record = self._record_at(place)
                if record is None and place.stem != stem:
                    where = self._place_of(place.stem)
                    if where is not None and self._lost(place.stem):
                        # Its file was cut or removed behind our back: the id may be
                        # there still, for all we can tell.
                        others.setdefault(item.id, where)
                    continue
                if record is None or record.id != item.id:
                    continue  # a key collision, or a row of a file since changed
                if place.stem == stem:
                    mine[item.id] = record
                else:
                    others.setdefault(item.id, (record.session_id, record.branch_id))
        return mine, others

    def _lost(self, stem: str) -> bool:
        """Whether a session's file was cut or removed behind agentlog's back (its index
        entry still vouches for records the file no longer has)."""
        if self._index.shrunk(stem) is not None:
            return True
        return self._index.indexed(stem) is not None and file_identity(self._path(stem)) == MISSING

    def _record_at(self, place: Located) -> EventRecord | None:
        """The record an index row points at, if it is still there."""
        path = self._path(place.stem)
        try:
            with path.open("rb") as file:
                line = read_line(file, place.offset, file.seek(0, os.SEEK_END))
            return record_from_line(line, place.sequence, self._branches)
        except (FileNotFoundError, DecodeError):
            return None
        except OSError as exc:  # not "absent": a retry must not be taken for a new id
            raise storage_error(exc, path) from None

    def _write_lines(
        self,
        staging: Staging,
        index: int,
        stem: str,
        state: SessionState,
        append: PendingAppend,
    ) -> None:
        batch, kept_ns = append.batch, append.timestamp_ns
        session_id, branch_id = append.session_id, append.branch_id
        last = state.written
        # Lines of a multi-event batch name the batch's last sequence, so a
        # batch cut short by a crash is recognised and never served in part.
        batch_end = last + len(batch) if len(batch) > 1 else None
        # One timestamp for the whole batch: it is one commit. A session's timestamps
        # never go backwards, even when the clock steps back (kept ones are copied).
        timestamp_ns = max(self.clock(), state.written_timestamp_ns) if kept_ns is None else kept_ns
        timestamp = format_timestamp(timestamp_ns)
        appended = Appended(session_id, batch, last + 1, timestamp_ns, branch_id=branch_id)
        lines = []
        for sequence, item in enumerate(batch, last + 1):
            fields: dict[str, Any]
            if self._branches:  # newest arcan's fields, in its order
                fields = {
                    "id": item.id,
                    "session_id": session_id,
                    "branch_id": branch_id,
                    "sequence": sequence,
                    "parent_id": item.parent_id,
                    "timestamp": timestamp,
                    "event": item.event_json,
                }
                if sequence == 1:
                    fields["agentlog"] = True  # started here: see FirstLine
            else:  # the seed's fields, then agentlog's sequence
                fields = {
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
            if len(line) > _rules.MAX_RECORD_BYTES and kept_ns is None:
                # (A copy carries what its source holds, whatever its size.)
                _rules.check_record_size(len(line), sequence - last - 1 if batch_end else None)
            lines.append(line)
        # The last record arcan wrote may lack its newline (it died between the two
        # writes): the newline goes first, in the same write.
        ending = b"\n" if state.open_line else b""
        data = ending + b"".join(lines)
        new_file = state.identity == MISSING
        fd = self._file(stem, state)
        start = state.written_end
        try:
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
            self._blank_misplaced(stem, state, end - count, data[:count])
            raise concurrent_writer(state.path)
        state.open_line = False
        rows: list[Row] = []
        offset, keys = start + len(ending), staging.keys
        for sequence, (item, line) in enumerate(zip(batch, lines, strict=True), last + 1):
            if sequence % MARK_EVERY == 1:
                state.marks.append(offset)
            rows.append((item.id, item.parent_id, sequence, offset, keys[item.id]))
            offset += len(line)
        previous_last = state.written_last_offset
        inode = self._files[stem][1]
        state.identity = (inode, offset)
        state.written += len(batch)
        state.written_end = offset
        state.written_last_offset = offset - len(lines[-1])
        state.written_timestamp_ns = max(state.written_timestamp_ns, timestamp_ns)
        state.unacked += 1
        entry = self._feed.reserve(stem, last + 1, len(batch), start + len(ending))
        written = Written(
            index,
            stem,
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
            opened_line=bool(ending),
        )
        staging.written.append(written)
        self._unacked_ids.update(dict.fromkeys([item.id for item in batch], written))
        self._dirty.add(state.path)
        if new_file:
            self._dirty.add(self.root)  # the new directory entry
        point("commit.written")

    def _blank_misplaced(self, stem: str, state: SessionState, offset: int, data: bytes) -> None:
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
        self._close_file(stem)
        state.identity = STALE  # rebuilt from the file before the next append
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data.translate(_BLANKED), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("%s: could not blank the misplaced lines: %s", state.path, exc)
            state.sealed = concurrent_writer(state.path)

    def _stage_feed_catch_up(self, staging: Staging, stem: str, state: SessionState) -> None:
        """Give feed positions to records of a feed session that the feed lacks (hold
        the lock): an append a crash cut short between its session lines and its feed
        line, or lines another writer (arcan) added to a session agentlog writes.

        A session is in the feed once the feed knows it or if agentlog started it
        (sessions only arcan wrote are not).
        """
        covered = self._feed.covered(stem)
        known = covered > 0 or state.started_here
        if known and covered < state.count and state.damage is None:
            entry = self._feed.reserve(stem, covered + 1, state.count - covered, -1)
            staging.written.append(Written(-1, stem, None, None, entry, [], 0, 0, 0, 0, 0, False))

    def _feed_catch_up(self, stem: str, state: SessionState) -> None:
        """Stage feed positions for records of the session the feed lacks, and wait."""
        if self.read_only:
            return  # nothing is written; the feed is as it was found
        done = threading.Event()
        with self._lock:
            if self._halted is not None or self._closing:
                return
            self._tickets += 1
            staging = Staging(self._tickets, [], lambda _: done.set())
            self._stage_feed_catch_up(staging, stem, state)
            if not staging.written:
                return
            finished = self._settle(staging)
        finish(finished)
        done.wait()
