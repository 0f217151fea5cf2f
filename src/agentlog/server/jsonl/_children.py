"""LoadChildren on the JSONL store: the index finds a parent's children, and each
session's file is read once for them, in order of session and branch ids."""

from __future__ import annotations

import itertools
import logging
from array import array
from collections.abc import Iterator

from agentlog._lines import record_from_line
from agentlog._plans import DecodeError
from agentlog._records import EventRecord
from agentlog._validation import MAIN, check_parent_query
from agentlog.errors import DataLossError
from agentlog.server._rules import MESSAGE_BYTES, MESSAGE_RECORDS
from agentlog.server.jsonl._reader import Reader
from agentlog.server.jsonl._state import View, file_identity
from agentlog.server.jsonl.files import corrupt_line, line_number, read_line, storage_error
from agentlog.server.jsonl.index_tables import Located

log = logging.getLogger("agentlog.server")


class Children(Reader):
    """Reading the children of a record."""

    def read_children(self, parent_id: str) -> Iterator[list[EventRecord]]:
        check_parent_query(parent_id)
        return self._read_children(parent_id)

    def _read_children(self, parent_id: str) -> Iterator[list[EventRecord]]:
        """Children found by the index, read a session at a time (one open file each),
        in runs bounded as every stream's messages are."""
        pending: list[EventRecord] = []
        size = 0
        by_file = itertools.groupby(self._index.children(parent_id), key=lambda c: c.stem)
        groups = [(stem, list(group)) for stem, group in by_file]
        # Sessions in byte order of their ids, then branches in byte order of theirs.
        groups.sort(key=lambda g: _place_key(self._place_of(g[0]) or (g[0], MAIN)))
        for stem, group in groups:
            try:
                view = self._children_view(stem)
                for record, line_size in self._records_at(view, group):
                    if record.parent_id != parent_id:
                        continue  # a key collision
                    if pending and (
                        len(pending) >= MESSAGE_RECORDS or size + line_size > MESSAGE_BYTES
                    ):
                        yield pending
                        pending, size = [], 0
                    pending.append(record)
                    size += line_size
            except DataLossError as exc:  # a damaged session: its loss alone
                self._skipped_children(stem, exc)
        if pending:
            yield pending

    def _records_at(self, view: View, places: list[Located]) -> Iterator[tuple[EventRecord, int]]:
        """The records at the places the index gave (of one session, in sequence order),
        with their line's size, reading the file once."""
        try:
            file = view.path.open("rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise storage_error(exc, view.path) from None
        with file:
            for place in places:
                if place.sequence > view.count:
                    continue  # the index ran ahead of a file cut since: nothing to serve
                line = read_line(file, place.offset, view.end)
                try:
                    yield record_from_line(line, place.sequence, self._branches), len(line) + 1
                except DecodeError as exc:
                    number = line_number(view.path, place.offset)
                    error = corrupt_line(view.path, number, str(exc), place.sequence, place.offset)
                    self._seal(view.path, error, place.sequence, place.offset)
                    raise error from None

    def _skipped_children(self, stem: str, error: DataLossError) -> None:
        """LoadChildren leaves out the children a damaged session holds (its own reads
        say why): one damaged file harms no other session's answers. Logged once a
        session and reason."""
        reason = error.reason or "DATA_LOSS"
        if (stem, "children:" + reason) not in self._reported_gaps:
            self._reported_gaps.add((stem, "children:" + reason))
            log.error("LoadChildren leaves out children in session %r: %s", stem, error.message)

    def _children_view(self, stem: str) -> View:
        """A view for reading records at offsets the index gave: the session's state if
        at hand, or just what the index holds if it vouches for the file."""
        path = self._path(stem)
        with self._lock:
            state = self._states.get(stem)
            if state is not None and (state.unacked or state.identity == file_identity(path)):
                return state.view()
        indexed = self._index.indexed(stem)
        if indexed is not None and (indexed.inode, indexed.size) == file_identity(path):
            return View(path, array("Q"), indexed.records, indexed.size)
        return self._view(stem)


def _place_key(place: tuple[str, str]) -> tuple[bytes, bytes]:
    return place[0].encode(), place[1].encode()
