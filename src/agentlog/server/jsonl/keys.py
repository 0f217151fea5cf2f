"""The index's integer keys for record ids, and a Bloom filter of them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


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
