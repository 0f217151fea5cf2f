"""The agentlog server and its storage backends.

- `create_server(address, repository)`: a gRPC server for a backend.
- `Backend` (`backend.py`): the interface every backend implements for the server.
- `BlockingStore`: the base of the in-process stores, which embedding programs call directly:
  - `JsonlSessionRepository(root)`: arcan-compatible JSONL files (the default);
  - `MemorySessionRepository()`: in process memory, for tests and embedding.
"""

from agentlog.server.app import Server, create_server, serve
from agentlog.server.backend import Backend, Growth
from agentlog.server.blocking import BlockingStore
from agentlog.server.jsonl import JsonlSessionRepository
from agentlog.server.memory import MemorySessionRepository

__all__ = [
    "Backend",
    "BlockingStore",
    "Growth",
    "JsonlSessionRepository",
    "MemorySessionRepository",
    "Server",
    "create_server",
    "serve",
]
