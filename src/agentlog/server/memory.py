"""An in-memory SessionRepository: for tests and for embedding; keeps nothing on disk."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson

from agentlog._codec import event_to_json, make_record
from agentlog._events import ReadDirection
from agentlog._records import (
    BranchInfo,
    EventRecord,
    FeedItem,
    FeedRecord,
    ForkedFrom,
    SessionDeleted,
    SessionInfo,
    SessionLabels,
)
from agentlog._validation import (
    MAIN,
    check_count,
    check_parent_query,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.server import _rules
from agentlog.server._forks import ForkPlan, IdDeriver, branch_exists, source_too_short
from agentlog.server._labels import LabelIndex
from agentlog.server._lifecycle import DeletePlan, LabelChange, erased_digest, nothing_to_delete
from agentlog.server._listing import SessionList, SessionQuery
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
    Appended,
    PendingAppend,
    Place,
    wrong_expected_sequence,
)
from agentlog.server.blocking import BlockingStore, Published


@dataclass
class _Branch:
    records: list[EventRecord] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each record's size as a JSONL line
    by_id: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    forked_from: ForkedFrom | None = None

    def info(self, branch_id: str) -> BranchInfo:
        return BranchInfo(
            branch_id=branch_id,
            event_count=len(self.records),
            first_timestamp_ns=self.records[0].timestamp_ns,
            last_timestamp_ns=self.records[-1].timestamp_ns,
            head_id=self.records[-1].id,
            forked_from=self.forked_from,
        )


class MemorySessionRepository(BlockingStore):
    """Holds every record in process memory; safe to share between threads."""

    def __init__(self, *, clock: Callable[[], int] = time.time_ns) -> None:
        """`clock` gives records their timestamps (nanoseconds since the epoch); a
        branch's never go backwards, whatever it says."""
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, dict[str, _Branch]] = {}
        self._session_ids: list[str] = []  # sorted by bytes, for paging
        self._children: dict[str, list[tuple[EventRecord, int]]] = defaultdict(list)
        # position - 1 -> record; None for a deleted record, a marker for a deletion.
        self._feed: list[EventRecord | SessionDeleted | None] = []
        self._feed_sizes: list[int] = []
        self._places: dict[str, Place] = {}  # record id -> its branch
        self._positions: dict[Place, list[int]] = {}  # each branch's records' positions
        self._deleted_ids: set[bytes] = set()  # digests of deleted records' ids
        self._labels = LabelIndex()

    def _branch(self, session_id: str, branch_id: str) -> _Branch | None:
        branches = self._sessions.get(session_id)
        return branches.get(branch_id) if branches is not None else None

    def _append(self, append: PendingAppend) -> tuple[Appended, int | None]:
        session_id, branch_id, batch = append.session_id, append.branch_id, append.batch
        with self._lock:
            branch = self._branch(session_id, branch_id) or _Branch()
            last = len(branch.records)
            stored = _rules.check_append(
                session_id,
                batch,
                append.expected,
                last,
                stored=branch.by_id.get,
                elsewhere=self._elsewhere((session_id, branch_id)),
                branch_id=branch_id,
                deleted=self._deleted if self._deleted_ids else None,
            )
            if stored is not None:
                records = [branch.records[sequence - 1] for sequence in stored]
                return Appended.stored(session_id, batch, records), None
            if append.labels and last == 0 and self._labels.get(session_id) is None:
                # Labels of an append that starts its branch, for a session with none.
                self._labels.put(session_id, SessionLabels(append.labels, 1))
            sizes = []
            for index, item in enumerate(batch):
                # The size of its line in a JSONL store, near enough.
                size = len(orjson.dumps(item.event_json)) + len(session_id) + 200
                if append.timestamp_ns is None:  # (a copy carries any size)
                    _rules.check_record_size(size, index if len(batch) > 1 else None)
                sizes.append(size)
            now = append.timestamp_ns
            if now is None:
                now = self._clock()
                if branch.records:
                    now = max(now, branch.records[-1].timestamp_ns)
            appended = Appended(session_id, batch, last + 1, now, branch_id=branch_id)
            return appended, self._store(session_id, branch_id, branch, appended.records(), sizes)

    def _store(
        self,
        session_id: str,
        branch_id: str,
        branch: _Branch,
        records: list[EventRecord],
        sizes: list[int],
    ) -> int:
        """Keep new records of a branch (hold the lock); the feed position of the first."""
        if session_id not in self._sessions:
            self._sessions[session_id] = {}
            bisect.insort(self._session_ids, session_id, key=str.encode)
        self._sessions[session_id][branch_id] = branch
        branch.sizes += sizes
        self._feed_sizes += sizes
        for record, size in zip(records, sizes, strict=True):
            branch.records.append(record)
            event_json = event_to_json(record.event)
            branch.by_id[record.id] = (
                record.sequence,
                _rules.content_digest(record.parent_id, event_json),
            )
            self._places[record.id] = (session_id, branch_id)
            if record.parent_id is not None:
                self._children[record.parent_id].append((record, size))
        position = len(self._feed) + 1
        self._feed.extend(records)
        self._positions.setdefault((session_id, branch_id), []).extend(
            range(position, position + len(records))
        )
        return position

    def _deleted(self, record_ids: list[str]) -> str | None:
        return next((i for i in record_ids if erased_digest(i) in self._deleted_ids), None)

    def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        with self._lock:
            branches = self._sessions.get(plan.session_id, {})
            chosen = [plan.branch_id] if plan.branch_id is not None else sorted(branches)
            if not chosen or any(b not in branches for b in chosen):
                raise nothing_to_delete(plan)
            if plan.expected is not None:
                last = len(branches[chosen[0]].records)
                if plan.expected != last:
                    raise wrong_expected_sequence(plan.session_id, plan.expected, last, chosen[0])
            markers = [self._erase(plan.session_id, b) for b in chosen]
        for marker in markers:
            self._announce_deleted(marker)
        return markers

    def _erase(self, session_id: str, branch_id: str) -> SessionDeleted:
        """Drop a branch's records everywhere (hold the lock); the feed's marker."""
        branches = self._sessions[session_id]
        branch = branches.pop(branch_id)
        for record in branch.records:
            self._deleted_ids.add(erased_digest(record.id))
            del self._places[record.id]
            if record.parent_id is not None:
                children = self._children[record.parent_id]
                children[:] = [c for c in children if c[0] is not record]
                if not children:
                    del self._children[record.parent_id]
        for position in self._positions.pop((session_id, branch_id), []):
            self._feed[position - 1] = None
            self._feed_sizes[position - 1] = 0
        if not branches:
            del self._sessions[session_id]
            index = bisect.bisect_left(self._session_ids, session_id.encode(), key=str.encode)
            del self._session_ids[index]
            self._labels.drop(session_id)
        marker = SessionDeleted(
            len(self._feed) + 1, session_id, branch_id, len(branch.records), self._clock()
        )
        self._feed.append(marker)
        self._feed_sizes.append(200)
        return marker

    def relabel(self, change: LabelChange) -> SessionLabels:
        with self._lock:
            labels = change.apply(
                self._labels.get(change.session_id),
                exists=change.session_id in self._sessions,
            )
            self._labels.put(change.session_id, labels)
            return labels

    def _elsewhere(self, here: Place) -> Callable[[list[str]], dict[str, Place]]:
        def elsewhere(record_ids: list[str]) -> dict[str, Place]:
            found = {i: self._places.get(i) for i in record_ids}
            return {i: p for i, p in found.items() if p is not None and p != here}

        return elsewhere

    def fork(self, plan: ForkPlan) -> BranchInfo:
        derive = IdDeriver()
        with self._lock:
            source = self._branch(plan.session_id, plan.branch_id)
            last = len(source.records) if source is not None else 0
            if plan.expected is not None and plan.expected != last:
                raise wrong_expected_sequence(plan.session_id, plan.expected, last, plan.branch_id)
            if source is None or last < plan.up_to_sequence:
                raise source_too_short(plan, last)
            if self._branch(plan.new_session_id, plan.new_branch_id) is not None:
                raise branch_exists(plan.new_session_id, plan.new_branch_id)
            copied = source.records[: plan.up_to_sequence]
            inside = {record.id for record in copied}
            records = [
                make_record(
                    derive(record.id),
                    plan.new_session_id,
                    record.sequence,
                    derive(record.parent_id) if record.parent_id in inside else record.parent_id,
                    record.timestamp_ns,
                    record.event,
                    plan.new_branch_id,
                )
                for record in copied
            ]
            branch = _Branch(forked_from=plan.origin)
            sizes = source.sizes[: plan.up_to_sequence]
            position = self._store(plan.new_session_id, plan.new_branch_id, branch, records, sizes)
            info = branch.info(plan.new_branch_id)
        self._announce(
            Published(plan.new_session_id, plan.new_branch_id, 1, len(records), position)
        )
        return info

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[EventRecord]:
        check_stored_session_id(session_id)
        branch_id = check_stored_branch_id(branch_id)
        selected = _rules.read_range(from_sequence, limit, direction)
        with self._lock:
            branch = self._branch(session_id, branch_id)
            records = branch.records if branch else []
            chosen = [records[s - 1] for s in selected.sequences(len(records))]
        return iter(chosen)

    def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        with self._lock:
            branch = self._branch(session_id, branch_id)
            if branch is None:
                return []
            start = max(from_sequence, 1) - 1
            end = min(len(branch.records), start + limit)
            return branch.records[start : start + _bounded(branch.sizes, start, end)]

    def read_feed_runs(self, from_position: int) -> Iterator[list[FeedItem]]:
        check_count(from_position, "from_position")
        position = max(from_position, 1)
        with self._lock:
            end = len(self._feed)  # the feed as it is now
        while position <= end:
            with self._lock:
                stop = min(end, position - 1 + MESSAGE_RECORDS)
                count = _bounded(self._feed_sizes, position - 1, stop)
                chosen = self._feed[position - 1 : position - 1 + count]
            run: list[FeedItem] = [
                item if isinstance(item, SessionDeleted) else FeedRecord(position + i, item)
                for i, item in enumerate(chosen)
                if item is not None
            ]
            if run:
                yield run
            position += count

    def last_position(self) -> int:
        with self._lock:
            return len(self._feed)

    def read_children(self, parent_id: str) -> Iterator[list[EventRecord]]:
        check_parent_query(parent_id)
        with self._lock:
            children = list(self._children.get(parent_id, ()))
        # Sorting is stable, so each branch keeps its append order.
        children.sort(key=lambda child: (child[0].session_id.encode(), child[0].branch_id.encode()))
        sizes = [size for _, size in children]
        start = 0
        while start < len(children):
            count = _bounded(sizes, start, min(len(children), start + MESSAGE_RECORDS))
            yield [record for record, _ in children[start : start + count]]
            start += count

    def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        check_stored_session_id(session_id)
        branch_id = check_stored_branch_id(branch_id)
        with self._lock:
            branch = self._branch(session_id, branch_id)
            return branch.records[-1] if branch else None

    def session_page(self, query: SessionQuery) -> SessionList:
        infos: list[SessionInfo] = []
        with self._lock:
            for session_id in self._labels.candidates(self._session_ids, query):
                if len(infos) == query.size:
                    return SessionList(infos, infos[-1].session_id)
                branches = self._sessions[session_id]
                info = SessionInfo.of(
                    session_id,
                    [branches[b].info(b) for b in sorted(branches, key=str.encode)],
                    self._labels.get(session_id),
                )
                if query.takes_time(info.last_timestamp_ns):
                    infos.append(info)
        return SessionList(infos, None)

    def close(self) -> None:
        """Nothing to release; present so every backend closes the same way."""


def _bounded(sizes: list[int], start: int, end: int) -> int:
    """How many of the records start..end-1 fit in MESSAGE_BYTES (at least one)."""
    total = 0
    for index in range(start, end):
        total += sizes[index]
        if total > MESSAGE_BYTES and index > start:
            return index - start
    return end - start
