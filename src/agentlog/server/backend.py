"""The backend interface: what the gRPC service needs from a store.

The service (`service.py`) and the live subscriptions (`_live.py`) talk to a
store only through `Backend`. Every backend implements it: the in-process
stores (`MemorySessionRepository`, `JsonlSessionRepository`) through
`ThreadedBackend`, which runs their blocking calls on a thread pool, and a
backend on a shared database directly, with its driver's own asyncio API.

Every method is called on the server's event loop. What a backend must keep:

- Appends decide retries, id conflicts and expectations as `_rules.check_append`
  says, atomically per append (a batch is stored whole or not at all), and give
  every stored record the session's next sequence and the feed's next position,
  in commit order: a record is readable (by `read_session`, `read_feed`, `head`)
  as soon as `append` returns it, and never before it is durable as the backend
  promises.
- Reads are snapshots of acknowledged records; errors are `AgentlogError`s
  (`agentlog.errors`), which the service turns into gRPC statuses in one place.
  A backend translates its driver's or the file system's errors where they
  arise, once.

How subscribers learn of new records: a backend calls the listener given to
`watch` with a `Growth` whenever a session and the feed grew, naming the new
last sequence and feed positions. It carries the new records only when they are
at hand in this process (a hint that saves a read); otherwise subscribers read
them from the backend by sequence or position. Since subscribers always read
up to what a `Growth` names and no further, word that arrives late, twice or out
of order costs a read, never a record: a backend shared by several processes
may send `Growth` from a notification channel (e.g. PostgreSQL LISTEN/NOTIFY)
and, to bound the delay when one is lost, from a periodic look at the feed's
last position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentlog._events import ReadDirection
from agentlog._records import (
    BranchInfo,
    EventRecord,
    FeedItem,
    SessionDeleted,
    SessionLabels,
    StoredRecord,
)
from agentlog._validation import MAIN
from agentlog.server._forks import ForkPlan
from agentlog.server._lifecycle import DeletePlan, LabelChange
from agentlog.server._listing import PageTokens, SessionList, SessionQuery
from agentlog.server._rules import Appended, PendingAppend, Place


@dataclass(frozen=True, slots=True)
class Growth:
    """Word that branch `branch_id` of session `session_id` now ends at
    `last_sequence` and the feed at `last_position` (an append or a fork placed the
    branch's records from `first_position`)."""

    session_id: str
    last_sequence: int
    first_position: int
    last_position: int
    records: Sequence[EventRecord] | None = None
    """The new records (sequences last_sequence - len + 1 .. last_sequence, positions
    first_position ..), when the backend has them at hand; None: read them."""
    branch_id: str = MAIN
    deleted: SessionDeleted | None = None
    """Set when the branch was deleted instead of grown: the feed's marker (at
    `first_position` = `last_position`); subscribers of the branch end."""

    @property
    def place(self) -> Place:
        return (self.session_id, self.branch_id)


GrowthListener = Callable[[Growth], None]


@dataclass(frozen=True, slots=True)
class StoreFigures:
    """What a store can say about itself for metrics, cheaply; None: it does not know
    or does not have such a thing."""

    feed_head: int | None = None
    """The feed's last position as this process knows it."""
    cached_sessions: int | None = None
    """Sessions whose state is held in memory."""
    open_files: int | None = None
    """Session files kept open for appending."""


class Backend(ABC):
    """A store as the server uses it. Methods are called on the server's event loop."""

    @abstractmethod
    def watch(
        self, listener: GrowthListener, following: Callable[[Place], bool] | None = None
    ) -> None:
        """Have `listener` called on the event loop (with no lock held) with a `Growth`
        whenever records are appended; one listener at a time (the server's). Called
        on the loop. `following((session_id, branch_id))`, if given, says whether anyone
        follows that branch or the feed; a backend may skip growth nobody follows."""

    @abstractmethod
    async def append(self, append: PendingAppend) -> Appended:
        """Store a checked append (see `_rules.prepare_request`) once durable; what was
        appended, or for a retry of a stored append the records as stored. Raises an
        AgentlogError: AlreadyExistsError, WrongExpectedSequence, DataLossError, ..."""

    @abstractmethod
    def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> AsyncIterator[list[Any]]:
        """A ranged read of a branch as LoadSession sends it: runs of at most
        MESSAGE_RECORDS records and (unless one is larger) MESSAGE_BYTES, each a list of
        `pb.EventRecord` messages or of dicts of their fields. The range is checked here."""

    @abstractmethod
    async def read_records(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        """Up to `limit` records of a branch from `from_sequence` on."""

    @abstractmethod
    async def read_stored(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[StoredRecord]:
        """Up to `limit` records of a branch from `from_sequence` on as they are stored:
        each event as its parsed JSON, unchecked against the event types, so that a copy
        carries whatever this store serves, exactly. DataLossError (naming the file or
        row) for a record that is no record at all."""

    @abstractmethod
    async def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        """A branch's records from `from_sequence` on: at most `limit`, and no more than
        MESSAGE_BYTES of them unless the first is larger (a subscriber catching up reads
        in such steps, so a message it is sent stays small whatever the records)."""

    @abstractmethod
    async def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        """A branch's latest record; None if it has none."""

    @abstractmethod
    async def fork(self, plan: ForkPlan) -> BranchInfo:
        """Make the branch a checked fork describes (see `_forks`), atomically, and
        return its summary. NotFoundError when the source lacks the sequence,
        AlreadyExistsError when the new branch exists, WrongExpectedSequence when the
        source's expectation fails. Its records reach the feed like appended ones."""

    @abstractmethod
    async def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        """Delete what a checked delete names (see `_lifecycle`), each branch whole or
        not at all, erasing its records from storage; the feed's markers, which reach
        the listener as `Growth` with `deleted` set. NotFoundError when there is nothing
        to delete, WrongExpectedSequence when the expectation fails."""

    @abstractmethod
    async def relabel(self, change: LabelChange) -> SessionLabels:
        """Carry out a checked label change atomically; the labels after it."""

    @abstractmethod
    async def expire(self, before_ns: int, limit: int) -> int:
        """Retention: delete up to `limit` branches whose last record is older than
        `before_ns`, as `delete` does; how many were deleted. A backend shared by
        replicas lets one of them sweep at a time."""

    @abstractmethod
    def read_children(self, parent_id: str) -> AsyncIterator[list[EventRecord]]:
        """Every record, of any session and branch, whose parent_id is `parent_id`
        (sessions in byte order of their ids, then branches in byte order of theirs,
        each in sequence order), in runs of at most MESSAGE_RECORDS
        and, unless one is larger, MESSAGE_BYTES: never all of them in memory at once."""

    @property
    @abstractmethod
    def page_tokens(self) -> PageTokens:
        """The store's page tokens (their key is the store's, shared by its replicas)."""

    @abstractmethod
    async def list_sessions(self, query: SessionQuery) -> SessionList:
        """The sessions a query takes, in byte order of their ids (the service makes the
        page tokens)."""

    @abstractmethod
    def read_feed(self, from_position: int) -> AsyncIterator[list[FeedItem]]:
        """The all-sessions feed from `from_position` to its current end, in runs of at
        most MESSAGE_RECORDS and, unless one record is larger, MESSAGE_BYTES; a FeedGap
        stands for positions whose records cannot be read."""

    @abstractmethod
    async def last_position(self) -> int:
        """The feed's last position (0: nothing appended yet)."""

    @property
    def available(self) -> bool:
        """Whether the backend can serve now (a database backend: whether it can reach
        the database); health checks report NOT_SERVING while it cannot."""
        return True

    def on_availability(self, callback: Callable[[bool], None]) -> None:  # noqa: B027
        """Have `callback(available)` called on the loop whenever `available` changes.
        A backend that is always available never calls it."""

    def figures(self) -> StoreFigures:
        """Figures for a metrics scrape: no I/O, callable from any thread."""
        return StoreFigures()

    @abstractmethod
    def stop_writing(self) -> None:
        """Refuse appends from now on (UNAVAILABLE); those in flight still finish."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the backend holds for the server (threads, connections). The
        store under it, if it was handed in open, is closed by its owner."""
