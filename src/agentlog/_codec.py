"""Conversions between the Python event types, the protobuf messages and arcan's JSON
(see `_plans` for the rules). The JSONL lines of session files are `_lines`'s;
the request messages the clients build are `_requests`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson

from agentlog import _converters
from agentlog._events import EVENT_TYPES, AgentEvent
from agentlog._plans import NS, PLANS, DecodeError, holds_json
from agentlog._records import (
    EventRecord,
    check_timestamp,
    format_timestamp,
)
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb

EVENT_PATHS = {part: f"event.{part}" for part in EVENT_TYPES}
RECORD_EVENT_PATHS = {part: f"record.event.{part}" for part in EVENT_TYPES}


def record_fields_of(
    event: Any,
    *,
    record_id: str,
    sequence: int,
    session_id: str,
    parent_id: str | None,
    timestamp_ns: int,
    branch_id: str = "main",
) -> dict[str, Any]:
    """An EventRecord message's fields as the nested dict its constructor takes."""
    seconds, nanos = divmod(timestamp_ns, NS)
    return {
        "id": record_id,
        "sequence": sequence,
        "session_id": session_id,
        "branch_id": branch_id,
        "parent_id": parent_id,
        "timestamp": {"seconds": seconds, "nanos": nanos},
        "event": event,
    }


RecordMaker = Callable[[str, str, int, str | None, int, AgentEvent, str], EventRecord]
make_record: RecordMaker = _converters.make_record
"""make_record(id, session_id, sequence, parent_id, timestamp_ns, event, branch_id): a
record of checked values, made without the frozen dataclass's per-field checks."""


def event_to_json(event: AgentEvent, path: str = "event") -> dict[str, Any]:
    """arcan's JSON object for an event, checking every field on the way."""
    part_type = _check_event_type(event, path)
    body = _converters.TO_JSON[type(event)](event, f"{path}.{part_type}")
    return {"part_type": part_type, **body}


def _check_event_type(event: AgentEvent, path: str) -> str:
    """The event's part_type, if it is one of the event classes."""
    part_type = getattr(event, "part_type", None)
    if type(event) not in PLANS or EVENT_TYPES.get(str(part_type)) is not type(event):
        raise InvalidArgumentError(
            f"{path}: must be one of the AgentEvent classes "
            f"({', '.join(c.__name__ for c in EVENT_TYPES.values())}), "
            f"not {type(event).__name__}",
            field=path,
            reason="INVALID_EVENT",
        )
    return str(part_type)


def checked_event_fields(event: AgentEvent, path: str = "event") -> dict[str, Any]:
    """An AgentEvent message's fields (nested dicts) for an event, checked as
    event_to_json checks it: what a client sends."""
    part_type = _check_event_type(event, path)
    return {part_type: _converters.CHECKED_FIELDS[type(event)](event, f"{path}.{part_type}")}


def record_to_json(record: EventRecord, *, branches: bool = False) -> dict[str, Any]:
    """arcan's EventRecord object, keys in arcan's order: the seed layout's, then
    agentlog's `sequence`; or (`branches`) newest arcan's, `branch_id` and `sequence`
    among them."""
    if branches:
        return {
            "id": record.id,
            "session_id": record.session_id,
            "branch_id": record.branch_id,
            "sequence": record.sequence,
            "parent_id": record.parent_id,
            "timestamp": format_timestamp(record.timestamp_ns),
            "event": event_to_json(record.event),
        }
    return {
        "id": record.id,
        "session_id": record.session_id,
        "parent_id": record.parent_id,
        "timestamp": format_timestamp(record.timestamp_ns),
        "event": event_to_json(record.event),
        "sequence": record.sequence,
    }


def record_line(record_json: dict[str, Any]) -> bytes:
    """One line of a session file, newline included."""
    return orjson.dumps(record_json, option=orjson.OPT_APPEND_NEWLINE)


def event_from_json(obj: object, path: str = "event") -> AgentEvent:
    """The event an arcan JSON object describes; DecodeError if it describes none."""
    if not isinstance(obj, dict):
        raise DecodeError(f"{path}: expected an object, found {type(obj).__name__}")
    part_type = obj.get("part_type")
    event_cls = EVENT_TYPES.get(part_type) if isinstance(part_type, str) else None
    if event_cls is None:
        raise DecodeError(f"{path}.part_type: unknown event kind {part_type!r}")
    event: AgentEvent = _converters.FROM_JSON[event_cls](obj, f"{path}.{part_type}")
    return event


def event_to_proto(event: AgentEvent) -> pb.AgentEvent:
    """The AgentEvent message for a checked event."""
    return pb.AgentEvent(**_event_fields(event))


def _event_fields(event: AgentEvent) -> dict[str, Any]:
    """An AgentEvent message's fields as nested dicts (to build a message around it)."""
    return {event.part_type: _converters.TO_PROTO[type(event)](event)}


def event_from_proto(
    message: pb.AgentEvent, path: str = "event", strict: bool = True
) -> AgentEvent:
    """The event an AgentEvent message holds; InvalidArgumentError if it holds none.

    `strict` parses JsonValue text as untrusted input (what a server receives).
    """
    part_type = message.WhichOneof("kind")
    if part_type is None:
        raise InvalidArgumentError(
            f"{path}: no event kind is set (set one of: {', '.join(EVENT_TYPES)})",
            field=path,
            reason="INVALID_EVENT",
        )
    event_cls = EVENT_TYPES[part_type]
    event: AgentEvent = _converters.FROM_PROTO[event_cls](
        getattr(message, part_type), f"{path}.{part_type}", strict
    )
    return event


def record_to_proto(record: EventRecord, event: pb.AgentEvent | None = None) -> pb.EventRecord:
    """The EventRecord message for a record.

    `event` is the record's event as a message, when the caller has it (an
    append answering with its own request's event): copying it is far cheaper
    than encoding the event again.
    """
    return pb.EventRecord(
        id=record.id,
        sequence=record.sequence,
        session_id=record.session_id,
        branch_id=record.branch_id,
        parent_id=record.parent_id,
        timestamp=timestamp_fields(record.timestamp_ns),
        event=_event_fields(record.event) if event is None else event,
    )


_COPIED_AS_SENT = frozenset(
    part_type for part_type, cls in EVENT_TYPES.items() if not holds_json(PLANS[cls])
)


def event_json_from_proto(message: pb.AgentEvent, path: str = "event") -> dict[str, Any]:
    """arcan's JSON for an event a client sent, checked as event_from_proto (strict)
    then event_to_json check it, without the Python event in between."""
    part_type = message.WhichOneof("kind")
    if part_type is None:
        return event_to_json(event_from_proto(message, path))  # raises what is wrong
    body = _converters.PROTO_TO_JSON_BY_PART[part_type](
        getattr(message, part_type), f"{path}.{part_type}"
    )
    return {"part_type": part_type, **body}


def appended_fields(
    sent: pb.AgentEvent,
    event_json: dict[str, Any],
    *,
    record_id: str,
    sequence: int,
    session_id: str,
    parent_id: str | None,
    timestamp_ns: int,
    branch_id: str = "main",
) -> dict[str, Any]:
    """The fields of the EventRecord message answering an appended event that a
    request held as `sent` and the store holds as `event_json`.

    Event kinds without JSON text are answered with the message as sent (a copy
    made in C); the others with their JSON as stored, in its canonical spelling.
    """
    part_type = event_json["part_type"]
    if part_type in _COPIED_AS_SENT:
        event: Any = sent
    else:
        event = {part_type: _converters.JSON_TO_PROTO_BY_PART[part_type](event_json, "event")}
    return record_fields_of(
        event,
        record_id=record_id,
        sequence=sequence,
        session_id=session_id,
        parent_id=parent_id,
        timestamp_ns=timestamp_ns,
        branch_id=branch_id,
    )


def record_from_proto(message: pb.EventRecord, event: AgentEvent | None = None) -> EventRecord:
    """The record an EventRecord message from the server holds.

    `event` is the record's event, when the caller has it: the client that
    appended it. (The store holds exactly the event sent, and a retry is only
    accepted with the same content, so decoding it back would only cost time.)
    """
    timestamp = message.timestamp
    timestamp_ns = check_timestamp(timestamp.seconds * NS + timestamp.nanos, "record.timestamp")
    if event is None:
        wrapper = message.event
        part_type = wrapper.WhichOneof("kind")
        decode = _converters.FROM_PROTO_BY_PART.get(part_type) if part_type is not None else None
        if decode is None:
            event = event_from_proto(wrapper, "record.event", strict=False)
        else:
            event = decode(getattr(wrapper, part_type), RECORD_EVENT_PATHS[part_type], False)
    return make_record(
        message.id,
        message.session_id,
        message.sequence,
        message.parent_id if message.HasField("parent_id") else None,
        timestamp_ns,
        event,
        message.branch_id or "main",
    )


def appended_from_proto(
    messages: Sequence[pb.EventRecord], events: Sequence[AgentEvent]
) -> list[EventRecord]:
    """The records an append's response holds, given the events the append sent."""
    if len(messages) != len(events):  # not what any agentlog server answers: trust it
        return [record_from_proto(message) for message in messages]
    return [record_from_proto(m, e) for m, e in zip(messages, events, strict=True)]


def timestamp_fields(timestamp_ns: int) -> dict[str, int]:
    """A google.protobuf.Timestamp's fields for nanoseconds since the epoch."""
    seconds, nanos = divmod(timestamp_ns, NS)
    return {"seconds": seconds, "nanos": nanos}
