"""The PostgreSQL backend: many stateless replicas on one database.

- `PostgresBackend.open(url)`: connect, migrate, serve (see `backend.py`).
- `migrate_database(url)`: bring a database's schema up to date (`agentlog migrate`).
"""

from agentlog.server.postgres.backend import PostgresBackend, check_store_path, is_postgres_url
from agentlog.server.postgres.setup import migrate_database

__all__ = ["PostgresBackend", "check_store_path", "is_postgres_url", "migrate_database"]
