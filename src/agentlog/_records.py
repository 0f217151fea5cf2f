"""The record envelope: what an append asks for and what the store keeps."""

from __future__ import annotations

import calendar
import functools
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from agentlog._events import AgentEvent
from agentlog.errors import InvalidArgumentError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS = 1_000_000_000
# 0001-01-01T00:00:00Z and 10000-01-01T00:00:00Z: the span RFC 3339 can write.
_MIN_NS = -62_135_596_800 * _NS
_MAX_NS = 253_402_300_800 * _NS


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEvent:
    """One event to append to a session."""

    session_id: str
    """The session to append to (see the README for the rules a session id follows)."""

    event: AgentEvent
    """The event."""

    parent_id: str | None = None
    """The record this one follows in the event tree, in any session; None for a root."""

    id: str | None = None
    """The record's id: a canonical UUID made by the caller so that a retry is stored
    once, or None for the store to make one. The clients fill it in themselves."""

    expected_sequence: int | None = None
    """What the branch's last sequence must be: None, anything; 0, no events yet;
    N, exactly N. Otherwise the append fails with WrongExpectedSequence."""

    branch_id: str = "main"
    """The branch of the session to append to (see the README for branch ids)."""

    labels: Mapping[str, str] | None = None
    """Labels for the session, taken only if this append creates it (its first record
    in any branch); change them later with `update_session_labels`."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NewEvent:
    """One event of a batch (see `append_batch`)."""

    event: AgentEvent
    """The event."""

    parent_id: str | None = None
    """The record this one follows; None for a root."""

    id: str | None = None
    """The record's id (a canonical UUID), or None for the store to make one."""


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """A subscription's marker: every record stored when it began has been delivered.

    What follows is live. For a session subscription, `sequence` is the last
    sequence delivered so far; for the all-sessions feed, `position` is the last
    position examined so far (filters may have skipped it). 0: none.
    """

    sequence: int = 0
    position: int = 0


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as a store holds it, its event as parsed JSON (a copy carries it so,
    exactly, whatever checks an append would make)."""

    id: str
    session_id: str
    sequence: int
    parent_id: str | None
    timestamp_ns: int
    event_json: Any
    branch_id: str = "main"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """How far a filtered all-sessions feed has been examined: no record up to `position`
    passed the filters since the last item delivered. A consumer may store it as its
    last position and resume after it."""

    position: int


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """A record of the all-sessions feed with its global position (commit order)."""

    position: int
    record: EventRecord


@dataclass(frozen=True, slots=True)
class FeedGap:
    """Feed positions `first_position`..`last_position`, all of one branch of session
    `session_id`, that could not be delivered: its file is damaged (`reason`, as its
    own reads report it, and `message`). The feed goes on after them."""

    first_position: int
    last_position: int
    session_id: str
    reason: str
    message: str
    branch_id: str = "main"


@dataclass(frozen=True, slots=True)
class ForkedFrom:
    """The record a branch was forked after: its records 1..`sequence` are copies of
    those of `branch_id` of `session_id`."""

    session_id: str
    branch_id: str
    sequence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BranchInfo:
    """A summary of one branch of a session."""

    branch_id: str
    """The branch ("main" for the default one)."""

    event_count: int
    """How many records it holds: also its last sequence."""

    first_timestamp_ns: int
    """Its first record's timestamp, in nanoseconds since the epoch (UTC)."""

    last_timestamp_ns: int
    """Its last record's timestamp, in nanoseconds since the epoch (UTC)."""

    head_id: str
    """Its last record's id."""

    forked_from: ForkedFrom | None = None
    """Where it was forked from; None if it was not (or the store does not know)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """A summary of one session, as ListSessions gives it."""

    session_id: str
    """The session."""

    event_count: int
    """How many records it holds in all its branches (with one branch: its last
    sequence)."""

    first_timestamp_ns: int
    """Its earliest record's timestamp, in nanoseconds since the epoch (UTC)."""

    last_timestamp_ns: int
    """Its latest record's timestamp: when it was last appended to."""

    head_id: str
    """The last record's id of its "main" branch (of its first branch, if none)."""

    branches: Sequence[BranchInfo] = ()
    """Its branches, in byte order of their ids."""

    labels: Mapping[str, str] = field(default_factory=dict)
    """Its labels."""

    labels_version: int = 0
    """Its labels' version: 0 before any were set, then one more at each change."""

    @classmethod
    def of(
        cls,
        session_id: str,
        branches: Sequence[BranchInfo],
        labels: SessionLabels | None = None,
    ) -> SessionInfo:
        """A session's summary from its branches' (in byte order of their ids)."""
        if len(branches) == 1:  # most sessions: a listing makes one for each
            only = branches[0]
            return cls(
                session_id=session_id,
                event_count=only.event_count,
                first_timestamp_ns=only.first_timestamp_ns,
                last_timestamp_ns=only.last_timestamp_ns,
                head_id=only.head_id,
                branches=(only,),
                labels=dict(labels.labels) if labels is not None else {},
                labels_version=labels.version if labels is not None else 0,
            )
        main = next((b for b in branches if b.branch_id == "main"), branches[0])
        return cls(
            session_id=session_id,
            event_count=sum(b.event_count for b in branches),
            first_timestamp_ns=min(b.first_timestamp_ns for b in branches),
            last_timestamp_ns=max(b.last_timestamp_ns for b in branches),
            head_id=main.head_id,
            branches=tuple(branches),
            labels=dict(labels.labels) if labels is not None else {},
            labels_version=labels.version if labels is not None else 0,
        )


@dataclass(frozen=True, slots=True)
class SessionLabels:
    """A session's labels and their version (0: none were ever set)."""

    labels: Mapping[str, str]
    version: int


@dataclass(frozen=True, slots=True)
class SessionDeleted:
    """The feed's marker that branch `branch_id` of session `session_id`, which held
    records 1..`last_sequence`, was deleted at `timestamp_ns`. It takes a position of its
    own; the deleted records' positions no longer appear in the feed."""

    position: int
    session_id: str
    branch_id: str
    last_sequence: int
    timestamp_ns: int


FeedItem = FeedRecord | FeedGap | SessionDeleted
"""What the all-sessions feed holds at a position (or a run of them)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionPage:
    """One page of sessions, in session id (byte) order."""

    sessions: Sequence[SessionInfo]
    """The sessions of this page."""

    next_page_token: str | None
    """Pass to `list_sessions(page_token=...)` for the next page; None on the last page."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRecord:
    """One stored event, as arcan's JsonlSessionRepository keeps it."""

    id: str
    """The record's id, a UUID."""

    session_id: str
    """The session the record belongs to."""

    branch_id: str = "main"
    """The branch of the session the record belongs to."""

    sequence: int
    """The record's place in its branch: 1, 2, 3, ... with no gaps."""

    parent_id: str | None
    """The record this one follows; None for a root."""

    timestamp_ns: int
    """When the store accepted the event: nanoseconds since the Unix epoch, UTC."""

    event: AgentEvent
    """The event."""

    @property
    def timestamp(self) -> datetime:
        """The timestamp as an aware UTC datetime (datetime keeps only microseconds)."""
        return _EPOCH + timedelta(microseconds=self.timestamp_ns // 1000)

    @property
    def timestamp_rfc3339(self) -> str:
        """The timestamp exactly as arcan writes it, e.g. `2026-11-25T01:33:38.853460046Z`."""
        return format_timestamp(self.timestamp_ns)


def format_timestamp(timestamp_ns: int) -> str:
    """RFC 3339 in UTC as chrono prints it (SecondsFormat::AutoSi, with `Z`).

    The fraction has 0, 3, 6 or 9 digits: the fewest that hold the value.
    """
    seconds, nanos = divmod(timestamp_ns, _NS)
    text = _utc_text(seconds)
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"


@functools.lru_cache(maxsize=1024)
def _utc_text(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of a second since the epoch (appends share few seconds)."""
    t = _EPOCH + timedelta(seconds=seconds)
    # Not strftime: its %Y does not pad years before 1000 to four digits.
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


def parse_timestamp(text: str) -> int:
    """Nanoseconds since the epoch from an RFC 3339 timestamp (any offset, 0-9 digit fraction)."""
    # Fast path for the form chrono writes, `YYYY-MM-DDTHH:MM:SS[.fraction]Z`: a
    # session's records share few distinct seconds, so those are cached.
    if len(text) >= 20 and text[-1] == "Z" and text[10] == "T":
        if len(text) == 20:
            fraction = ""
        elif text[19] == ".":
            fraction = text[20:-1]
            if not (1 <= len(fraction) <= 9 and fraction.isascii() and fraction.isdigit()):
                fraction = "-"  # not this form: let the full parser judge (and refuse) it
        else:
            fraction = "-"
        if fraction != "-":
            seconds = utc_seconds(text[:19])
            if seconds is not None:
                return seconds * _NS + int(fraction.ljust(9, "0"))
    return _parse_timestamp(text)


@functools.lru_cache(maxsize=4096)
def utc_seconds(text: str) -> int | None:
    """Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS` in UTC, or None if it is not that."""
    try:
        return _parse_timestamp(text + "Z") // _NS
    except ValueError:
        return None


def _parse_timestamp(text: str) -> int:
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second <= 60):
        raise ValueError(f"not a valid date and time: {text!r}")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    if match.group(9):
        offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
        seconds -= offset if match.group(9) == "+" else -offset
    fraction = match.group(7) or ""
    return seconds * _NS + int(fraction.ljust(9, "0") or 0)


def check_timestamp(timestamp_ns: object, field: str = "timestamp") -> int:
    """The timestamp if it is an int nanosecond count in years 1-9999, else InvalidArgumentError."""
    if not isinstance(timestamp_ns, int) or isinstance(timestamp_ns, bool):
        raise InvalidArgumentError(f"{field}: must be an int of nanoseconds", field=field)
    if not _MIN_NS <= timestamp_ns < _MAX_NS:
        raise InvalidArgumentError(f"{field}: outside the years 1 to 9999", field=field)
    return timestamp_ns


_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_record_id() -> str:
    """One new record id, from ids made 256 at a time: a writer making one an event
    would otherwise pay a system call each, which hands the GIL to the client's other
    threads and waits to get it back."""
    with _SPARE_IDS_LOCK:
        if not _SPARE_IDS:
            _SPARE_IDS.extend(new_record_ids(256))
        return _SPARE_IDS.pop()


_SPARE_IDS: list[str] = []
_SPARE_IDS_LOCK = threading.Lock()
# A forked child must not hand out the ids its parent may also hand out.
os.register_at_fork(after_in_child=_SPARE_IDS.clear)


def new_record_ids(count: int) -> list[str]:
    """`count` new random record ids: version 4 UUIDs in canonical text, as
    `str(uuid.uuid4())` makes them, at a fraction of its cost."""
    raw = os.urandom(16 * count).hex()
    return [
        f"{raw[i : i + 8]}-{raw[i + 8 : i + 12]}-4{raw[i + 13 : i + 16]}-"
        f"{_VARIANT[raw[i + 16]]}{raw[i + 17 : i + 20]}-{raw[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]
