"""Forks in the JSONL store: a new branch file whose records are copies of another's.

A branch file stands alone (arcan has no notion of a shared prefix), so a fork
copies. It streams: the source's records are read a block at a time from a
snapshot of the file and written, rewritten, to a file of its own under
`.agentlog-forks/`, which is synced and then linked into place under the store's
lock, where the target is checked to be free. So a crash leaves the whole new
branch or none of it (start-up removes what `.agentlog-forks/` holds). The new
file is then read like any other: its state built, its ids indexed, and its
records given feed positions, which is durable before the fork returns.

A copy's parent is re-pointed when it is one of the copied records. Those are the
source's records 1..N, so a parent among the ids copied lately (kept exactly, a
bounded window) is one; any other is looked up in the index and confirmed by
reading the line it names. Memory stays bounded whatever the branch's length.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from agentlog._lines import checked_line
from agentlog._plans import DecodeError
from agentlog._records import BranchInfo
from agentlog.errors import (
    AgentlogError,
    FailedPreconditionError,
    UnavailableError,
)
from agentlog.server._forks import ForkPlan, IdDeriver, branch_exists, source_too_short
from agentlog.server._pauses import point
from agentlog.server._rules import wrong_expected_sequence
from agentlog.server.jsonl._state import SUFFIX, View
from agentlog.server.jsonl._sync import SyncLoops
from agentlog.server.jsonl.durability import fsync_path
from agentlog.server.jsonl.files import corrupt_line, line_number, read_line, storage_error

log = logging.getLogger("agentlog.server")

FORKS_DIR = ".agentlog-forks"
# Ids of the records copied last, kept to re-point parents without a lookup.
RECENT_IDS = 1 << 16


class Forks(SyncLoops):
    """`fork`, for the JSONL store."""

    def fork(self, plan: ForkPlan) -> BranchInfo:
        self._check_changeable("forks")
        target = self._stem_to_write(plan.new_session_id, plan.new_branch_id)
        view = self._fork_source(plan)
        with self._lock:
            self._check_free(target, plan)
        partial = self._copy(view, plan, target)
        try:
            self._link(partial, target, plan)
        finally:
            with contextlib.suppress(OSError):
                partial.unlink()
        point("fork.linked")
        # Read like any file: indexed, and its records given feed positions (durable
        # before this returns, as an append's are).
        state = self._state(target)
        if state.damage is not None:
            raise state.damage
        with self._lock:
            return BranchInfo(
                branch_id=plan.new_branch_id,
                event_count=state.count,
                first_timestamp_ns=state.first_timestamp_ns,
                last_timestamp_ns=state.last_timestamp_ns,
                head_id=state.head_id,
                forked_from=plan.origin,
            )

    def _check_changeable(self, what: str) -> None:
        """Refuse a change (`what`: "forks", "deletes", ...) in a read-only store, or one
        halted after a failed sync."""
        if self.read_only:
            raise FailedPreconditionError(
                f"{self.root} is served read-only: {what} are refused", reason="READ_ONLY"
            )
        if self._halted is not None:
            raise self._halted

    def _fork_source(self, plan: ForkPlan) -> View:
        """A snapshot of the source branch, once its expectation and length are checked."""
        stem = self._stem_for(plan.session_id, plan.branch_id)
        view = None
        if stem is not None:
            state = self._state(stem)
            if state.damage is not None:
                raise state.damage
            with self._lock:
                view = state.view()
        last = view.count if view is not None else 0
        if plan.expected is not None and plan.expected != last:
            raise wrong_expected_sequence(plan.session_id, plan.expected, last, plan.branch_id)
        if view is None or last < plan.up_to_sequence:
            raise source_too_short(plan, last)
        return view

    def _check_free(self, target: str, plan: ForkPlan) -> None:
        """Refuse a fork onto a branch that exists (hold the lock): one with records,
        being written, or known to the index (a file removed behind our back)."""
        state = self._states.get(target)
        indexed = self._index.indexed(target)
        try:
            size = os.stat(self._path(target)).st_size
        except FileNotFoundError:
            size = -1
        except OSError as exc:
            raise storage_error(exc, self._path(target)) from None
        if (
            size > 0
            or (state is not None and (state.unacked or state.written))
            or (indexed is not None and indexed.known_records > 0)
        ):
            raise branch_exists(plan.new_session_id, plan.new_branch_id)

    def _link(self, partial: Path, target: str, plan: ForkPlan) -> None:
        """Put the synced copy in place, if the target is still free (an append or
        another fork may have made it meanwhile)."""
        path = self._path(target)
        with self._lock:
            if self._closing:
                raise _closing()
            if self._halted is not None:
                raise self._halted
            self._check_free(target, plan)
            try:
                if path.exists():  # an empty file: no branch, so replaced
                    os.replace(partial, path)
                else:
                    os.link(partial, path)  # fails if made meanwhile by another writer
            except FileExistsError:
                raise branch_exists(plan.new_session_id, plan.new_branch_id) from None
            except OSError as exc:
                raise storage_error(exc, path) from None
            stale = self._states.pop(target, None)
            if stale is not None:
                self._close_file(target)
            self._add_to_catalog(target)
        try:
            fsync_path(self.root)
        except OSError as exc:
            raise storage_error(exc, self.root) from None

    def _copy(self, view: View, plan: ForkPlan, target: str) -> Path:
        """Write records 1..N of the source, rewritten for the new branch, to a synced
        file under FORKS_DIR; its path."""
        directory = self.root / FORKS_DIR
        try:
            directory.mkdir(exist_ok=True)
            partial = directory / f"{secrets.token_hex(8)}.partial"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise storage_error(exc, directory) from None
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as out:
                for block in self._copies(view, plan):
                    out.write(block)
                    if self._closing:
                        raise _closing()
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            if isinstance(exc, OSError):
                raise storage_error(exc, partial) from None
            raise
        return partial

    def _copies(self, view: View, plan: ForkPlan) -> Iterator[bytes]:
        """The new branch's lines, a block at a time."""
        derive = IdDeriver()
        # The ids copied lately, each with its copy's id: most parents are among them.
        recent: dict[str, str] = {}
        order: deque[str] = deque()
        up_to, branches = plan.up_to_sequence, self._branches
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        for first, lines in self._lines(view, 1, up_to, None):
            objects = [self._copied(view, line, number) for number, line in enumerate(lines, first)]
            inside = self._copied_parents(view, objects, recent, up_to)
            out = []
            for sequence, obj in enumerate(objects, first):
                parent = obj["parent_id"]
                if parent is not None:
                    known = recent.get(parent)
                    if known is not None:
                        parent = known
                    elif parent in inside:
                        parent = derive(parent)
                record_id = obj["id"]
                new_id = derive(record_id)
                if sequence == 1:
                    fields = self._fork_line(obj, new_id, parent, plan)
                elif branches:  # newest arcan's fields, in its order
                    fields = {
                        "id": new_id,
                        "session_id": plan.new_session_id,
                        "branch_id": plan.new_branch_id,
                        "sequence": sequence,
                        "parent_id": parent,
                        "timestamp": obj["timestamp"],
                        "event": obj["event"],
                    }
                else:  # the seed's fields, then agentlog's sequence
                    fields = {
                        "id": new_id,
                        "session_id": plan.new_session_id,
                        "parent_id": parent,
                        "timestamp": obj["timestamp"],
                        "event": obj["event"],
                        "sequence": sequence,
                    }
                out.append(dumps(fields, option=newline))
                recent[record_id] = new_id
                order.append(record_id)
            while len(order) > RECENT_IDS:
                del recent[order.popleft()]
            yield b"".join(out)

    def _copied(self, view: View, line: bytes, sequence: int) -> dict[str, Any]:
        """A source line's JSON, checked as a record of its layout at `sequence` (the
        common shape at a glance, anything else by `checked_line`, which words what is
        wrong); DataLossError naming the line if it is no record."""
        try:
            obj = orjson.loads(line)
            if type(obj) is dict:
                get = obj.get
                timestamp, event, parent = get("timestamp"), get("event"), get("parent_id")
                stated = get("sequence") if self._branches else get("sequence", sequence)
                if (
                    type(get("id")) is str
                    and type(get("session_id")) is str
                    and (not self._branches or type(get("branch_id")) is str)
                    and (parent is None or type(parent) is str)
                    and type(timestamp) is str
                    and len(timestamp) == 30
                    and timestamp[10] == "T"
                    and timestamp[19] == "."
                    and timestamp[29] == "Z"
                    and type(stated) is int
                    and stated == sequence
                    and type(event) is dict
                    and type(event.get("part_type")) is str
                ):
                    return obj
            return checked_line(line, sequence, self._branches)
        except (orjson.JSONDecodeError, DecodeError) as exc:
            offset = self._offset_of(view, sequence)
            number = line_number(view.path, offset)
            raise corrupt_line(view.path, number, str(exc), sequence, offset) from None

    def _copied_parents(
        self,
        view: View,
        objects: list[dict[str, Any]],
        recent: dict[str, str],
        up_to: int,
    ) -> set[str]:
        """Which parents of a block's records, other than those copied lately or in the
        block, are copied records too (records 1..up_to of the source): looked up in the
        index, each candidate confirmed by reading its line."""
        block = {obj["id"] for obj in objects}
        wanted = [
            parent
            for obj in objects
            if (parent := obj.get("parent_id")) is not None
            and parent not in recent
            and parent not in block
        ]
        found = set(block)
        if not wanted:
            return found
        source = view.path.name[: -len(SUFFIX)]
        holders = self._index.holders(sorted(set(wanted)))
        with view.path.open("rb") as file:
            for parent, places in holders.items():
                for place in places:
                    if place.stem != source or place.sequence > up_to:
                        continue
                    line = read_line(file, place.offset, view.end)
                    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                        if orjson.loads(line).get("id") == parent:
                            found.add(parent)
        return found

    def _fork_line(
        self, obj: dict[str, Any], record_id: str, parent: Any, plan: ForkPlan
    ) -> dict[str, Any]:
        """The first copy's fields, in its layout's order, saying where it came from
        (an extra field, which arcan's readers ignore)."""
        fields: dict[str, Any] = {"id": record_id, "session_id": plan.new_session_id}
        if self._branches:
            fields |= {"branch_id": plan.new_branch_id, "sequence": 1}
        fields |= {"parent_id": parent, "timestamp": obj["timestamp"], "event": obj["event"]}
        if self._branches:
            fields["agentlog"] = True  # started here: see layout.FirstLine
        else:
            fields["sequence"] = 1
        origin = plan.origin
        fields["forked_from"] = {
            "session_id": origin.session_id,
            "branch_id": origin.branch_id,
            "sequence": origin.sequence,
        }
        return fields

    def _remove_partial_forks(self) -> None:
        """Remove the copies of forks a crash cut short (at open)."""
        directory = self.root / FORKS_DIR
        try:
            leftovers = list(directory.iterdir())
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: cannot look for forks cut short (%s)", directory, exc)
            return
        for leftover in leftovers:
            try:
                leftover.unlink()
                log.warning("%s: removed a fork a crash cut short (never made)", leftover)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("%s: cannot remove (%s)", leftover, exc)


def _closing() -> AgentlogError:
    return UnavailableError(
        "the store is closing; retry the fork (here when it is back, or elsewhere)",
        reason="SHUTTING_DOWN",
    )
