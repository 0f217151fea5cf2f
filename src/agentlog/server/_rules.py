"""The event-store rules every backend applies the same way.

Backends differ in where records live; what an append, a ranged read and a
session listing mean is decided here, once: the order of checks (idempotent
retry, then id conflicts, then the expectation), the errors and their details,
the range and paging parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from agentlog._codec import (
    event_from_json,
    event_json_from_proto,
    event_to_json,
    make_record,
)
from agentlog._events import EVENT_TYPES, AgentEvent, ReadDirection
from agentlog._records import (
    EventRecord,
    FeedGap,
    FeedItem,
    FeedRecord,
    NewEvent,
    new_record_id,
)
from agentlog._validation import (
    CANONICAL_UUID,
    MAIN,
    check_branch_id,
    check_count,
    check_event_id,
    check_labels,
    check_record_id,
    check_session_id,
    check_stored_branch_id,
    quoted,
)
from agentlog.errors import AlreadyExistsError, InvalidArgumentError, WrongExpectedSequence
from agentlog.v1 import session_pb2 as pb


@dataclass(frozen=True, slots=True)
class Prepared:
    """A checked event about to be appended."""

    id: str
    parent_id: str | None
    event_json: dict[str, Any]
    """The event as arcan's JSON: what is stored."""
    event: AgentEvent | None = None
    """The caller's own event object, if it gave one (in-process), else None (the wire)."""

    def digest(self) -> bytes:
        """What "the same content" means for a retried id: parent and event, exactly."""
        return content_digest(self.parent_id, self.event_json)

    def to_event(self) -> AgentEvent:
        return self.event if self.event is not None else event_from_json(self.event_json)


@dataclass(frozen=True, slots=True)
class PendingAppend:
    """A checked append or batch, waiting to be stored (see `Backend.append`)."""

    session_id: str
    batch: list[Prepared]
    expected: int | None
    timestamp_ns: int | None = None
    """The records' timestamp when copying them from another store (`agentlog copy`,
    which the JSONL and PostgreSQL stores honour); None: the time of the commit."""
    branch_id: str = MAIN
    """The branch of the session (sequences, expectations and retries are its own)."""
    labels: dict[str, str] | None = None
    """Labels for the session, taken if this append creates it (see `_lifecycle`)."""


@dataclass(slots=True)
class Appended:
    """What an append came to: its events stored at `first_sequence`.. at one
    timestamp, or (a retry) found stored as `known`.

    The records are only built when someone asks: a server answering over the
    wire builds messages from the request instead.
    """

    session_id: str
    batch: Sequence[Prepared]
    first_sequence: int
    timestamp_ns: int
    known: list[EventRecord] | None = None
    retried: bool = False
    """True when the append was a retry of one already stored (nothing was written)."""
    branch_id: str = MAIN

    @property
    def last_sequence(self) -> int:
        return self.first_sequence + len(self.batch) - 1

    def records(self) -> list[EventRecord]:
        if self.known is None:
            first, session_id, branch_id = self.first_sequence, self.session_id, self.branch_id
            self.known = [
                make_record(
                    item.id,
                    session_id,
                    first + offset,
                    item.parent_id,
                    self.timestamp_ns,
                    item.to_event(),
                    branch_id,
                )
                for offset, item in enumerate(self.batch)
            ]
        return self.known

    @classmethod
    def stored(
        cls, session_id: str, batch: Sequence[Prepared], records: list[EventRecord]
    ) -> Appended:
        """A retry's answer: the records as the store holds them."""
        first = records[0]
        return cls(
            session_id,
            batch,
            first.sequence,
            first.timestamp_ns,
            records,
            retried=True,
            branch_id=first.branch_id,
        )


# A stream message holds at most this many records, and no more than this many
# bytes of them unless one record is larger, so messages stay far below any
# size limit.
MESSAGE_RECORDS = 256
MESSAGE_BYTES = 1 << 20
# What a gRPC client receives by default in one message is 4 MiB: every record
# stored must fit in one (a read's message, a feed record, an append's answer),
# with room for the message around it.
MAX_RECORD_BYTES = (4 << 20) - (16 << 10)


def check_record_size(size: int, index: int | None) -> None:
    """Refuse a record whose stored line is `size` bytes if a default client could
    not receive it back (a record's message is never larger than its JSON line).
    `index`: its place in a batch."""
    if size > MAX_RECORD_BYTES:
        where = "" if index is None else f"events[{index}]."
        raise InvalidArgumentError(
            f"{where}event: the record would be {size} bytes, more than the "
            f"{MAX_RECORD_BYTES} a record may have so that every client can read it back "
            "(4 MiB is gRPC's default message limit); store large payloads elsewhere and "
            "refer to them",
            field=f"{where}event",
            reason="RECORD_TOO_LARGE",
        )


def check_answer_size(request: pb.AppendBatchRequest) -> None:
    """Refuse a batch whose answer, with its events, a default client could not
    receive (ask with omit_events, or send smaller batches)."""
    size = request.ByteSize() + len(request.events) * (len(request.session_id) + 48)
    if size > MAX_RECORD_BYTES:
        raise InvalidArgumentError(
            f"events: the answer to this batch would be about {size} bytes, more than a "
            "client receives by default; send smaller batches, or set omit_events",
            field="events",
            reason="ANSWER_TOO_LARGE",
        )


def content_digest(parent_id: str | None, event_json: object) -> bytes:
    """A digest of a record's content (its parent and event, as JSON with exact types)."""
    return hashlib.blake2b(orjson.dumps([parent_id, event_json]), digest_size=16).digest()


def prepare(
    session_id: str,
    items: Sequence[NewEvent],
    expected_sequence: int | None,
    *,
    batch: bool,
) -> list[Prepared]:
    """Check an append (batch=False: one item, fields named as in AppendRequest) or a batch."""
    _check_append_fields(session_id, expected_sequence, items)
    prepared: list[Prepared] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        prefix = f"events[{index}]." if batch else ""
        if not isinstance(item, NewEvent):
            raise InvalidArgumentError(
                f"{prefix or 'events'}: must be a NewEvent, not {type(item).__name__}",
                reason="INVALID_EVENT",
            )
        event_json = event_to_json(item.event, f"{prefix}event")
        record_id = _checked_ids(item.id, item.parent_id, prefix, seen, index)
        prepared.append(Prepared(record_id, item.parent_id, event_json, item.event))
    return prepared


def prepare_request(request: pb.AppendRequest) -> PendingAppend:
    """Check an AppendRequest as `prepare` checks an append, without the Python event."""
    expected = request.expected_sequence if request.HasField("expected_sequence") else None
    _check_append_fields(request.session_id, expected, (request,))
    branch_id = check_branch_id(request.branch_id)
    if not request.HasField("event"):
        raise InvalidArgumentError("event: is required", field="event", reason="INVALID_EVENT")
    event_json = event_json_from_proto(request.event)
    parent_id = request.parent_id if request.HasField("parent_id") else None
    record_id = _checked_ids(request.id or None, parent_id, "", {}, 0)
    batch = [Prepared(record_id, parent_id, event_json)]
    labels = check_labels(request.labels) if request.labels else None
    return PendingAppend(request.session_id, batch, expected, branch_id=branch_id, labels=labels)


def prepare_batch_request(request: pb.AppendBatchRequest) -> PendingAppend:
    """Check an AppendBatchRequest as `prepare` checks a batch, without Python events."""
    expected = request.expected_sequence if request.HasField("expected_sequence") else None
    _check_append_fields(request.session_id, expected, request.events)
    branch_id = check_branch_id(request.branch_id)
    if not request.omit_events:
        check_answer_size(request)
    prepared: list[Prepared] = []
    seen: dict[str, int] = {}
    is_event_id = CANONICAL_UUID.fullmatch
    for index, item in enumerate(request.events):
        record_id = item.id
        parent_id = item.parent_id if item.HasField("parent_id") else None
        if (
            not item.HasField("event")
            or not record_id
            or not is_event_id(record_id)
            or record_id in seen
            or parent_id == ""
        ):  # the uncommon path, which says what is wrong (or makes an id)
            prefix = f"events[{index}]."
            if not item.HasField("event"):
                raise InvalidArgumentError(
                    f"{prefix}event: is required", field=f"{prefix}event", reason="INVALID_EVENT"
                )
            event_json = event_json_from_proto(item.event, f"{prefix}event")
            record_id = _checked_ids(record_id or None, parent_id, prefix, seen, index)
        else:
            event_json = event_json_from_proto(item.event, f"events[{index}].event")
            seen[record_id] = index
        prepared.append(Prepared(record_id, parent_id, event_json))
    labels = check_labels(request.labels) if request.labels else None
    return PendingAppend(request.session_id, prepared, expected, branch_id=branch_id, labels=labels)


def _check_append_fields(
    session_id: str, expected_sequence: int | None, items: Sequence[object]
) -> None:
    check_session_id(session_id)
    if expected_sequence is not None:
        check_count(expected_sequence, "expected_sequence")
    if not items:
        raise InvalidArgumentError(
            "events: a batch needs at least one event", field="events", reason="INVALID_EVENT"
        )


def _checked_ids(
    record_id: str | None, parent_id: str | None, prefix: str, seen: dict[str, int], index: int
) -> str:
    """The event's id (a new one if it has none), once its parent and id are checked."""
    if parent_id is not None:
        check_record_id(parent_id, f"{prefix}parent_id")
    record_id = check_event_id(record_id, f"{prefix}id") if record_id is not None else new_id()
    if record_id in seen:
        raise InvalidArgumentError(
            f"{prefix}id: {record_id} is also the id of events[{seen[record_id]}]",
            field=f"{prefix}id",
            reason="DUPLICATE_EVENT_ID",
        )
    seen[record_id] = index
    return record_id


def new_id() -> str:
    return new_record_id()


Place = tuple[str, str]
"""A branch: (session id, branch id)."""


def named(session_id: str, branch_id: str) -> str:
    """A branch as a message names it: the session, and its branch unless "main"."""
    return f"{session_id!r}" if branch_id == MAIN else f"{session_id!r} (branch {branch_id!r})"


def check_append(
    session_id: str,
    batch: Sequence[Prepared],
    expected_sequence: int | None,
    last_sequence: int,
    *,
    stored: Callable[[str], tuple[int, bytes] | None],
    elsewhere: Callable[[list[str]], dict[str, Place]],
    branch_id: str = MAIN,
    deleted: Callable[[list[str]], str | None] | None = None,
) -> list[int] | None:
    """Decide an append against its branch's state.

    `stored(id)` gives the (sequence, digest) of a record the branch holds;
    `elsewhere(ids)` maps those ids that another branch (of this session or
    another) holds to that branch. Returns the stored sequences when the whole
    append is a retry of one already stored (the caller returns those records
    and writes nothing), or None when it is to be written. Raises
    AlreadyExistsError when an id is stored with other content, or (`deleted(ids)`
    names one) was a deleted record's, WrongExpectedSequence when the expectation
    fails. A retry is recognised
    before the expectation is checked, since the branch has moved on by the
    very append being retried.
    """
    first = stored(batch[0].id)
    if first is not None:
        sequences = []
        for offset, item in enumerate(batch):
            found = stored(item.id)
            if found is None or found[0] != first[0] + offset or found[1] != item.digest():
                raise _conflict(session_id, branch_id, item, found)
            sequences.append(found[0])
        return sequences
    for item in batch[1:]:
        found = stored(item.id)
        if found is not None:
            raise _conflict(session_id, branch_id, item, found)
    taken = elsewhere([item.id for item in batch])
    if taken:
        record_id, (other, other_branch) = next(iter(taken.items()))
        why = "record ids are unique across the store, so a new event needs a new id"
        raise AlreadyExistsError(
            f"the record id {record_id} is already used by session "
            f"{named(other, other_branch)}; {why}",
            reason="EVENT_ID_CONFLICT",
            metadata={"session_id": other, "branch_id": other_branch, "id": record_id},
        ).naming(
            other,
            # What a caller who may not read that session learns: that the id is taken
            # (unavoidable, ids being unique), not where.
            AlreadyExistsError(
                f"the record id {record_id} is already used by another session; {why}",
                reason="EVENT_ID_CONFLICT",
                metadata={"id": record_id},
            ),
        )
    if deleted is not None:
        gone = deleted([item.id for item in batch])
        if gone is not None:
            raise record_id_deleted(gone)
    if expected_sequence is not None and expected_sequence != last_sequence:
        raise wrong_expected_sequence(session_id, expected_sequence, last_sequence, branch_id)
    return None


def record_id_deleted(record_id: str) -> AlreadyExistsError:
    """An append reused the id of a deleted record (most likely an old retry)."""
    return AlreadyExistsError(
        f"the record id {record_id} belonged to a record that was deleted; the ids of "
        "deleted records are never used again (so an old retry cannot bring one back): "
        "a new event needs a new id",
        reason="RECORD_ID_DELETED",
        metadata={"id": record_id},
    )


def _conflict(
    session_id: str, branch_id: str, item: Prepared, found: tuple[int, bytes] | None
) -> Exception:
    where = f" at sequence {found[0]}" if found is not None else ""
    why = (
        "whose content differs from this append's; a retry must send the same parent and "
        "event as the first attempt, and a new event needs a new id"
    )
    metadata = {"session_id": session_id, "branch_id": branch_id, "id": item.id}
    return AlreadyExistsError(
        f"session {named(session_id, branch_id)} already holds a record with id {item.id}"
        f"{where} {why}",
        reason="EVENT_ID_CONFLICT",
        metadata=metadata,
    ).naming(
        session_id,
        AlreadyExistsError(
            f"session {named(session_id, branch_id)} already holds a record with id {item.id} "
            f"{why}",
            reason="EVENT_ID_CONFLICT",
            metadata=metadata,
        ),
    )


def wrong_expected_sequence(
    session_id: str, expected: int, actual: int, branch_id: str = MAIN
) -> WrongExpectedSequence:
    """The error for an expectation that did not hold."""
    describe = {0: "no events"}
    return WrongExpectedSequence(
        f"session {named(session_id, branch_id)}: the append expected "
        f"{describe.get(expected, f'last sequence {expected}')} but it has "
        f"{describe.get(actual, f'last sequence {actual}')}; nothing was written. "
        "Reload it and retry with expected_sequence set to its last sequence.",
        reason=WrongExpectedSequence.reason_name,
        metadata={
            "session_id": session_id,
            "branch_id": branch_id,
            "expected_sequence": str(expected),
            "actual_sequence": str(actual),
        },
    )


@dataclass(frozen=True, slots=True)
class ReadRange:
    """A checked ranged read."""

    from_sequence: int
    limit: int | None
    backwards: bool

    def sequences(self, last_sequence: int) -> range:
        """The sequences this read returns from a session whose last sequence is given."""
        if self.backwards:
            start = min(self.from_sequence or last_sequence, last_sequence)
            stop = 0 if self.limit is None else max(start - self.limit, 0)
            return range(start, stop, -1)
        start = max(self.from_sequence, 1)
        stop = last_sequence + 1
        if self.limit is not None:
            stop = min(start + self.limit, stop)
        return range(start, max(stop, start))


def read_range(from_sequence: int, limit: int | None, direction: ReadDirection | str) -> ReadRange:
    """Check the parameters of a ranged read."""
    check_count(from_sequence, "from_sequence")
    if limit is not None:
        check_count(limit, "limit", minimum=1)
    if direction not in (ReadDirection.FORWARDS, ReadDirection.BACKWARDS):
        raise InvalidArgumentError(
            f"direction must be 'forwards' or 'backwards', not {direction!r}", field="direction"
        )
    return ReadRange(from_sequence, limit, direction == ReadDirection.BACKWARDS)


def start_sequence(head: EventRecord | None, from_sequence: int | None) -> int:
    """The first sequence a subscription delivers."""
    if from_sequence is None:
        return (head.sequence if head else 0) + 1
    return check_count(from_sequence, "from_sequence", minimum=1)


def start_position(last_position: int, from_position: int | None) -> int:
    """The first position a feed subscription delivers."""
    if from_position is None:
        return last_position + 1
    return check_count(from_position, "from_position", minimum=1)


@dataclass(frozen=True, slots=True)
class FeedFilter:
    """Which records of the all-sessions feed a subscriber wants."""

    session_id_prefix: str
    part_types: frozenset[str]
    visible: Callable[[str], bool] | None = None
    """Which sessions the subscriber may see at all (its credential's scope); None: all."""
    scope: Hashable = None
    """What `visible` depends on (two subscribers with the same filters and scope keep
    the same records, so they may share the work)."""
    branch_id: str = ""
    """Only records of branches with this id (of any session); "": every branch."""

    @property
    def key(self) -> Hashable:
        return (self.session_id_prefix, self.part_types, self.branch_id, self.scope)

    @property
    def keeps_everything(self) -> bool:
        return (
            self.visible is None
            and not self.session_id_prefix
            and not self.part_types
            and not self.branch_id
        )

    def kept(self, items: list[FeedItem]) -> list[FeedItem]:
        """The items the subscriber wants."""
        return items if self.keeps_everything else [item for item in items if self(item)]

    @classmethod
    def of(
        cls,
        session_id_prefix: str,
        part_types: Collection[str],
        visible: Callable[[str], bool] | None = None,
        scope: Hashable = None,
        *,
        branch_id: str = "",
    ) -> FeedFilter:
        if not isinstance(session_id_prefix, str) or len(session_id_prefix.encode()) > 200:
            raise InvalidArgumentError(
                "session_id_prefix must be a string of at most 200 bytes",
                field="session_id_prefix",
            )
        unknown = sorted(set(part_types) - set(EVENT_TYPES))
        if unknown:
            raise InvalidArgumentError(
                f"part_types: unknown event kinds {', '.join(map(quoted, unknown[:5]))}"
                f"{' and more' if len(unknown) > 5 else ''} (known: {', '.join(EVENT_TYPES)})",
                field="part_types",
            )
        branch = check_stored_branch_id(branch_id) if branch_id else ""
        return cls(session_id_prefix, frozenset(part_types), visible, scope, branch)

    def __call__(self, item: FeedItem) -> bool:
        """Whether the subscriber wants a record, or hears of a gap or a deletion (any of
        a branch it follows: what was lost may have been of the kinds it wants)."""
        if self.visible is not None:
            session_id = item.record.session_id if isinstance(item, FeedRecord) else item.session_id
            if not self.visible(session_id):
                return False
        if not isinstance(item, FeedRecord):
            return item.session_id.startswith(self.session_id_prefix) and (
                not self.branch_id or item.branch_id == self.branch_id
            )
        record = item.record
        return (
            record.session_id.startswith(self.session_id_prefix)
            and (not self.branch_id or record.branch_id == self.branch_id)
            and (not self.part_types or record.event.part_type in self.part_types)
        )


def feed_end(item: FeedItem) -> int:
    """The last position a feed item covers."""
    return item.last_position if isinstance(item, FeedGap) else item.position
