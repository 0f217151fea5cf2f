"""The contract suite, run against every SessionRepository implementation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agentlog import (
    AgentlogClient,
    AppendEvent,
    AsyncAgentlogClient,
    AsyncAppendWriter,
    BranchInfo,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedItem,
    NewEvent,
    SessionDeleted,
    SessionLabels,
    SessionPage,
)
from agentlog.protocol import AsyncSessionRepository
from agentlog.server import BlockingStore, JsonlSessionRepository, MemorySessionRepository
from agentlog.server.postgres import PostgresBackend
from tests.branch_contract import BranchContract
from tests.contract import FeedContract
from tests.lifecycle_contract import BranchLifecycleContract, LifecycleContract
from tests.pg import database
from tests.servers import LoopThread, running_server
from tests.writer_contract import WriterContract

T = TypeVar("T")


# Every backend the contract is run against, in one place. Each runs the whole
# suite through both clients over a real server; the in-process stores also
# run it called directly. A new backend is one line here.
BACKENDS: dict[str, Callable[[Path], BlockingStore]] = {
    "memory": lambda _: MemorySessionRepository(),
    "jsonl": JsonlSessionRepository,
    "jsonl-branches": lambda root: JsonlSessionRepository(root, layout="branches"),
}
# Those that hold branches other than "main" (the JSONL seed layout holds only it).
BRANCHED = ["memory", "jsonl-branches", "postgresql"]


@contextmanager
def _served_blocking(name: str, root: Path) -> Iterator[str]:
    opened = BACKENDS[name](root)
    try:
        with running_server(opened) as address:
            yield address
    finally:
        opened.close()


@contextmanager
def _served_postgres(_: Path) -> Iterator[str]:
    """A server on PostgresBackend over a new database of the machine's PostgreSQL."""
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as address:
            yield address


SERVED_BACKENDS: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
    **{name: functools.partial(_served_blocking, name) for name in BACKENDS},
    "postgresql": _served_postgres,
}


@pytest.fixture(params=list(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockingStore]:
    opened = BACKENDS[request.param](tmp_path)
    yield opened
    opened.close()


@pytest.fixture(scope="module", params=list(SERVED_BACKENDS))
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server on a free port over one of the backends, shared by a module's tests."""
    with SERVED_BACKENDS[request.param](tmp_path_factory.mktemp(request.param)) as address:
        yield address


@pytest.fixture(params=[name for name in BRANCHED if name in BACKENDS])
def branched_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlockingStore]:
    opened = BACKENDS[request.param](tmp_path)
    yield opened
    opened.close()


@pytest.fixture(scope="module", params=BRANCHED)
def branched_target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server over one of the backends that hold branches."""
    with SERVED_BACKENDS[request.param](tmp_path_factory.mktemp(request.param)) as address:
        yield address


class TestInProcess(FeedContract):
    @pytest.fixture
    def repo(self, store: BlockingStore) -> BlockingStore:
        return store


class TestClient(FeedContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[AgentlogClient]:
        with AgentlogClient(target) as client:
            yield client


class BlockingAsyncClient:
    """Drives the real AsyncAgentlogClient from sync tests: each call runs on its loop."""

    def __init__(self, loop: LoopThread, client: AsyncAgentlogClient) -> None:
        self._loop = loop
        self.client = client

    def append(self, event: AppendEvent) -> EventRecord:
        return self._loop.run(self.client.append(event))

    def load_children(self, parent_id: str) -> list[EventRecord]:
        return self._loop.run(self.client.load_children(parent_id))

    def head(self, session_id: str, branch_id: str = "main") -> EventRecord | None:
        return self._loop.run(self.client.head(session_id, branch_id))

    def append_batch(
        self, session_id: str, events: Sequence[NewEvent], **kwargs: Any
    ) -> list[EventRecord]:
        return self._loop.run(self.client.append_batch(session_id, events, **kwargs))

    def delete_session(self, session_id: str, *args: Any, **kwargs: Any) -> list[SessionDeleted]:
        return self._loop.run(self.client.delete_session(session_id, *args, **kwargs))

    def update_session_labels(self, session_id: str, *args: Any, **kwargs: Any) -> SessionLabels:
        return self._loop.run(self.client.update_session_labels(session_id, *args, **kwargs))

    def fork_session(self, session_id: str, up_to_sequence: int, **kwargs: Any) -> BranchInfo:
        return self._loop.run(self.client.fork_session(session_id, up_to_sequence, **kwargs))

    def read_session(self, session_id: str, **kwargs: Any) -> Iterator[EventRecord]:
        return iter(self.load_session(session_id, **kwargs))

    def load_session(self, session_id: str, **kwargs: Any) -> list[EventRecord]:
        return self._loop.run(self.client.load_session(session_id, **kwargs))

    def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None, branch_id: str = "main"
    ) -> Iterator[EventRecord | CaughtUp]:
        return self._blocking(
            self.client.subscribe_session(
                session_id, from_sequence=from_sequence, branch_id=branch_id
            )
        )

    def subscribe_all(self, **kwargs: Any) -> Iterator[FeedItem | CaughtUp | Checkpoint]:
        return self._blocking(self.client.subscribe_all(**kwargs))

    def _blocking(self, items: AsyncGenerator[T, None]) -> Iterator[T]:
        async def step() -> T:
            return await anext(items)

        try:
            while True:
                try:
                    yield self._loop.run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(items.aclose())

    def list_sessions(self, **kwargs: Any) -> SessionPage:
        return self._loop.run(self.client.list_sessions(**kwargs))

    def writer(self, *, window: int = 1000) -> BlockingAsyncWriter:
        return BlockingAsyncWriter(self._loop, self.client.writer(window=window))


class BlockingAsyncWriter:
    """Drives the real AsyncAppendWriter from sync tests, its futures seen as blocking ones."""

    def __init__(self, loop: LoopThread, writer: AsyncAppendWriter) -> None:
        self._loop = loop
        self._writer = writer

    def __enter__(self) -> BlockingAsyncWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def append(self, event: AppendEvent) -> concurrent.futures.Future[EventRecord]:
        async def queued() -> concurrent.futures.Future[EventRecord]:
            future = await self._writer.append(event)
            seen: concurrent.futures.Future[EventRecord] = concurrent.futures.Future()
            future.add_done_callback(functools.partial(_settle, seen))
            return seen

        return self._loop.run(queued())

    def flush(self, timeout: float | None = None) -> bool:
        self._loop.run(self._writer.flush(), timeout=timeout or 60)
        return True

    def close(self) -> None:
        self._loop.run(self._writer.close())


def _settle(
    seen: concurrent.futures.Future[EventRecord], future: asyncio.Future[EventRecord]
) -> None:
    error = future.exception()
    if error is not None:
        seen.set_exception(error)
    else:
        seen.set_result(future.result())


class TestAsyncClient(FeedContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[Any]:
        yield from _async_client(target)


def _async_client(target: str) -> Iterator[BlockingAsyncClient]:
    loop = LoopThread()

    async def connect() -> AsyncAgentlogClient:
        return AsyncAgentlogClient(target)

    client = loop.run(connect())
    assert isinstance(client, AsyncSessionRepository)
    yield BlockingAsyncClient(loop, client)
    loop.run(client.close())
    loop.close()


class TestWriterInProcess(WriterContract):
    @pytest.fixture
    def repo(self, store: BlockingStore) -> BlockingStore:
        return store


class TestWriterClient(WriterContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[AgentlogClient]:
        with AgentlogClient(target) as client:
            yield client


class TestWriterAsyncClient(WriterContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[Any]:
        yield from _async_client(target)


class TestBranchesInProcess(BranchContract):
    @pytest.fixture
    def repo(self, branched_store: BlockingStore) -> BlockingStore:
        return branched_store


class TestBranchesClient(BranchContract):
    @pytest.fixture
    def repo(self, branched_target: str) -> Iterator[AgentlogClient]:
        with AgentlogClient(branched_target) as client:
            yield client


class TestBranchesAsyncClient(BranchContract):
    @pytest.fixture
    def repo(self, branched_target: str) -> Iterator[Any]:
        yield from _async_client(branched_target)


class TestLifecycleInProcess(LifecycleContract):
    @pytest.fixture
    def repo(self, store: BlockingStore) -> BlockingStore:
        return store


class TestLifecycleClient(LifecycleContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[AgentlogClient]:
        with AgentlogClient(target) as client:
            yield client


class TestLifecycleAsyncClient(LifecycleContract):
    @pytest.fixture
    def repo(self, target: str) -> Iterator[Any]:
        yield from _async_client(target)


class TestBranchLifecycleInProcess(BranchLifecycleContract):
    @pytest.fixture
    def repo(self, branched_store: BlockingStore) -> BlockingStore:
        return branched_store


class TestBranchLifecycleClient(BranchLifecycleContract):
    @pytest.fixture
    def repo(self, branched_target: str) -> Iterator[AgentlogClient]:
        with AgentlogClient(branched_target) as client:
            yield client


class TestBranchLifecycleAsyncClient(BranchLifecycleContract):
    @pytest.fixture
    def repo(self, branched_target: str) -> Iterator[Any]:
        yield from _async_client(branched_target)
