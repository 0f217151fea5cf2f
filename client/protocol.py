"""The SessionRepository protocol: what every agentlog store offers.

The in-process stores (`agentlog.server.MemorySessionRepository`,
`agentlog.server.JsonlSessionRepository`) and the gRPC client
(`agentlog.client.AgentlogClient`) all satisfy `SessionRepository`; the async
client satisfies `AsyncSessionRepository`. Code written against the protocol
runs on any of them unchanged, and they raise the same `agentlog.errors`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from agentlog._records import AppendEvent, EventRecord


@runtime_checkable
class SessionRepository(Protocol):
    """A store of append-only session event logs."""

    def append(self, event: AppendEvent) -> EventRecord:
        """Store one event at the end of its session; returns the stored record."""
        ...

    def load_session(self, session_id: str) -> list[EventRecord]:
        """A session's records in append order; empty for a session with no events."""
        ...

    def load_children(self, parent_id: str) -> list[EventRecord]:
        """Every record, in any session, whose parent_id is `parent_id`.

        Grouped by session (session ids in byte order), each in append order.
        """
        ...

    def head(self, session_id: str) -> EventRecord | None:
        """A session's latest record, or None when it has no events."""
        ...


@runtime_checkable
class AsyncSessionRepository(Protocol):
    """The async twin of `SessionRepository`: the same operations, awaited."""

    async def append(self, event: AppendEvent) -> EventRecord:
        """Store one event at the end of its session; returns the stored record."""
        ...

    async def load_session(self, session_id: str) -> list[EventRecord]:
        """A session's records in append order; empty for a session with no events."""
        ...

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        """Every record, in any session, whose parent_id is `parent_id`."""
        ...

    async def head(self, session_id: str) -> EventRecord | None:
        """A session's latest record, or None when it has no events."""
        ...
