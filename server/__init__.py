"""The agentlog server and its storage backends.

- `create_server(address, repository)`: a gRPC server for any SessionRepository.
- `JsonlSessionRepository(root)`: arcan-compatible JSONL files (the default).
- `MemorySessionRepository()`: in process memory, for tests and embedding.
"""

from agentlog.server.app import Server, create_server, serve
from agentlog.server.jsonl import JsonlSessionRepository
from agentlog.server.memory import MemorySessionRepository

__all__ = [
    "JsonlSessionRepository",
    "MemorySessionRepository",
    "Server",
    "create_server",
    "serve",
]
