"""Streams do not outlive their credentials.

A subscription is authorized when it starts, then may stay open for hours. Every
`RECHECK_SECONDS` the guard asks the authenticator again, with the metadata and
TLS peer the stream started with: a token removed from the access file, a JWT
whose `exp` passed or whose key left the JWKS, or a client certificate that
expired ends the stream with UNAUTHENTICATED; a grant that no longer covers what
the stream delivers (a narrower prefix, a permission taken away) ends it with
PERMISSION_DENIED. Either way the error says where to resume, and the clients
stop rather than retry. One sweep on the event loop checks every stream (the
authenticator's caches make each check a lookup), so thousands of streams cost
no timer each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agentlog.errors import AgentlogError
from agentlog.server._auth import Authenticator, Grant, Metadata, Peer

log = logging.getLogger("agentlog.server")

RECHECK_SECONDS = 1.0


@dataclass(eq=False)
class Watched:
    """One stream under watch: how it authenticated, and what it must still be allowed."""

    metadata: Metadata
    peer: Peer
    still_allowed: Callable[[Grant], None]
    """Raises PermissionDeniedError if a grant no longer covers the stream."""
    end: Callable[[AgentlogError], None]
    """Ends the stream with an error (called once, on the loop)."""
    ended: bool = field(default=False)


class StreamGuard:
    """Rechecks the credentials of every open stream, on the event loop."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator
        self._streams: set[Watched] = set()
        self._sweeper: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def watching(self, stream: Watched) -> Iterator[None]:
        """Watch `stream` while the block runs (on the loop)."""
        self._streams.add(stream)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep())
        try:
            yield
        finally:
            self._streams.discard(stream)

    async def _sweep(self) -> None:
        while self._streams:
            await asyncio.sleep(RECHECK_SECONDS)
            for stream in list(self._streams):
                if stream.ended:
                    continue
                try:
                    grant = self._authenticator.grant(stream.metadata, stream.peer)
                    stream.still_allowed(grant)
                except AgentlogError as exc:
                    stream.ended = True
                    log.info("ending a stream whose credential no longer holds: %s", exc)
                    stream.end(exc)
                except Exception:  # a bug here must not stop the guard
                    log.exception("checking a stream's credential failed")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
