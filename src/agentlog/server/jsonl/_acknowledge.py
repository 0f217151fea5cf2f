"""The JSONL store's commit path, its second half: staged appends acknowledged in order
once durable (made visible, indexed, published), or taken back when a write or sync fails.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from agentlog.errors import AgentlogError
from agentlog.server._pauses import point
from agentlog.server._rules import Appended
from agentlog.server.blocking import Outcome, Published
from agentlog.server.jsonl._state import LastRecord, SessionState, file_identity
from agentlog.server.jsonl._summaries import Summaries
from agentlog.server.jsonl.durability import SyncPolicy
from agentlog.server.jsonl.feed import Entry
from agentlog.server.jsonl.index import MARK_EVERY
from agentlog.server.jsonl.keys import Row
from agentlog.server.jsonl.layout import FirstLine

log = logging.getLogger("agentlog.server")

Answer: TypeAlias = Appended | Exception
"""What a submitted append is answered (see `JsonlSessionRepository.submit`)."""

MAX_UNACKED_IDS = 1 << 16


@dataclass(slots=True)
class Written:
    """A staged append's lines (or, with no state, a feed entry alone)."""

    index: int  # its place in the staging's appends
    stem: str
    state: SessionState | None
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
    opened_line: bool = False  # it began with the newline of arcan's last record


@dataclass(slots=True)
class Staging:
    """Appends staged together, acknowledged together."""

    ticket: int
    outcomes: list[Outcome | None]
    done: Callable[[list[Answer]], None]
    written: list[Written] = field(default_factory=list)
    keys: dict[str, int] = field(default_factory=dict)  # the index keys of its ids


class Acknowledging(Summaries):
    """Staged appends, queued in order until durable as the policy promises, then
    acknowledged (made visible, indexed and published), or taken back on a failure."""

    sync_policy: SyncPolicy
    read_only: bool  # appends refused, nothing written in the directory
    clock: Callable[[], int]  # the time now, in nanoseconds since the epoch
    # Ids of staged appends, to find a retry of one still in flight (an entry
    # whose append is no longer live is stale; cleared when nothing is staged).
    _unacked_ids: dict[str, Written]
    # Staged and not yet acknowledged, in order. Under `always`, those up to
    # ticket `_released` may be synced, those up to `_durable` are.
    _queue: deque[Staging]
    _on_durable: Callable[[], bool] | None
    _dirty: set[Path]  # written since the last sync
    _tickets: int
    _released: int
    _durable: int
    _feed_durable_size: int

    def _fail(self, stagings: list[Staging], error: Exception) -> None:
        """Take back the lines of unacknowledged stagings (the newest there are) and
        fail their appends (hold the lock)."""
        for staging in reversed(stagings):
            for written in reversed(staging.written):
                self._take_back(written)
            staging.written.clear()
            staging.outcomes = [error] * len(staging.outcomes)
        self._feed.abandon()

    def _take_back(self, written: Written) -> None:
        """Cut a staged append's lines back off its file (the newest of its session)."""
        state = written.state
        if state is None:
            return
        written.live = False
        state.written = written.entry[2] - 1
        state.written_end = written.start
        state.written_last_offset = written.previous_last_offset
        state.open_line = state.open_line or written.opened_line
        del state.marks[(state.written + MARK_EVERY - 1) // MARK_EVERY :]
        state.unacked -= 1
        try:
            os.truncate(state.path, written.start)
        except OSError as exc:
            log.error("%s: could not cut unacknowledged lines off: %s", state.path, exc)
        self._index.cut_back(
            written.stem,
            written.inode,
            written.start,
            state.written,
            written.previous_last_offset,
        )
        state.identity = file_identity(state.path)
        self._close_file(written.stem)

    def _settle(self, staging: Staging, *, hold: bool = False) -> list[Staging]:
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
        finish(finished)

    def _release(self) -> None:
        if self._released < self._tickets:
            self._released = self._tickets
            self._cond.notify_all()

    def _write_and_acknowledge(self) -> list[Staging]:
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
        finish(finished)

    def _acknowledge_durable(self) -> list[Staging]:
        finished = []
        while self._queue and self._queue[0].ticket <= self._durable:
            staging = self._queue.popleft()
            self._acknowledge(staging)
            finished.append(staging)
        if finished:
            self._feed.acknowledged_size = self._feed_durable_size
        return finished

    def _acknowledge(self, staging: Staging) -> None:
        """Make a staging's appends visible, in order, and tell listeners (hold the lock)."""
        for written in staging.written:
            self._feed.add(written.entry)
            state, appended = written.state, written.appended
            if state is None or appended is None:
                # A feed entry alone (both or neither are set): records the feed
                # learns of late (a fork's, or lines another writer added).
                self._publish_caught_up(written.entry)
                continue
            position, stem = written.entry[:2]
            state.count = appended.last_sequence
            state.end = written.end
            state.last_offset = written.last_offset
            if appended.first_sequence == 1:
                state.first_timestamp_ns = appended.timestamp_ns
                state.started_here = True
            state.last_timestamp_ns = appended.timestamp_ns
            state.head_id = appended.batch[-1].id
            state.last_record = LastRecord(
                appended.last_sequence, appended.batch[-1], appended.timestamp_ns
            )
            state.unacked -= 1
            first = None
            if appended.first_sequence == 1:
                branch = appended.branch_id if self._branches else None
                first = FirstLine(appended.session_id, branch, started_here=True)
            self._index.record(
                stem, written.rows, written.inode, written.end, state.last_offset, first=first
            )
            written.live = False
            staging.outcomes[written.index] = (appended, position)
            self._publish(appended, position)
            if written.new_file:
                self._add_to_catalog(stem)
        if not self._queue:
            self._unacked_ids.clear()  # nothing staged: every entry is stale
        elif len(self._unacked_ids) > MAX_UNACKED_IDS:
            self._unacked_ids = {i: w for i, w in self._unacked_ids.items() if w.live}
        self._evict()

    def _publish_caught_up(self, entry: Entry) -> None:
        position, stem, sequence, count, _ = entry
        place = self._place_of(stem) if stem else None
        if place is not None:
            self._announce(Published(*place, sequence, sequence + count - 1, position))


def finish(stagings: list[Staging]) -> None:
    """Answer finished stagings (without the store's lock: `done` may take others)."""
    if stagings:
        point("commit.acknowledged")
    for staging in stagings:
        staging.done(
            [
                outcome if isinstance(outcome, Exception) else outcome[0]
                for outcome in staging.outcomes
                if outcome is not None
            ]
        )
