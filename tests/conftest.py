"""Suite-wide rules."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import pytest

_outlived: list[threading.Thread] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A skipped test is a check that did not run: fail the run instead of
    # letting it pass quietly (e.g. a backend whose service was unreachable).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; every test must run")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    # A thread the tests left running would keep the interpreter from exiting
    # after the summary (CI would wait for its own time limit): name it, fail the
    # run, and end the process anyway (pytest_unconfigure).
    deadline = time.monotonic() + 5
    while (left := _non_daemon_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        _outlived.extend(left)
        frames = sys._current_frames()
        for thread in left:
            stack = "".join(traceback.format_stack(frames.get(thread.ident or 0)))
            reporter.write_line(f"FAILED: thread {thread.name!r} outlived the tests:\n{stack}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _non_daemon_threads() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _outlived:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(pytest.ExitCode.TESTS_FAILED))
