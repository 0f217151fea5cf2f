"""One line per event, for people watching a session (`agentlog tail`)."""

from __future__ import annotations

import json

from agentlog._codec import (
    event_to_json,
)
from agentlog._records import (
    CaughtUp,
    EventRecord,
    FeedGap,
    FeedRecord,
    SessionDeleted,
    format_timestamp,
)

# Every event has these; the line shows the session once, in the heading of `tail`.
_OMITTED = {"part_type", "run_id", "session_id"}


def describe(item: EventRecord | FeedRecord | FeedGap | SessionDeleted | CaughtUp) -> str | None:
    """`#12  01:33:38.853  tool_call_requested  run=run-1 iteration=1 call={...}`.

    A feed record is prefixed with its position and session: `@41 chat-7 #12 ...`.
    """
    if isinstance(item, CaughtUp):
        return None
    if isinstance(item, FeedGap):
        return (
            f"@{item.first_position}-{item.last_position} {item.session_id} "
            f"NOT DELIVERED ({item.reason}): {item.message}"
        )
    if isinstance(item, SessionDeleted):
        return (
            f"@{item.position} {item.session_id} DELETED branch {item.branch_id} "
            f"({item.last_sequence} records)"
        )
    if isinstance(item, FeedRecord):
        return f"@{item.position} {item.record.session_id} {describe(item.record)}"
    fields = event_to_json(item.event)
    parts = [f"run={fields['run_id']}"]
    for name, value in fields.items():
        if name in _OMITTED:
            continue
        # Strings and structures in JSON spelling: control characters stay visible.
        text = value if isinstance(value, int | float) else json.dumps(value, ensure_ascii=False)
        parts.append(f"{name}={text}")
    clock = format_timestamp(item.timestamp_ns)[11:23]
    return f"#{item.sequence:<6} {clock:<12}  {item.event.part_type:<20} {' '.join(parts)}"
