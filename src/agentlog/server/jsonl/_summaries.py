"""Branch summaries for ListSessions: from a session's state when it is in memory,
else from the first and last lines of its file where the index vouches for it,
kept (by the file's identity) for the next listing."""

from __future__ import annotations

import orjson

from agentlog._records import BranchInfo, parse_timestamp
from agentlog.server.jsonl._children import Children
from agentlog.server.jsonl._state import file_identity
from agentlog.server.jsonl.files import first_and_last_lines

# Branch summaries a listing keeps, checked against their file's identity when used.
SUMMARIES = 1 << 16


class Summaries(Children):
    """What a listing says of each branch."""

    def _branch_info(self, branch_id: str, stem: str) -> BranchInfo | None:
        with self._lock:
            cached = stem in self._states
        if not cached:  # a listing need not build the state: what the index vouches for
            found = self._indexed_summary(branch_id, stem)
            if found is not None:
                return found
        state = self._state(stem)
        with self._lock:
            if state.count == 0:
                return None
            return BranchInfo(
                branch_id=branch_id,
                event_count=state.count,
                first_timestamp_ns=state.first_timestamp_ns,
                last_timestamp_ns=state.last_timestamp_ns,
                head_id=state.head_id,
                forked_from=state.forked_from,
            )

    def _indexed_summary(self, branch_id: str, stem: str) -> BranchInfo | None:
        """A branch's summary from its first and last lines, found where the index says,
        when the index vouches for the whole file; None: build its state instead."""
        # A listing's common case first: a summary made earlier, of the file as it is
        # now (one stat of a string path; a file changed behind the server has another
        # identity, and is summarised again).
        identity = file_identity(self._path_text(stem))
        with self._lock:  # other storage threads file summaries meanwhile
            known = self._summaries.get(stem)
        if known is not None and known[0] == identity and known[1].branch_id == branch_id:
            return known[1]
        indexed = self._index.indexed(stem)
        if indexed is None or indexed.records == 0:
            return None
        if (indexed.inode, indexed.size) != identity:
            return None
        try:
            first_text, last_text = first_and_last_lines(
                self._path_text(stem), indexed.size, indexed.last_offset
            )
            first, last = orjson.loads(first_text), orjson.loads(last_text)
            found = BranchInfo(
                branch_id=branch_id,
                event_count=indexed.records,
                first_timestamp_ns=parse_timestamp(first["timestamp"]),
                last_timestamp_ns=parse_timestamp(last["timestamp"]),
                head_id=str(last["id"]),
                forked_from=indexed.first.forked_from if indexed.first is not None else None,
            )
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # the slow path says what is wrong
        with self._lock:  # kept while the file stays as it is (its identity)
            self._summaries[stem] = (identity, found)
            self._summaries.move_to_end(stem)
            while len(self._summaries) > SUMMARIES:
                self._summaries.popitem(last=False)
        return found

    def session_ids(self) -> list[str]:
        """Ids of the sessions that have a file, in byte order."""
        return list(self._catalog_of_places()[0])

    def branch_ids(self, session_id: str) -> list[str]:
        """Ids of a session's branches that have a file, in byte order."""
        return [branch_id for branch_id, _ in self._catalog_of_places()[1].get(session_id, ())]
