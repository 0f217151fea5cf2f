"""Running in a mesh: health probes, configuration from the environment, and
connections that age out (GOAWAY) under live subscriptions."""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from agentlog import AgentlogClient, AppendEvent, CaughtUp, FeedRecord
from agentlog.server import MemorySessionRepository
from agentlog.server.cli import build_parser
from agentlog.v1 import session_pb2, session_pb2_grpc
from tests.contract import delta
from tests.servers import running_server
from tests.test_command import free_port


def agentlog_health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentlog.server", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with running_server(MemorySessionRepository()) as address:
        yield address


def test_health_exits_0_when_serving(target: str) -> None:
    result = agentlog_health("--addr", target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{target}: SERVING"
    service = agentlog_health("--addr", target, "--service", "agentlog.v1.SessionRepository")
    assert service.returncode == 0


def test_health_exits_1_for_an_unknown_service_or_no_server_and_2_for_no_address(
    target: str,
) -> None:
    unknown = agentlog_health("--addr", target, "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    nobody = agentlog_health("--addr", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert nobody.returncode == 1
    assert "UNAVAILABLE" in nobody.stderr or "no answer" in nobody.stderr
    bad = agentlog_health("--addr", "not an address")
    assert bad.returncode == 2  # as tail: an address that can never answer
    assert "HOST:PORT" in bad.stderr


def _serve_flags() -> list[argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return [a for a in serve._actions if a.option_strings and a.dest != "help"]


def test_every_serve_flag_has_an_environment_variable() -> None:
    flags = _serve_flags()
    assert len(flags) >= 13
    for action in flags:
        assert "(env AGENTLOG_" in (action.help or ""), action.option_strings


def _follow(items: Iterator[Any], into: list[Any], stop: threading.Event) -> None:
    for item in items:
        if not isinstance(item, CaughtUp):
            into.append(item)
        if stop.is_set():
            return


def test_subscriptions_resume_across_connections_that_age_out() -> None:
    with running_server(
        MemorySessionRepository(), max_connection_age=0.4, max_connection_age_grace=0.2
    ) as target:
        session, total = "aging", 60
        records: list[Any] = []
        feed: list[Any] = []
        done = threading.Event()
        with AgentlogClient(target) as reader, AgentlogClient(target) as writer:
            followers = [
                threading.Thread(
                    target=_follow,
                    args=(reader.subscribe_session(session, from_sequence=1), records, done),
                    daemon=True,
                ),
                threading.Thread(
                    target=_follow,
                    args=(reader.subscribe_all(from_position=1), feed, done),
                    daemon=True,
                ),
            ]
            for follower in followers:
                follower.start()
            started = time.monotonic()
            for n in range(total):
                writer.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))
                time.sleep(0.04)
            assert time.monotonic() - started > 2  # several connection lifetimes
            deadline = time.monotonic() + 30
            while (len(records) < total or len(feed) < total) and time.monotonic() < deadline:
                time.sleep(0.05)
            done.set()
            writer.append(AppendEvent(session_id=session, event=delta(session, "last")))
            for follower in followers:
                follower.join(30)
        # The connections really were cut: a bare stream ends UNAVAILABLE.
        with grpc.insecure_channel(target) as channel:
            stream = session_pb2_grpc.SessionRepositoryStub(channel).SubscribeSession(
                session_pb2.SubscribeSessionRequest(session_id="bare"), timeout=10
            )
            with pytest.raises(grpc.RpcError) as cut:
                for _ in stream:
                    pass
            assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [r.sequence for r in records[:total]] == list(range(1, total + 1))
        assert [i.position for i in feed[:total] if isinstance(i, FeedRecord)] == list(
            range(1, total + 1)
        )
