"""AppendStream on the wire and across restarts: what the writers rely on (the
contract suite runs the writers themselves on every backend)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from prometheus_client import REGISTRY

from agentlog import (
    AbortedError,
    AgentlogClient,
    AlreadyExistsError,
    AppendEvent,
    AsyncAgentlogClient,
    PermissionDeniedError,
    UnauthenticatedError,
)
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server._auth import RELOAD_CHECK_SECONDS, Authenticator
from agentlog.server._guard import RECHECK_SECONDS
from agentlog.server._tail import describe
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc
from tests.contract import delta
from tests.servers import running_server, serve_process
from tests.test_auth import TOKENS, entry


def _append(session: str, text: str, **fields: Any) -> pb.AppendRequest:
    return pb.AppendRequest(
        session_id=session,
        event=pb.AgentEvent(text_delta=pb.TextDelta(run_id="r", session_id=session, delta=text)),
        **fields,
    )


def _info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    call: Any = error
    for key, value in call.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError("no ErrorInfo in the status")


def test_appends_in_one_message_or_many_are_answered_in_order_with_their_events() -> None:
    with running_server(MemorySessionRepository()) as target, grpc.insecure_channel(target) as ch:
        stub = session_pb2_grpc.SessionRepositoryStub(ch)
        messages = [
            pb.AppendStreamRequest(appends=[_append("wire", f"{n}-{m}") for m in range(n + 1)])
            for n in range(4)
        ]
        messages.append(pb.AppendStreamRequest(appends=[_append("wire", "bare", omit_event=True)]))
        records = [r for response in stub.AppendStream(iter(messages)) for r in response.records]
        assert [r.sequence for r in records] == list(range(1, 12))
        texts = [r.event.text_delta.delta for r in records]
        assert texts[:10] == [f"{n}-{m}" for n in range(4) for m in range(n + 1)]
        assert not records[-1].HasField("event")  # omit_event holds append by append


def test_a_message_that_does_not_parse_ends_the_stream_after_what_came_before() -> None:
    with running_server(MemorySessionRepository()) as target, grpc.insecure_channel(target) as ch:
        raw = ch.stream_stream(
            "/agentlog.v1.SessionRepository/AppendStream",
            request_serializer=lambda data: data,
            response_deserializer=pb.AppendStreamResponse.FromString,
        )
        good = pb.AppendStreamRequest(appends=[_append("raw", "a"), _append("raw", "b")])
        answers: list[pb.EventRecord] = []

        def send() -> None:
            for response in raw(iter([good.SerializeToString(), b"\xff\xff\xff"])):
                answers.extend(response.records)

        with pytest.raises(grpc.RpcError) as refused:
            send()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = _info(refused.value)
        assert (info.reason, info.metadata["stream_index"]) == ("MALFORMED_REQUEST", "2")
        assert [r.sequence for r in answers] == [1, 2]
        stub = session_pb2_grpc.SessionRepositoryStub(ch)
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.AppendStream(iter([pb.AppendStreamRequest()])))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at least one append" in str(empty.value.details())


def test_a_bad_append_in_the_middle_is_refused_with_its_index_and_field() -> None:
    with running_server(MemorySessionRepository()) as target, grpc.insecure_channel(target) as ch:
        stub = session_pb2_grpc.SessionRepositoryStub(ch)
        message = pb.AppendStreamRequest(
            appends=[_append("mid", "a"), _append("mid", "b", id="not-a-uuid"), _append("mid", "c")]
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.AppendStream(iter([message])))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _info(refused.value).metadata["stream_index"] == "1"
        head = stub.Head(pb.HeadRequest(session_id="mid"))
        assert head.record.sequence == 1  # the append before it is stored, none after


def test_a_writers_grant_holds_append_by_append(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    path.write_text(json.dumps({"callers": [entry("writer", ["read", "append"], ["team-a-"])]}))
    authenticator = Authenticator(path, None)
    with (
        running_server(MemorySessionRepository(), authenticator=authenticator) as target,
        AgentlogClient(target, token=TOKENS["writer"]) as client,
    ):
        writer = client.writer()
        ok = writer.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "ok")))
        outside = writer.append(AppendEvent(session_id="team-b-1", event=delta("team-b-1", "no")))
        with pytest.raises(PermissionDeniedError) as denied:
            writer.close()
        assert ok.result().sequence == 1
        assert outside.exception() is denied.value
        assert denied.value.metadata["stream_index"] == "1"
        with AgentlogClient(target, token=TOKENS["writer"]) as reader:
            assert len(reader.load_session("team-a-1")) == 1


def test_append_streams_are_counted_as_bidi_streams_in_the_metrics() -> None:
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "agentlog.v1.SessionRepository",
        "grpc_method": "AppendStream",
        "grpc_code": "OK",
    }
    before = REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0
    with (
        running_server(MemorySessionRepository()) as target,
        AgentlogClient(target) as client,
        client.writer() as writer,
    ):
        writer.append(AppendEvent(session_id="m", event=delta("m", "x")))
    assert REGISTRY.get_sample_value("grpc_server_handled_total", labels) == before + 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_a_writer_outlives_a_server_restart_and_stores_every_event_once(
    tmp_path: Path, client_kind: str
) -> None:
    """The server stops (SIGTERM) in the middle of a writer's stream and comes back on
    the same port: every event is stored once, in the order appended."""
    address = f"127.0.0.1:{_free_port()}"
    first = serve_process(tmp_path, addr=address)
    total = 3000
    session = f"restart-{uuid.uuid4()}"
    events = [AppendEvent(session_id=session, event=delta(session, f"{n}")) for n in range(total)]
    restarted: list[Any] = []

    def restart() -> None:
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(30)
        restarted.append(serve_process(tmp_path, addr=address))

    try:
        if client_kind == "sync":
            with AgentlogClient(address, retries=12) as client, client.writer() as writer:
                futures = [writer.append(event) for event in events[: total // 3]]
                restarting = threading.Thread(target=restart)
                restarting.start()  # while appends are on their way
                futures += [writer.append(event) for event in events[total // 3 :]]
                restarting.join()
            records = [future.result(timeout=60) for future in futures]
        else:

            async def write() -> list[Any]:
                async with (
                    AsyncAgentlogClient(address, retries=12) as client,
                    client.writer() as writer,
                ):
                    futures = [await writer.append(event) for event in events[: total // 3]]
                    restarting = asyncio.ensure_future(asyncio.to_thread(restart))
                    futures += [await writer.append(event) for event in events[total // 3 :]]
                    await restarting
                return [await future for future in futures]

            records = asyncio.run(write())
        assert [r.sequence for r in records] == list(range(1, total + 1))
        with AgentlogClient(address) as reader:
            stored = reader.load_session(session)
        assert [r.event for r in stored] == [e.event for e in events]
        assert stored == records
    finally:
        for running in (first, *restarted):
            running.process.terminate()
            running.process.wait(30)
    with JsonlSessionRepository(tmp_path) as reopened:
        assert len(reopened.load_session(session)) == total


def test_a_writers_stream_ends_when_its_credential_is_withdrawn(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    path.write_text(json.dumps({"callers": [entry("writer", ["read", "append"], ["team-a-"])]}))
    repo = MemorySessionRepository()
    with (
        running_server(repo, authenticator=Authenticator(path, None)) as target,
        AgentlogClient(target, token=TOKENS["writer"]) as client,
    ):
        writer = client.writer()
        first = writer.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "ok")))
        assert first.result(timeout=10).sequence == 1
        path.write_text(json.dumps({"callers": []}))  # the token is withdrawn
        time.sleep(RELOAD_CHECK_SECONDS + RECHECK_SECONDS + 0.5)

        def append_again() -> None:
            # Refused at once if the writer already saw its stream end, else at close.
            writer.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "no")))
            writer.close()

        with pytest.raises(UnauthenticatedError):
            append_again()
    assert len(repo.load_session("team-a-1")) == 1


def test_tail_shows_streamed_events_as_it_shows_appended_ones() -> None:
    """What `agentlog tail` prints of a session written by a writer is what it prints of
    the same events appended one by one (their times apart)."""
    with running_server(MemorySessionRepository()) as target, AgentlogClient(target) as client:
        for n in range(5):
            client.append(AppendEvent(session_id="one", event=delta("one", f"t{n}")))
        with client.writer() as writer:
            for n in range(5):
                writer.append(AppendEvent(session_id="one-w", event=delta("one", f"t{n}")))

        def lines(session: str) -> list[str]:
            shown = [describe(record) for record in client.load_session(session)]
            return [line.split(None, 2)[0] + " " + line.split(None, 2)[2] for line in shown if line]

        assert lines("one-w") == lines("one")
        assert len(lines("one")) == 5


def test_a_refusal_naming_a_session_the_writer_may_not_read_is_told_without_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "access.json"
    callers = [entry("writer", ["read", "append"], ["team-a-"]), entry("admin", ["admin"], [])]
    path.write_text(json.dumps({"callers": callers}))
    taken = str(uuid.uuid4())
    with (
        running_server(MemorySessionRepository(), authenticator=Authenticator(path, None)) as t,
        AgentlogClient(t, token=TOKENS["admin"]) as admin,
        AgentlogClient(t, token=TOKENS["writer"]) as client,
    ):
        admin.append(AppendEvent(session_id="team-b-1", event=delta("team-b-1", "x"), id=taken))
        writer = client.writer()
        refused = writer.append(
            AppendEvent(session_id="team-a-1", event=delta("team-a-1", "y"), id=taken)
        )
        behind = writer.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "z")))
        with pytest.raises(AlreadyExistsError) as raised:
            writer.close()
        assert "team-b-1" not in str(raised.value)
        assert "team-b-1" not in str(raised.value.metadata)
        assert raised.value.metadata["stream_index"] == "0"
        assert refused.exception() is raised.value
        assert isinstance(behind.exception(), AbortedError)
