"""Session labels held in memory, with what finds sessions by them quickly.

The memory store keeps its labels here; the JSONL store keeps them here too,
loaded from its labels file. For each (key, value) the ids of the sessions
carrying it are kept in byte order, so a page of sessions with a label is found
by a binary search and a walk, whatever the number of sessions.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

from agentlog._records import SessionLabels
from agentlog.server._listing import SessionQuery, ids_of


class LabelIndex:
    """Every session's labels, and the sessions carrying each label. Not thread-safe:
    its owner locks around it."""

    def __init__(self) -> None:
        self._labels: dict[str, SessionLabels] = {}
        self._holders: dict[tuple[str, str], list[str]] = {}  # sorted by UTF-8 bytes

    def __len__(self) -> int:
        return len(self._labels)

    def get(self, session_id: str) -> SessionLabels | None:
        return self._labels.get(session_id)

    def items(self) -> Iterator[tuple[str, SessionLabels]]:
        return iter(self._labels.items())

    def put(self, session_id: str, labels: SessionLabels) -> None:
        """Give a session these labels (replacing what it had)."""
        self.drop(session_id)
        self._labels[session_id] = labels
        for pair in labels.labels.items():
            holders = self._holders.setdefault(pair, [])
            bisect.insort(holders, session_id, key=str.encode)

    def drop(self, session_id: str) -> None:
        """Forget a session's labels."""
        old = self._labels.pop(session_id, None)
        if old is None:
            return
        for pair in old.labels.items():
            holders = self._holders[pair]
            index = bisect.bisect_left(holders, session_id.encode(), key=str.encode)
            if index < len(holders) and holders[index] == session_id:
                del holders[index]
            if not holders:
                del self._holders[pair]

    def candidates(self, ordered: Sequence[str], query: SessionQuery) -> Iterator[str]:
        """The ids a query may take, in byte order from after `query.after`: those of
        `ordered` (every session, sorted by UTF-8 bytes) within its prefixes and, if it
        filters by labels, carrying them all (found from the rarest label's holders)."""
        if not query.labels:
            yield from ids_of(ordered, query)
            return
        rarest = min(query.labels, key=lambda pair: len(self._holders.get(pair, ())))
        for session_id in ids_of(self._holders.get(rarest, []), query):
            found = self._labels.get(session_id)
            if found is not None and query.takes_labels(found.labels):
                yield session_id
