"""The JSONL backend: arcan's on-disk format, one file per session (the default).

- `store.py`: `JsonlSessionRepository`, the blocking store.
- `backend.py`: `JsonlBackend`, the store as the server's `Backend` (group commit).
- `index.py`, `keys.py`: the SQLite index of ids, parents and offsets, and its Bloom filter.
- `feed.py`: the all-sessions feed file.
- `files.py`, `durability.py`: reading lines and scanning files; syncing.
"""

from agentlog.server.jsonl.durability import SyncPolicy
from agentlog.server.jsonl.store import JsonlSessionRepository

__all__ = ["JsonlSessionRepository", "SyncPolicy"]
