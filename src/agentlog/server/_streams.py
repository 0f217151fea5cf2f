"""The messages the service streams: records encoded once and shared by every
subscriber sent the same run, in messages bounded by size.

A stream message holds at most MESSAGE_RECORDS records and, unless one record is
larger, MESSAGE_BYTES of them, however the records it carries were read: so a
client with gRPC's default 4 MiB limit can read and follow every record the
server accepts (each at most `_rules.MAX_RECORD_BYTES`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from agentlog import _codec, _requests
from agentlog._records import EventRecord, FeedGap, FeedItem, FeedRecord, SessionDeleted
from agentlog.server._rules import MESSAGE_BYTES, MESSAGE_RECORDS
from agentlog.v1 import session_pb2 as pb


def bounded(messages: Sequence[Any]) -> Iterator[list[Any]]:
    """Protobuf messages in runs of at most MESSAGE_RECORDS and, unless one is larger,
    MESSAGE_BYTES."""
    run: list[Any] = []
    size = 0
    for message in messages:
        length = message.ByteSize()
        if run and (len(run) == MESSAGE_RECORDS or size + length > MESSAGE_BYTES):
            yield run
            run, size = [], 0
        run.append(message)
        size += length
    if run:
        yield run


def record_messages(records: Sequence[EventRecord]) -> Iterator[list[pb.EventRecord]]:
    """Records as EventRecord messages, in bounded runs."""
    return bounded([_codec.record_to_proto(record) for record in records])


def session_messages(records: list[EventRecord]) -> list[bytes]:
    """A run of a session's records as encoded SubscribeSessionResponse messages."""
    return [
        pb.SubscribeSessionResponse(records=pb.RecordBatch(records=run)).SerializeToString()
        for run in record_messages(records)
    ]


def feed_messages(run: list[FeedRecord]) -> list[bytes]:
    """A run of feed records as encoded SubscribeAllResponse messages."""
    records = [
        pb.FeedRecord(position=f.position, record=_codec.record_to_proto(f.record)) for f in run
    ]
    return [
        pb.SubscribeAllResponse(records=pb.FeedBatch(records=part)).SerializeToString()
        for part in bounded(records)
    ]


def gap_message(gap: FeedGap) -> pb.SubscribeAllResponse:
    return pb.SubscribeAllResponse(
        gap=pb.FeedGap(
            first_position=gap.first_position,
            last_position=gap.last_position,
            session_id=gap.session_id,
            reason=gap.reason,
            message=gap.message,
            branch_id=gap.branch_id,
        )
    )


def deleted_message(marker: SessionDeleted) -> pb.SubscribeAllResponse:
    return pb.SubscribeAllResponse(deleted=_requests.deleted_to_proto(marker))


def feed_runs(items: list[FeedItem]) -> Iterator[list[FeedRecord] | FeedGap | SessionDeleted]:
    """Feed items as runs of records, each gap and deletion marker on its own."""
    run: list[FeedRecord] = []
    for item in items:
        if not isinstance(item, FeedRecord):
            if run:
                yield run
                run = []
            yield item
        else:
            run.append(item)
    if run:
        yield run


class EncodedRuns:
    """The encoded stream messages of the latest runs of records, shared by every
    subscriber sent the same run: a new record is encoded once, not once a
    subscriber. (Sent as bytes: see `service._serialize`.)"""

    SIZE = 256  # runs kept: a wake-up of every subscriber hands them the same few

    def __init__(self) -> None:
        self._runs: OrderedDict[tuple[Any, ...], list[bytes]] = OrderedDict()

    def get(
        self, scope: tuple[Any, ...], run: list[Any], encode: Callable[[Any], list[bytes]]
    ) -> list[bytes]:
        """`encode(run)`, from the cache if the same run was encoded lately. A run is
        named by its first and last records (ids, and sequences or positions):
        records once acknowledged never change."""
        first, last = run[0], run[-1]
        key = (*scope, len(run), _name(first), _name(last))
        found = self._runs.get(key)
        if found is None:
            found = self._runs[key] = encode(run)
            if len(self._runs) > self.SIZE:
                self._runs.popitem(last=False)
        return found


def _name(item: EventRecord | FeedRecord) -> tuple[Any, ...]:
    if isinstance(item, FeedRecord):
        return (item.position, item.record.id)
    return (item.sequence, item.id)
