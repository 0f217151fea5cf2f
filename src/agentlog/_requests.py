"""The messages of requests and of listings: what the clients send (checked as
every backend checks it) and what a ListSessions call answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from agentlog._codec import (
    checked_event_fields,
    timestamp_fields,
)
from agentlog._events import ReadDirection
from agentlog._plans import NS
from agentlog._records import (
    AppendEvent,
    BranchInfo,
    ForkedFrom,
    NewEvent,
    SessionDeleted,
    SessionInfo,
    SessionLabels,
    SessionPage,
    check_timestamp,
    new_record_id,
    new_record_ids,
)
from agentlog._validation import (
    MAIN,
    check_branch_id,
    check_count,
    check_event_id,
    check_labels,
    check_record_id,
    check_session_id,
    check_session_prefix,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb


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
    branch_id = check_branch_id(append.branch_id)
    if append.parent_id is not None:
        check_record_id(append.parent_id, "parent_id")
    if append.id is not None:
        check_event_id(append.id)
    if append.expected_sequence is not None:
        check_count(append.expected_sequence, "expected_sequence")
    labels = check_labels(append.labels)
    return pb.AppendRequest(
        session_id=append.session_id,
        parent_id=append.parent_id,
        event=checked_event_fields(append.event),
        id=append.id if append.id is not None else new_record_id(),
        expected_sequence=append.expected_sequence,
        omit_event=True,
        branch_id="" if branch_id == MAIN else branch_id,
        labels=labels,
    )


def batch_to_proto(
    session_id: str,
    events: Sequence[NewEvent],
    expected_sequence: int | None,
    branch_id: str = MAIN,
    labels: Mapping[str, str] | None = None,
) -> pb.AppendBatchRequest:
    """The AppendBatchRequest for a batch, each event checked as every backend checks it.

    Events without an id get new ones here (see append_to_proto).
    """
    check_session_id(session_id)
    branch_id = check_branch_id(branch_id)
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
        session_id=session_id,
        expected_sequence=expected_sequence,
        events=items,
        omit_events=True,
        branch_id="" if branch_id == MAIN else branch_id,
        labels=check_labels(labels),
    )


_DIRECTIONS = {
    pb.READ_DIRECTION_UNSPECIFIED: ReadDirection.FORWARDS,
    pb.READ_DIRECTION_FORWARDS: ReadDirection.FORWARDS,
    pb.READ_DIRECTION_BACKWARDS: ReadDirection.BACKWARDS,
}


def read_to_proto(
    session_id: str,
    from_sequence: int,
    limit: int | None,
    direction: ReadDirection,
    branch_id: str = MAIN,
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
        branch_id="" if branch_id == MAIN else branch_id,
    )


def read_from_proto(
    request: pb.LoadSessionRequest,
) -> tuple[str, str, int, int | None, ReadDirection]:
    """The session, branch, start, limit and direction a LoadSessionRequest asks for."""
    direction = _DIRECTIONS.get(request.direction)
    if direction is None:
        raise InvalidArgumentError(
            f"direction: unknown value {request.direction}", field="direction"
        )
    session_id = check_stored_session_id(request.session_id)
    branch_id = check_stored_branch_id(request.branch_id)
    return session_id, branch_id, request.from_sequence, request.limit or None, direction


def head_to_proto(session_id: str, branch_id: str) -> pb.HeadRequest:
    branch_id = check_stored_branch_id(branch_id)
    return pb.HeadRequest(session_id=session_id, branch_id="" if branch_id == MAIN else branch_id)


def fork_to_proto(
    session_id: str,
    up_to_sequence: int,
    *,
    branch_id: str,
    expected_sequence: int | None,
    new_branch_id: str,
    new_session_id: str,
) -> pb.ForkSessionRequest:
    """The ForkSessionRequest for a fork, checked as every backend checks it."""
    check_stored_session_id(session_id)
    check_stored_branch_id(branch_id)
    check_count(up_to_sequence, "up_to_sequence", minimum=1)
    if expected_sequence is not None:
        check_count(expected_sequence, "expected_sequence")
    if new_session_id:
        check_session_id(new_session_id, "new_session_id")
    if new_branch_id:
        check_branch_id(new_branch_id, "new_branch_id")
    return pb.ForkSessionRequest(
        session_id=session_id,
        branch_id="" if branch_id == MAIN else branch_id,
        up_to_sequence=up_to_sequence,
        expected_sequence=expected_sequence,
        new_branch_id=new_branch_id,
        new_session_id=new_session_id,
    )


def branch_to_proto(info: BranchInfo) -> pb.BranchInfo:
    forked = info.forked_from
    return pb.BranchInfo(
        branch_id=info.branch_id,
        event_count=info.event_count,
        first_timestamp=timestamp_fields(info.first_timestamp_ns),
        last_timestamp=timestamp_fields(info.last_timestamp_ns),
        head_id=info.head_id,
        forked_from=(
            None
            if forked is None
            else pb.ForkedFrom(
                session_id=forked.session_id, branch_id=forked.branch_id, sequence=forked.sequence
            )
        ),
    )


def branch_from_proto(message: pb.BranchInfo) -> BranchInfo:
    forked = message.forked_from if message.HasField("forked_from") else None
    return BranchInfo(
        branch_id=message.branch_id or MAIN,
        event_count=message.event_count,
        first_timestamp_ns=_ns(message.first_timestamp),
        last_timestamp_ns=_ns(message.last_timestamp),
        head_id=message.head_id,
        forked_from=(
            None
            if forked is None
            else ForkedFrom(forked.session_id, forked.branch_id or MAIN, forked.sequence)
        ),
    )


def _ns(timestamp: Any) -> int:
    return int(timestamp.seconds) * NS + int(timestamp.nanos)


def session_to_proto(info: SessionInfo) -> pb.SessionInfo:
    """A session's SessionInfo message (built field by field: a listing makes thousands,
    and keyword dicts of nested messages cost twice as much)."""
    first, last = info.first_timestamp_ns, info.last_timestamp_ns
    message = pb.SessionInfo(
        session_id=info.session_id,
        event_count=info.event_count,
        first_timestamp=Timestamp(seconds=first // NS, nanos=first % NS),
        last_timestamp=Timestamp(seconds=last // NS, nanos=last % NS),
        head_id=info.head_id,
        labels_version=info.labels_version,
    )
    if info.labels:
        message.labels.update(info.labels)
    for branch in info.branches:
        if branch.first_timestamp_ns == first and branch.last_timestamp_ns == last:
            added = message.branches.add(
                branch_id=branch.branch_id,
                event_count=branch.event_count,
                first_timestamp=message.first_timestamp,
                last_timestamp=message.last_timestamp,
                head_id=branch.head_id,
            )
            if branch.forked_from is not None:
                added.forked_from.CopyFrom(branch_to_proto(branch).forked_from)
        else:
            message.branches.append(branch_to_proto(branch))
    return message


def page_to_proto(
    page: SessionPage, made: Callable[[SessionInfo], pb.SessionInfo] = session_to_proto
) -> pb.ListSessionsResponse:
    """The ListSessionsResponse for a page of sessions; `made` gives each session's
    message (a server keeps those it made lately)."""
    response = pb.ListSessionsResponse(next_page_token=page.next_page_token or "")
    response.sessions.extend([made(info) for info in page.sessions])
    return response


def page_from_proto(response: pb.ListSessionsResponse) -> SessionPage:
    """The page of sessions a ListSessionsResponse holds."""
    sessions = []
    for info in response.sessions:
        first, last = info.first_timestamp, info.last_timestamp
        sessions.append(
            SessionInfo(
                session_id=info.session_id,
                event_count=info.event_count,
                first_timestamp_ns=first.seconds * NS + first.nanos,
                last_timestamp_ns=last.seconds * NS + last.nanos,
                head_id=info.head_id,
                branches=tuple([branch_from_proto(branch) for branch in info.branches]),
                labels=dict(info.labels) if info.labels else {},
                labels_version=info.labels_version,
            )
        )
    return SessionPage(sessions=sessions, next_page_token=response.next_page_token or None)


def list_to_proto(
    page_size: int | None,
    page_token: str | None,
    *,
    labels: Mapping[str, str] | None,
    session_id_prefix: str,
    updated_after_ns: int | None,
    updated_before_ns: int | None,
) -> pb.ListSessionsRequest:
    """The ListSessionsRequest for a page of sessions with these filters."""
    for value, name in ((updated_after_ns, "updated_after"), (updated_before_ns, "updated_before")):
        if value is not None:
            check_timestamp(value, name)
    return pb.ListSessionsRequest(
        page_size=page_size or 0,
        page_token=page_token or "",
        labels=check_labels(labels, "labels"),
        session_id_prefix=check_session_prefix(session_id_prefix),
        updated_after=None if updated_after_ns is None else timestamp_fields(updated_after_ns),
        updated_before=None if updated_before_ns is None else timestamp_fields(updated_before_ns),
    )


def list_from_proto(request: pb.ListSessionsRequest) -> dict[str, Any]:
    """The filters of a ListSessionsRequest, as `SessionQuery.of` takes them."""
    after = before = None
    if request.HasField("updated_after"):
        after = check_timestamp(_ns(request.updated_after), "updated_after")
    if request.HasField("updated_before"):
        before = check_timestamp(_ns(request.updated_before), "updated_before")
    check_session_prefix(request.session_id_prefix)
    return {"labels": dict(request.labels), "updated_after_ns": after, "updated_before_ns": before}


def delete_to_proto(
    session_id: str, branch_id: str, all_branches: bool, expected_sequence: int | None
) -> pb.DeleteSessionRequest:
    check_session_id(session_id)
    branch_id = check_branch_id(branch_id)
    if expected_sequence is not None:
        check_count(expected_sequence, "expected_sequence")
    return pb.DeleteSessionRequest(
        session_id=session_id,
        branch_id="" if branch_id == MAIN else branch_id,
        all_branches=all_branches,
        expected_sequence=expected_sequence,
    )


def deleted_to_proto(marker: SessionDeleted) -> pb.SessionDeleted:
    return pb.SessionDeleted(
        position=marker.position,
        session_id=marker.session_id,
        branch_id=marker.branch_id,
        last_sequence=marker.last_sequence,
        timestamp=timestamp_fields(marker.timestamp_ns),
    )


def deleted_from_proto(message: pb.SessionDeleted) -> SessionDeleted:
    return SessionDeleted(
        message.position,
        message.session_id,
        message.branch_id or MAIN,
        message.last_sequence,
        _ns(message.timestamp),
    )


def labels_to_proto(
    session_id: str,
    set_labels: Mapping[str, str] | None,
    remove: Sequence[str],
    expected_version: int | None,
) -> pb.UpdateSessionLabelsRequest:
    check_session_id(session_id)
    if expected_version is not None:
        check_count(expected_version, "expected_version")
    return pb.UpdateSessionLabelsRequest(
        session_id=session_id,
        set=check_labels(set_labels, "set"),
        remove=list(remove),
        expected_version=expected_version,
    )


def labels_from_proto(response: pb.UpdateSessionLabelsResponse) -> SessionLabels:
    return SessionLabels(dict(response.labels), response.version)
