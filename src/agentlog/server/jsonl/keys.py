"""The index's integer keys for record ids, and a Bloom filter of them: the
filter itself (`KeyFilter`) and how the index keeps it (`FilteredIds`): filled
in the background at open, saved at a clean close for the next open, rebuilt
larger when full."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("agentlog.server")

KEYS_FILE = ".agentlog.keys"  # the id filter, kept from a clean close to the next open
# A row of an append for the index: (id, parent_id, sequence, byte offset of its
# line, key_of(id)).
Row = tuple[str, str | None, int, int, int]


def key_of(record_id: str) -> int:
    """The index key of a record or parent id: 60 of a canonical UUID's random bits,
    or 63 bits of another string's BLAKE2b hash."""
    if len(record_id) == 36 and record_id[8] == "-" and record_id[13] == "-":
        try:
            return int(record_id[0:8] + record_id[9:13] + record_id[15:18], 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(record_id.encode(), digest_size=8).digest()) >> 1


class KeyFilter:
    """A Bloom filter of index keys: "absent" is certain, "present" is likely (about
    0.5% false positives at capacity), so most ids never cost a query.

    Filled from the index in the background at open (`ready` until then is
    False: ask the index); every key added since goes in at once. Past its
    capacity it is rebuilt twice as large, in the background too.
    """

    BITS_PER_KEY = 12  # and three probes: about 1% false positives when full
    MIN_CAPACITY = 1 << 20  # 1.5 MB: a million keys before the first rebuild

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, self.MIN_CAPACITY)
        size = (self.capacity * self.BITS_PER_KEY + 7) // 8
        self._bits = bytearray(size)
        self._nbits = size * 8
        self.count = 0
        self.ready = False

    def twin(self) -> KeyFilter:
        """An empty filter of the same size, to fill apart and `merge` back."""
        return KeyFilter(self.capacity)

    def merge(self, other: KeyFilter) -> None:
        """Add every key of a twin."""
        size = len(self._bits)
        merged = int.from_bytes(self._bits) | int.from_bytes(other._bits)
        self._bits[:] = merged.to_bytes(size)
        self.count += other.count

    def add_all(self, keys: Iterable[int]) -> None:
        bits, nbits = self._bits, self._nbits
        count = 0
        for key in keys:
            step = (key >> 31) | 1
            bit = key % nbits
            bits[bit >> 3] |= 1 << (bit & 7)
            bit = (key + step) % nbits
            bits[bit >> 3] |= 1 << (bit & 7)
            bit = (key + 2 * step) % nbits
            bits[bit >> 3] |= 1 << (bit & 7)
            count += 1
        self.count += count

    def might_hold(self, key: int) -> bool:
        bits, nbits, step = self._bits, self._nbits, (key >> 31) | 1
        bit = key % nbits
        if not bits[bit >> 3] & (1 << (bit & 7)):
            return False
        bit = (key + step) % nbits
        if not bits[bit >> 3] & (1 << (bit & 7)):
            return False
        bit = (key + 2 * step) % nbits
        return bool(bits[bit >> 3] & (1 << (bit & 7)))


class FilteredIds:
    """The key filter's keeping, for StoreIndex (its base): which filter is in use,
    the one being filled to replace it, and its save file. The fields are the
    index's, set by StoreIndex.__init__; `_lock` guards them."""

    _path: Path
    _db: sqlite3.Connection
    _lock: threading.Lock
    _stop: threading.Event
    _files: dict[str, Any]
    _pending: dict[str, list[Row]]
    _flushing: dict[str, list[Row]]
    _uncommitted_keys: list[int]
    _filter: KeyFilter
    _filter_started: bool
    _had_rows: bool  # rows the filter was not built with (see open_filter)
    _next_filter: KeyFilter | None
    _fillers: list[threading.Thread]

    def open_filter(self, expected_keys: int) -> None:
        """Start the key filter, before the files are indexed at open (the store then
        calls `filter_indexed`). It is the one a clean close saved, if the index is as
        it was then; otherwise a new one for `expected_keys`, to which indexing adds."""
        saved = self._load_filter()  # a saved filter is good for one open only
        try:
            self._db.execute(  # one statement: its own transaction (autocommit)
                "INSERT OR REPLACE INTO meta VALUES ('filter_generation', ?)",
                (self._filter_generation() + 1,),
            )
        except sqlite3.OperationalError as exc:  # a full disk: its file is gone anyway
            log.warning("%s: could not count this open (%s)", self._path, exc)
        with self._lock:
            self._filter_started = True
            if saved is not None:
                self._filter = saved
                self._filter.ready = True
            else:
                self._had_rows = bool(self._files)
                self._filter = KeyFilter(max(expected_keys, 1) * 3 // 2)

    def filter_indexed(self) -> None:
        """The open's indexing is done: if the index held rows the filter does not
        (rows from before this open, unless saved), fill it from the index in the
        background; else it is complete."""
        with self._lock:
            if self._filter.ready:
                return
            if self._had_rows:
                self._fill_in_background(self._filter)
            else:
                self._filter.ready = True

    def _filter_generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'filter_generation'").fetchone()
        return int(row[0]) if row else 0

    def _load_filter(self) -> KeyFilter | None:
        path = self._path.with_name(KEYS_FILE)
        try:
            data = path.read_bytes()
            path.unlink()
        except FileNotFoundError:
            return None
        header, _, bits = data.partition(b"\n")
        try:
            generation, capacity, count = (int(x) for x in header.split())
        except ValueError:
            return None
        if generation != self._filter_generation():
            return None  # the index changed since (a crash, or another version)
        saved = KeyFilter(capacity)
        if len(bits) != len(saved._bits):
            return None
        saved._bits[:] = bits
        saved.count = count
        return saved

    def _save_filter(self) -> None:
        """Keep the filter for the next open (at a clean close, everything flushed)."""
        with self._lock:
            kept = self._filter if self._filter.ready and self._next_filter is None else None
        if kept is None:
            return
        generation = self._filter_generation()
        path = self._path.with_name(KEYS_FILE)
        try:
            with path.open("wb") as file:
                file.write(f"{generation} {kept.capacity} {kept.count}\n".encode())
                file.write(kept._bits)
        except OSError as exc:
            log.warning("%s: could not keep the id filter for the next start: %s", path, exc)

    def _add_keys(self, keys: list[int]) -> None:
        """Put keys in the filter (hold the lock); grow it when it is full."""
        if not self._filter_started:
            return  # open_filter() comes before any key
        self._filter.add_all(keys)
        if self._next_filter is not None:
            self._next_filter.add_all(keys)
        elif self._filter.count > self._filter.capacity:
            bigger = self._next_filter = KeyFilter(self._filter.count * 2)
            # Rows not yet on disk are not in what the new filter is filled from.
            bigger.add_all(keys)
            for pending in (self._pending, self._flushing):
                for rows in pending.values():
                    bigger.add_all([row[4] for row in rows])
            bigger.add_all(self._uncommitted_keys)  # a catch_up's, being written
            self._fill_in_background(bigger)

    def _fill_in_background(self, target: KeyFilter) -> None:
        thread = threading.Thread(
            target=self._fill, args=(target,), name="agentlog-index-filter", daemon=True
        )
        self._fillers = [t for t in self._fillers if t.is_alive()] + [thread]
        thread.start()

    def _fill(self, target: KeyFilter) -> None:
        """Add every key the index holds on disk to `target`, then put it in use.

        The keys go into a twin of its own first (the others add to `target` meanwhile,
        holding the lock only for that), merged in at the end.
        """
        db = sqlite3.connect(self._path, check_same_thread=False)  # reads only
        apart = target.twin()
        try:
            cursor = db.execute("SELECT key FROM ids")
            while not self._stop.is_set() and (rows := cursor.fetchmany(1 << 11)):
                apart.add_all(key for (key,) in rows)
                time.sleep(0)  # about a millisecond at a time: calls being served go first
        except sqlite3.Error:
            log.exception("filling the index's key filter failed; lookups query the index")
            return
        finally:
            db.close()
        with self._lock:
            if self._stop.is_set():
                return
            target.merge(apart)
            target.ready = True
            if target is self._next_filter:
                self._filter, self._next_filter = target, None
