"""An in-memory SessionRepository: for tests and for embedding; keeps nothing on disk."""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson

from agentlog._events import ReadDirection
from agentlog._records import EventRecord, FeedGap, FeedRecord, SessionInfo
from agentlog._validation import (
    check_count,
    check_parent_query,
    check_stored_session_id,
)
from agentlog.server import _rules
from agentlog.server._listing import SessionList, SessionQuery, ids_of
from agentlog.server._rules import MESSAGE_BYTES, MESSAGE_RECORDS, Appended, Prepared
from agentlog.server.blocking import BlockingStore


@dataclass
class _Session:
    records: list[EventRecord] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # each record's size as a JSONL line
    by_id: dict[str, tuple[int, bytes]] = field(default_factory=dict)


class MemorySessionRepository(BlockingStore):
    """Holds every record in process memory; safe to share between threads."""

    def __init__(self, *, clock: Callable[[], int] = time.time_ns) -> None:
        """`clock` gives records their timestamps (nanoseconds since the epoch); a
        session's never go backwards, whatever it says."""
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._session_ids: list[str] = []  # sorted by bytes, for paging
        self._children: dict[str, list[tuple[EventRecord, int]]] = defaultdict(list)
        self._feed: list[EventRecord] = []  # position - 1 -> record
        self._feed_sizes: list[int] = []
        self._sessions_by_id: dict[str, str] = {}

    def _append(
        self, session_id: str, batch: list[Prepared], expected: int | None
    ) -> tuple[Appended, int | None]:
        with self._lock:
            session = self._sessions.get(session_id) or _Session()
            last = len(session.records)
            stored = _rules.check_append(
                session_id,
                batch,
                expected,
                last,
                stored=session.by_id.get,
                elsewhere=self._other_sessions(session_id),
            )
            if stored is not None:
                records = [session.records[sequence - 1] for sequence in stored]
                return Appended.stored(session_id, batch, records), None
            sizes = []
            for index, item in enumerate(batch):
                # The size of its line in a JSONL store, near enough.
                size = len(orjson.dumps(item.event_json)) + len(session_id) + 200
                _rules.check_record_size(size, index if len(batch) > 1 else None)
                sizes.append(size)
            if session_id not in self._sessions:
                self._sessions[session_id] = session
                bisect.insort(self._session_ids, session_id, key=str.encode)
            now = self._clock()
            if session.records:
                now = max(now, session.records[-1].timestamp_ns)
            appended = Appended(session_id, batch, last + 1, now)
            records = appended.records()
            session.sizes += sizes
            self._feed_sizes += sizes
            for item, record, size in zip(batch, records, sizes, strict=True):
                session.records.append(record)
                session.by_id[item.id] = (record.sequence, item.digest())
                self._sessions_by_id[item.id] = session_id
                if record.parent_id is not None:
                    self._children[record.parent_id].append((record, size))
            position = len(self._feed) + 1
            self._feed.extend(records)
            return appended, position

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> Iterator[EventRecord]:
        check_stored_session_id(session_id)
        selected = _rules.read_range(from_sequence, limit, direction)
        with self._lock:
            session = self._sessions.get(session_id)
            records = session.records if session else []
            chosen = [records[s - 1] for s in selected.sequences(len(records))]
        return iter(chosen)

    def _other_sessions(self, session_id: str) -> Callable[[list[str]], dict[str, str]]:
        def elsewhere(record_ids: list[str]) -> dict[str, str]:
            found = {i: self._sessions_by_id.get(i) for i in record_ids}
            return {i: s for i, s in found.items() if s is not None and s != session_id}

        return elsewhere

    def read_run(self, session_id: str, from_sequence: int, limit: int) -> list[EventRecord]:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return []
            start = max(from_sequence, 1) - 1
            end = min(len(session.records), start + limit)
            return session.records[start : start + _bounded(session.sizes, start, end)]

    def read_feed_runs(self, from_position: int) -> Iterator[list[FeedRecord | FeedGap]]:
        check_count(from_position, "from_position")
        position = max(from_position, 1)
        with self._lock:
            end = len(self._feed)  # the feed as it is now
        while position <= end:
            with self._lock:
                stop = min(end, position - 1 + MESSAGE_RECORDS)
                count = _bounded(self._feed_sizes, position - 1, stop)
                chosen = self._feed[position - 1 : position - 1 + count]
            yield [FeedRecord(position + i, record) for i, record in enumerate(chosen)]
            position += count

    def last_position(self) -> int:
        with self._lock:
            return len(self._feed)

    def read_children(self, parent_id: str) -> Iterator[list[EventRecord]]:
        check_parent_query(parent_id)
        with self._lock:
            children = list(self._children.get(parent_id, ()))
        # Sorting is stable, so each session keeps its append order.
        children.sort(key=lambda child: child[0].session_id.encode())
        sizes = [size for _, size in children]
        start = 0
        while start < len(children):
            count = _bounded(sizes, start, min(len(children), start + MESSAGE_RECORDS))
            yield [record for record, _ in children[start : start + count]]
            start += count

    def head(self, session_id: str) -> EventRecord | None:
        check_stored_session_id(session_id)
        with self._lock:
            session = self._sessions.get(session_id)
            return session.records[-1] if session else None

    def session_page(self, query: SessionQuery) -> SessionList:
        infos: list[SessionInfo] = []
        with self._lock:
            for session_id in ids_of(self._session_ids, query):
                if len(infos) == query.size:
                    return SessionList(infos, infos[-1].session_id)
                records = self._sessions[session_id].records
                infos.append(
                    SessionInfo(
                        session_id=session_id,
                        event_count=len(records),
                        first_timestamp_ns=records[0].timestamp_ns,
                        last_timestamp_ns=records[-1].timestamp_ns,
                        head_id=records[-1].id,
                    )
                )
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
