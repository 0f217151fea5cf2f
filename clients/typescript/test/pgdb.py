"""A PostgreSQL database for the TypeScript tests, made and dropped as the Python
tests make theirs (`tests/pg.py`): run from the repository root as
`python clients/typescript/test/pgdb.py create` (prints its URL) or `drop URL`."""

from __future__ import annotations

import sys

sys.path.insert(0, ".")  # tests.pg

import psycopg

from tests.pg import ADMIN_URL, name_of, url_of


def main() -> None:
    command, *args = sys.argv[1:]
    with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10) as admin:
        if command == "create":
            import uuid

            name = f"agentlog_ts_{uuid.uuid4().hex[:16]}"
            admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
            print(url_of(name))
        elif command == "drop":
            name = name_of(args[0])
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        else:
            raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main()
