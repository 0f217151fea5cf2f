"""Real servers for tests: a grpc.aio server on a free loopback port, in a thread; or
`agentlog serve` in a process of its own."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agentlog.server import Server, create_server
from agentlog.server.backend import Backend
from agentlog.server.blocking import BlockingStore

# What a test serves: a blocking store, or (a backend bound to the server's event
# loop, such as PostgreSQL's) a coroutine function that opens one on that loop.
Servable = BlockingStore | Callable[[], Awaitable[Backend]]

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
    repository: Servable, port: int = 0, **options: Any
) -> Iterator[tuple[Server, LoopThread]]:
    """Serve `repository` on 127.0.0.1:`port` (0: a free one); yields the server and its loop."""
    loop = LoopThread()

    async def start() -> Server:
        opened = repository if isinstance(repository, BlockingStore) else await repository()
        built = create_server(f"127.0.0.1:{port}", opened, **options)
        await built.start()
        return built

    built = loop.run(start())
    try:
        yield built, loop
    finally:
        loop.run(built.stop(1.0))
        loop.close()


@contextmanager
def running_server(repository: Servable, **options: Any) -> Iterator[str]:
    """Serve `repository` on 127.0.0.1:<free port>; yields the target "127.0.0.1:PORT"."""
    with served(repository, **options) as (built, _):
        yield f"127.0.0.1:{built.port}"


@dataclass
class ServeProcess:
    """`agentlog serve` running: its process, its target, and every line it logged."""

    process: subprocess.Popen[str]
    target: str
    log: list[str] = field(default_factory=list)

    @property
    def logged(self) -> str:
        return "".join(self.log)


def serve_process(data: Path | str, *args: str, addr: str = "127.0.0.1:0") -> ServeProcess:
    """Start `agentlog serve --addr ADDR --data-dir DATA ARGS...` and wait until it serves;
    what it logs is kept (read on a thread, so a full pipe never stalls it)."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentlog.server",
            "serve",
            "--addr",
            addr,
            "--data-dir",
            str(data),
            *args,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    log: list[str] = []
    while line := process.stderr.readline():
        log.append(line)
        found = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if found:
            threading.Thread(target=log.extend, args=(process.stderr,), daemon=True).start()
            return ServeProcess(process, f"127.0.0.1:{found.group(1)}", log)
    raise AssertionError(f"the server did not start: {''.join(log)}")
