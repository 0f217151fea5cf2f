"""The SessionRepository protocol: what every agentlog store offers.

The in-process stores (`agentlog.server.MemorySessionRepository`,
`agentlog.server.JsonlSessionRepository`) and the gRPC client
(`agentlog.client.AgentlogClient`) all satisfy `SessionRepository`; the async
client satisfies `AsyncSessionRepository`. Code written against the protocol
runs on any of them unchanged, and they raise the same `agentlog.errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from agentlog._events import ReadDirection
from agentlog._records import (
    AppendEvent,
    BranchInfo,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedItem,
    NewEvent,
    SessionDeleted,
    SessionLabels,
    SessionPage,
)


class SessionWriter(Protocol):
    """Appends sent without a round trip each (see `SessionRepository.writer`)."""

    def append(self, event: AppendEvent) -> Future[EventRecord]: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class AsyncSessionWriter(Protocol):
    """The async twin of `SessionWriter`."""

    async def append(self, event: AppendEvent) -> asyncio.Future[EventRecord]: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class SessionRepository(Protocol):
    """A store of append-only session event logs.

    A session has one or more branches, each its own log with its own sequences
    (1, 2, 3, ...); every method that names a session takes `branch_id`, "main"
    unless given, so code that never names a branch sees one log a session.
    """

    def append(self, event: AppendEvent) -> EventRecord:
        """Store one event at the end of its branch (`event.branch_id`); returns the
        stored record.

        With `event.id` set, appending the same id again with the same content
        returns the stored record and writes nothing (AlreadyExistsError if the
        content differs). With `event.expected_sequence` set, the append happens
        only if the branch's last sequence is that number (0: no events yet),
        else WrongExpectedSequence.
        """
        ...

    def writer(self, *, window: int = 1000) -> SessionWriter:
        """A writer for events that need no round trip each (an agent's text deltas and
        tool calls): `writer.append(event)` returns a future of its record at once, and
        the events go to the server on one stream, stored in the order appended, each
        exactly as `append` would store it (ids, expectations, retries, labels). The
        first append refused fails with its error; every append behind it fails with
        AbortedError and is not stored; closing the writer (leaving its `with` block)
        waits for every answer and raises that refusal. At most `window` appends wait
        for their answers; `append` waits for room beyond that."""
        ...

    def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
        branch_id: str = "main",
        labels: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        """Store several events at the end of one session: all or none, at consecutive sequences."""
        ...

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = "main",
    ) -> Iterator[EventRecord]:
        """Stream a range of a session's records without holding them all.

        Forwards from N yields sequences N, N+1, ...; backwards from N yields N,
        N-1, ...; from_sequence=0 starts at the first (forwards) or last
        (backwards) record; `limit` caps how many.
        """
        ...

    def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = "main",
    ) -> list[EventRecord]:
        """`read_session` as a list; empty for a session with no events."""
        ...

    def load_children(self, parent_id: str) -> list[EventRecord]:
        """Every record, in any session and branch, whose parent_id is `parent_id`.

        Grouped by session (session ids in byte order), then by branch (branch ids in
        byte order), each in sequence order.
        """
        ...

    def head(self, session_id: str, branch_id: str = "main") -> EventRecord | None:
        """A branch's latest record (its sequence is the last), or None when it has none."""
        ...

    def fork_session(
        self,
        session_id: str,
        up_to_sequence: int,
        *,
        branch_id: str = "main",
        expected_sequence: int | None = None,
        new_branch_id: str = "",
        new_session_id: str = "",
    ) -> BranchInfo:
        """Make a new branch whose records 1..`up_to_sequence` are copies of a branch's
        (same events and timestamps, new ids, parents inside the copied records
        pointing to the copies); returns the new branch's summary, with `forked_from`.

        The new branch is `new_branch_id` of `new_session_id` (default: the same
        session; a new session's branch is "main" unless named). NotFoundError if
        the source lacks `up_to_sequence`, AlreadyExistsError if the new branch
        exists, WrongExpectedSequence if the source's last sequence is not
        `expected_sequence`.
        """
        ...

    def list_sessions(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        labels: Mapping[str, str] | None = None,
        session_id_prefix: str = "",
        updated_after_ns: int | None = None,
        updated_before_ns: int | None = None,
    ) -> SessionPage:
        """One page of sessions in session id (byte) order; page_size 1-1000, default
        100. Optionally only sessions carrying every one of `labels`, with ids starting
        with `session_id_prefix`, last appended to at or after `updated_after_ns` and
        before `updated_before_ns`. A page token serves only the same filters."""
        ...

    def delete_session(
        self,
        session_id: str,
        branch_id: str = "main",
        *,
        all_branches: bool = False,
        expected_sequence: int | None = None,
    ) -> list[SessionDeleted]:
        """Delete a branch (or, with `all_branches`, every branch and the session's
        labels) for good: its records are erased from storage, the feed gets a
        SessionDeleted marker, subscribers of the branch end with NotFoundError
        (BRANCH_DELETED), and the deleted records' ids stay reserved (an append reusing
        one fails with AlreadyExistsError, RECORD_ID_DELETED). Returns the markers.
        NotFoundError if there is nothing to delete; WrongExpectedSequence if
        `expected_sequence` does not hold."""
        ...

    def update_session_labels(
        self,
        session_id: str,
        set_labels: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
        *,
        expected_version: int | None = None,
    ) -> SessionLabels:
        """Set and remove labels of a session that has records, all or none; the labels
        and their version after. FailedPreconditionError (WRONG_LABELS_VERSION) if
        `expected_version` does not hold; InvalidArgumentError beyond the limits (64
        labels; keys of 1-63 letters, digits and `._/:-`; values up to 256 bytes)."""
        ...

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = "main"
    ) -> Iterator[EventRecord | CaughtUp]:
        """Follow a branch: stored records from `from_sequence`, CaughtUp, then live ones.

        `from_sequence=None` delivers only records appended from now on; to
        resume, pass the sequence after the last one received. Records come in
        sequence order with no gap and no duplicate. The iterator blocks while
        it waits; close it to end the subscription.
        """
        ...

    def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
        branch_id: str = "",
    ) -> Iterator[FeedItem | CaughtUp | Checkpoint]:
        """Follow every session: FeedRecord(position, record) in commit order, stored
        ones from `from_position` (None: only new ones), CaughtUp, then live ones;
        optionally only sessions whose id starts with `session_id_prefix`, branches
        named `branch_id` ("": every branch) and events of the given `part_types`.

        Positions increase in commit order; store the last one processed and
        resume from the one after it. CaughtUp comes once, when every record stored
        at the start has been examined; with filters, a Checkpoint(position) says how
        far the feed was examined where they kept nothing (store it as the last
        position, too).
        """
        ...


@runtime_checkable
class AsyncSessionRepository(Protocol):
    """The async twin of `SessionRepository`: the same operations, awaited."""

    async def append(self, event: AppendEvent) -> EventRecord:
        """Store one event at the end of its session; returns the stored record."""
        ...

    def writer(self, *, window: int = 1000) -> AsyncSessionWriter:
        """See `SessionRepository.writer`; `await writer.append(event)` returns the
        record's future once the event is queued."""
        ...

    async def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
        branch_id: str = "main",
        labels: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        """Store several events at the end of one session: all or none."""
        ...

    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = "main",
    ) -> AsyncIterator[EventRecord]:
        """Stream a range of a session's records without holding them all."""
        ...

    async def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = "main",
    ) -> list[EventRecord]:
        """`read_session` as a list; empty for a session with no events."""
        ...

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        """Every record, in any session, whose parent_id is `parent_id`."""
        ...

    async def head(self, session_id: str, branch_id: str = "main") -> EventRecord | None:
        """A branch's latest record, or None when it has no events."""
        ...

    async def fork_session(
        self,
        session_id: str,
        up_to_sequence: int,
        *,
        branch_id: str = "main",
        expected_sequence: int | None = None,
        new_branch_id: str = "",
        new_session_id: str = "",
    ) -> BranchInfo:
        """Make a new branch from another's first records; see SessionRepository.fork_session."""
        ...

    async def list_sessions(
        self,
        *,
        page_size: int | None = None,
        page_token: str | None = None,
        labels: Mapping[str, str] | None = None,
        session_id_prefix: str = "",
        updated_after_ns: int | None = None,
        updated_before_ns: int | None = None,
    ) -> SessionPage:
        """One page of sessions; see SessionRepository.list_sessions."""
        ...

    async def delete_session(
        self,
        session_id: str,
        branch_id: str = "main",
        *,
        all_branches: bool = False,
        expected_sequence: int | None = None,
    ) -> list[SessionDeleted]:
        """Delete a branch or a session; see SessionRepository.delete_session."""
        ...

    async def update_session_labels(
        self,
        session_id: str,
        set_labels: Mapping[str, str] | None = None,
        remove: Sequence[str] = (),
        *,
        expected_version: int | None = None,
    ) -> SessionLabels:
        """Change a session's labels; see SessionRepository.update_session_labels."""
        ...

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = "main"
    ) -> AsyncIterator[EventRecord | CaughtUp]:
        """Follow a branch: stored records from `from_sequence`, CaughtUp, then live ones."""
        ...

    def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
        branch_id: str = "",
    ) -> AsyncIterator[FeedItem | CaughtUp | Checkpoint]:
        """Follow every session in commit order; see SessionRepository.subscribe_all."""
        ...
