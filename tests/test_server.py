"""The server as any gRPC caller meets it: raw generated stubs, health, reflection, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from agentlog import AgentlogClient, AppendEvent, NewEvent, ServerError, UnavailableError
from agentlog.errors import CancelledError
from agentlog.server import JsonlSessionRepository
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc
from tests.contract import delta, started
from tests.servers import running_server, served

MAX_MESSAGE = 64 * 1024


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def channel(data: Path) -> Iterator[grpc.Channel]:
    repo = JsonlSessionRepository(data)
    with (
        running_server(repo, max_message_bytes=MAX_MESSAGE) as target,
        grpc.insecure_channel(target) as channel,
    ):
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> Any:
    return session_pb2_grpc.SessionRepositoryStub(channel)


def call_error(function: Any, request: Any) -> grpc.RpcError:
    def call() -> None:
        result = function(request, timeout=10)
        if not hasattr(result, "record"):
            list(result)  # drain a stream

    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def field_violation(error: Any) -> str | None:
    status = rpc_status.from_call(error)
    assert status is not None, "every error carries rich details"
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return str(bad_request.field_violations[0].field)
    return None


def text_delta(session: str = "s") -> pb.AgentEvent:
    return pb.AgentEvent(
        text_delta=pb.TextDelta(run_id="r", session_id=session, iteration=1, delta="hi")
    )


def tool_call(json_text: str) -> pb.AgentEvent:
    return pb.AgentEvent(
        tool_call_requested=pb.ToolCallRequested(
            run_id="r",
            session_id="s",
            iteration=1,
            call=pb.ToolCall(call_id="c", tool_name="t", input=pb.JsonValue(json=json_text)),
        )
    )


@pytest.mark.parametrize(
    ("request_", "field", "message"),
    [
        (pb.AppendRequest(session_id="s"), "event", "event: is required"),
        (pb.AppendRequest(session_id="s", event=pb.AgentEvent()), "event", "no event kind is set"),
        (pb.AppendRequest(session_id="../x", event=text_delta()), "session_id", "path separator"),
        (pb.AppendRequest(session_id="", event=text_delta()), "session_id", "it is empty"),
        (
            pb.AppendRequest(session_id="s", parent_id="", event=text_delta()),
            "parent_id",
            "must not be empty",
        ),
        (
            pb.AppendRequest(
                session_id="s",
                event=pb.AgentEvent(
                    model_output=pb.ModelOutput(run_id="r", session_id="s", iteration=1)
                ),
            ),
            "event.model_output.stop_reason",
            "must be set",
        ),
        (
            pb.AppendRequest(
                session_id="s",
                event=pb.AgentEvent(
                    run_finished=pb.RunFinished(
                        run_id="r",
                        session_id="s",
                        reason=99,  # type: ignore[arg-type]
                    )
                ),
            ),
            "event.run_finished.reason",
            "unknown value 99",
        ),
        (
            pb.AppendRequest(
                session_id="s",
                event=pb.AgentEvent(tool_call_requested=pb.ToolCallRequested(run_id="r")),
            ),
            "event.tool_call_requested.call",
            "is required",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call("{not json")),
            "event.tool_call_requested.call.input",
            "not valid JSON text",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call('{"a": 1, "a": 2}')),
            "event.tool_call_requested.call.input",
            "appears more than once",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call("[18446744073709551616]")),
            "event.tool_call_requested.call.input",
            "outside the 64-bit range",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call('{"x": NaN}')),
            "event.tool_call_requested.call.input",
            "NaN is not a JSON number",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call("1e999")),
            "event.tool_call_requested.call.input",
            "not a JSON number",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call("")),
            "event.tool_call_requested.call.input",
            "json text is empty",
        ),
        (
            pb.AppendRequest(session_id="s", event=tool_call("1 2")),
            "event.tool_call_requested.call.input",
            "not valid JSON text",
        ),
    ],
)
def test_malformed_appends_get_invalid_argument_naming_the_field(
    stub: Any, data: Path, request_: pb.AppendRequest, field: str, message: str
) -> None:
    error: Any = call_error(stub.Append, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert field_violation(error) == field
    assert list(data.glob("*.jsonl")) == []  # nothing written


def test_reads_validate_their_ids(stub: Any) -> None:
    for method, request_ in [
        (stub.LoadSession, pb.LoadSessionRequest(session_id="a/b")),
        (stub.Head, pb.HeadRequest(session_id="")),
        (stub.SubscribeSession, pb.SubscribeSessionRequest(session_id="x\x00y")),
    ]:
        error: Any = call_error(method, request_)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_json_text_is_stored_compact_and_exact(stub: Any, data: Path) -> None:
    text = '{ "b" : [ 9007199254740993 , 1.5e300 , -0.0 ],\n  "a" : { } }'
    response = stub.Append(pb.AppendRequest(session_id="s", event=tool_call(text)), timeout=10)
    stored = response.record.event.tool_call_requested.call.input.json
    # Same values, compact; the float is spelled as Python spells it (1.5e+300).
    assert stored == '{"b":[9007199254740993,1.5e+300,-0.0],"a":{}}'
    line = (data / "s.jsonl").read_text()
    assert line.count("\n") == 1  # newlines inside JSON never split a line
    assert '"input":{"b":[9007199254740993,1.5e+300,-0.0],"a":{}}' in line


def test_appends_answer_without_events_when_asked(stub: Any) -> None:
    event = pb.AgentEvent(run_started=pb.RunStarted(run_id="r", session_id="s", provider="p"))
    full = stub.Append(pb.AppendRequest(session_id="s", event=event), timeout=10).record
    bare = stub.Append(
        pb.AppendRequest(session_id="s", event=event, omit_event=True), timeout=10
    ).record
    assert full.event == event
    assert not bare.HasField("event")
    assert (bare.sequence, bare.session_id) == (2, "s")
    assert bare.timestamp.seconds > 0
    assert bare.id
    assert bare.id != full.id
    items = [pb.BatchEvent(event=event, parent_id=full.id) for _ in range(3)]
    batch = stub.AppendBatch(
        pb.AppendBatchRequest(session_id="s", events=items, omit_events=True), timeout=10
    )
    assert [(r.sequence, r.parent_id, r.HasField("event")) for r in batch.records] == [
        (3, full.id, False),
        (4, full.id, False),
        (5, full.id, False),
    ]
    again = stub.AppendBatch(
        pb.AppendBatchRequest(
            session_id="s",
            events=[pb.BatchEvent(id=r.id, event=event, parent_id=full.id) for r in batch.records],
        ),
        timeout=10,
    )  # a retry, answered with the records as stored, events and all
    assert [(r.id, r.sequence, r.timestamp) for r in again.records] == [
        (r.id, r.sequence, r.timestamp) for r in batch.records
    ]
    assert all(r.event == event for r in again.records)


def test_an_oversized_request_is_resource_exhausted_and_writes_nothing(
    stub: Any, data: Path
) -> None:
    big = pb.AppendRequest(
        session_id="s",
        event=pb.AgentEvent(
            text_delta=pb.TextDelta(run_id="r", session_id="s", delta="x" * (MAX_MESSAGE + 1))
        ),
    )
    error: Any = call_error(stub.Append, big)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not (data / "s.jsonl").exists()
    # Just under the limit is fine.
    fits = pb.AppendRequest(session_id="s", event=text_delta())
    fits.event.text_delta.delta = "x" * (MAX_MESSAGE - 200)
    stub.Append(fits, timeout=10)
    assert (data / "s.jsonl").exists()


def test_head_of_an_empty_session_is_a_normal_answer(stub: Any) -> None:
    response = stub.Head(pb.HeadRequest(session_id="nobody"), timeout=10)
    assert not response.HasField("record")


def test_streams_come_in_bounded_chunks(stub: Any) -> None:
    for _i in range(600):
        stub.Append(pb.AppendRequest(session_id="long", event=text_delta("long")), timeout=10)
    chunks = list(stub.LoadSession(pb.LoadSessionRequest(session_id="long"), timeout=10))
    assert [len(c.records) for c in chunks] == [256, 256, 88]


def test_a_storage_failure_is_internal_with_a_clean_message(data: Path) -> None:
    repo = JsonlSessionRepository(data)
    (data / "weird.jsonl").mkdir()  # the session's "file" is a directory
    with (
        running_server(repo) as target,
        AgentlogClient(target) as client,
        pytest.raises(ServerError) as caught,
    ):
        client.load_session("weird")
    assert caught.value.reason == "INTERNAL"
    assert "LoadSession failed inside the server (IsADirectoryError)" in caught.value.message
    assert "Traceback" not in caught.value.message


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "agentlog.v1.SessionRepository"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="agentlog.v1.SessionRepository"
        ),
    ]
    listed, described = list(reflection.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert "agentlog.v1.SessionRepository" in names
    assert "grpc.health.v1.Health" in names
    assert described.file_descriptor_response.file_descriptor_proto


def test_an_unreachable_server_is_unavailable() -> None:
    with AgentlogClient("127.0.0.1:1", timeout=5) as client, pytest.raises(UnavailableError):
        client.head("s")


# --- the `agentlog` command ---


def agentlog(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_port(process: subprocess.Popen[str]) -> tuple[int, str]:
    """The port from the "serving on" line, and every line logged up to it (warnings at
    start come before it)."""
    assert process.stderr is not None
    seen = []
    while line := process.stderr.readline():
        seen.append(line)
        found = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if found:
            return int(found.group(1)), "".join(seen)
    raise AssertionError(f"the server did not start: {''.join(seen)}")


def test_help_explains_every_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for word in (
        "--addr",
        "AGENTLOG_ADDR",
        "--data-dir",
        "AGENTLOG_DATA_DIR",
        "--max-message-bytes",
        "--grace",
        "127.0.0.1:50051",
        "./data",
    ):
        assert word in result.stdout
    top = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "serve" in top.stdout


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_logs_start_and_stop_and_stops_on_signal(data: Path, signum: signal.Signals) -> None:
    process = agentlog(
        "serve", env={"AGENTLOG_ADDR": "127.0.0.1:0", "AGENTLOG_DATA_DIR": str(data)}
    )
    try:
        port, start_line = wait_for_port(process)
        assert str(data.resolve()) in start_line
        assert re.search(r"agentlog \d+\.\d+\.\d+", start_line)
        with AgentlogClient(f"127.0.0.1:{port}") as client:
            client.append(AppendEvent(session_id="cli", event=started("cli")))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0
    lines = stderr.strip().splitlines()
    assert f"{signum.name} received: stopping" in lines[0]  # the signal is said at once
    assert "stopped after" in lines[-1]
    assert len(lines) <= 3
    assert (data / "cli.jsonl").exists()


def test_sigterm_during_appends_leaves_no_torn_line_and_keeps_every_ack(data: Path) -> None:
    process = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data), "--grace", "5")
    acknowledged: list[str] = []
    failures: list[BaseException] = []
    try:
        port, _ = wait_for_port(process)

        def write(n: int) -> None:
            with AgentlogClient(f"127.0.0.1:{port}", timeout=10) as client:
                for i in range(10_000):
                    try:
                        record = client.append(
                            AppendEvent(session_id="load", event=delta("load", f"{n}-{i}"))
                        )
                    except (UnavailableError, CancelledError):
                        # The server went away; grpc core answers calls that
                        # arrive during shutdown with either status. Neither
                        # is an acknowledgement.
                        return
                    except BaseException as exc:
                        failures.append(exc)
                        return
                    acknowledged.append(record.id)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        for thread in threads:
            thread.join(30)
    finally:
        process.kill()
    assert process.returncode == 0
    assert failures == []
    raw = (data / "load.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    stored = [json.loads(line)["id"] for line in raw.splitlines()]
    assert len(acknowledged) > 0
    assert set(acknowledged) <= set(stored)  # every acknowledged append is on disk
    assert len(stored) == len(set(stored))


def test_a_busy_address_is_a_clear_startup_error(data: Path) -> None:
    first = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
    try:
        port, _ = wait_for_port(first)
        second = agentlog("serve", "--addr", f"127.0.0.1:{port}", "--data-dir", str(data / "2"))
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_wrong_expected_sequence_carries_the_actual_sequence(stub: Any) -> None:
    stub.Append(pb.AppendRequest(session_id="s", event=text_delta()), timeout=10)
    error: Any = call_error(
        stub.Append, pb.AppendRequest(session_id="s", event=text_delta(), expected_sequence=0)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(error)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "WRONG_EXPECTED_SEQUENCE"
    assert info.domain == "agentlog"
    assert dict(info.metadata) == {
        "session_id": "s",
        "branch_id": "main",
        "expected_sequence": "0",
        "actual_sequence": "1",
    }


@pytest.mark.parametrize(
    ("method", "request_", "field"),
    [
        ("AppendBatch", pb.AppendBatchRequest(session_id="s"), "events"),
        (
            "AppendBatch",
            pb.AppendBatchRequest(session_id="s", events=[pb.BatchEvent()]),
            "events[0].event",
        ),
        (
            "AppendBatch",
            pb.AppendBatchRequest(
                session_id="s", events=[pb.BatchEvent(id="nope", event=text_delta())]
            ),
            "events[0].id",
        ),
        (
            "AppendBatch",
            pb.AppendBatchRequest(
                session_id="s",
                events=[
                    pb.BatchEvent(id="0c7421a5-7c6f-4b3e-8517-6757d1e510f2", event=text_delta()),
                    pb.BatchEvent(id="0c7421a5-7c6f-4b3e-8517-6757d1e510f2", event=text_delta()),
                ],
            ),
            "events[1].id",
        ),
        (
            "AppendBatch",
            pb.AppendBatchRequest(
                session_id="s",
                events=[
                    pb.BatchEvent(event=text_delta()),
                    pb.BatchEvent(event=text_delta(), parent_id=""),
                ],
            ),
            "events[1].parent_id",
        ),
        (
            "AppendBatch",
            pb.AppendBatchRequest(
                session_id="s",
                events=[
                    pb.BatchEvent(id="0c7421a5-7c6f-4b3e-8517-6757d1e510f2", event=text_delta()),
                    pb.BatchEvent(
                        id="1c7421a5-7c6f-4b3e-8517-6757d1e510f2",
                        event=pb.AgentEvent(
                            model_output=pb.ModelOutput(run_id="r", session_id="s", iteration=1)
                        ),
                    ),
                ],
            ),
            "events[1].event.model_output.stop_reason",
        ),
        ("Append", pb.AppendRequest(session_id="s", id="NOPE", event=text_delta()), "id"),
        ("LoadSession", pb.LoadSessionRequest(session_id="s", direction=7), "direction"),  # type: ignore[arg-type]
        ("ListSessions", pb.ListSessionsRequest(page_size=5000), "page_size"),
        ("ListSessions", pb.ListSessionsRequest(page_token="!!"), "page_token"),
    ],
)
def test_new_rpcs_validate_their_requests(
    stub: Any, data: Path, method: str, request_: Any, field: str
) -> None:
    error: Any = call_error(getattr(stub, method), request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violation(error) == field
    assert not (data / "s.jsonl").exists()


def test_appends_are_retried_until_the_server_comes_up(data: Path) -> None:
    import socket

    with socket.socket() as probe:  # a free port, with nothing listening yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result: list[Any] = []
    # Enough retries to outlast a slow start on a busy machine (the backoff is random).
    with AgentlogClient(f"127.0.0.1:{port}", timeout=2, retries=100) as client:
        thread = threading.Thread(
            target=lambda: result.append(
                client.append(AppendEvent(session_id="late", event=started("late")))
            )
        )
        thread.start()
        time.sleep(0.5)
        repo = JsonlSessionRepository(data)
        with served(repo, port):
            thread.join(30)
            assert len(result) == 1
            assert [r.id for r in repo.load_session("late")] == [result[0].id]


def test_tail_prints_the_last_events_then_live_ones(data: Path) -> None:
    repo = JsonlSessionRepository(data)
    with running_server(repo) as target:
        with AgentlogClient(target) as client:
            for i in range(12):
                client.append(AppendEvent(session_id="watch", event=delta("watch", f"old {i}")))
        process = subprocess.Popen(
            [sys.executable, "-m", "agentlog.server", "tail", "watch", "--addr", target, "-n", "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            first = [process.stdout.readline() for _ in range(3)]
            with AgentlogClient(target) as client:
                client.append(AppendEvent(session_id="watch", event=delta("watch", "new\nline é")))
            live = process.stdout.readline()
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(10)
    assert [line.split()[0] for line in first] == ["#10", "#11", "#12"]
    assert "text_delta" in first[0]
    assert 'delta="old 9"' in first[0]
    assert live.startswith("#13")
    assert 'delta="new\\nline é"' in live  # one line, control characters visible
    assert process.returncode == 0


def test_a_second_server_on_the_same_data_directory_refuses_to_start(data: Path) -> None:
    first = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
    try:
        wait_for_port(first)
        second = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
        _, stderr = second.communicate(timeout=30)
        assert second.returncode == 1
        assert f"in use by another agentlog process (pid {first.pid})" in stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    # The lock went with the process: the directory can be served again.
    third = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
    try:
        wait_for_port(third)
    finally:
        third.kill()  # even a killed server releases it
        third.wait(10)
    fourth = agentlog("serve", "--addr", "127.0.0.1:0", "--data-dir", str(data))
    try:
        wait_for_port(fourth)
    finally:
        fourth.send_signal(signal.SIGTERM)
        fourth.communicate(timeout=30)


def test_tail_all_follows_every_session_with_filters(data: Path) -> None:
    repo = JsonlSessionRepository(data)
    with running_server(repo) as target:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agentlog.server",
                "tail",
                "--all",
                "--addr",
                target,
                "--prefix",
                "team-",
                "--kind",
                "run_started",
                "--kind",
                "text_delta",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            time.sleep(1.0)  # let it subscribe: --all starts from now
            with AgentlogClient(target) as client:
                client.append(AppendEvent(session_id="other", event=started("other")))
                client.append(AppendEvent(session_id="team-a", event=started("team-a")))
                client.append_batch("team-b", [NewEvent(event=delta("team-b", "hi"))])
            lines = [process.stdout.readline() for _ in range(2)]
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(10)
    assert lines[0].startswith("@2 team-a #1 ")
    assert "run_started" in lines[0]
    assert lines[1].startswith("@3 team-b #1 ")
    assert 'delta="hi"' in lines[1]


def test_tail_needs_a_session_or_all() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agentlog.server", "tail"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "name one SESSION, or --all" in result.stderr
