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


# What the server says when it will never accept this connection as asked: a role,
# password or database that does not exist or is refused, a URL libpq cannot read.
_PERMANENT = (
    "does not exist",
    "password authentication failed",
    "no pg_hba.conf entry",
    "authentication failed",
    "permission denied",
    "invalid integer value",
    "invalid connection option",
    "invalid sslmode",
    'missing "="',
    "invalid URI",
    "invalid percent-encoded",
)


async def wait_for_database(conninfo: str, url: str, connect_timeout: float) -> None:
    """Return once a connection to the database succeeds. What can heal (a server that
    refuses or does not answer yet, one starting up, a name not yet resolvable) is
    retried for up to `connect_timeout` seconds (UnavailableError then); what cannot (a
    role, password or database refused, a URL that does not parse) fails at once with
    the server's words (FailedPreconditionError)."""
    import asyncio
    import time

    from agentlog.errors import FailedPreconditionError

    deadline = time.monotonic() + connect_timeout
    last = ""
    while True:
        left = deadline - time.monotonic()
        try:
            conn = await psycopg.AsyncConnection.connect(
                conninfo, connect_timeout=max(1, min(5, int(left) if left > 1 else 1))
            )
        except (psycopg.Error, OSError) as exc:
            text = redact(" ".join(str(exc).split()))
            if any(marker.lower() in text.lower() for marker in _PERMANENT):
                raise FailedPreconditionError(
                    f"PostgreSQL at {redact(url)} refuses this connection: {text}; fix the "
                    "URL (--store, AGENTLOG_STORE): its user, password, database or port",
                    reason="DATABASE_REFUSED",
                ) from None
            last = text
        else:
            await conn.close()
            return
        if time.monotonic() >= deadline:
            raise UnavailableError(
                f"could not connect to PostgreSQL at {redact(url)} within "
                f"{connect_timeout:g} s ({last}); is it running, and does the URL name the "
                "right host and port?",
                reason="DATABASE_UNAVAILABLE",
            )
        await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
