"""The JSONL store's commit log: every append in commit order, with global positions.

`<root>/.agentlog.feed` holds one `{"position", "session_id", "sequence",
"count", "offset"}` line per append: records `sequence`.. of the session file
hold positions `position`.., and the first starts at byte `offset` of the file
(absent in feeds written before it was kept). `session_id` names the file: its
name less `.jsonl` (its stem), which in the branch layout is
`<session_id>__<branch_id>`. Lines are written when an
append is staged, right after its session lines, and synced with them; an entry
is served (and counted in `last_position`) once its append is acknowledged.
Positions are never reused.

A deletion is a line of its own, `{"position", "session_id", "sequence",
"count": 1, "deleted", "place"}`: the stem's records 1..`sequence` were deleted
at time `deleted` (ns), `place` names their [session, branch]. It takes one
position; the stem's entries before it are dead (never served again), and its
file may start again at sequence 1 after it.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import sys
import threading
from array import array
from collections.abc import Iterator
from pathlib import Path

import orjson

from agentlog.server.jsonl.files import storage_error

log = logging.getLogger("agentlog.server")

FEED_FILE = ".agentlog.feed"
_READ_CHUNK = 256
# One append's entry: (position, stem, sequence, count, offset); stem ""
# marks a gap, offset -1 an unknown offset, offset MARKER a deletion.
Entry = tuple[int, str, int, int, int]
MARKER = -2


class Feed:
    """The commit log. The store calls it under its lock, except `entries_from`,
    which runs beside the writer: the columns it reads are appended to and read
    under `_columns`, a lock of their own (the innermost: nothing is taken under it)."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """The feed in `path`; `read_only`: only read (a store that writes nothing)."""
        self.path = path
        self._read_only = read_only
        self._columns = threading.Lock()
        self.positions = array("Q")
        self.sequences = array("Q")
        self.counts = array("Q")
        self.offsets = array("q")
        self.stems: list[str] = []
        self.last_position = 0  # the last acknowledged position
        # Deletions: each stem's latest marker's position, and each marker's
        # (session, branch, time).
        self.deleted_at: dict[str, int] = {}
        self.markers: dict[int, tuple[str, str, int]] = {}
        self._load()
        self.next_position = self.last_position + 1  # the next to hand out
        self._covered: dict[str, int] = {}  # written, acknowledged or not
        self._recount()
        if read_only:
            self.fd = -1
            self.size = self.acknowledged_size = 0
            return
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.size = self.acknowledged_size = os.fstat(self.fd).st_size

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        good = 0
        for line in data.splitlines(keepends=True):
            try:
                entry = orjson.loads(line) if line.endswith(b"\n") else None
                if entry is None or entry["position"] != self.last_position + 1:
                    break
                position, stem = entry["position"], entry["session_id"]
                sequence, count = entry["sequence"], entry["count"]
                if "deleted" in entry:
                    session_id, branch_id = entry["place"]
                    self.markers[position] = (session_id, branch_id, entry["deleted"])
                    self.add((position, stem, sequence, 1, MARKER))
                else:
                    self.add((position, stem, sequence, count, entry.get("offset", -1)))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                break
            good += len(line)
        if good < len(data) and not self._read_only:
            # Our own log, cut short by a crash: its tail was never acknowledged.
            log.warning(
                "%s: dropping %d bytes after byte offset %d that are not whole feed entries",
                self.path,
                len(data) - good,
                good,
            )
            os.truncate(self.path, good)

    def reserve(self, stem: str, sequence: int, count: int, offset: int) -> Entry:
        """The entry giving records `sequence`.. of a session (the first at byte
        `offset`, -1 if unknown) the next `count` positions, handed out now."""
        entry = (self.next_position, stem, sequence, count, offset)
        self.next_position += count
        if stem:
            self._covered[stem] = sequence + count - 1
        return entry

    def reserve_marker(
        self, stem: str, session_id: str, branch_id: str, last_sequence: int, time_ns: int
    ) -> Entry:
        """The entry marking the deletion of a stem's records 1..`last_sequence`, at the
        next position, handed out now."""
        entry = (self.next_position, stem, last_sequence, 1, MARKER)
        self.markers[self.next_position] = (session_id, branch_id, time_ns)
        self.next_position += 1
        self._covered.pop(stem, None)
        return entry

    def dead(self, position: int, stem: str) -> bool:
        """Whether the entry at `position` names records of `stem` since deleted."""
        return position < self.deleted_at.get(stem, 0)

    def _line(self, entry: Entry) -> bytes:
        p, s, q, c, o = entry
        fields: dict[str, object] = {"position": p, "session_id": s, "sequence": q, "count": c}
        if o >= 0:
            fields["offset"] = o
        elif o == MARKER:
            session_id, branch_id, time_ns = self.markers[p]
            fields |= {"deleted": time_ns, "place": [session_id, branch_id]}
        return orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)

    def write(self, entries: list[Entry]) -> None:
        """Write reserved entries, in one write."""
        lines = b"".join(map(self._line, entries))
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise storage_error(exc, self.path) from None
        self.size += len(lines)

    def add(self, entry: Entry) -> None:
        """Serve a written entry: its append is acknowledged."""
        position, stem, sequence, count, offset = entry
        stem = sys.intern(stem)
        with self._columns:
            self.positions.append(position)
            self.stems.append(stem)
            self.sequences.append(sequence)
            self.counts.append(count)
            self.offsets.append(offset)
        if offset == MARKER:
            self.deleted_at[stem] = position
        self.last_position = position + count - 1

    def abandon(self) -> None:
        """Forget what was written and not acknowledged (a failed sync or write)."""
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, self.acknowledged_size)
        self.size = self.acknowledged_size
        self.next_position = self.last_position + 1
        self._recount()

    def _recount(self) -> None:
        """What each stem's acknowledged entries cover, from its latest deletion on."""
        self._covered = {}
        for stem, sequence, count, offset in zip(
            self.stems, self.sequences, self.counts, self.offsets, strict=True
        ):
            if offset == MARKER:
                self._covered.pop(stem, None)
            elif stem:
                self._covered[stem] = sequence + count - 1

    def covered(self, stem: str) -> int:
        """The last sequence of a session that has a position, acknowledged or not (0: none)."""
        return self._covered.get(stem, 0)

    def cut_beyond(self, counts: dict[str, int]) -> int | None:
        """Drop the feed from its first entry naming records a session file does not hold.

        Possible after a power loss under the `interval` or `never` policies: the
        feed line reached the disk, the session's lines did not. Returns the file's
        new size if it was cut; the caller syncs it.
        """
        for index in range(len(self.positions)):
            stem = self.stems[index]
            if self.offsets[index] == MARKER or self.dead(self.positions[index], stem):
                continue
            end = self.sequences[index] + self.counts[index] - 1
            if end > counts.get(stem, 0):
                keep = index
                break
        else:
            return None
        log.warning(
            "%s: dropping feed entries from position %d on: they name records the session "
            "files do not hold (lost before they reached the disk)",
            self.path,
            self.positions[keep],
        )
        first_dropped, last_dropped = self.positions[keep], self.last_position
        with self.path.open("rb") as file:
            offset = sum(len(file.readline()) for _ in range(keep))
        with self._columns:
            for column in (self.positions, self.sequences, self.counts, self.offsets):
                del column[keep:]
            del self.stems[keep:]
        self.deleted_at = {
            stem: position
            for stem, position, offset in zip(self.stems, self.positions, self.offsets, strict=True)
            if offset == MARKER
        }
        self.markers = {p: m for p, m in self.markers.items() if p < first_dropped}
        self.last_position = first_dropped - 1
        self.acknowledged_size = offset
        self.abandon()
        # A gap entry (no session) keeps the dropped positions from being handed out
        # again: a consumer that stored one must not skip a new record.
        gap = self.reserve("", 0, last_dropped - first_dropped + 1, -1)
        self.write([gap])
        self.add(gap)
        self.acknowledged_size = self.size
        return self.size

    def entries_from(self, position: int) -> Iterator[Entry]:
        """The acknowledged entries holding `position` and after."""
        with self._columns:
            index = max(bisect.bisect_right(self.positions, position) - 1, 0)
            end = len(self.positions)
        while index < end:
            with self._columns:  # a run at a time: the writer waits for one copy at most
                batch = [
                    (
                        self.positions[i],
                        self.stems[i],
                        self.sequences[i],
                        self.counts[i],
                        self.offsets[i],
                    )
                    for i in range(index, min(index + _READ_CHUNK, end))
                ]
            for entry in batch:
                if entry[0] + entry[3] > position:
                    yield entry
            index += len(batch)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
