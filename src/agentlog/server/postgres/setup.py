"""Operator commands on a database: migrating it before a rollout."""

from __future__ import annotations

import psycopg

from agentlog.errors import UnavailableError
from agentlog.server.postgres._errors import redact, translated, wait_for_database
from agentlog.server.postgres._schema import migrate


async def migrate_database(url: str, *, connect_timeout: float = 30.0) -> tuple[int, int]:
    """Bring the schema of the database at `url` up to date; (version before, after)."""
    await wait_for_database(url, url, connect_timeout)
    try:
        conn = await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=max(1, int(connect_timeout))
        )
    except (psycopg.Error, OSError) as exc:
        raise UnavailableError(
            f"could not connect to PostgreSQL at {redact(url)}: {redact(str(exc).strip())}",
            reason="DATABASE_UNAVAILABLE",
        ) from None
    async with conn, translated():
        return await migrate(conn)
