"""Deletes, labels and retention in the JSONL store.

A delete of branches goes in three steps, so that a crash at any point leaves
each branch whole or gone, never half-deleted:

1. Its records' ids are read from the file and reserved in the sessions
   database (`sessions_db`), durably, one transaction for a group of branches.
   (A crash here: nothing is deleted; ids of live records reserved are harmless,
   since a retry of a stored record is found as stored first.)
2. Appends wait a moment (`_draining`) while those in flight are acknowledged;
   then the feed gets a deletion marker per branch, synced, and the files are
   unlinked, under the store's lock. (A crash between the marker and the unlink
   is finished at the next open: a file whose last feed entry is its deletion
   marker is removed.)
3. The index's rows of the files are erased, copies of their torn tails kept by
   recovery are removed, and labels of a session left with no branch are erased.

Deletes are grouped (retention deletes many branches with one wait of appends).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import orjson

from agentlog._records import SessionDeleted, SessionInfo, SessionLabels
from agentlog.errors import AgentlogError, UnavailableError
from agentlog.server._lifecycle import DeletePlan, LabelChange, nothing_to_delete
from agentlog.server._listing import SessionList, SessionQuery
from agentlog.server._pauses import point
from agentlog.server._rules import Appended, PendingAppend, Place, wrong_expected_sequence
from agentlog.server.jsonl._fork import Forks
from agentlog.server.jsonl._state import (
    MISSING,
    RECOVERED_DIR,
    STALE,
    SUFFIX,
    Identity,
    View,
    file_identity,
)
from agentlog.server.jsonl.durability import fsync_path
from agentlog.server.jsonl.index_tables import IndexedFile
from agentlog.server.jsonl.keys import key_of

log = logging.getLogger("agentlog.server")

# Branches deleted under one wait of appends, at most (retention's batches).
DELETE_BATCH = 64


@dataclass(slots=True)
class _Doomed:
    """A branch about to be deleted, as read in step 1."""

    session_id: str
    branch_id: str
    stem: str
    count: int
    ids: list[str]
    parents: list[str]
    identity: Identity  # the file's when its ids were read
    deleted_before: int  # the stem's last deletion's position (0: none); then its own
    time_ns: int = 0  # when it was deleted


class Lifecycle(Forks):
    """`delete`, `relabel`, labels on appends, filtered listing and retention."""

    _labels_lock: threading.Lock  # labels: LabelIndex and the sessions db together

    # --- delete ---

    def delete(self, plan: DeletePlan) -> list[SessionDeleted]:
        self._check_changeable("deletes")
        if plan.branch_id is None:
            branches = [b for b, _ in self._catalog_of_places()[1].get(plan.session_id, ())]
        else:
            branches = [plan.branch_id]
        markers = self._delete_places([(plan.session_id, b) for b in branches], plan.expected)
        if not markers:
            raise nothing_to_delete(plan)
        return markers

    def _delete_places(self, places: Sequence[Place], expected: int | None) -> list[SessionDeleted]:
        """Delete branches (step 1, then 2 and 3 for all at once); their markers."""
        for _ in range(100):
            doomed = [d for place in places if (d := self._doom(place, expected)) is not None]
            if not doomed:
                return []
            # Reserved durably before anything is deleted: one transaction for them all.
            self._sessions_db.add_erased(i for d in doomed for i in d.ids)
            point("delete.reserved")
            settled = self._settle_deletes(doomed)
            if settled is not None:
                doomed, numbers = settled
                break
        else:  # pragma: no cover - appends outran the delete a hundred times
            raise UnavailableError(
                "the branch kept growing while it was being deleted; retry", reason="BUSY"
            )
        markers = self._after_deletes(doomed, numbers)
        for marker in markers:
            self._announce_deleted(marker)
        return markers

    def _doom(self, place: Place, expected: int | None) -> _Doomed | None:
        """Step 1 for one branch: its ids read and reserved; None if it has no records."""
        session_id, branch_id = place
        stem = self._stem_for(session_id, branch_id)
        if stem is None:
            return None
        state = self._state(stem)
        with self._lock:  # one moment: the file, what was read of it, its deletions
            view = state.view()
            # Lines written and not yet acknowledged are not in the view: then no
            # identity vouches for it (see _settle_deletes).
            identity = file_identity(self._path(stem)) if not state.unacked else STALE
            before = self._feed.deleted_at.get(stem, 0)
        if view.count == 0 and identity == MISSING:
            return None
        if expected is not None and expected != view.count:
            raise wrong_expected_sequence(session_id, expected, view.count, branch_id)
        ids, parents = self._ids_in(view)
        return _Doomed(session_id, branch_id, stem, view.count, ids, parents, identity, before)

    def _ids_in(self, view: View) -> tuple[list[str], list[str]]:
        """The ids and parent ids of a file's records (lines that are no record are
        skipped: the file goes whole)."""
        ids: list[str] = []
        parents: list[str] = []
        if view.count == 0:
            return ids, parents
        with contextlib.suppress(AgentlogError):
            for _, lines in self._lines(view, 1, view.count, None):
                for line in lines:
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    if type(obj) is dict and type(obj.get("id")) is str:
                        ids.append(obj["id"])
                        parent = obj.get("parent_id")
                        if type(parent) is str:
                            parents.append(parent)
        return ids, parents

    def _settle_deletes(
        self, doomed: list[_Doomed]
    ) -> tuple[list[_Doomed], dict[str, IndexedFile | None]] | None:
        """Step 2: markers in the feed, synced; files unlinked. The branches deleted
        (not those another delete took meanwhile), with what the index knew of their
        files; None if a branch grew since it was read (step 1 again)."""
        with self._lock:
            self._draining = True
        try:
            with self._lock:
                while self._queue:  # appends in flight: acknowledged first
                    if self._closing:
                        raise _closing()
                    self._cond.wait(0.002)
                if self._closing:
                    raise _closing()
                if self._halted is not None:
                    raise self._halted
                feed = self._feed
                doomed = [d for d in doomed if feed.deleted_at.get(d.stem, 0) == d.deleted_before]
                for d in doomed:
                    # Grown since its ids were read: read them again. Its state says so
                    # if it is held; if it was evicted since, the file's identity does.
                    state = self._states.get(d.stem)
                    if state is not None and state.count != d.count:
                        return None
                    if state is None and file_identity(self._path(d.stem)) != d.identity:
                        return None
                if not doomed:
                    return [], {}
                now = self.clock()
                entries = [
                    feed.reserve_marker(d.stem, d.session_id, d.branch_id, d.count, now)
                    for d in doomed
                ]
                try:
                    feed.write(entries)
                    os.fsync(feed.fd)
                except BaseException:
                    feed.abandon()
                    raise
                for entry in entries:
                    feed.add(entry)
                feed.acknowledged_size = self._feed_durable_size = feed.size
                point("delete.marked")
                for d in doomed:
                    self._states.pop(d.stem, None)
                    self._summaries.pop(d.stem, None)  # a new file may get its inode
                    self._heads.pop(d.stem, None)
                    self._close_file(d.stem)
                    with contextlib.suppress(FileNotFoundError):
                        self._path(d.stem).unlink()
                    self._remove_from_catalog(d.stem)
                numbers = {d.stem: self._index.indexed(d.stem) for d in doomed}
                for d in doomed:
                    self._index.forget(d.stem)
                    d.deleted_before = entries[doomed.index(d)][0]  # its marker's position
                    d.time_ns = now
        finally:
            with self._lock:
                self._draining = False
                self._cond.notify_all()
        fsync_path(self.root)
        return doomed, numbers

    def _after_deletes(
        self, doomed: list[_Doomed], numbers: dict[str, IndexedFile | None]
    ) -> list[SessionDeleted]:
        """Step 3: no copy of the deleted records left in the index or recovered tails;
        labels of sessions left with no branch erased. The markers."""
        self._index.erase(
            [
                (indexed.session, [key_of(i) for i in d.ids], [key_of(p) for p in d.parents])
                for d in doomed
                if (indexed := numbers.get(d.stem)) is not None
            ]
        )
        recovered = self.root / RECOVERED_DIR
        names = {f"{d.stem}{SUFFIX}." for d in doomed}
        try:
            for leftover in recovered.iterdir():
                if any(leftover.name.startswith(name) for name in names):
                    leftover.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # the records are deleted; a copy aside could not be
            log.error("%s: cannot remove copies of deleted records (%s)", recovered, exc)
        gone = {d.session_id for d in doomed}
        with self._labels_lock:
            places = self._catalog_of_places()[1]
            emptied = [s for s in gone if not places.get(s)]
            self._sessions_db.drop_labels(emptied)
            for session_id in emptied:
                self._labels.drop(session_id)
        return [
            SessionDeleted(d.deleted_before, d.session_id, d.branch_id, d.count, d.time_ns)
            for d in doomed
        ]

    def _finish_deletes(self) -> None:
        """At open: remove files whose deletion a crash interrupted (step 2)."""
        feed = self._feed
        for stem in feed.deleted_at:
            if feed.covered(stem) == 0:
                path = self._path(stem)
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_size > 0:
                        path.unlink()
                        log.warning("%s: removed: its deletion was cut short by a crash", path)

    # --- labels ---

    def relabel(self, change: LabelChange) -> SessionLabels:
        self._check_changeable("label changes")
        with self._labels_lock:
            exists = bool(self._catalog_of_places()[1].get(change.session_id))
            labels = change.apply(self._labels.get(change.session_id), exists=exists)
            self._sessions_db.put_labels(change.session_id, labels)
            point("labels.written")
            self._labels.put(change.session_id, labels)
        return labels

    def take_labels(self, append: PendingAppend, appended: Appended) -> None:
        """Labels an append carries, for a session that has none, if the append started
        its branch (or is a retry of the one that did)."""
        if not append.labels or appended.first_sequence != 1:
            return
        with self._labels_lock:  # under the lock a delete of the session drops labels in
            if self._labels.get(append.session_id) is not None:
                return
            if not self._catalog_of_places()[1].get(append.session_id):
                return  # deleted meanwhile
            labels = SessionLabels(dict(append.labels), 1)
            self._sessions_db.put_labels(append.session_id, labels)
            self._labels.put(append.session_id, labels)

    def commit_answers(self, appends: Sequence[PendingAppend]) -> list[Appended | Exception]:
        answers = super().commit_answers(appends)
        for append, answer in zip(appends, answers, strict=True):
            if append.labels and isinstance(answer, Appended):
                self.take_labels(append, answer)
        return answers

    def _load_labels(self) -> None:
        """At open: the labels of the sessions present (those of sessions whose files are
        gone, after a crash in a delete, are erased)."""
        found = list(self._sessions_db.labels())
        if not found:
            return  # no catalog to build at start
        present = self._catalog_of_places()[1]
        stale = []
        for session_id, labels in found:
            if session_id in present:
                self._labels.put(session_id, labels)
            else:
                stale.append(session_id)
        if stale and not self.read_only:
            self._sessions_db.drop_labels(stale)

    def session_page(self, query: SessionQuery) -> SessionList:
        infos: list[SessionInfo] = []
        last: str | None = None
        after = query.after
        while True:
            session_ids, branches = self._catalog_of_places()
            with self._labels_lock:
                candidates = self._labels.candidates(session_ids, replace(query, after=after))
                chunk = list(itertools.islice(candidates, query.size + 1))
                labels = {s: self._labels.get(s) for s in chunk}
            if not chunk:
                return SessionList(infos, None)
            for session_id in chunk:
                if len(infos) == query.size:
                    return SessionList(infos, last)  # more follow
                last = session_id
                found = [
                    info
                    for branch_id, stem in branches.get(session_id, ())
                    if (info := self._branch_info(branch_id, stem)) is not None
                ]
                if not found:  # an empty or vanished file is no branch, and no session
                    continue
                summary = SessionInfo.of(session_id, found, labels[session_id])
                if query.takes_time(summary.last_timestamp_ns):
                    infos.append(summary)
            after = chunk[-1]

    # --- retention ---

    def expire(self, before_ns: int, limit: int) -> int:
        deleted = 0
        expired = self.expired(before_ns, limit)
        for start in range(0, len(expired), DELETE_BATCH):
            places = expired[start : start + DELETE_BATCH]
            deleted += len(self._delete_places(places, None))
            time.sleep(0)  # let appends in between batches
        return deleted


def _closing() -> AgentlogError:
    return UnavailableError(
        "the store is closing; retry the delete (here when it is back, or elsewhere)",
        reason="SHUTTING_DOWN",
    )
