"""Deleting branches and labelling sessions: the rules every backend applies the same way.

A delete erases a branch's records (or every branch's) for good. Afterwards the
branch reads as empty, and a new append starts it again at sequence 1, as arcan
does with a new file. What stays: the feed's `SessionDeleted` marker, at a new
position (positions are never reused), naming the session and branch but
nothing of their content; and the ids of the deleted records, as one-way
digests, so that an old append retried after the delete is refused
(RECORD_ID_DELETED) rather than bringing a deleted record back.

Labels are a session's own: set by the append that creates the session, or
changed by `UpdateSessionLabels`, each change one more version. Deleting every
branch of a session deletes its labels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agentlog._records import SessionLabels
from agentlog._validation import (
    MAX_LABELS,
    check_count,
    check_label_key,
    check_labels,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from agentlog.server._rules import named


@dataclass(frozen=True, slots=True)
class DeletePlan:
    """A checked delete: one branch, or (branch_id None) every branch of a session."""

    session_id: str
    branch_id: str | None
    expected: int | None


def plan_delete(
    session_id: str,
    branch_id: str = "",
    *,
    all_branches: bool = False,
    expected_sequence: int | None = None,
) -> DeletePlan:
    """Check a delete's arguments (InvalidArgumentError if they cannot make one)."""
    session_id = check_stored_session_id(session_id)
    if all_branches:
        if expected_sequence is not None:
            raise InvalidArgumentError(
                "expected_sequence applies to one branch; leave it out with all_branches",
                field="expected_sequence",
            )
        return DeletePlan(session_id, None, None)
    expected = (
        None if expected_sequence is None else check_count(expected_sequence, "expected_sequence")
    )
    return DeletePlan(session_id, check_stored_branch_id(branch_id), expected)


def nothing_to_delete(plan: DeletePlan) -> NotFoundError:
    if plan.branch_id is None:
        return NotFoundError(
            f"session {plan.session_id!r} has no records to delete",
            reason="SESSION_NOT_FOUND",
            metadata={"session_id": plan.session_id},
        )
    return NotFoundError(
        f"branch {named(plan.session_id, plan.branch_id)} has no records to delete",
        reason="BRANCH_NOT_FOUND",
        metadata={"session_id": plan.session_id, "branch_id": plan.branch_id},
    )


def branch_deleted(session_id: str, branch_id: str, position: int | None = None) -> NotFoundError:
    """What a subscription of a branch ends with when the branch is deleted."""
    where = f" (feed position {position})" if position else ""
    return NotFoundError(
        f"branch {named(session_id, branch_id)} was deleted{where}; its records are gone. "
        "Subscribe again from sequence 1 to follow the branch if it is started again",
        reason="BRANCH_DELETED",
        metadata={"session_id": session_id, "branch_id": branch_id},
    )


def erased_digest(record_id: str) -> bytes:
    """What a store keeps of a deleted record's id: a one-way digest (16 bytes)."""
    return hashlib.blake2b(record_id.encode(), digest_size=16, person=b"agentlog-erased").digest()


@dataclass(frozen=True, slots=True)
class LabelChange:
    """A checked UpdateSessionLabels."""

    session_id: str
    set: Mapping[str, str]
    remove: tuple[str, ...]
    expected: int | None

    def apply(self, current: SessionLabels | None, *, exists: bool) -> SessionLabels:
        """The labels after the change, from the session's `current` ones; NotFoundError
        if the session does not exist, FailedPreconditionError if the version differs
        from the expected one, InvalidArgumentError if too many labels would result."""
        if not exists:
            raise NotFoundError(
                f"session {self.session_id!r} does not exist (labels belong to a session "
                "with records; set them with its first append, or after it)",
                reason="SESSION_NOT_FOUND",
                metadata={"session_id": self.session_id},
            )
        labels = dict(current.labels) if current is not None else {}
        version = current.version if current is not None else 0
        if self.expected is not None and self.expected != version:
            raise FailedPreconditionError(
                f"the labels of session {self.session_id!r} are at version {version}, not "
                f"{self.expected} as expected: someone changed them meanwhile. Read them "
                "again (ListSessions) and decide with what is there now",
                reason="WRONG_LABELS_VERSION",
                metadata={
                    "session_id": self.session_id,
                    "expected_version": str(self.expected),
                    "actual_version": str(version),
                },
            )
        for key in self.remove:
            labels.pop(key, None)
        labels.update(self.set)
        check_labels(labels, "set")
        return SessionLabels(labels, version + 1)


def plan_label_change(
    session_id: str,
    set_labels: Mapping[str, str] | None = None,
    remove: Iterable[str] = (),
    expected_version: int | None = None,
) -> LabelChange:
    """Check an UpdateSessionLabels (InvalidArgumentError if it cannot be one)."""
    session_id = check_stored_session_id(session_id)
    checked = check_labels(set_labels, "set", allowed=MAX_LABELS)
    removed = tuple(check_label_key(key, "remove") for key in remove)
    both = sorted(set(checked) & set(removed))
    if both:
        raise InvalidArgumentError(
            f"label {both[0]!r} is both set and removed; do one or the other",
            field="remove",
            reason="INVALID_LABELS",
        )
    if not checked and not removed:
        raise InvalidArgumentError(
            "nothing to change: give labels to set or keys to remove",
            field="set",
            reason="INVALID_LABELS",
        )
    expected = (
        None if expected_version is None else check_count(expected_version, "expected_version")
    )
    return LabelChange(session_id, checked, removed, expected)
