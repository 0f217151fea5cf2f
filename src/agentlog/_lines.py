"""The lines of arcan session files: parsing a line into a record, or straight into
the fields of the EventRecord message a read sends, checked as arcan's format says.

Every function takes `branches`: whether the line is of newest arcan's branch
layout, where `branch_id` and `sequence` are required fields, or of the seed
layout, where every record is of branch "main" and `sequence` (agentlog's own
field) may be absent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import orjson

from agentlog import _converters
from agentlog._codec import (
    EVENT_PATHS,
    event_from_json,
    make_record,
    record_fields_of,
)
from agentlog._events import EVENT_TYPES
from agentlog._plans import DecodeError
from agentlog._records import (
    EventRecord,
    StoredRecord,
    parse_timestamp,
    utc_seconds,
)
from agentlog._validation import MAIN
from agentlog.v1 import session_pb2 as pb


def record_from_json(obj: object, sequence: int, branches: bool = False) -> EventRecord:
    """The record one parsed line of a session file holds; DecodeError if none.

    `sequence` is the line's position among the file's records; a line that
    states a different `sequence` is damaged.
    """
    record_id, session_id, branch_id, parent_id, timestamp_ns = _record_fields(
        obj, sequence, branches
    )
    obj = cast(dict[str, Any], obj)  # _record_fields refused anything else
    event = event_from_json(obj.get("event"))
    return make_record(record_id, session_id, sequence, parent_id, timestamp_ns, event, branch_id)


def record_message_fields(obj: object, sequence: int, branches: bool = False) -> dict[str, Any]:
    """The fields of the EventRecord message for one parsed line, as the nested dict
    the message's constructor takes, checked as record_from_json checks it.

    What a read sends: a response built from these dicts is made in one call,
    with no Python record or message objects in between.
    """
    record_id, session_id, branch_id, parent_id, timestamp_ns = _record_fields(
        obj, sequence, branches
    )
    obj = cast(dict[str, Any], obj)  # _record_fields refused anything else
    event = obj.get("event")
    part_type = event.get("part_type") if isinstance(event, dict) else None
    event_cls = EVENT_TYPES.get(part_type) if isinstance(part_type, str) else None
    if event_cls is None:
        event_from_json(event)  # raises the DecodeError that says what is wrong
        raise AssertionError("unreachable")
    fields = _converters.JSON_TO_PROTO[event_cls](event, f"event.{part_type}")
    return record_fields_of(
        {part_type: fields},
        record_id=record_id,
        sequence=sequence,
        session_id=session_id,
        parent_id=parent_id,
        timestamp_ns=timestamp_ns,
        branch_id=branch_id,
    )


def _record_fields(
    obj: object, sequence: int, branches: bool
) -> tuple[str, str, str, str | None, int]:
    """The id, session id, branch id, parent id and timestamp of a parsed line;
    DecodeError if bad."""
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
    if branches:
        branch_id = obj.get("branch_id")
        if not isinstance(branch_id, str):
            raise DecodeError("branch_id: missing or not a string (the branch layout needs it)")
        if "sequence" not in obj:
            raise DecodeError("sequence: missing (the branch layout needs it)")
    else:
        branch_id = MAIN
    stated = obj.get("sequence", sequence)
    if stated != sequence or type(stated) is not int:
        raise DecodeError(f"sequence: the line says {stated!r} but it is record {sequence}")
    return record_id, session_id, branch_id, parent_id, timestamp_ns


def stored_from_line(line: bytes, sequence: int, branches: bool = False) -> StoredRecord:
    """A line as it is stored: the record's fields with its event as parsed JSON, not
    checked against the event types (what a copy carries; reading accepts whatever
    arcan reads); DecodeError if the line is no record."""
    obj = checked_line(line, sequence, branches)
    record_id, session_id, branch_id, parent_id, timestamp_ns = _record_fields(
        obj, sequence, branches
    )
    return StoredRecord(
        record_id, session_id, sequence, parent_id, timestamp_ns, obj["event"], branch_id
    )


def checked_line(line: bytes, sequence: int, branches: bool = False) -> dict[str, Any]:
    """A line's JSON object, checked as a record of its layout at `sequence` whose event
    has a part_type (not checked against the event types: what a copy or a fork
    carries); DecodeError if the line is no record."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    _record_fields(obj, sequence, branches)
    event = cast(dict[str, Any], obj).get("event")
    if type(event) is not dict or type(event.get("part_type")) is not str:
        raise DecodeError("event: missing, or without a part_type")
    return cast(dict[str, Any], obj)


def record_from_line(line: bytes, sequence: int, branches: bool = False) -> EventRecord:
    """The record one line of a session file holds, at `sequence`; DecodeError if none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    return record_from_json(obj, sequence, branches)


def record_fields_from_line(line: bytes, sequence: int, branches: bool = False) -> dict[str, Any]:
    """record_message_fields for one line of a session file; DecodeError if it holds none."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None
    return record_message_fields(obj, sequence, branches)


def record_fields_from_lines(
    lines: Sequence[bytes], first_sequence: int, branches: bool = False
) -> list[dict[str, Any]]:
    """record_fields_from_line for consecutive lines, the first at `first_sequence`.

    The same checks in one loop, with the common shape of a line tried first
    (what long reads spend their time on); any other line takes the full path,
    which words the error.
    """
    out: list[dict[str, Any]] = []
    append = out.append
    loads = orjson.loads
    event_fields = _converters.JSON_TO_PROTO_BY_PART
    paths: dict[Any, str] = EVENT_PATHS
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
            timestamp, event = get("timestamp"), get("event")
            if branches:
                branch_id, stated = get("branch_id"), get("sequence")
            else:
                branch_id, stated = MAIN, get("sequence", sequence)
            # chrono's nanosecond form, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`
            if (
                type(record_id) is str
                and type(session_id) is str
                and type(branch_id) is str
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
                            "branch_id": branch_id,
                            "parent_id": parent_id,
                            "timestamp": {"seconds": seconds, "nanos": int(fraction)},
                            "event": {part_type: fields(event, paths[part_type])},
                        }
                    )
                    sequence += 1
                    continue
        append(record_message_fields(obj, sequence, branches))
        sequence += 1
    return out


def record_proto_from_line(line: bytes, sequence: int, branches: bool = False) -> pb.EventRecord:
    """The EventRecord message for one line of a session file; DecodeError if none."""
    return pb.EventRecord(**record_fields_from_line(line, sequence, branches))
