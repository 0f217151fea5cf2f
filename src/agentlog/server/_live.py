"""Live subscriptions: SubscribeSession and SubscribeAll over any `Backend`.

Subscribers never hold records of their own: each reads from the backend by
sequence (or feed position) and then waits, on the event loop, for `Growth`
past where it is. So a subscriber cannot miss, repeat or reorder a record, and
a slow one costs writers nothing. The latest records of followed sessions (and
of the feed) are kept here, contiguous, so a new record fans out to thousands
of subscribers without a storage read each; anything not contiguous is read
from the backend instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import ctypes.util
import gc
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Collection, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from agentlog._records import CaughtUp, Checkpoint, EventRecord, FeedItem, FeedRecord
from agentlog._validation import MAIN
from agentlog.errors import AgentlogError, UnavailableError
from agentlog.server._fanout import Waiter, WakeRounds
from agentlog.server._lifecycle import branch_deleted
from agentlog.server._rules import FeedFilter, Place, feed_end, start_position, start_sequence
from agentlog.server.backend import Backend, Growth

T = TypeVar("T")
# Records a subscriber catching up reads from storage in one step, at most.
CATCH_UP_STEP = 256
# Records read from storage at once by all subscribers catching up together,
# about (each reads smaller chunks when many do): bounds their memory.
CATCH_UP_RECORDS = 8192
# Storage reads for subscribers catching up, at once: appends keep their share
# of the backend (its threads or connections).
CATCH_UP_READS = 4
RECENT_RECORDS = 1024
# Memory is given back once the subscriptions fall to a quarter of a crowd this large.
TRIM_AFTER = 1000
# The feed's latest records, kept while it has subscribers.
RECENT_FEED_RECORDS = 4096
# Views of the kept feed shared by subscribers with the same filters at the same place.
SHARED_VIEWS = 512


# While live, a filtered feed subscriber whose filters kept nothing is told how far
# it has been examined (a Checkpoint) at most this often.
CHECKPOINT_SECONDS = 1.0


class Interrupt:
    """Ends a subscription from outside (its credential lapsed): the subscription
    raises `error`, with where to resume, at its next step."""

    def __init__(self) -> None:
        self.error: AgentlogError | None = None
        self._waiter: Waiter | None = None

    def end(self, error: AgentlogError) -> None:
        self.error = error
        if self._waiter is not None:
            self._waiter.set()

    def check(self, resume: dict[str, str], where: str) -> None:
        """Raise the error that ended the subscription, if one did, saying where to resume."""
        if self.error is not None:
            raise resumable(self.error, resume, where)


def resumable(error: AgentlogError, resume: dict[str, str], where: str) -> AgentlogError:
    """`error`, saying that the subscription ended and where to resume it (`where`, for
    a person; `resume`, the metadata a client reads)."""
    ended = copy.copy(error)
    ended.message = f"{error.message}; the subscription ended: resume {where}"
    ended.metadata = {**error.metadata, **resume}
    return ended


class LiveSubscriptions:
    """Every live subscription of one server, fed by its backend's `Growth`."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._watching = False
        # Keyed by branch: (session id, branch id).
        self._waiters: dict[Place, set[Waiter]] = {}
        self._published: dict[Place, int] = {}
        # The latest records of branches that have subscribers, consecutive by
        # sequence, so that a new record fans out without a storage read each.
        self._recent: dict[Place, deque[EventRecord]] = {}
        # The same for the all-sessions feed, while it has subscribers.
        self._feed_waiters: set[Waiter] = set()
        self._recent_feed: deque[FeedRecord] = deque(maxlen=RECENT_FEED_RECORDS)
        # What subscribers with the same filters, at the same position, are sent from
        # `_recent_feed`: worked out once for all of them (thousands of subscribers of
        # the whole feed would otherwise each copy and filter the same records).
        self._feed_views: OrderedDict[tuple[Hashable, int], tuple[int, int, list[Any]]] = (
            OrderedDict()
        )
        self._recent_version = 0  # changes whenever `_recent_feed` does
        self._published_position = 0
        self._closing = False
        self._rounds = WakeRounds(self._waiters_of, lambda: self._feed_waiters)
        self._catching_up = 0  # subscribers reading stored records
        self._catch_up_slots: asyncio.Semaphore | None = None  # made on the loop
        # Who follows what, for `_following`, which the backend may call from its
        # threads: counted under a lock of its own (taken after any store lock).
        self._follow_lock = threading.Lock()
        self._followers: dict[Place, int] = {}
        self._feed_followers = 0
        # How many subscriptions there are, and the most there were since memory was
        # last given back (see `_trim`).
        self._subscriptions = 0
        self._most = 0
        self._trim_scheduled = False
        # What each subscription has been sent up to (for the lag metric, read by
        # the metrics thread): feed positions, and (branch, sequence).
        self._feed_sent: dict[Waiter, int] = {}
        self._session_sent: dict[Waiter, tuple[Place, int]] = {}

    def _waiters_of(self, place: Hashable) -> Iterable[Waiter]:
        found = self._waiters.get(place) if isinstance(place, tuple) else None
        return found if found is not None else ()

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._backend.watch(self._grew, self._following)

    def _following(self, place: Place) -> bool:
        with self._follow_lock:
            return self._feed_followers > 0 or place in self._followers

    def _follow(self, place: Place | None, change: int) -> None:
        """Count a subscriber of a branch (None: of the feed) in or out."""
        with self._follow_lock:
            self._subscriptions += change
            self._most = max(self._most, self._subscriptions)
            if place is None:
                self._feed_followers += change
            else:
                count = self._followers.get(place, 0) + change
                if count:
                    self._followers[place] = count
                else:
                    del self._followers[place]
            drained = self._most >= TRIM_AFTER and self._subscriptions <= self._most // 4
        if drained and not self._trim_scheduled:
            self._trim_scheduled = True
            asyncio.get_running_loop().call_later(1.0, self._trim)

    def _trim(self) -> None:
        """Most of a crowd of subscriptions has gone: give the memory they held back to
        the system (the C allocator keeps freed pages otherwise)."""
        self._trim_scheduled = False
        with self._follow_lock:
            self._most = self._subscriptions
        gc.collect()
        give_back_memory()

    def _grew(self, growth: Growth) -> None:
        """A backend's word that a session and the feed grew (on the loop)."""
        if growth.deleted is not None:
            self._deleted(growth)
            return
        records = growth.records
        if self._feed_waiters:
            self._published_position = max(self._published_position, growth.last_position)
            recent = self._recent_feed
            if records is None or (recent and recent[-1].position + 1 != growth.first_position):
                recent.clear()  # not contiguous: storage is the truth
            if records is not None:
                first = growth.first_position
                recent.extend(FeedRecord(first + i, r) for i, r in enumerate(records))
            self._recent_version += 1
            self._rounds.grew(None)
        place = growth.place
        if self._waiters.get(place):
            if growth.last_sequence > self._published.get(place, 0):
                self._published[place] = growth.last_sequence
            self._remember(place, records)
            self._rounds.grew(place)
        # (Nobody follows this branch otherwise: a subscriber reads storage first.)
        self._rounds.wake()

    def _deleted(self, growth: Growth) -> None:
        """A branch was deleted: its subscribers end, nothing kept of it is served again,
        and feed subscribers read the marker (and what follows) from storage."""
        position = growth.first_position
        if self._feed_waiters:
            self._published_position = max(self._published_position, position)
            self._recent_feed.clear()
            self._recent_version += 1
            self._rounds.grew(None)
        place = growth.place
        waiters = self._waiters.get(place)
        if waiters:
            for waiter in waiters:
                waiter.deleted = position
                waiter.set()
            self._published[place] = 0
            recent = self._recent.get(place)
            if recent is not None:
                recent.clear()
        self._rounds.wake()

    def _remember(self, place: Place, records: Sequence[EventRecord] | None) -> None:
        recent = self._recent.get(place)
        if recent is None:
            return  # nobody is subscribed
        if records is None or (recent and recent[-1].sequence + 1 != records[0].sequence):
            # Word out of order, or without records: storage is the truth.
            recent.clear()
        if records is not None:
            recent.extend(records)

    def _cached(self, place: Place, next_sequence: int) -> list[EventRecord] | None:
        recent = self._recent.get(place)
        if not recent or not recent[0].sequence <= next_sequence <= recent[-1].sequence:
            return None
        return list(itertools.islice(recent, next_sequence - recent[0].sequence, None))

    def close(self) -> None:
        """End every subscription with UNAVAILABLE (at shutdown)."""
        self._closing = True
        for waiters in [*self._waiters.values(), self._feed_waiters]:
            for waiter in waiters:
                waiter.set()

    def subscribers(self) -> tuple[int, int]:
        """How many session subscriptions and feed subscriptions there are."""
        with self._follow_lock:
            return sum(self._followers.values()), self._feed_followers

    def lag(self) -> tuple[int, int]:
        """How far the furthest-behind session subscription and feed subscription are
        behind what this server has heard was stored (records; positions)."""
        with self._follow_lock:
            sessions = [
                self._published.get(place, sent) - sent
                for place, sent in self._session_sent.values()
            ]
            feed = [self._published_position - sent for sent in self._feed_sent.values()]
        return max(sessions, default=0), max(feed, default=0)

    def _sent(self, waiter: Waiter, place: Place | None, upto: int) -> None:
        with self._follow_lock:
            if place is None:
                self._feed_sent[waiter] = upto
            else:
                self._session_sent[waiter] = (place, upto)

    def subscribers_of(self, session_id: str, branch_id: str = MAIN) -> int:
        return len(self._waiters.get((session_id, branch_id), ()))

    def recent_of(self, session_id: str, branch_id: str = MAIN) -> list[EventRecord]:
        """The records kept for a followed branch (for tests and metrics)."""
        return list(self._recent.get((session_id, branch_id), ()))

    async def feed_chunks(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
        visible: Callable[[str], bool] | None = None,
        scope: Hashable = None,
        interrupt: Interrupt | None = None,
        branch_id: str = "",
    ) -> AsyncIterator[list[FeedItem] | CaughtUp | Checkpoint]:
        """The all-sessions feed as runs of kept records (and gaps), one CaughtUp when
        every record stored at the start has been examined, and Checkpoints.

        A Checkpoint says how far the feed was examined when the filters kept nothing:
        after each such run while catching up, and at most every CHECKPOINT_SECONDS
        while live, so a filtered consumer can resume past what it never wanted.
        Stored records are read a run at a time, so a subscriber catching up holds one
        run, not the feed.
        """
        self._watch()
        keep = FeedFilter.of(session_id_prefix, part_types, visible, scope, branch_id=branch_id)
        interrupt = interrupt or Interrupt()
        waiter = Waiter()
        interrupt._waiter = waiter
        if not self._feed_waiters:
            self._recent_feed.clear()  # nobody kept it up to date
        self._feed_waiters.add(waiter)
        self._follow(None, 1)
        next_position = 0

        def resume() -> tuple[dict[str, str], str]:
            return {"next_position": str(next_position)}, f"from position {next_position}"

        try:
            last = await self._backend.last_position()
            self._published_position = max(self._published_position, last)
            next_position = start_position(last, from_position)
            self._sent(waiter, None, next_position - 1)
            caught_up = False
            loop = asyncio.get_running_loop()
            last_sent = loop.time()
            while True:
                waiter.clear()
                interrupt.check(*resume())
                shared = self._feed_view(keep, next_position) if caught_up else None
                runs: AsyncIterator[tuple[int, list[FeedItem]]]
                if shared is not None:
                    runs = _once(shared)
                elif caught_up and self._published_position < next_position:
                    runs = _nothing()  # woken for records it has already been sent
                else:
                    runs = _kept(keep, self._backend.read_feed(next_position))
                async for end, kept in runs:
                    interrupt.check(*resume())
                    next_position = end + 1
                    if kept:
                        yield kept
                        last_sent = loop.time()
                    elif not caught_up or loop.time() - last_sent >= CHECKPOINT_SECONDS:
                        yield Checkpoint(next_position - 1)
                        last_sent = loop.time()
                    self._sent(waiter, None, next_position - 1)
                if not caught_up:
                    caught_up = True
                    yield CaughtUp(position=next_position - 1)
                self._rounds.back(waiter)
                if not self._closing and self._published_position < next_position:
                    await waiter.wait()
                if self._closing:
                    raise UnavailableError(
                        "the server is shutting down; subscribe again (here when it is back, "
                        f"or elsewhere) from position {next_position}",
                        reason="SHUTTING_DOWN",
                        metadata={"next_position": str(next_position)},
                    )
        finally:
            self._feed_waiters.discard(waiter)
            self._follow(None, -1)
            with self._follow_lock:
                self._feed_sent.pop(waiter, None)
            self._rounds.back(waiter)

    def _feed_view(self, keep: FeedFilter, next_position: int) -> tuple[int, list[FeedItem]] | None:
        """(last position examined, kept items) of the recent feed from `next_position`,
        shared by subscribers with the same filters there; None if not at hand."""
        recent = self._recent_feed  # contiguous: cleared at any gap
        if not recent or not recent[0].position <= next_position <= recent[-1].position:
            return None
        key = (keep.key, next_position)
        found = self._feed_views.get(key)
        if found is None or found[0] != self._recent_version:
            items: list[FeedItem] = list(
                itertools.islice(recent, next_position - recent[0].position, None)
            )
            found = (self._recent_version, recent[-1].position, keep.kept(items))
            self._feed_views[key] = found
            if len(self._feed_views) > SHARED_VIEWS:
                self._feed_views.popitem(last=False)
        return found[1], found[2]

    async def session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int | None = None,
        interrupt: Interrupt | None = None,
        branch_id: str = MAIN,
    ) -> AsyncIterator[list[EventRecord] | CaughtUp]:
        """A branch's records as runs (each at most CATCH_UP_STEP long, and about
        MESSAGE_BYTES) and CaughtUp."""
        self._watch()
        interrupt = interrupt or Interrupt()
        place = (session_id, branch_id)
        waiter = Waiter()
        interrupt._waiter = waiter
        # Registered before the head is read: a deletion after the read reaches it.
        self._waiters.setdefault(place, set()).add(waiter)
        self._recent.setdefault(place, deque(maxlen=RECENT_RECORDS))
        try:
            head = await self._backend.head(session_id, branch_id)
        except BaseException:
            self._unregister(place, waiter)
            raise
        head_sequence = head.sequence if head is not None else 0
        next_sequence = start_sequence(head, from_sequence)

        def resume() -> tuple[dict[str, str], str]:
            return (
                {
                    "session_id": session_id,
                    "branch_id": branch_id,
                    "next_sequence": str(next_sequence),
                },
                f"from sequence {next_sequence}",
            )

        if head is not None and head.sequence > self._published.get(place, 0):
            self._published[place] = head.sequence  # stored: what lag counts up to
        self._follow(place, 1)
        self._sent(waiter, place, next_sequence - 1)
        try:
            caught_up = False
            while True:
                waiter.clear()
                interrupt.check(*resume())
                if waiter.deleted is not None:
                    raise branch_deleted(session_id, branch_id, waiter.deleted)
                cached = self._cached(place, next_sequence) if caught_up else None
                if cached:
                    yield cached
                    next_sequence = cached[-1].sequence + 1
                    self._sent(waiter, place, next_sequence - 1)
                elif caught_up and self._published.get(place, 0) < next_sequence:
                    pass  # woken for records it has already been sent
                else:
                    # A bounded read at a time, nothing held between: thousands of
                    # subscribers catching up hold little memory.
                    # Everything stored up to `stored` is read before moving on (a
                    # read may stop short of `size` at MESSAGE_BYTES).
                    stored = max(self._published.get(place, 0), head_sequence)
                    self._catching_up += 1
                    try:
                        while True:
                            size = self._catch_up_chunk()
                            chunk = await self._catch_up_read(place, next_sequence, size)
                            interrupt.check(*resume())
                            if waiter.deleted is not None:
                                raise branch_deleted(session_id, branch_id, waiter.deleted)
                            if chunk:
                                yield chunk
                                next_sequence = chunk[-1].sequence + 1
                                self._sent(waiter, place, next_sequence - 1)
                            if not chunk or (len(chunk) < size and next_sequence > stored):
                                break
                    finally:
                        self._catching_up -= 1
                if not caught_up:
                    caught_up = True
                    yield CaughtUp(next_sequence - 1)
                self._rounds.back(waiter)
                if (
                    not self._closing
                    and waiter.deleted is None
                    and self._published.get(place, 0) < next_sequence
                ):
                    await waiter.wait()
                if self._closing:
                    raise UnavailableError(
                        "the server is shutting down; subscribe again (here when it is back, "
                        f"or elsewhere) from sequence {next_sequence}",
                        reason="SHUTTING_DOWN",
                        metadata={
                            "session_id": session_id,
                            "branch_id": branch_id,
                            "next_sequence": str(next_sequence),
                        },
                    )
        finally:
            self._follow(place, -1)
            with self._follow_lock:
                self._session_sent.pop(waiter, None)
            self._rounds.back(waiter)
            self._unregister(place, waiter)

    def _unregister(self, place: Place, waiter: Waiter) -> None:
        waiters = self._waiters.get(place)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[place]
                self._recent.pop(place, None)
                self._published.pop(place, None)

    async def _catch_up_read(
        self, place: Place, from_sequence: int, limit: int
    ) -> list[EventRecord]:
        """Stored records for a subscriber catching up; a few such reads at a time."""
        if self._catch_up_slots is None:
            self._catch_up_slots = asyncio.Semaphore(CATCH_UP_READS)
        async with self._catch_up_slots:
            session_id, branch_id = place
            return await self._backend.read_records(session_id, from_sequence, limit, branch_id)

    def _catch_up_chunk(self) -> int:
        """Records a subscriber catching up reads at once: fewer when many do."""
        return max(16, min(CATCH_UP_STEP, CATCH_UP_RECORDS // max(self._catching_up, 1)))


def give_back_memory() -> None:
    """Have the C allocator return freed memory to the system (glibc's malloc_trim);
    elsewhere, nothing."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


async def _once(item: T) -> AsyncIterator[T]:
    yield item


async def _nothing() -> AsyncIterator[tuple[int, list[FeedItem]]]:
    return
    yield


async def _kept(
    keep: FeedFilter, runs: AsyncIterator[list[FeedItem]]
) -> AsyncIterator[tuple[int, list[FeedItem]]]:
    """(last position examined, kept items) of each run read from storage."""
    async for run in runs:
        if run:
            yield feed_end(run[-1]), keep.kept(run)
