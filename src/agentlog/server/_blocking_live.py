"""The blocking subscriptions of an in-process store (`BlockingStore.subscribe_session`,
`subscribe_all`), for programs that embed one: stored records, CaughtUp, then each
new one, waiting on the store's `_grown` condition, which its commits notify."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from agentlog._records import CaughtUp, Checkpoint, EventRecord, FeedItem
from agentlog.server._lifecycle import branch_deleted
from agentlog.server._rules import FeedFilter, feed_end, start_position, start_sequence

if TYPE_CHECKING:
    from agentlog.server.blocking import BlockingStore


def follow_session(
    store: BlockingStore, session_id: str, from_sequence: int | None, branch_id: str
) -> Iterator[EventRecord | CaughtUp]:
    """See `BlockingStore.subscribe_session`."""
    place = (session_id, branch_id)
    with store._grown:
        deletions = store._deletions.get(place, 0)
    next_sequence = start_sequence(store.head(session_id, branch_id), from_sequence)
    caught_up = False
    while True:
        for record in store.read_session(
            session_id, from_sequence=next_sequence, branch_id=branch_id
        ):
            yield record
            next_sequence = record.sequence + 1
        if not caught_up:
            caught_up = True
            yield CaughtUp(next_sequence - 1)
        with store._grown:
            store._waiting += 1
            try:
                while (
                    store._last_published.get(place, 0) < next_sequence
                    and store._deletions.get(place, 0) == deletions
                ):
                    store._grown.wait()
                if store._deletions.get(place, 0) != deletions:
                    raise branch_deleted(session_id, branch_id)
            finally:
                store._waiting -= 1


def follow_feed(
    store: BlockingStore,
    from_position: int | None,
    session_id_prefix: str,
    part_types: Collection[str],
    branch_id: str,
) -> Iterator[FeedItem | CaughtUp | Checkpoint]:
    """See `BlockingStore.subscribe_all`."""
    keep = FeedFilter.of(session_id_prefix, part_types, branch_id=branch_id)
    next_position = start_position(store.last_position(), from_position)
    caught_up = False
    while True:
        for run in store.read_feed_runs(next_position):
            kept = [item for item in run if keep(item)]
            next_position = feed_end(run[-1]) + 1
            yield from kept
            if not kept and not caught_up:
                yield Checkpoint(next_position - 1)
        if not caught_up:
            caught_up = True
            yield CaughtUp(position=next_position - 1)
        with store._grown:
            store._waiting += 1
            try:
                while store._last_position < next_position:
                    store._grown.wait()
            finally:
                store._waiting -= 1
