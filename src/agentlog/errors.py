"""agentlog's exceptions: what every backend and both clients raise.

Each error names the gRPC status it travels as, so the server and the clients
translate with one table (`ERRORS_BY_STATUS`) and a caller sees the same
exception whether it talks to a store in-process or through the network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar


class AgentlogError(Exception):
    """Base of every error agentlog raises.

    `reason` is a stable UPPER_SNAKE identifier of the failure (e.g.
    `INVALID_SESSION_ID`), `metadata` holds machine-readable facts about it, and
    `field` names the request field at fault where there is one.
    """

    status_name: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.status_name
        self.field = field
        self.metadata: dict[str, str] = dict(metadata or {})
        self.concerning: str | None = None
        """A session this error names (a server sets it): a caller who may not read that
        session is told `redacted` instead."""
        self.redacted: AgentlogError | None = None

    def __str__(self) -> str:
        return self.message

    def naming(self, session_id: str, redacted: AgentlogError) -> AgentlogError:
        """Mark this error as naming `session_id`; `redacted` says the same without it."""
        self.concerning, self.redacted = session_id, redacted
        return self

    def seen_by(self, may_read: Callable[[str], bool]) -> AgentlogError:
        """This error as a caller who may read what `may_read` allows is told it."""
        hidden = self.concerning is not None and not may_read(self.concerning)
        return self.redacted if hidden and self.redacted is not None else self


class InvalidArgumentError(AgentlogError, ValueError):
    """The request is malformed: fix it before sending it again."""

    status_name = "INVALID_ARGUMENT"


class NotFoundError(AgentlogError, LookupError):
    """Something the request names does not exist."""

    status_name = "NOT_FOUND"


class AlreadyExistsError(AgentlogError):
    """Something the request would create exists already, with other content."""

    status_name = "ALREADY_EXISTS"


class FailedPreconditionError(AgentlogError):
    """The store is not in the state the request needs."""

    status_name = "FAILED_PRECONDITION"


class WrongExpectedSequence(FailedPreconditionError):
    """An append's expectation about the session's last sequence did not hold; nothing was written.

    Reload the session (or its head), decide again, and retry with the new sequence.
    """

    reason_name: ClassVar[str] = "WRONG_EXPECTED_SEQUENCE"

    @property
    def expected_sequence(self) -> int:
        """What the append expected the session's last sequence to be (0: no events)."""
        return int(self.metadata["expected_sequence"])

    @property
    def actual_sequence(self) -> int:
        """The session's last sequence when the append was refused (0: no events)."""
        return int(self.metadata["actual_sequence"])


class DataLossError(AgentlogError):
    """Stored data cannot be read back: a session file holds a line that does not parse."""

    status_name = "DATA_LOSS"


class ResourceExhaustedError(AgentlogError):
    """A limit was hit: message size, disk space, or a server's capacity."""

    status_name = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(AgentlogError):
    """The call carried no credential the server accepts (missing, unknown, expired)."""

    status_name = "UNAUTHENTICATED"


class PermissionDeniedError(AgentlogError, PermissionError):
    """The caller is known but may not do this (to this session)."""

    status_name = "PERMISSION_DENIED"


class UnavailableError(AgentlogError, ConnectionError):
    """The server cannot be reached or is shutting down; retrying may succeed."""

    status_name = "UNAVAILABLE"


class DeadlineExceededError(AgentlogError, TimeoutError):
    """The call did not finish within its deadline."""

    status_name = "DEADLINE_EXCEEDED"


class CancelledError(AgentlogError):
    """The call was cancelled."""

    status_name = "CANCELLED"


class AbortedError(AgentlogError):
    """Not attempted because an append before it in the same stream was refused
    (reason `EARLIER_APPEND_REFUSED`): nothing of it was stored. Decide again after
    the refusal, then send it on a new writer."""

    status_name = "ABORTED"


class ServerError(AgentlogError):
    """The server failed in a way the request did not cause (INTERNAL, UNKNOWN, ...)."""

    status_name = "INTERNAL"


ERRORS_BY_STATUS: dict[str, type[AgentlogError]] = {
    cls.status_name: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        DataLossError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        AbortedError,
        ServerError,
    )
}
"""The exception class for each gRPC status name; other statuses map to ServerError."""

ERRORS_BY_REASON: dict[str, type[AgentlogError]] = {
    WrongExpectedSequence.reason_name: WrongExpectedSequence,
}
"""Subclasses that a status's ErrorInfo reason selects (the clients rebuild these)."""
