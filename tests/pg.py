"""A real PostgreSQL for tests: the machine's server, one new database per use.

Tests never mock the database. Each database is created here and dropped
afterwards (its connections cut off), so runs do not see each other's data.
`AGENTLOG_TEST_POSTGRES` (or `AGENTLOG_TEST_PG`) names the server (a URL of its
maintenance database); `make test` sets it (`tools/with_postgres.py`: the machine's
server, or one it starts when none answers).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

ADMIN_URL = (
    os.environ.get("AGENTLOG_TEST_POSTGRES")
    or os.environ.get("AGENTLOG_TEST_PG")
    or "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin() -> psycopg.Connection[tuple[object, ...]]:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"no PostgreSQL answers at {ADMIN_URL} ({exc}); the PostgreSQL tests need one. "
            "Start it (pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main "
            "start) or point AGENTLOG_TEST_POSTGRES at one",
            pytrace=False,
        )


def url_of(name: str, user: str | None = None) -> str:
    """The URL of database `name` on the test server (as `user`, default its own)."""
    params = conninfo_to_dict(ADMIN_URL)
    host, port = str(params.get("host", "127.0.0.1")), params.get("port", 5432)
    user = user or str(params["user"])
    if host.startswith("/"):  # a Unix socket's directory (a server tools/with_postgres.py started)
        query = urllib.parse.urlencode({"host": host, "port": port})
        return f"postgresql://{user}@/{name}?{query}"
    return f"postgresql://{user}@{host}:{port}/{name}"


def name_of(url: str) -> str:
    """The database a URL names (a TCP or a Unix-socket one)."""
    return str(conninfo_to_dict(url)["dbname"])


def control_server(action: str) -> None:
    """Stop or start the test server: the one tools/with_postgres.py started, or else the
    machine's cluster."""
    spec = os.environ.get("AGENTLOG_TEST_POSTGRES_CONTROL")
    if spec:
        found = json.loads(spec)
        if action == "stop":  # a fast shutdown, as pg_ctl asks for it: SIGINT to the postmaster
            pid = int((Path(found["data"]) / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + 60
            while (Path(found["data"]) / "postmaster.pid").exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the test server (pid {pid}) did not stop")
                time.sleep(0.05)
            return
        # As with_postgres started it: on a Unix socket only.
        command = [found["pg_ctl"], "-D", found["data"], "-w", "-l", f"{found['data']}/log"]
        command += ["-o", '-h ""', "-o", f"-k {found['socket']}", "start"]
        subprocess.run(command, check=True, capture_output=True, timeout=120, user=found["user"])
        return
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def psql_target() -> list[str]:
    """psql's options for the test server's host and port."""
    params = conninfo_to_dict(ADMIN_URL)
    return ["-h", str(params.get("host", "127.0.0.1")), "-p", str(params.get("port", 5432))]


@contextmanager
def database() -> Iterator[str]:
    """A new, empty UTF-8 database; yields its URL and drops it afterwards."""
    name = f"agentlog_test_{uuid.uuid4().hex[:16]}"
    with _admin() as admin:
        admin.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    try:
        yield url_of(name)
    finally:
        with _admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def conninfo(url: str) -> str:
    return make_conninfo(url)
