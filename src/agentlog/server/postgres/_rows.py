"""Rows of `agentlog_events` as records, or as the fields of the messages a read sends.

The event column holds the event's JSON exactly as the JSONL store writes it,
so a row decodes with the same converters as a line of a session file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from agentlog import _converters
from agentlog._codec import EVENT_PATHS, event_from_json, make_record, record_fields_of
from agentlog._plans import DecodeError
from agentlog._records import EventRecord, StoredRecord
from agentlog.errors import DataLossError
from agentlog.server._rules import named

# The columns every read selects, in this order (`position` first for the feed).
RECORD_COLUMNS = "session_id, sequence, id, parent_id, timestamp_ns, event, branch_id"
Row = tuple[str, int, str, bytes | None, int, bytes, str]


def _damaged(row: Sequence[Any], problem: object) -> DataLossError:
    return DataLossError(
        f"session {named(row[0], row[6])}: the record at sequence {row[1]} in PostgreSQL "
        f"does not decode ({problem}); it was changed outside agentlog",
        reason="DAMAGED_RECORD",
        metadata={"session_id": str(row[0]), "branch_id": str(row[6]), "sequence": str(row[1])},
    )


def _parent(raw: bytes | None) -> str | None:
    return None if raw is None else bytes(raw).decode()


def record_of(row: Sequence[Any]) -> EventRecord:
    """The record a row (RECORD_COLUMNS) holds; DataLossError if it does not decode."""
    session_id, sequence, record_id, parent, timestamp_ns, event, branch_id = row
    try:
        return make_record(
            record_id,
            session_id,
            sequence,
            _parent(parent),
            timestamp_ns,
            event_from_json(orjson.loads(event)),
            branch_id,
        )
    except (DecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(row, exc) from None


def stored_of(row: Sequence[Any]) -> StoredRecord:
    """A row as stored, its event as parsed JSON (see `Backend.read_stored`)."""
    session_id, sequence, record_id, parent, timestamp_ns, event, branch_id = row
    try:
        event_json = orjson.loads(event)
        if type(event_json) is not dict or type(event_json.get("part_type")) is not str:
            raise DecodeError("event: missing, or without a part_type")
        parent_id = _parent(parent)
    except (DecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(row, exc) from None
    return StoredRecord(
        record_id, session_id, sequence, parent_id, timestamp_ns, event_json, branch_id
    )


def message_fields_of(row: Sequence[Any]) -> dict[str, Any]:
    """The fields of the EventRecord message for a row, as its constructor takes them."""
    session_id, sequence, record_id, parent, timestamp_ns, event, branch_id = row
    try:
        obj = orjson.loads(event)
        part_type = obj.get("part_type") if type(obj) is dict else None
        convert = (
            _converters.JSON_TO_PROTO_BY_PART.get(part_type) if type(part_type) is str else None
        )
        if convert is None or type(part_type) is not str:
            event_from_json(obj)  # raises the DecodeError that says what is wrong
            raise DecodeError("event: not an event")
        fields = convert(obj, EVENT_PATHS[part_type])
        parent_id = _parent(parent)
    except (DecodeError, orjson.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(row, exc) from None
    return record_fields_of(
        {part_type: fields},
        record_id=record_id,
        sequence=sequence,
        session_id=session_id,
        parent_id=parent_id,
        timestamp_ns=timestamp_ns,
        branch_id=branch_id,
    )


def row_bytes(row: Sequence[Any]) -> int:
    """About how many bytes a row's message takes (to bound a stream message)."""
    return len(row[5]) + len(row[0]) + 80
