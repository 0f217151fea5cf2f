"""Real servers for tests: a grpc.aio server on a free loopback port, in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from agentlog.server import Server, create_server
from agentlog.server.blocking import BlockingStore

T = TypeVar("T")


class LoopThread:
    """An event loop running in its own thread, for driving async code from sync tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@contextmanager
def served(
    repository: BlockingStore, port: int = 0, **options: Any
) -> Iterator[tuple[Server, LoopThread]]:
    """Serve `repository` on 127.0.0.1:`port` (0: a free one); yields the server and its loop."""
    loop = LoopThread()

    async def start() -> Server:
        built = create_server(f"127.0.0.1:{port}", repository, **options)
        await built.start()
        return built

    built = loop.run(start())
    try:
        yield built, loop
    finally:
        loop.run(built.stop(1.0))
        loop.close()


@contextmanager
def running_server(repository: BlockingStore, **options: Any) -> Iterator[str]:
    """Serve `repository` on 127.0.0.1:<free port>; yields the target "127.0.0.1:PORT"."""
    with served(repository, **options) as (built, _):
        yield f"127.0.0.1:{built.port}"
