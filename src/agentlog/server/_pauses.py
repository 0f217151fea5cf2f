"""Named points in the commit path where a test may hold a thread.

Each point marks a state a record id passes through on its way from a request
to the disk and back (staged, written, acknowledged, pending in the index,
being flushed, indexed from a file, forgotten, rebuilt, synced). The store's
exactly-once and durability promises must hold whatever another thread does
while one thread stands at any of them; tests prove it by holding a thread
there (`hold`) and acting meanwhile. Unarmed, a point costs one truth test of
a dict.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# The points, by name: where in the code each one is.
POINTS = frozenset(
    {
        # StoreIndex: a catch-up has looked at a file (stat) and its entry.
        "index.catch_up.looked",
        # StoreIndex: a catch-up has read a file's new lines, not yet committed them.
        "index.catch_up.scanned",
        # StoreIndex: a flush has taken the rows waiting in memory, not yet committed them.
        "index.flush.taken",
        # StoreIndex: a rebuild has wiped the damaged index, not yet re-read the files.
        "index.rebuild.wiped",
        # The commit path: an append's lines were written (the store's lock held).
        "commit.written",
        # The commit path: appends were staged (decided and written), not yet acknowledged.
        "commit.staged",
        # The sync thread: about to sync what was released.
        "commit.syncing",
        # The commit path: appends were acknowledged (visible, indexed), their callers not
        # yet answered.
        "commit.acknowledged",
        # The session states: a state was built from a file, not yet installed.
        "states.built",
        # A JSONL delete: ids read and reserved, the branches not yet marked or unlinked.
        "delete.reserved",
        # A JSONL delete: the feed's markers synced, the files not yet unlinked.
        "delete.marked",
        # A JSONL label change: written to the sessions database, not yet in memory.
        "labels.written",
        # A JSONL fork: the copy linked into place, not yet indexed.
        "fork.linked",
    }
)

_armed: dict[str, Pause] = {}
_arming = threading.Lock()


def point(name: str) -> None:
    """A thread passes the point `name`: it waits here if a test holds the point."""
    if _armed:
        pause = _armed.get(name)
        if pause is not None:
            pause.hit()


class Pause:
    """A held point: the first `times` threads (that `when` accepts) to reach it wait
    there, each until it is let through (`let_one_through`) or all are (`release`)."""

    def __init__(self, name: str, times: int, when: Callable[[], bool] | None) -> None:
        self.name = name
        self.count = 0  # threads that have reached the point (and been held)
        self._times = times
        self._when = when
        self._allowed = 0  # threads let through so far
        self._released = False
        self._changed = threading.Condition()

    def hit(self) -> None:
        with self._changed:
            if self._released or self.count >= self._times:
                return
            if self._when is not None and not self._when():
                return
            self.count += 1
            number = self.count
            self._changed.notify_all()
            if not self._changed.wait_for(
                lambda: self._released or self._allowed >= number, timeout=60
            ):
                raise RuntimeError(f"a test held {self.name} for 60 s and never let it go")

    def wait(self, count: int = 1, timeout: float = 10) -> None:
        """Wait until `count` threads have reached the point."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.count >= count, timeout):
                raise TimeoutError(f"{count} thread(s) did not reach {self.name} in {timeout} s")

    def let_one_through(self) -> None:
        """Let the longest-held thread go on."""
        with self._changed:
            self._allowed += 1
            self._changed.notify_all()

    def release(self) -> None:
        """Let every thread go on, and let the point hold none from now on."""
        with self._changed:
            self._released = True
            self._changed.notify_all()


@contextmanager
def hold(name: str, *, times: int = 1, when: Callable[[], bool] | None = None) -> Iterator[Pause]:
    """Hold threads at point `name` (for tests); all are let go on leaving the block."""
    if name not in POINTS:
        raise ValueError(f"no pause point {name!r} (known: {', '.join(sorted(POINTS))})")
    pause = Pause(name, times, when)
    with _arming:
        if name in _armed:
            raise RuntimeError(f"{name} is held already")
        _armed[name] = pause
    try:
        yield pause
    finally:
        pause.release()
        with _arming:
            _armed.pop(name, None)
