"""Forks: the rules every backend applies the same way.

A fork makes a new branch (of the same session, or of a new one) whose records
1..N are copies of a source branch's: the same events and timestamps, new ids
(ids are unique across the store), and parents re-pointed to the copies when
they point into the copied records (a record's parent in its own branch always
comes before it), other parents kept. The new ids are derived from the source's
by a keyed hash, so a backend re-points parents without holding a map of every
copied id.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from agentlog._records import ForkedFrom
from agentlog._validation import (
    check_branch_id,
    check_count,
    check_session_id,
    check_stored_branch_id,
    check_stored_session_id,
)
from agentlog.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
)
from agentlog.server._rules import named


@dataclass(frozen=True, slots=True)
class ForkPlan:
    """A checked fork: what to copy, and where to."""

    session_id: str
    branch_id: str
    up_to_sequence: int
    expected: int | None
    new_session_id: str
    new_branch_id: str

    @property
    def origin(self) -> ForkedFrom:
        return ForkedFrom(self.session_id, self.branch_id, self.up_to_sequence)


def plan_fork(
    session_id: str,
    branch_id: str,
    up_to_sequence: int,
    *,
    expected_sequence: int | None = None,
    new_branch_id: str = "",
    new_session_id: str = "",
) -> ForkPlan:
    """Check a fork's arguments (InvalidArgumentError if they cannot make one)."""
    source = check_stored_session_id(session_id)
    source_branch = check_stored_branch_id(branch_id)
    check_count(up_to_sequence, "up_to_sequence", minimum=1)
    if expected_sequence is not None:
        check_count(expected_sequence, "expected_sequence")
    target = check_session_id(new_session_id, "new_session_id") if new_session_id else source
    if not new_branch_id and target == source:
        raise InvalidArgumentError(
            "new_branch_id: is required to fork within the same session (give new_session_id "
            'to fork into a new session, whose branch is then "main" unless named)',
            field="new_branch_id",
        )
    target_branch = check_branch_id(new_branch_id, "new_branch_id")
    if (target, target_branch) == (source, source_branch):
        raise InvalidArgumentError(
            "a branch cannot be forked into itself",
            field="new_branch_id",
            reason="FORK_ONTO_ITSELF",
        )
    return ForkPlan(source, source_branch, up_to_sequence, expected_sequence, target, target_branch)


def source_too_short(plan: ForkPlan, last_sequence: int) -> NotFoundError:
    """The error for a fork whose source lacks sequence up_to_sequence."""
    has = "has no records" if last_sequence == 0 else f"ends at sequence {last_sequence}"
    return NotFoundError(
        f"cannot fork session {named(plan.session_id, plan.branch_id)} up to sequence "
        f"{plan.up_to_sequence}: it {has}",
        reason="FORK_SOURCE_NOT_FOUND",
        metadata={
            "session_id": plan.session_id,
            "branch_id": plan.branch_id,
            "last_sequence": str(last_sequence),
        },
    )


def branch_exists(session_id: str, branch_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"session {named(session_id, branch_id)} exists already; a fork makes a new branch "
        "(choose another new_branch_id, or new_session_id)",
        reason="BRANCH_EXISTS",
        metadata={"session_id": session_id, "branch_id": branch_id},
    )


class IdDeriver:
    """New record ids for a fork's copies: a keyed hash of the source's ids, in the
    form of random (version 4) UUIDs. Different for every fork (its own key)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._keyed = hashlib.blake2b(
            key=key if key is not None else os.urandom(16), digest_size=16
        )

    def __call__(self, source_id: str) -> str:
        keyed = self._keyed.copy()
        keyed.update(source_id.encode())
        raw = bytearray(keyed.digest())
        raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
        raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
        text = raw.hex()
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
