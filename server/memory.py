"""An in-memory SessionRepository: for tests and for embedding; keeps nothing on disk."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

from agentlog._codec import validate_append
from agentlog._records import AppendEvent, EventRecord
from agentlog._validation import check_record_id, check_session_id


class MemorySessionRepository:
    """Holds every record in process memory; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, list[EventRecord]] = defaultdict(list)
        self._children: dict[str, list[EventRecord]] = defaultdict(list)

    def append(self, event: AppendEvent) -> EventRecord:
        validate_append(event)
        with self._lock:
            record = EventRecord(
                id=str(uuid.uuid4()),
                session_id=event.session_id,
                parent_id=event.parent_id,
                timestamp_ns=time.time_ns(),
                event=event.event,
            )
            self._sessions[event.session_id].append(record)
            if record.parent_id is not None:
                self._children[record.parent_id].append(record)
        return record

    def load_session(self, session_id: str) -> list[EventRecord]:
        check_session_id(session_id)
        with self._lock:
            return list(self._sessions.get(session_id, ()))

    def load_children(self, parent_id: str) -> list[EventRecord]:
        check_record_id(parent_id, "parent_id")
        with self._lock:
            children = list(self._children.get(parent_id, ()))
        # Sorting is stable, so each session keeps its append order.
        return sorted(children, key=lambda r: r.session_id.encode())

    def head(self, session_id: str) -> EventRecord | None:
        check_session_id(session_id)
        with self._lock:
            records = self._sessions.get(session_id)
            return records[-1] if records else None

    def close(self) -> None:
        """Nothing to release; present so every backend closes the same way."""
