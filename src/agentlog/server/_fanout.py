"""Waking live subscribers in paced rounds, so that however many there are, they
take at most about a quarter of the event loop and appends keep the rest.

A round wakes every subscriber of every session (and of the feed) that grew
since the last round, then lasts until each has sent what it was woken for and
waits again (or MAX_ROUND_SECONDS). The next round starts no sooner than three times
the last one's cost after it ended (its length, or what the messages it sent cost
gRPC after it, if more), unless it was cheap and the loop had nothing else to do
meanwhile: with few subscribers, or no appends waiting, rounds take microseconds
and records go out at once; with thousands, each message carries
every record since the subscriber's last one, and the cost of a new record no
longer grows with the number of subscribers waiting on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable

# The pause after a round, as a multiple of the round's length.
IDLE_FACTOR = 3.0
# A loop that runs a callback this soon after it was asked has nothing else to
# do: then the next round need not wait.
IDLE_LAG_SECONDS = 0.0005
# What sending one message to one subscriber costs the server, about, beyond the round
# that sends it (gRPC's own work, which goes on after the message is handed over): a
# round that wakes many subscribers is paced by this, not only by its own length.
MESSAGE_SECONDS = 0.00025
# A round that sends more than this costs more after it than a moment of idleness
# can tell: it is paced whatever the loop looks like (about 40 subscribers woken).
CHEAP_ROUND_SECONDS = 0.01
# A round is over by then even if a subscriber has not come back (a slow client).
MAX_ROUND_SECONDS = 0.25


class Waiter(asyncio.Event):
    """A subscriber's wake-up call; `round` is the round that last woke it, `deleted`
    the feed position of the deletion of the branch it follows, once there is one."""

    round = 0
    deleted: int | None = None


class WakeRounds:
    """Which subscribers are due a wake-up, and when the next round may start.
    Used on the event loop only."""

    def __init__(
        self,
        session_waiters: Callable[[Hashable], Iterable[Waiter]],
        feed_waiters: Callable[[], Iterable[Waiter]],
    ) -> None:
        self._session_waiters = session_waiters
        self._feed_waiters = feed_waiters
        self._due: set[Hashable] = set()  # branches: (session id, branch id)
        self._feed_due = False
        self._round = 0
        self._ended = 0  # the last round that ended
        self._pending = 0  # subscribers of the round in progress not back yet
        self._woken = 0  # subscribers the round in progress woke
        self._started = 0.0
        self._next_at = 0.0
        self._scheduled = False

    def grew(self, place: Hashable | None) -> None:
        """A branch (None: the feed) has new records for its subscribers (then call
        `wake`)."""
        if place is None:
            self._feed_due = True
        else:
            self._due.add(place)

    def wake(self) -> None:
        """Start a round for what grew now, if the pace allows, else when it does."""
        if self._due or self._feed_due:
            self._maybe_start(asyncio.get_running_loop())

    def back(self, waiter: Waiter) -> None:
        """A subscriber woken in a round has sent what it was woken for (or left)."""
        if waiter.round == self._round and self._pending > 0:
            waiter.round = 0
            self._pending -= 1
            if self._pending == 0:
                self._end(asyncio.get_running_loop(), self._round)

    def _maybe_start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._pending > 0 or self._scheduled:
            return  # the round in progress, or the one scheduled, takes it
        if loop.time() >= self._next_at:
            self._start(loop)
        else:
            self._scheduled = True
            loop.call_at(self._next_at, self._start, loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._round += 1
        woken = 0
        for place in self._due:
            for waiter in self._session_waiters(place):
                waiter.round = self._round
                waiter.set()
                woken += 1
        self._due.clear()
        if self._feed_due:
            self._feed_due = False
            for waiter in self._feed_waiters():
                waiter.round = self._round
                waiter.set()
                woken += 1
        self._started = loop.time()
        self._pending = self._woken = woken
        if woken:
            loop.call_later(MAX_ROUND_SECONDS, self._end, loop, self._round)
        else:
            self._end(loop, self._round)

    def _end(self, loop: asyncio.AbstractEventLoop, round_: int) -> None:
        if round_ != self._round or round_ == self._ended:
            return  # an earlier round, or this one ended already
        self._ended = round_
        self._pending = 0
        now = loop.time()
        spent = max(now - self._started, self._woken * MESSAGE_SECONDS)
        self._next_at = now + IDLE_FACTOR * spent
        loop.call_soon(self._probe, loop, round_, now)

    def _probe(self, loop: asyncio.AbstractEventLoop, round_: int, asked: float) -> None:
        """After a round: if the loop had nothing else waiting (this ran at once), no
        pause is needed; subscribers may be woken again straight away."""
        cheap = self._woken * MESSAGE_SECONDS < CHEAP_ROUND_SECONDS
        if round_ == self._round and cheap and loop.time() - asked < IDLE_LAG_SECONDS:
            self._next_at = 0.0
        if not self._scheduled and (self._due or self._feed_due):
            self._maybe_start(loop)
