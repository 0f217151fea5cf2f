"""The one place where PostgreSQL driver errors become agentlog errors.

Whatever the database or the network does, a caller sees one of the project's
statuses: UNAVAILABLE (retry: the database is unreachable, restarting, or
timed out; an append cut off before its answer may or may not be stored, and
its retry with the same ids is stored once), RESOURCE_EXHAUSTED (the database
is out of room), or INTERNAL for what only an operator can fix. The URL's
password never appears in a message.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from agentlog.errors import (
    AgentlogError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
)

log = logging.getLogger("agentlog.postgres")

_PASSWORD_IN_URL = re.compile(r"(postgres(?:ql)?://[^:/@\s]*:)[^@\s]*@")
_PASSWORD_IN_DSN = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with any password of a PostgreSQL URL or key=value DSN masked."""
    return _PASSWORD_IN_DSN.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))


def translate(exc: BaseException) -> AgentlogError:
    """The agentlog error a driver error means for the caller."""
    detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return UnavailableError(
            "no PostgreSQL connection became free in time (the database is unreachable or "
            "every pooled connection is busy); retry",
            reason="DATABASE_UNAVAILABLE",
        )
    if isinstance(exc, pg_errors.QueryCanceled):
        return UnavailableError(
            f"PostgreSQL cancelled the statement ({detail}): it ran past the statement "
            "timeout, and nothing it did was kept; retry (an append is stored once however "
            "often it is retried)",
            reason="DATABASE_TIMEOUT",
        )
    if isinstance(exc, (pg_errors.DiskFull, pg_errors.OutOfMemory)):
        return ResourceExhaustedError(
            f"PostgreSQL is out of resources ({detail})", reason="DATABASE_EXHAUSTED"
        )
    if isinstance(
        exc,
        (
            psycopg.OperationalError,
            psycopg.InterfaceError,
            pg_errors.SerializationFailure,
            pg_errors.DeadlockDetected,
            pg_errors.LockNotAvailable,
        ),
    ):
        # Connection lost, the server shutting down or restarting, too many
        # connections, a conflict worth retrying.
        return UnavailableError(
            f"PostgreSQL is unavailable ({detail}); retry (an append cut off before its "
            "answer is stored once however often it is retried with the same ids)",
            reason="DATABASE_UNAVAILABLE",
        )
    log.error("PostgreSQL failed: %s", detail)
    return ServerError(
        f"PostgreSQL failed ({type(exc).__name__}); the server log has details",
        reason="DATABASE_ERROR",
    )


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Raise driver errors raised inside as agentlog errors."""
    try:
        yield
    except (psycopg.Error, psycopg_pool.PoolTimeout, OSError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, psycopg.Error):
            raise UnavailableError(
                f"PostgreSQL is unreachable ({redact(str(exc))}); retry",
                reason="DATABASE_UNAVAILABLE",
            ) from None
        raise translate(exc) from None
