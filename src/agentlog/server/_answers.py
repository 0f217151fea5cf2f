"""What answers an append: the stored records as message fields, and the metrics of it.
Shared by Append, AppendBatch and AppendStream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentlog import _codec
from agentlog.server import metrics
from agentlog.server._rules import Appended
from agentlog.v1 import session_pb2 as pb


def answer_fields(appended: Appended, sent: Sequence[pb.AgentEvent] | None) -> list[dict[str, Any]]:
    """The records answering an append, as message fields: from the request's events
    (`sent`; None: the request asked for no events in the answer) and what the
    store says of them (for a retry, the records as stored)."""
    known = appended.known  # a retry's records, as stored (or records built meanwhile)
    session_id, branch_id, first, timestamp_ns = (
        appended.session_id,
        appended.branch_id,
        appended.first_sequence,
        appended.timestamp_ns,
    )
    if sent is None:
        if known is None:
            timestamp = _codec.timestamp_fields(timestamp_ns)
            return [
                {
                    "id": item.id,
                    "sequence": first + offset,
                    "session_id": session_id,
                    "branch_id": branch_id,
                    "parent_id": item.parent_id,
                    "timestamp": timestamp,
                }
                for offset, item in enumerate(appended.batch)
            ]
        return [
            {
                "id": record.id,
                "sequence": record.sequence,
                "session_id": session_id,
                "branch_id": branch_id,
                "parent_id": record.parent_id,
                "timestamp": _codec.timestamp_fields(record.timestamp_ns),
            }
            for record in known
        ]
    fields = []
    for offset, (item, event) in enumerate(zip(appended.batch, sent, strict=True)):
        stored = known[offset] if known is not None else None
        fields.append(
            _codec.appended_fields(
                event,
                item.event_json,
                record_id=item.id,
                sequence=stored.sequence if stored else first + offset,
                session_id=session_id,
                parent_id=item.parent_id,
                timestamp_ns=stored.timestamp_ns if stored else timestamp_ns,
                branch_id=branch_id,
            )
        )
    return fields


def count_appended(appended: Appended, size: int) -> None:
    """Count an append's events and request bytes in the metrics, unless it was a retry."""
    if not appended.retried:  # stored now, not a retry's answer
        metrics.APPENDED_EVENTS.inc(len(appended.batch))
        metrics.APPENDED_BYTES.inc(size)
