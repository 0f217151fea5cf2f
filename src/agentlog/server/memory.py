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
from agentlog._records import EventRecord, FeedGap, FeedRecord, SessionInfo, SessionPage
from agentlog._validation import (
    check_count,
    check_page_size,
    check_parent_query,
    check_stored_session_id,
)
from agentlog.server import _rules
from agentlog.server._rules import Appended, Prepared
from agentlog.server.blocking import BlockingStore


@dataclass
class _Session:
    records: list[EventRecord] = field(default_factory=list)
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
        self._children: dict[str, list[EventRecord]] = defaultdict(list)
        self._feed: list[EventRecord] = []  # position - 1 -> record
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
            for index, item in enumerate(batch):
                # The size of its line in a JSONL store, near enough.
                size = len(orjson.dumps(item.event_json)) + len(session_id) + 200
                _rules.check_record_size(size, index if len(batch) > 1 else None)
            if session_id not in self._sessions:
                self._sessions[session_id] = session
                bisect.insort(self._session_ids, session_id, key=str.encode)
            now = self._clock()
            if session.records:
                now = max(now, session.records[-1].timestamp_ns)
            appended = Appended(session_id, batch, last + 1, now)
            records = appended.records()
            for item, record in zip(batch, records, strict=True):
                session.records.append(record)
                session.by_id[item.id] = (record.sequence, item.digest())
                self._sessions_by_id[item.id] = session_id
                if record.parent_id is not None:
                    self._children[record.parent_id].append(record)
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

    def read_all(
        self, from_position: int, limit: int | None = None
    ) -> Iterator[FeedRecord | FeedGap]:
        check_count(from_position, "from_position")
        start = max(from_position, 1)
        with self._lock:
            end = len(self._feed) if limit is None else min(len(self._feed), start - 1 + limit)
            chosen = self._feed[start - 1 : end]
        return (FeedRecord(start + i, record) for i, record in enumerate(chosen))

    def last_position(self) -> int:
        with self._lock:
            return len(self._feed)

    def load_children(self, parent_id: str) -> list[EventRecord]:
        check_parent_query(parent_id)
        with self._lock:
            children = list(self._children.get(parent_id, ()))
        # Sorting is stable, so each session keeps its append order.
        return sorted(children, key=lambda r: r.session_id.encode())

    def head(self, session_id: str) -> EventRecord | None:
        check_stored_session_id(session_id)
        with self._lock:
            session = self._sessions.get(session_id)
            return session.records[-1] if session else None

    def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        size = check_page_size(page_size)
        after = self.page_tokens.decode(page_token)
        with self._lock:
            start = (
                0
                if after is None
                else bisect.bisect_right(self._session_ids, after.encode(), key=str.encode)
            )
            ids = self._session_ids[start : start + size]
            more = start + size < len(self._session_ids)
            infos = []
            for session_id in ids:
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
        token = self.page_tokens.encode(ids[-1]) if more and ids else None
        return SessionPage(sessions=infos, next_page_token=token)

    def close(self) -> None:
        """Nothing to release; present so every backend closes the same way."""
