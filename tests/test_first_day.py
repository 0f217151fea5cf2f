"""An operator's first day: a --store agentlog cannot serve is refused at once, saying
why; only what can heal (a database not up yet) is waited for."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.test_command import free_port


def serve(*args: str, timeout: float = 60) -> tuple[int, str, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "serve", "--addr", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stderr, time.monotonic() - start


@pytest.mark.parametrize(
    ("store", "said"),
    [
        ("mysql://root@host/x", "names a mysql: store, which agentlog does not support"),
        ("sqlite:///tmp/x.db", "names a sqlite: store"),
        ("postgresql://postgres@127.0.0.1:abc/agentlog", 'invalid integer value "abc"'),
        ("postgresql://postgres@127.0.0.1:5432/no_such_database_here", "does not exist"),
        ("postgresql://no_such_role@127.0.0.1:5432/postgres", 'role "no_such_role"'),
    ],
)
def test_a_store_that_can_never_be_served_is_refused_at_once_with_the_cause(
    store: str, said: str
) -> None:
    code, stderr, took = serve("--store", store, "--connect-timeout", "30")
    assert code == 1, stderr
    assert said in stderr
    assert took < 10  # not the connect timeout
    assert "Traceback" not in stderr


def test_a_database_that_does_not_answer_yet_is_waited_for_then_named() -> None:
    port = free_port()  # nothing listens there
    code, stderr, took = serve(
        "--store", f"postgresql://postgres@127.0.0.1:{port}/postgres", "--connect-timeout", "2"
    )
    assert code == 1
    assert "could not connect to PostgreSQL" in stderr
    assert "within 2 s" in stderr
    assert took >= 2
