"""`BlockingStore`: the base of the in-process backends (memory, JSONL).

A blocking store is called from threads: appends, ranged reads and
subscriptions that block while they wait. The server runs one behind a
`ThreadedBackend` (`_threaded.py`), which makes it a `Backend`; programs that
embed a store use it directly.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Self, TypeAlias

from agentlog._codec import (
    event_to_json,
    record_to_proto,
)
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
    StoredRecord,
)
from agentlog._validation import MAIN, check_branch_id, check_labels, check_session_prefix
from agentlog._writers import DEFAULT_WINDOW, InlineWriter
from agentlog.errors import NotFoundError
from agentlog.server._blocking_live import follow_feed, follow_session
from agentlog.server._forks import ForkPlan, plan_fork
from agentlog.server._lifecycle import (
    DeletePlan,
    LabelChange,
    plan_delete,
    plan_label_change,
)
from agentlog.server._listing import PageTokens, SessionList, SessionQuery, scope_of
from agentlog.server._rules import (
    MESSAGE_BYTES,
    MESSAGE_RECORDS,
    Appended,
    PendingAppend,
    Place,
    prepare,
)
from agentlog.server.backend import StoreFigures

if TYPE_CHECKING:
    from agentlog.server.backend import Backend

Outcome: TypeAlias = tuple[Appended, int | None] | Exception
"""What storing one PendingAppend came to: (what was appended, its first feed
position; None for a retry) or the error it failed with."""

Result: TypeAlias = list[EventRecord] | Exception
"""What `BlockingStore.commit` gives for one append: its records, or the error."""


@dataclass(frozen=True, slots=True)
class Published:
    """Records a branch gained (an append's, or a fork's copies): sequences
    `first_sequence`..`last_sequence`, at feed positions from `first_position`."""

    session_id: str
    branch_id: str
    first_sequence: int
    last_sequence: int
    first_position: int
    appended: Appended | None = None
    """The append that stored them, if one did (a fork's copies are read, not held)."""
    deleted: SessionDeleted | None = None
    """Set when the branch was deleted instead: the feed's marker (at `first_position`)."""

    def records(self) -> list[EventRecord] | None:
        """The records, if they are at hand (an append's); None: read them."""
        return self.appended.records() if self.appended is not None else None


Listener = Callable[[Published], None]
"""Called after every append (or fork) that stored records."""


class BlockingStore(ABC):
    """What the in-process backends share: appends, list reads and subscriptions.

    A backend implements `_append` (decide with `check_append`, then store), or
    `commit` if it stores appends in groups, and the reads; the rest of the
    SessionRepository protocol is theirs to fill. After every append that stored
    records it calls `_publish`, which wakes blocking subscribers here and tells
    listeners (a `ThreadedBackend` turns that into `Growth` for the server).
    Subscribers never hold records of their own: they read from the store by
    sequence and only wait for word that a session has grown, so they cannot
    miss, repeat or reorder a record, and a slow one costs writers nothing.
    """

    def __init__(self) -> None:
        self._grown = threading.Condition()
        self._waiting = 0  # subscribers waiting on _grown
        self._last_published: dict[Place, int] = {}
        # How many times each branch was deleted (a subscriber ends when this moves).
        self._deletions: dict[Place, int] = {}
        self._last_position = 0
        self._listeners: list[Listener] = []
        # A backend whose tokens must outlive the process replaces this.
        self.page_tokens = PageTokens(secrets.token_bytes(32))

    def add_listener(self, listener: Listener) -> None:
        """Be told after each append; it runs on the writer's thread, so it must not block."""
        self._listeners.append(listener)

    def _publish(self, appended: Appended, position: int | None) -> None:
        if position is None:
            return  # a retry: nothing new was stored
        self._announce(
            Published(
                appended.session_id,
                appended.branch_id,
                appended.first_sequence,
                appended.last_sequence,
                position,
                appended,
            )
        )

    def _announce_deleted(self, marker: SessionDeleted) -> None:
        """Tell subscribers and listeners that a branch was deleted (its feed marker)."""
        self._announce(
            Published(
                marker.session_id,
                marker.branch_id,
                1,
                1,
                marker.position,
                deleted=marker,
            )
        )

    def _announce(self, published: Published) -> None:
        place = (published.session_id, published.branch_id)
        last = published.last_sequence
        # Publishers are serialized by the backend; subscribers count themselves
        # in `_waiting` before they look, so one that waits is always woken.
        if published.deleted is not None:
            with self._grown:
                self._deletions[place] = self._deletions.get(place, 0) + 1
                self._last_published.pop(place, None)
            last = published.first_sequence
        else:
            self._last_published[place] = max(last, self._last_published.get(place, 0))
        end = published.first_position + last - published.first_sequence
        self._last_position = max(end, self._last_position)
        if self._waiting:
            with self._grown:
                self._grown.notify_all()
        for listener in self._listeners:
            listener(published)

    def append(self, event: AppendEvent) -> EventRecord:
        return self.commit_one(self.prepare_append(event))[0]

    def writer(self, *, window: int = DEFAULT_WINDOW) -> InlineWriter:
        """See `SessionRepository.writer`: in process, each append is stored as it is
        made (there is no round trip to save); `window` is the clients' and unused."""
        return InlineWriter(self.append)

    def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
        branch_id: str = MAIN,
        labels: Mapping[str, str] | None = None,
    ) -> list[EventRecord]:
        pending = self.prepare_batch(session_id, events, expected_sequence, branch_id)
        if labels:
            pending = replace(pending, labels=check_labels(labels))
        return self.commit_one(pending)

    @staticmethod
    def prepare_append(event: AppendEvent) -> PendingAppend:
        """Check an append (no storage is touched); InvalidArgumentError if malformed."""
        item = NewEvent(event=event.event, parent_id=event.parent_id, id=event.id)
        batch = prepare(event.session_id, [item], event.expected_sequence, batch=False)
        branch_id = check_branch_id(event.branch_id)
        labels = check_labels(event.labels) if event.labels else None
        return PendingAppend(
            event.session_id, batch, event.expected_sequence, branch_id=branch_id, labels=labels
        )

    @staticmethod
    def prepare_batch(
        session_id: str,
        events: Sequence[NewEvent],
        expected_sequence: int | None,
        branch_id: str = MAIN,
    ) -> PendingAppend:
        """Check a batch (no storage is touched); InvalidArgumentError if malformed."""
        batch = prepare(session_id, events, expected_sequence, batch=True)
        return PendingAppend(
            session_id, batch, expected_sequence, branch_id=check_branch_id(branch_id)
        )

    def fork_session(
        self,
        session_id: str,
        up_to_sequence: int,
        *,
        branch_id: str = MAIN,
        expected_sequence: int | None = None,
        new_branch_id: str = "",
        new_session_id: str = "",
    ) -> BranchInfo:
        """Make a new branch whose records 1..`up_to_sequence` are copies of those of
        `branch_id` of `session_id` (see `_forks`); its summary. NotFoundError if the
        source lacks that sequence, AlreadyExistsError if the new branch exists,
        WrongExpectedSequence if `expected_sequence` does not hold."""
        plan = plan_fork(
            session_id,
            branch_id,
            up_to_sequence,
            expected_sequence=expected_sequence,
            new_branch_id=new_branch_id,
            new_session_id=new_session_id,
        )
        return self.fork(plan)

    @abstractmethod
    def fork(self, plan: ForkPlan) -> BranchInfo:
        """Carry out a checked fork, atomically: the new branch whole, or nothing."""

    def delete_session(
        self,
        session_id: str,
        branch_id: str = MAIN,
        *,
        all_branches: bool = False,
        expected_sequence: int | None = None,
    ) -> list[SessionDeleted]:
        """Delete a branch (or every branch, and the session's labels) for good: its
        records erased, their ids reserved (see `_lifecycle`); the feed's markers, one per
        branch. NotFoundError if there is nothing to delete, WrongExpectedSequence if
        `expected_sequence` does not hold."""
        plan = plan_delete(
            session_id,
            branch_id,
            all_branches=all_branches,
            expected_sequence=expected_sequence,
        )
        return self.delete(plan)

    @abstractmethod
    def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        """Carry out a checked delete, each branch whole or not at all, and announce its
        markers (`_announce_deleted`)."""

    def update_session_labels(
        self,
        session_id: str,
        set_labels: Mapping[str, str] | None = None,
        remove: Iterable[str] = (),
        *,
        expected_version: int | None = None,
    ) -> SessionLabels:
        """Set and remove labels of a session with records, all or none; the labels after.
        NotFoundError if the session has no records, FailedPreconditionError if
        `expected_version` does not hold, InvalidArgumentError beyond the limits."""
        return self.relabel(plan_label_change(session_id, set_labels, remove, expected_version))

    @abstractmethod
    def relabel(self, change: LabelChange) -> SessionLabels:
        """Carry out a checked label change, atomically."""

    def expire(self, before_ns: int, limit: int) -> int:
        """Retention: delete up to `limit` branches whose last record is older than
        `before_ns`, one at a time (appends go on between them); how many were deleted."""
        deleted = 0
        for session_id, branch_id in self.expired(before_ns, limit):
            try:
                self.delete(DeletePlan(session_id, branch_id, None))
            except NotFoundError:
                continue  # deleted meanwhile
            deleted += 1
        return deleted

    def expired(self, before_ns: int, limit: int) -> list[Place]:
        """Up to `limit` branches whose last record is older than `before_ns` (for
        retention), oldest first where the store can tell cheaply."""
        found: list[Place] = []
        after: str | None = None
        while len(found) < limit:
            page = self.session_page(SessionQuery(size=1000, after=after, updated_before_ns=None))
            for info in page.sessions:
                for branch in info.branches:
                    if branch.last_timestamp_ns < before_ns:
                        found.append((info.session_id, branch.branch_id))
            if page.after is None:
                break
            after = page.after
        return found[:limit]

    @abstractmethod
    def close(self) -> None:
        """Release what the store holds (files, threads, locks). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def backend(self, executor: ThreadPoolExecutor) -> Backend:
        """This store as a `Backend` for the server, its blocking calls run on `executor`."""
        from agentlog.server._threaded import ThreadedBackend

        return ThreadedBackend(self, executor)

    def commit(self, appends: Sequence[PendingAppend]) -> list[Result]:
        """Store checked appends, each as if alone and in this order: for each, its
        records or the error it failed with."""
        return [
            answer if isinstance(answer, Exception) else answer.records()
            for answer in self.commit_answers(appends)
        ]

    def commit_answers(self, appends: Sequence[PendingAppend]) -> list[Appended | Exception]:
        """Store checked appends, each as if alone and in this order: what each came
        to (`Appended`), or the error it failed with."""
        answers: list[Appended | Exception] = []
        for outcome in self._commit(appends):
            if isinstance(outcome, Exception):
                answers.append(outcome)
                continue
            appended, position = outcome
            self._publish(appended, position)
            answers.append(appended)
        return answers

    def commit_one(self, append: PendingAppend) -> list[EventRecord]:
        """Store one checked append; its records, or raise what it failed with."""
        [result] = self.commit([append])
        if isinstance(result, Exception):
            raise result
        return result

    def _commit(self, appends: Sequence[PendingAppend]) -> list[Outcome]:
        """Store appends in order, one at a time (see `_append`)."""
        outcomes: list[Outcome] = []
        for append in appends:
            try:
                outcomes.append(self._append(append))
            except Exception as exc:  # each append fails alone
                outcomes.append(exc)
        return outcomes

    def _append(self, append: PendingAppend) -> tuple[Appended, int | None]:
        """Store a checked append: what was appended and the feed position of the first
        record; for a retry, the stored records and None. (A store that overrides
        `commit_answers` need not implement it.)"""
        raise NotImplementedError

    @abstractmethod
    def head(self, session_id: str, branch_id: str = MAIN) -> EventRecord | None:
        """A branch's latest record."""

    @abstractmethod
    def read_children(self, parent_id: str) -> Iterator[list[EventRecord]]:
        """Every record whose parent_id is `parent_id` (sessions in byte order of their
        ids, each session's in sequence order), in runs of at most MESSAGE_RECORDS and,
        unless one record is larger, MESSAGE_BYTES: a parent with many large children is
        never held whole."""

    def load_children(self, parent_id: str) -> list[EventRecord]:
        """Every record whose parent_id is `parent_id`."""
        return [record for run in self.read_children(parent_id) for record in run]

    def read_stored(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[StoredRecord]:
        """Up to `limit` records of a branch from `from_sequence` on, as stored (see
        `Backend.read_stored`)."""
        records = self.read_session(
            session_id, from_sequence=from_sequence, limit=limit, branch_id=branch_id
        )
        return [
            StoredRecord(
                r.id,
                r.session_id,
                r.sequence,
                r.parent_id,
                r.timestamp_ns,
                event_to_json(r.event),
                r.branch_id,
            )
            for r in records
        ]

    @abstractmethod
    def read_run(
        self, session_id: str, from_sequence: int, limit: int, branch_id: str = MAIN
    ) -> list[EventRecord]:
        """A branch's records from `from_sequence` on: at most `limit`, and no more than
        MESSAGE_BYTES of them unless the first is larger (a subscriber catching up reads
        in such steps, so large records never make a large message)."""

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
        """One page of sessions, in byte order of their ids; optionally only those with
        every one of `labels`, ids starting with `session_id_prefix`, last appended to
        at or after `updated_after_ns` and before `updated_before_ns`."""
        filters = SessionQuery.of(
            page_size,
            None,
            (check_session_prefix(session_id_prefix),),
            labels=labels,
            updated_after_ns=updated_after_ns,
            updated_before_ns=updated_before_ns,
        )
        scope = scope_of(filters.prefixes, *filters.filters)
        query = replace(filters, after=self.page_tokens.decode(page_token, scope))
        found = self.session_page(query)
        token = None if found.after is None else self.page_tokens.encode(found.after, scope)
        return SessionPage(sessions=found.sessions, next_page_token=token)

    @abstractmethod
    def session_page(self, query: SessionQuery) -> SessionList:
        """The sessions a query takes (see `Backend.list_sessions`)."""

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = MAIN
    ) -> Iterator[EventRecord | CaughtUp]:
        """A branch's stored records from `from_sequence` (None: only new ones), CaughtUp,
        then live ones.

        The iterator blocks while it waits for new records; close it (or leave
        the loop) to end the subscription.
        """
        return follow_session(self, session_id, from_sequence, branch_id)

    def read_all(self, from_position: int) -> Iterator[FeedItem]:
        """The feed of every session from `from_position` to its current end, in commit
        order; a FeedGap for positions whose records cannot be read (a damaged session
        file)."""
        return itertools.chain.from_iterable(self.read_feed_runs(from_position))

    @abstractmethod
    def read_feed_runs(self, from_position: int) -> Iterator[list[FeedItem]]:
        """`read_all` in runs of at most MESSAGE_RECORDS items and, unless one record is
        larger, MESSAGE_BYTES."""

    @abstractmethod
    def last_position(self) -> int:
        """The feed's last position (0: nothing appended yet)."""

    def figures(self) -> StoreFigures:
        """Figures for a metrics scrape (see `Backend.figures`); from any thread."""
        return StoreFigures(feed_head=self.last_position())

    def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
        branch_id: str = "",
    ) -> Iterator[FeedItem | CaughtUp | Checkpoint]:
        """Every session's records in commit order from `from_position` (None: only new
        ones), CaughtUp, then live ones; optionally only some sessions, branches (""
        for every one) or event kinds. A FeedGap stands for records of a kept branch
        that could not be read."""
        return follow_feed(self, from_position, session_id_prefix, part_types, branch_id)

    @abstractmethod
    def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[EventRecord]:
        """Stream a range of a branch's records."""

    def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> Iterator[list[Any]]:
        """read_session's records as the EventRecord messages (or the dicts of their
        fields) LoadSession sends, in runs of at most MESSAGE_RECORDS records and
        (unless one record is larger) MESSAGE_BYTES. A backend that keeps JSON can
        make them without building the Python records."""
        records = self.read_session(
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
            branch_id=branch_id,
        )
        run: list[Any] = []
        size = 0
        for message in map(record_to_proto, records):
            length = message.ByteSize()
            if run and (len(run) == MESSAGE_RECORDS or size + length > MESSAGE_BYTES):
                yield run
                run, size = [], 0
            run.append(message)
            size += length
        if run:
            yield run

    def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
        branch_id: str = MAIN,
    ) -> list[EventRecord]:
        return list(
            self.read_session(
                session_id,
                from_sequence=from_sequence,
                limit=limit,
                direction=direction,
                branch_id=branch_id,
            )
        )
