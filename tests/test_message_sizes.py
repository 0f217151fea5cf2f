"""Every streamed message stays within gRPC's default 4 MiB, whatever the records: a
client that never raised its limit reads and follows every record the server
accepts, on every backend, by every stream (ranged reads, children, both
subscriptions, catching up and live)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentlog import (
    AgentlogClient,
    AppendEvent,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedRecord,
    ToolCall,
    ToolCallRequested,
)
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server._rules import MAX_RECORD_BYTES
from agentlog.server.postgres import PostgresBackend
from tests.contract import started
from tests.pg import database
from tests.servers import running_server

DEFAULT_LIMIT = [("grpc.max_receive_message_length", 4 * 1024 * 1024)]


@contextmanager
def served(kind: str, root: Path) -> Iterator[str]:
    if kind == "postgresql":
        with database() as url:

            async def open_backend() -> PostgresBackend:
                return await PostgresBackend.open(url)

            with running_server(open_backend) as target:
                yield target
        return
    store = MemorySessionRepository() if kind == "memory" else JsonlSessionRepository(root)
    try:
        with running_server(store) as target:
            yield target
    finally:
        store.close()


def large(session: str, n: int) -> ToolCallRequested:
    """An event whose record is just under the largest a record may be."""
    text = "x" * (MAX_RECORD_BYTES - 2000)
    call = ToolCall(call_id=f"c{n}", tool_name="big", input={"blob": text})
    return ToolCallRequested(run_id="r", session_id=session, iteration=n, call=call)


@pytest.mark.parametrize("kind", ["memory", "jsonl", "postgresql"])
def test_large_records_reach_a_client_with_the_default_message_limit(
    kind: str, tmp_path: Path
) -> None:
    with (
        served(kind, tmp_path / "data") as target,
        AgentlogClient(target, options=DEFAULT_LIMIT) as client,
    ):
        root = client.append(AppendEvent(session_id="big", event=started("big")))
        stored = [root]
        for n in range(3):
            stored.append(
                client.append(
                    AppendEvent(session_id="big", parent_id=root.id, event=large("big", n))
                )
            )
        ids = [r.id for r in stored]
        assert [r.id for r in client.load_session("big")] == ids
        assert [r.id for r in client.load_children(root.id)] == ids[1:]
        caught = []
        for followed in client.subscribe_session("big", from_sequence=1):
            if isinstance(followed, CaughtUp):
                break
            caught.append(followed.id)
        assert caught == ids
        fed = []
        for item in client.subscribe_all(from_position=1):
            if isinstance(item, CaughtUp):
                break
            if not isinstance(item, Checkpoint):
                assert isinstance(item, FeedRecord)
                fed.append(item.record.id)
        assert fed == ids
        # And live: a subscriber that is caught up receives new large records too.
        live = client.subscribe_session("big")
        assert isinstance(next(live), CaughtUp)
        more = client.append(AppendEvent(session_id="big", event=large("big", 9)))
        arrived = next(live)
        assert isinstance(arrived, EventRecord)
        assert arrived.id == more.id
        live.close()
