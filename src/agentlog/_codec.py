"""Conversions between the Python event types, the protobuf messages and arcan's JSON.

Nothing here names a field: every conversion is planned once, at import, from
the proto descriptors paired with the generated classes of `_events`. The JSON
rules are arcan's (serde's), stated once:

- a message is an object whose keys are the proto field names;
- an event is its variant's object with `"part_type": <oneof member name>` first;
- an enum is its value name without the enum's prefix, lower-cased;
- `JsonValue` is the JSON value itself; unset means null;
- an absent optional scalar is written as null, an absent optional message is
  omitted (serde's skip_serializing_if), and both read back as None;
- on reading, unknown keys are ignored and a missing scalar takes its zero
  value, as serde's `#[serde(default)]` does for TokenUsage.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any, cast

import orjson
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from agentlog import _events, _json
from agentlog._events import EVENT_TYPES, AgentEvent, ReadDirection
from agentlog._records import (
    AppendEvent,
    EventRecord,
    NewEvent,
    SessionInfo,
    SessionPage,
    check_timestamp,
    format_timestamp,
    new_record_ids,
    parse_timestamp,
    utc_seconds,
)
from agentlog._validation import (
    check_count,
    check_event_id,
    check_record_id,
    check_session_id,
    check_stored_session_id,
)
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb

_SCALAR, _ENUM, _MESSAGE, _JSON = range(4)
_JSON_MESSAGE = pb.JsonValue.DESCRIPTOR.full_name
_NS = 1_000_000_000

# Closed vocabularies the format page gives for fields the proto keeps as strings.
_ALLOWED_STRINGS: dict[tuple[str, str], frozenset[str]] = {
    ("ApprovalRequested", "risk"): frozenset({"low", "medium", "high", "critical"}),
    ("ApprovalResolved", "decision"): frozenset({"approved", "denied", "timeout"}),
}

_PY_SCALARS: dict[int, type] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float,
}
_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


class DecodeError(ValueError):
    """Stored JSON that does not describe a record; the caller adds where it was found."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Field:
    name: str
    kind: int
    optional: bool
    py_type: type
    int_range: tuple[int, int] | None = None
    allowed: frozenset[str] | None = None
    enum_numbers: dict[str, int] | None = None
    enum_members: dict[int, StrEnum] | None = None
    message: _Plan | None = None


@dataclasses.dataclass(slots=True)
class _Plan:
    py_cls: type
    proto_cls: Callable[..., Message]
    fields: list[_Field]


def _enum_prefix(descriptor: EnumDescriptor) -> str:
    name = descriptor.name
    return "".join("_" + c if c.isupper() else c for c in name).lstrip("_").upper() + "_"


def _build_plans() -> dict[type, _Plan]:
    plans: dict[type, _Plan] = {}
    for full_name, py_cls in _events.MESSAGE_TYPES.items():
        descriptor: Descriptor = pb.DESCRIPTOR.message_types_by_name[full_name.rsplit(".", 1)[1]]
        plans[py_cls] = _Plan(py_cls, getattr(pb, descriptor.name), [])
    for py_cls, plan in plans.items():
        descriptor = getattr(pb, py_cls.__name__).DESCRIPTOR
        defaults = {f.name: f.default for f in dataclasses.fields(py_cls)}
        for fd in descriptor.fields:
            optional = defaults[fd.name] is None
            if fd.message_type is not None and fd.message_type.full_name == _JSON_MESSAGE:
                plan.fields.append(_Field(fd.name, _JSON, True, object))
            elif fd.message_type is not None:
                sub = plans[_events.MESSAGE_TYPES[fd.message_type.full_name]]
                plan.fields.append(_Field(fd.name, _MESSAGE, optional, sub.py_cls, message=sub))
            elif fd.enum_type is not None:
                enum_cls = _events.ENUM_TYPES[fd.enum_type.full_name]
                prefix = _enum_prefix(fd.enum_type)
                members = {
                    v.number: enum_cls(v.name.removeprefix(prefix).lower())
                    for v in fd.enum_type.values
                    if v.number != 0
                }
                plan.fields.append(
                    _Field(
                        fd.name,
                        _ENUM,
                        optional,
                        enum_cls,
                        enum_numbers={m.value: n for n, m in members.items()},
                        enum_members=members,
                    )
                )
            else:
                plan.fields.append(
                    _Field(
                        fd.name,
                        _SCALAR,
                        optional,
                        _PY_SCALARS[fd.type],
                        int_range=_INT_RANGES.get(fd.type),
                        allowed=_ALLOWED_STRINGS.get((py_cls.__name__, fd.name)),
                    )
                )
    return plans


_PLANS = _build_plans()


# --- Python objects -> arcan JSON (validating: this is the check every append passes) ---


def _invalid(path: str, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{path}: {problem}", field=path, reason="INVALID_EVENT")


def _scalar_to_json(value: object, field: _Field, path: str, *, closed: bool = True) -> object:
    """A checked scalar; `closed`: a string must be one of its field's closed
    vocabulary, if it has one (what an append may say; reads serve any string
    arcan wrote, since arcan's own types are free strings)."""
    expected = field.py_type
    if expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(path, f"must be an integer, not {type(value).__name__}")
        low, high = field.int_range or (-(2**63), 2**64 - 1)
        if not low <= value <= high:
            raise _invalid(path, f"{value} is outside the range {low} to {high}")
        return value
    if not isinstance(value, expected) or (expected is float and isinstance(value, bool)):
        raise _invalid(path, f"must be a {expected.__name__}, not {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _invalid(path, "is not valid Unicode (lone surrogate)") from None
        if closed and field.allowed is not None and value not in field.allowed:
            raise _invalid(path, f"{value!r} is not one of {', '.join(sorted(field.allowed))}")
    return value


def _to_json(obj: object, plan: _Plan, path: str) -> dict[str, Any]:
    if type(obj) is not plan.py_cls:
        raise _invalid(path, f"must be a {plan.py_cls.__name__}, not {type(obj).__name__}")
    out: dict[str, Any] = {}
    for field in plan.fields:
        value = getattr(obj, field.name)
        where = f"{path}.{field.name}"
        if value is None:
            if field.kind == _JSON or (field.optional and field.kind != _MESSAGE):
                out[field.name] = None
            elif not field.optional:
                raise _invalid(where, "is required")
            continue
        kind = field.kind
        if kind == _SCALAR:
            out[field.name] = _scalar_to_json(value, field, where)
        elif kind == _ENUM:
            assert field.enum_numbers is not None
            if not isinstance(value, str) or value not in field.enum_numbers:
                choices = ", ".join(field.enum_numbers)
                raise _invalid(where, f"{value!r} is not a {field.py_type.__name__} ({choices})")
            out[field.name] = str(value)
        elif kind == _MESSAGE:
            assert field.message is not None
            out[field.name] = _to_json(value, field.message, where)
        else:
            _json.check_json(value, where)
            out[field.name] = value
    return out


def event_to_json(event: AgentEvent, path: str = "event") -> dict[str, Any]:
    """arcan's JSON object for an event, checking every field on the way."""
    part_type = _check_event_type(event, path)
    body = _FAST_TO_JSON[type(event)](event, f"{path}.{part_type}")
    return {"part_type": part_type, **body}


def _check_event_type(event: AgentEvent, path: str) -> str:
    """The event's part_type, if it is one of the event classes."""
    part_type = getattr(event, "part_type", None)
    if type(event) not in _PLANS or EVENT_TYPES.get(str(part_type)) is not type(event):
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
    return {part_type: _FAST_CHECKED_FIELDS[type(event)](event, f"{path}.{part_type}")}


def record_to_json(record: EventRecord) -> dict[str, Any]:
    """arcan's EventRecord object, keys in arcan's order, then agentlog's `sequence`."""
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


# --- arcan JSON -> Python objects ---


def _from_json(obj: object, plan: _Plan, path: str) -> Any:
    if not isinstance(obj, dict):
        raise DecodeError(f"{path}: expected an object, found {type(obj).__name__}")
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        value = obj.get(field.name)
        where = f"{path}.{field.name}"
        kind = field.kind
        if value is None:
            if kind == _JSON or field.optional:
                kwargs[field.name] = None
            elif kind == _MESSAGE:
                raise DecodeError(f"{where}: missing")
            elif field.name in obj:
                raise DecodeError(f"{where}: null where a {field.py_type.__name__} belongs")
            else:
                kwargs[field.name] = field.py_type()
            continue
        if kind == _SCALAR:
            try:
                kwargs[field.name] = _scalar_to_json(value, field, where, closed=False)
            except InvalidArgumentError as exc:
                raise DecodeError(str(exc)) from None
        elif kind == _ENUM:
            try:
                kwargs[field.name] = field.py_type(value)
            except ValueError:
                raise DecodeError(f"{where}: unknown value {value!r}") from None
        elif kind == _MESSAGE:
            assert field.message is not None
            kwargs[field.name] = _from_json(value, field.message, where)
        else:
            kwargs[field.name] = value
    return plan.py_cls(**kwargs)


def event_from_json(obj: object, path: str = "event") -> AgentEvent:
    """The event an arcan JSON object describes; DecodeError if it describes none."""
    if not isinstance(obj, dict):
        raise DecodeError(f"{path}: expected an object, found {type(obj).__name__}")
    part_type = obj.get("part_type")
    event_cls = EVENT_TYPES.get(part_type) if isinstance(part_type, str) else None
    if event_cls is None:
        raise DecodeError(f"{path}.part_type: unknown event kind {part_type!r}")
    event: AgentEvent = _FAST_FROM_JSON[event_cls](obj, f"{path}.{part_type}")
    return event


def record_from_json(obj: object, sequence: int) -> EventRecord:
    """The record one parsed line of a session file holds; DecodeError if none.

    `sequence` is the line's position among the file's records; a line that
    states a different `sequence` is damaged.
    """
    record_id, session_id, parent_id, timestamp_ns = _record_fields(obj, sequence)
    assert isinstance(obj, dict)
    event = event_from_json(obj.get("event"))
    return make_record(record_id, session_id, sequence, parent_id, timestamp_ns, event)


def record_message_fields(obj: object, sequence: int) -> dict[str, Any]:
    """The fields of the EventRecord message for one parsed line, as the nested dict
    the message's constructor takes, checked as record_from_json checks it.

    What a read sends: a response built from these dicts is made in one call,
    with no Python record or message objects in between.
    """
    record_id, session_id, parent_id, timestamp_ns = _record_fields(obj, sequence)
    assert isinstance(obj, dict)
    event = obj.get("event")
    part_type = event.get("part_type") if isinstance(event, dict) else None
    event_cls = EVENT_TYPES.get(part_type) if isinstance(part_type, str) else None
    if event_cls is None:
        event_from_json(event)  # raises the DecodeError that says what is wrong
        raise AssertionError("unreachable")
    fields = _FAST_JSON_TO_PROTO[event_cls](event, f"event.{part_type}")
    return _record_fields_of(
        {part_type: fields},
        record_id=record_id,
        sequence=sequence,
        session_id=session_id,
        parent_id=parent_id,
        timestamp_ns=timestamp_ns,
    )


def _record_fields_of(
    event: Any,
    *,
    record_id: str,
    sequence: int,
    session_id: str,
    parent_id: str | None,
    timestamp_ns: int,
) -> dict[str, Any]:
    """An EventRecord message's fields as the nested dict its constructor takes."""
    seconds, nanos = divmod(timestamp_ns, _NS)
    return {
        "id": record_id,
        "sequence": sequence,
        "session_id": session_id,
        "parent_id": parent_id,
        "timestamp": {"seconds": seconds, "nanos": nanos},
        "event": event,
    }


def _record_fields(obj: object, sequence: int) -> tuple[str, str, str | None, int]:
    """The id, session id, parent id and timestamp of a parsed line; DecodeError if bad."""
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, found {type(obj).__name__}")
    record_id, session_id, parent_id = obj.get("id"), obj.get("session_id"), obj.get("parent_id")
    timestamp = obj.get("timestamp")
    if not isinstance(record_id, str):
        raise DecodeError("id: missing or not a string")
    if not isinstance(session_id, str):
        raise DecodeError("session_id: missing or not a string")
    if parent_id is not None and not isinstance(parent_id, str):
        raise DecodeError("parent_id: not a string or null")
    if not isinstance(timestamp, str):
        raise DecodeError("timestamp: missing or not a string")
    try:
        timestamp_ns = parse_timestamp(timestamp)
    except ValueError as exc:
        raise DecodeError(f"timestamp: {exc}") from None
    stated = obj.get("sequence", sequence)
    if stated != sequence or type(stated) is not int:
        raise DecodeError(f"sequence: the line says {stated!r} but it is record {sequence}")
    return record_id, session_id, parent_id, timestamp_ns


def record_from_line(line: bytes, sequence: int) -> EventRecord:
    """The record one line of a session file holds, at `sequence`; DecodeError if none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    return record_from_json(obj, sequence)


def record_fields_from_line(line: bytes, sequence: int) -> dict[str, Any]:
    """record_message_fields for one line of a session file; DecodeError if it holds none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    return record_message_fields(obj, sequence)


def record_fields_from_lines(lines: Sequence[bytes], first_sequence: int) -> list[dict[str, Any]]:
    """record_fields_from_line for consecutive lines, the first at `first_sequence`.

    The same checks in one loop, with the common shape of a line tried first
    (what long reads spend their time on); any other line takes the full path,
    which words the error.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    loads = orjson.loads
    event_fields = _JSON_TO_PROTO_BY_PART
    paths: dict[Any, str] = _EVENT_PATHS
    seconds_of = utc_seconds
    sequence = first_sequence
    for line in lines:
        try:
            obj = loads(line)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not valid JSON: {exc}") from None
        if type(obj) is dict:
            get = obj.get
            record_id, session_id, parent_id = get("id"), get("session_id"), get("parent_id")
            timestamp, event, stated = get("timestamp"), get("event"), get("sequence", sequence)
            # chrono's nanosecond form, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`
            if (
                type(record_id) is str
                and type(session_id) is str
                and (parent_id is None or type(parent_id) is str)
                and type(timestamp) is str
                and len(timestamp) == 30
                and timestamp[19] == "."
                and timestamp[29] == "Z"
                and timestamp[10] == "T"
                and type(stated) is int
                and stated == sequence
                and type(event) is dict
            ):
                part_type = event.get("part_type")
                fields = event_fields.get(part_type) if type(part_type) is str else None
                fraction = timestamp[20:29]
                seconds = seconds_of(timestamp[:19])
                if (
                    fields is not None
                    and seconds is not None
                    and fraction.isascii()
                    and fraction.isdigit()
                ):
                    append(
                        {
                            "id": record_id,
                            "sequence": sequence,
                            "session_id": session_id,
                            "parent_id": parent_id,
                            "timestamp": {"seconds": seconds, "nanos": int(fraction)},
                            "event": {part_type: fields(event, paths[part_type])},
                        }
                    )
                    sequence += 1
                    continue
        append(record_message_fields(obj, sequence))
        sequence += 1
    return out


def record_proto_from_line(line: bytes, sequence: int) -> pb.EventRecord:
    """The EventRecord message for one line of a session file; DecodeError if none."""
    return pb.EventRecord(**record_fields_from_line(line, sequence))


# --- Python objects <-> protobuf ---


def _to_proto(obj: object, plan: _Plan) -> Message:
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        value = getattr(obj, field.name)
        if value is None:
            continue
        kind = field.kind
        if kind == _SCALAR:
            kwargs[field.name] = value
        elif kind == _ENUM:
            assert field.enum_numbers is not None
            kwargs[field.name] = field.enum_numbers[value]
        elif kind == _MESSAGE:
            assert field.message is not None
            kwargs[field.name] = _to_proto(value, field.message)
        else:
            kwargs[field.name] = pb.JsonValue(json=_json.dumps(value))
    return plan.proto_cls(**kwargs)


def event_to_proto(event: AgentEvent) -> pb.AgentEvent:
    """The AgentEvent message for a checked event."""
    return pb.AgentEvent(**_event_fields(event))


def _event_fields(event: AgentEvent) -> dict[str, Any]:
    """An AgentEvent message's fields as nested dicts (to build a message around it)."""
    return {event.part_type: _FAST_TO_PROTO[type(event)](event)}


def _from_proto(message: Any, plan: _Plan, path: str, strict: bool) -> Any:
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        name = field.name
        kind = field.kind
        where = f"{path}.{name}"
        if (kind >= _MESSAGE or field.optional) and not message.HasField(name):
            if kind == _MESSAGE and not field.optional:
                raise _invalid(where, "is required")
            kwargs[name] = None
            continue
        value = getattr(message, name)
        if kind == _SCALAR:
            kwargs[name] = value
        elif kind == _ENUM:
            assert field.enum_members is not None
            member = field.enum_members.get(value)
            if member is None:
                problem = "must be set" if value == 0 else f"unknown value {value}"
                raise _invalid(
                    where, f"{problem} (one of {', '.join(map(str, field.enum_members.values()))})"
                )
            kwargs[name] = member
        elif kind == _MESSAGE:
            assert field.message is not None
            kwargs[name] = _from_proto(value, field.message, where, strict)
        elif strict:
            kwargs[name] = _json.parse_strict(value.json, where)
        else:
            kwargs[name] = _json.loads(value.json)
    return plan.py_cls(**kwargs)


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
    event: AgentEvent = _FAST_FROM_PROTO[event_cls](
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
        parent_id=record.parent_id,
        timestamp=timestamp_fields(record.timestamp_ns),
        event=_event_fields(record.event) if event is None else event,
    )


def _holds_json(plan: _Plan) -> bool:
    return any(
        f.kind == _JSON or (f.message is not None and _holds_json(f.message)) for f in plan.fields
    )


# Event kinds whose message a server may send back as it came: they hold no
# JSON text, which is stored in its canonical spelling and answered so.
_COPIED_AS_SENT = frozenset(
    part_type for part_type, cls in EVENT_TYPES.items() if not _holds_json(_PLANS[cls])
)


def event_json_from_proto(message: pb.AgentEvent, path: str = "event") -> dict[str, Any]:
    """arcan's JSON for an event a client sent, checked as event_from_proto (strict)
    then event_to_json check it, without the Python event in between."""
    part_type = message.WhichOneof("kind")
    if part_type is None:
        return event_to_json(event_from_proto(message, path))  # raises what is wrong
    body = _PROTO_TO_JSON_BY_PART[part_type](getattr(message, part_type), f"{path}.{part_type}")
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
        event = {part_type: _JSON_TO_PROTO_BY_PART[part_type](event_json, "event")}
    return _record_fields_of(
        event,
        record_id=record_id,
        sequence=sequence,
        session_id=session_id,
        parent_id=parent_id,
        timestamp_ns=timestamp_ns,
    )


def record_from_proto(message: pb.EventRecord, event: AgentEvent | None = None) -> EventRecord:
    """The record an EventRecord message from the server holds.

    `event` is the record's event, when the caller has it: the client that
    appended it. (The store holds exactly the event sent, and a retry is only
    accepted with the same content, so decoding it back would only cost time.)
    """
    timestamp = message.timestamp
    timestamp_ns = check_timestamp(timestamp.seconds * _NS + timestamp.nanos, "record.timestamp")
    if event is None:
        wrapper = message.event
        part_type = wrapper.WhichOneof("kind")
        decode = _FROM_PROTO_BY_PART.get(part_type) if part_type is not None else None
        if decode is None:
            event = event_from_proto(wrapper, "record.event", strict=False)
        else:
            event = decode(getattr(wrapper, part_type), _RECORD_EVENT_PATHS[part_type], False)
    return make_record(
        message.id,
        message.session_id,
        message.sequence,
        message.parent_id if message.HasField("parent_id") else None,
        timestamp_ns,
        event,
    )


def appended_from_proto(
    messages: Sequence[pb.EventRecord], events: Sequence[AgentEvent]
) -> list[EventRecord]:
    """The records an append's response holds, given the events the append sent."""
    if len(messages) != len(events):  # not what any agentlog server answers: trust it
        return [record_from_proto(message) for message in messages]
    return [record_from_proto(m, e) for m, e in zip(messages, events, strict=True)]


def append_to_proto(append: AppendEvent) -> pb.AppendRequest:
    """The AppendRequest for an append, checked as every backend checks it.

    An append without an id gets a new one here, so that a retry of the
    request is recognised as the same append. The answer leaves the event out:
    the caller has it.
    """
    if not isinstance(append, AppendEvent):
        raise InvalidArgumentError(
            f"append takes an AppendEvent, not {type(append).__name__}", reason="INVALID_EVENT"
        )
    check_session_id(append.session_id)
    if append.parent_id is not None:
        check_record_id(append.parent_id, "parent_id")
    if append.id is not None:
        check_event_id(append.id)
    if append.expected_sequence is not None:
        check_count(append.expected_sequence, "expected_sequence")
    return pb.AppendRequest(
        session_id=append.session_id,
        parent_id=append.parent_id,
        event=checked_event_fields(append.event),
        id=append.id if append.id is not None else new_record_ids(1)[0],
        expected_sequence=append.expected_sequence,
        omit_event=True,
    )


def batch_to_proto(
    session_id: str, events: Sequence[NewEvent], expected_sequence: int | None
) -> pb.AppendBatchRequest:
    """The AppendBatchRequest for a batch, each event checked as every backend checks it.

    Events without an id get new ones here (see append_to_proto).
    """
    check_session_id(session_id)
    if expected_sequence is not None:
        check_count(expected_sequence, "expected_sequence")
    fresh = iter(new_record_ids(sum(1 for item in events if item.id is None)))
    items = []
    for index, item in enumerate(events):
        if not isinstance(item, NewEvent):
            raise InvalidArgumentError(
                f"events[{index}]: must be a NewEvent, not {type(item).__name__}",
                reason="INVALID_EVENT",
            )
        if item.parent_id is not None:
            check_record_id(item.parent_id, f"events[{index}].parent_id")
        if item.id is not None:
            check_event_id(item.id, f"events[{index}].id")
        items.append(
            {
                "id": item.id if item.id is not None else next(fresh),
                "parent_id": item.parent_id,
                "event": checked_event_fields(item.event, f"events[{index}].event"),
            }
        )
    return pb.AppendBatchRequest(
        session_id=session_id, expected_sequence=expected_sequence, events=items, omit_events=True
    )


_DIRECTIONS = {
    pb.READ_DIRECTION_UNSPECIFIED: ReadDirection.FORWARDS,
    pb.READ_DIRECTION_FORWARDS: ReadDirection.FORWARDS,
    pb.READ_DIRECTION_BACKWARDS: ReadDirection.BACKWARDS,
}


def read_to_proto(
    session_id: str, from_sequence: int, limit: int | None, direction: ReadDirection
) -> pb.LoadSessionRequest:
    """The LoadSessionRequest for a ranged read (limit None: no limit)."""
    check_count(from_sequence, "from_sequence")
    if limit is not None:
        check_count(limit, "limit", minimum=1)
    backwards = direction == ReadDirection.BACKWARDS
    if not backwards and direction != ReadDirection.FORWARDS:
        raise InvalidArgumentError(
            f"direction must be 'forwards' or 'backwards', not {direction!r}", field="direction"
        )
    return pb.LoadSessionRequest(
        session_id=session_id,
        from_sequence=from_sequence,
        limit=limit or 0,
        direction=pb.READ_DIRECTION_BACKWARDS if backwards else pb.READ_DIRECTION_FORWARDS,
    )


def read_from_proto(request: pb.LoadSessionRequest) -> tuple[str, int, int | None, ReadDirection]:
    """The session, start, limit and direction a LoadSessionRequest asks for."""
    direction = _DIRECTIONS.get(request.direction)
    if direction is None:
        raise InvalidArgumentError(
            f"direction: unknown value {request.direction}", field="direction"
        )
    session_id = check_stored_session_id(request.session_id)
    return session_id, request.from_sequence, request.limit or None, direction


def timestamp_fields(timestamp_ns: int) -> dict[str, int]:
    """A google.protobuf.Timestamp's fields for nanoseconds since the epoch."""
    seconds, nanos = divmod(timestamp_ns, _NS)
    return {"seconds": seconds, "nanos": nanos}


def page_to_proto(page: SessionPage) -> pb.ListSessionsResponse:
    """The ListSessionsResponse for a page of sessions."""
    return pb.ListSessionsResponse(
        sessions=[
            pb.SessionInfo(
                session_id=info.session_id,
                event_count=info.event_count,
                first_timestamp=timestamp_fields(info.first_timestamp_ns),
                last_timestamp=timestamp_fields(info.last_timestamp_ns),
                head_id=info.head_id,
            )
            for info in page.sessions
        ],
        next_page_token=page.next_page_token or "",
    )


def page_from_proto(response: pb.ListSessionsResponse) -> SessionPage:
    """The page of sessions a ListSessionsResponse holds."""
    return SessionPage(
        sessions=[
            SessionInfo(
                session_id=info.session_id,
                event_count=info.event_count,
                first_timestamp_ns=info.first_timestamp.seconds * _NS + info.first_timestamp.nanos,
                last_timestamp_ns=info.last_timestamp.seconds * _NS + info.last_timestamp.nanos,
                head_id=info.head_id,
            )
            for info in response.sessions
        ],
        next_page_token=response.next_page_token or None,
    )


# --- Straight-line conversions, compiled from the plans ---
#
# The functions above walk a plan field by field; these do the same work as
# generated code, one function per message (several times faster). They only
# take the common path: on anything unusual (a wrong type, a missing field, an
# unknown enum value) they hand over to the walk above, which decides and words
# the error, so both always agree.


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _scalar_check(
    field: _Field, value: str, names: dict[str, object], *, closed: bool = True
) -> str:
    """A Python expression true when `value` passes `_scalar_to_json` for `field`
    (with the same `closed`)."""
    expected = field.py_type
    if expected is int:
        low, high = field.int_range or (-(2**63), 2**64 - 1)
        check = f"type({value}) is int and {low} <= {value} <= {high}"
    elif expected is str:
        check = f"type({value}) is str and ({value}.isascii() or _encodable({value}))"
        if closed and field.allowed is not None:
            names[f"A_{id(field)}"] = field.allowed
            check += f" and {value} in A_{id(field)}"
    else:
        check = f"type({value}) is {expected.__name__}"
    return check


def _as_dict(arguments: list[str]) -> str:
    """`{'a': x, ...}` from `["a=x", ...]`: messages are built from nested dicts, once,
    at the top (building each level as a message would copy it into the next)."""
    pairs = (argument.split("=", 1) for argument in arguments)
    return "{" + ", ".join(f"{name!r}: {value}" for name, value in pairs) + "}"


def _maker_source(name: str, cls_name: str, fields: list[str], names: dict[str, Any]) -> str:
    """A function `name(*values)` making an instance of the frozen, slotted
    dataclass `names[cls_name]` from its `fields`' values, in that order.

    For values already checked (decoding): it sets the slots directly, at
    half the cost of the frozen __init__'s object.__setattr__ call per field.
    The instance is the same: equal, hashable, immutable.
    """
    cls = names[cls_name]
    assert set(getattr(cls, "__slots__", ())) >= set(fields)
    assert {f.name for f in dataclasses.fields(cls)} == set(fields)
    assert "__post_init__" not in vars(cls)
    for j, field in enumerate(fields):
        names[f"{name}_{j}"] = vars(cls)[field].__set__
    args = [f"a{j}" for j in range(len(fields))]
    return (
        f"def {name}({', '.join(args)}):\n    r = _new({cls_name})\n"
        + "".join(f"    {name}_{j}(r, a{j})\n" for j in range(len(fields)))
        + "    return r\n"
    )


def _proto_to_json_source(
    n: int, plan: _Plan, index: dict[type, int], names: dict[str, Any]
) -> str:
    """`pj{n}(m, path)`: arcan's JSON for a message received from a client, checked as
    `_to_json(_from_proto(m, ..., strict=True))` checks it, without the Python objects.

    A proto string is valid UTF-8 and a proto integer is in its type's range
    already; what is left to check is enums, closed vocabularies, required
    messages and JSON text. Anything unusual takes the walk, which words the error.
    """
    slow = f"_to_json(_from_proto(m, P{n}, path, True), P{n}, path)"
    lines = [f"def pj{n}(m, path):"]
    out: list[tuple[str, str, bool]] = []  # key, value, omitted when None
    checks: list[str] = []
    for j, field in enumerate(plan.fields):
        name, key, v = field.name, repr(field.name), f"v{j}"
        where = f'path + ".{name}"'
        has = f"m.HasField({key})"
        if field.kind == _SCALAR:
            lines.append(
                f"    {v} = m.{name} if {has} else None"
                if field.optional
                else f"    {v} = m.{name}"
            )
            if field.allowed is not None:
                names[f"A_{id(field)}"] = field.allowed
                check = f"{v} in A_{id(field)}"
                checks.append(f"({v} is None or {check})" if field.optional else check)
            out.append((key, v, False))
        elif field.kind == _ENUM:
            assert field.enum_members is not None
            names[f"S{n}_{j}"] = {number: str(m) for number, m in field.enum_members.items()}
            if field.optional:
                lines.append(f"    {v} = S{n}_{j}.get(m.{name}, _BAD) if {has} else None")
            else:
                lines.append(f"    {v} = S{n}_{j}.get(m.{name}, _BAD)")
            checks.append(f"{v} is not _BAD")
            out.append((key, v, False))
        elif field.kind == _MESSAGE:
            sub = index[field.message.py_cls] if field.message is not None else -1
            if field.optional:
                lines.append(f"    {v} = pj{sub}(m.{name}, {where}) if {has} else None")
                out.append((key, v, True))
            else:
                lines.append(f"    if not {has}:\n        return {slow}")
                lines.append(f"    {v} = pj{sub}(m.{name}, {where})")
                out.append((key, v, False))
        else:  # JSON text, parsed as untrusted input (its errors are the walk's own)
            lines.append(f"    {v} = _parse_strict(m.{name}.json, {where}) if {has} else None")
            out.append((key, v, False))
    if checks:
        lines.append(f"    if not ({' and '.join(checks)}):\n        return {slow}")
    if any(omit for _, _, omit in out):
        lines.append("    out = {}")
        for key, value, omit in out:
            if omit:
                lines.append(f"    if {value} is not None:\n        out[{key}] = {value}")
            else:
                lines.append(f"    out[{key}] = {value}")
        lines.append("    return out")
    else:
        lines.append("    return {" + ", ".join(f"{key}: {value}" for key, value, _ in out) + "}")
    return "\n".join(lines) + "\n"


def _checked_fields_source(
    n: int, plan: _Plan, index: dict[type, int], names: dict[str, Any]
) -> str:
    """`vp{n}(obj, path)`: the message fields (nested dicts) of a Python event,
    checked as `_to_json` checks it (what a client sends); anything unusual takes
    the walk, which words the error."""
    slow = f"(_to_json(obj, P{n}, path), tp{n}(obj))[1]"
    lines = [f"def vp{n}(obj, path):", f"    if type(obj) is not C{n}:", f"        return {slow}"]
    checks: list[str] = []
    out: list[str] = []
    for j, field in enumerate(plan.fields):
        name, v = field.name, f"v{j}"
        where = f'path + ".{name}"'
        lines.append(f"    {v} = obj.{name}")
        if field.kind == _SCALAR:
            check = _scalar_check(field, v, names)
            checks.append(f"({v} is None or ({check}))" if field.optional else check)
            out.append(f"{name}={v}")
        elif field.kind == _ENUM:
            numbers = f"E{n}_{j}"  # the same table the other conversions use
            check = f"isinstance({v}, str) and {v} in {numbers}"
            checks.append(f"({v} is None or ({check}))" if field.optional else check)
            value = f"{numbers}[{v}]"
            out.append(
                f"{name}=None if {v} is None else {value}" if field.optional else f"{name}={value}"
            )
        elif field.kind == _MESSAGE:
            sub = index[field.message.py_cls] if field.message is not None else -1
            if field.optional:
                checks.append(f"({v} is None or type({v}) is C{sub})")
                out.append(f"{name}=None if {v} is None else vp{sub}({v}, {where})")
            else:
                checks.append(f"type({v}) is C{sub}")
                out.append(f"{name}=vp{sub}({v}, {where})")
        else:  # JSON: any value, checked, sent as its canonical text
            out.append(f"{name}=None if {v} is None else {{'json': _dumps({v})}}")
    if checks:
        lines.append(f"    if not ({' and '.join(checks)}):")
        lines.append(f"        return {slow}")
    for j, field in enumerate(plan.fields):
        if field.kind == _JSON:
            lines.append(f"    if v{j} is not None:")
            lines.append(f'        _check_json(v{j}, path + ".{field.name}")')
    lines.append(f"    return {_as_dict(out)}")
    return "\n".join(lines) + "\n"


def _compile_plans() -> dict[str, dict[type, Callable[..., Any]]]:
    index = {cls: n for n, cls in enumerate(_PLANS)}
    names: dict[str, object] = {
        "_to_json": _to_json,
        "_from_json": _from_json,
        "_from_proto": _from_proto,
        "_to_proto": _to_proto,
        "_check_json": _json.check_json,
        "_parse_strict": _json.parse_strict,
        "_loads": _json.loads,
        "_dumps": _json.dumps,
        "_encodable": _encodable,
        "_new": object.__new__,
        "_BAD": object(),
    }
    source: list[str] = []
    for cls, n in index.items():
        plan = _PLANS[cls]
        names[f"P{n}"], names[f"C{n}"], names[f"M{n}"] = plan, cls, plan.proto_cls
        to_json_checks: list[str] = []
        to_json_out: list[tuple[str, str, str | None]] = []
        omitted = False
        from_json_checks: list[str] = []
        from_json_args: list[str] = []
        to_proto_args: list[str] = []
        from_proto_pre: list[str] = []
        from_proto_args: list[str] = []
        json_to_proto_args: list[str] = []
        for j, field in enumerate(plan.fields):
            name, v, key = field.name, f"v{j}", repr(field.name)
            where = f'path + ".{name}"'
            sub = index[field.message.py_cls] if field.message is not None else -1
            if field.kind == _SCALAR:
                check = _scalar_check(field, v, names)
                check = f"({v} is None or ({check}))" if field.optional else check
                from_check = _scalar_check(field, v, names, closed=False)
                from_check = f"({v} is None or ({from_check}))" if field.optional else from_check
                to_json_checks.append(check)
                to_json_out.append((key, v, None))
                from_json_checks.append(from_check)
                from_json_args.append(f"{name}={v}")
                json_to_proto_args.append(f"{name}={v}")
                to_proto_args.append(f"{name}=obj.{name}")
                if field.optional:
                    from_proto_args.append(f"{name}=m.{name} if m.HasField({key}) else None")
                else:
                    from_proto_args.append(f"{name}=m.{name}")
            elif field.kind == _ENUM:
                assert field.enum_numbers is not None
                assert field.enum_members is not None
                names[f"E{n}_{j}"] = field.enum_numbers
                names[f"R{n}_{j}"] = field.enum_members
                names[f"V{n}_{j}"] = {str(m): m for m in field.enum_members.values()}
                check = f"isinstance({v}, str) and {v} in E{n}_{j}"
                from_check = f"type({v}) is str and {v} in V{n}_{j}"
                if field.optional:
                    check, from_check = (
                        f"({v} is None or ({check}))",
                        f"({v} is None or ({from_check}))",
                    )
                    to_json_out.append((key, f"None if {v} is None else str({v})", None))
                    from_json_args.append(f"{name}=None if {v} is None else V{n}_{j}[{v}]")
                    json_to_proto_args.append(f"{name}=None if {v} is None else E{n}_{j}[{v}]")
                    to_proto_args.append(
                        f"{name}=None if obj.{name} is None else E{n}_{j}[obj.{name}]"
                    )
                    from_proto_pre.append(
                        f"    x{j} = None\n"
                        f"    if m.HasField({key}):\n"
                        f"        x{j} = R{n}_{j}.get(m.{name})\n"
                        f"        if x{j} is None:\n"
                        f"            return _from_proto(m, P{n}, path, strict)"
                    )
                else:
                    to_json_out.append((key, f"str({v})", None))
                    from_json_args.append(f"{name}=V{n}_{j}[{v}]")
                    json_to_proto_args.append(f"{name}=E{n}_{j}[{v}]")
                    to_proto_args.append(f"{name}=E{n}_{j}[obj.{name}]")
                    from_proto_pre.append(
                        f"    x{j} = R{n}_{j}.get(m.{name})\n"
                        f"    if x{j} is None:\n"
                        f"        return _from_proto(m, P{n}, path, strict)"
                    )
                to_json_checks.append(check)
                from_json_checks.append(from_check)
                from_proto_args.append(f"{name}=x{j}")
            elif field.kind == _MESSAGE:
                if field.optional:
                    to_json_checks.append(f"({v} is None or type({v}) is C{sub})")
                    to_json_out.append((key, f"tj{sub}({v}, {where})", v))
                    from_json_checks.append(f"({v} is None or type({v}) is dict)")
                    from_json_args.append(f"{name}=None if {v} is None else fj{sub}({v}, {where})")
                    json_to_proto_args.append(
                        f"{name}=None if {v} is None else jp{sub}({v}, {where})"
                    )
                    to_proto_args.append(
                        f"{name}=None if obj.{name} is None else tp{sub}(obj.{name})"
                    )
                    from_proto_args.append(
                        f"{name}=fp{sub}(m.{name}, {where}, strict) if m.HasField({key}) else None"
                    )
                    omitted = True
                else:
                    to_json_checks.append(f"type({v}) is C{sub}")
                    to_json_out.append((key, f"tj{sub}({v}, {where})", None))
                    from_json_checks.append(f"type({v}) is dict")
                    from_json_args.append(f"{name}=fj{sub}({v}, {where})")
                    json_to_proto_args.append(f"{name}=jp{sub}({v}, {where})")
                    to_proto_args.append(f"{name}=tp{sub}(obj.{name})")
                    from_proto_pre.append(
                        f"    if not m.HasField({key}):\n"
                        f"        return _from_proto(m, P{n}, path, strict)"
                    )
                    from_proto_args.append(f"{name}=fp{sub}(m.{name}, {where}, strict)")
            else:  # JSON: any value; checked (to JSON) by _check_json
                to_json_out.append((key, v, None))
                from_json_args.append(f"{name}={v}")
                json_to_proto_args.append(
                    f"{name}=None if {v} is None else {{'json': _dumps({v})}}"
                )
                to_proto_args.append(
                    f"{name}=None if obj.{name} is None else {{'json': _dumps(obj.{name})}}"
                )
                from_proto_args.append(
                    f"{name}=(_parse_strict(m.{name}.json, {where}) if strict "
                    f"else _loads(m.{name}.json)) if m.HasField({key}) else None"
                )
        reads = "".join(f"    v{j} = obj.{f.name}\n" for j, f in enumerate(plan.fields))
        gets = "".join(f"    v{j} = get({f.name!r})\n" for j, f in enumerate(plan.fields))
        json_checks = "".join(
            f'    if v{j} is not None:\n        _check_json(v{j}, path + ".{f.name}")\n'
            for j, f in enumerate(plan.fields)
            if f.kind == _JSON
        )
        if omitted:
            # An absent optional message is left out, so the keys go in one by one.
            build = (
                "    out = {}\n"
                + "".join(
                    f"    if {omit_if_none} is not None:\n        out[{key}] = {value}\n"
                    if omit_if_none
                    else f"    out[{key}] = {value}\n"
                    for key, value, omit_if_none in to_json_out
                )
                + "    return out\n"
            )
        else:
            build = (
                "    return {" + ", ".join(f"{k}: {value}" for k, value, _ in to_json_out) + "}\n"
            )
        source.append(
            f"def tj{n}(obj, path):\n"
            f"    if type(obj) is not C{n}:\n        return _to_json(obj, P{n}, path)\n"
            + reads
            + f"    if not ({' and '.join(to_json_checks) or 'True'}):\n"
            f"        return _to_json(obj, P{n}, path)\n" + json_checks + build
        )
        source.append(
            f"def fj{n}(obj, path):\n"
            f"    if type(obj) is not dict:\n        return _from_json(obj, P{n}, path)\n"
            "    get = obj.get\n"
            + gets
            + f"    if not ({' and '.join(from_json_checks) or 'True'}):\n"
            f"        return _from_json(obj, P{n}, path)\n"
            f"    return K{n}({', '.join(a.split('=', 1)[1] for a in from_json_args)})\n"
        )
        slow_proto = f"tp{n}(_from_json(obj, P{n}, path))"
        source.append(
            f"def jp{n}(obj, path):\n"
            f"    if type(obj) is not dict:\n        return {slow_proto}\n"
            "    get = obj.get\n"
            + gets
            + f"    if not ({' and '.join(from_json_checks) or 'True'}):\n"
            f"        return {slow_proto}\n"
            f"    return {_as_dict(json_to_proto_args)}\n"
        )
        source.append(f"def tp{n}(obj):\n    return {_as_dict(to_proto_args)}\n")
        source.append(
            f"def fp{n}(m, path, strict):\n"
            + "".join(line + "\n" for line in from_proto_pre)
            + f"    return K{n}({', '.join(a.split('=', 1)[1] for a in from_proto_args)})\n"
        )
        source.append(_maker_source(f"K{n}", f"C{n}", [f.name for f in plan.fields], names))
        source.append(_proto_to_json_source(n, plan, index, names))
        source.append(_checked_fields_source(n, plan, index, names))
    code = "\n".join(source)
    exec(compile(code, "<agentlog codec, compiled from the proto descriptors>", "exec"), names)
    return {
        kind: {cls: cast(Callable[..., Any], names[f"{kind}{n}"]) for cls, n in index.items()}
        for kind in ("tj", "fj", "tp", "fp", "jp", "pj", "vp", "K")
    }


_COMPILED = _compile_plans()
_FAST_TO_JSON = _COMPILED["tj"]
_FAST_FROM_JSON = _COMPILED["fj"]
_FAST_TO_PROTO = _COMPILED["tp"]
_FAST_FROM_PROTO = _COMPILED["fp"]
_FAST_JSON_TO_PROTO = _COMPILED["jp"]
_FAST_PROTO_TO_JSON = _COMPILED["pj"]
_FAST_CHECKED_FIELDS = _COMPILED["vp"]
_JSON_TO_PROTO_BY_PART = {part: _FAST_JSON_TO_PROTO[cls] for part, cls in EVENT_TYPES.items()}
_FROM_PROTO_BY_PART = {part: _FAST_FROM_PROTO[cls] for part, cls in EVENT_TYPES.items()}
_PROTO_TO_JSON_BY_PART = {part: _FAST_PROTO_TO_JSON[cls] for part, cls in EVENT_TYPES.items()}
_EVENT_PATHS = {part: f"event.{part}" for part in EVENT_TYPES}
_RECORD_EVENT_PATHS = {part: f"record.event.{part}" for part in EVENT_TYPES}


_RecordMaker = Callable[[str, str, int, str | None, int, AgentEvent], EventRecord]


def _record_maker() -> _RecordMaker:
    names: dict[str, Any] = {"_new": object.__new__, "EventRecord": EventRecord}
    fields = ["id", "session_id", "sequence", "parent_id", "timestamp_ns", "event"]
    exec(_maker_source("make_record", "EventRecord", fields, names), names)
    return cast(_RecordMaker, names["make_record"])


# make_record(id, session_id, sequence, parent_id, timestamp_ns, event), for checked values.
make_record = _record_maker()
