"""Statuses a caller can trust: what the caller did wrong is INVALID_ARGUMENT naming the
field, never UNKNOWN or INTERNAL; what agentlog accepts, a default client reads back."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from agentlog import (
    AgentlogClient,
    AppendEvent,
    InvalidArgumentError,
    NewEvent,
    TextDelta,
    ToolCall,
    ToolCallRequested,
)
from agentlog._json import MAX_DEPTH
from agentlog.server import JsonlSessionRepository, MemorySessionRepository
from agentlog.server._rules import MAX_RECORD_BYTES
from agentlog.v1 import session_pb2 as pb
from tests.servers import running_server


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    with running_server(JsonlSessionRepository(tmp_path / "data")) as target:
        yield target


@pytest.fixture
def client(target: str) -> Iterator[AgentlogClient]:
    with AgentlogClient(target) as client:
        yield client


def raw_call(target: str, method: str, data: bytes) -> grpc.RpcError:
    """Send `data` as the request bytes of a unary method; the error it gets."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            f"/agentlog.v1.SessionRepository/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=10)
    return caught.value


def tool_call_text(json_text: str) -> pb.AppendRequest:
    return pb.AppendRequest(
        session_id="s",
        event=pb.AgentEvent(
            tool_call_requested=pb.ToolCallRequested(
                run_id="r",
                session_id="s",
                iteration=1,
                call=pb.ToolCall(call_id="c", tool_name="t", input=pb.JsonValue(json=json_text)),
            )
        ),
    )


def tool_call(value: Any) -> ToolCallRequested:
    return ToolCallRequested(
        run_id="r",
        session_id="s",
        iteration=1,
        call=ToolCall(call_id="c", tool_name="t", input=value),
    )


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 252, 998, 5000])
def test_json_nested_too_deep_is_invalid_json_on_the_wire(target: str, depth: int) -> None:
    request = tool_call_text("[" * depth + "]" * depth)
    error: Any = raw_call(target, "Append", request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "nested more than" in error.details()
    info = rpc_status.from_call(error)
    assert info is not None


def test_json_at_the_nesting_limit_goes_in_and_comes_out(client: AgentlogClient) -> None:
    value = nested(MAX_DEPTH)
    record = client.append(AppendEvent(session_id="s", event=tool_call(value)))
    stored = client.load_session("s")
    assert stored == [record]
    event = stored[0].event
    assert isinstance(event, ToolCallRequested)
    assert event.call.input == value


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 300, 2000])
def test_json_nested_too_deep_is_refused_by_the_client_before_sending(
    client: AgentlogClient, depth: int
) -> None:
    with pytest.raises(InvalidArgumentError, match="nested more than") as caught:
        client.append(AppendEvent(session_id="s", event=tool_call(nested(depth))))
    assert caught.value.reason == "INVALID_JSON"
    assert caught.value.field == "event.tool_call_requested.call.input"
    with pytest.raises(InvalidArgumentError, match="nested more than"):
        MemorySessionRepository().append(
            AppendEvent(session_id="s", event=tool_call(nested(depth)))
        )


@pytest.mark.parametrize("digits", [21, 4301, 100_000])
def test_integers_of_many_digits_are_invalid_json(
    target: str, client: AgentlogClient, digits: int
) -> None:
    error: Any = raw_call(target, "Append", tool_call_text("9" * digits).SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "outside the 64-bit range" in error.details()
    assert len(error.details()) < 500  # the number is not spelled out
    with pytest.raises(InvalidArgumentError, match="outside the 64-bit range") as caught:
        client.append(AppendEvent(session_id="s", event=tool_call(10 ** (digits - 1))))
    assert caught.value.field == "event.tool_call_requested.call.input"


@pytest.mark.parametrize(
    "method", ["Append", "AppendBatch", "Head", "ListSessions", "LoadSession", "LoadChildren"]
)
def test_bytes_that_are_not_the_request_message_are_invalid_argument(
    target: str, method: str
) -> None:
    with grpc.insecure_channel(target) as channel:
        streaming = method in ("LoadSession", "LoadChildren")
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(
            f"/agentlog.v1.SessionRepository/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

        def send() -> None:
            result = call(b"\x0a\x05ab", timeout=10)  # a field longer than the bytes left
            if streaming:
                list(result)

        with pytest.raises(grpc.RpcError) as caught:
            send()
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid agentlog.v1." in error.details()
    assert "Traceback" not in error.details()


def test_a_string_field_with_bad_utf8_is_invalid_argument(target: str) -> None:
    error: Any = raw_call(target, "Append", b"\x0a\x02\xff\xfe")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid agentlog.v1.AppendRequest" in error.details()


def test_the_largest_record_accepted_is_read_back_by_a_default_client(
    client: AgentlogClient, target: str
) -> None:
    text = "x" * (MAX_RECORD_BYTES - 400)
    event = TextDelta(run_id="r", session_id="big", iteration=1, delta=text)
    record = client.append(AppendEvent(session_id="big", event=event))
    assert client.head("big") == record
    assert client.load_session("big") == [record]
    with grpc.insecure_channel(target) as channel:  # no client limits raised
        stub: Any = pb_stub(channel)
        answer = stub.Append(
            pb.AppendRequest(
                session_id="big",
                event=pb.AgentEvent(
                    text_delta=pb.TextDelta(run_id="r", session_id="big", iteration=1, delta=text)
                ),
            ),
            timeout=30,
        )
        assert answer.record.sequence == 2
        assert stub.Head(pb.HeadRequest(session_id="big"), timeout=30).record.sequence == 2
        chunks = list(stub.LoadSession(pb.LoadSessionRequest(session_id="big"), timeout=30))
        assert sum(len(c.records) for c in chunks) == 2


def test_a_record_too_large_to_read_back_is_refused_and_nothing_is_written(
    client: AgentlogClient, tmp_path: Path
) -> None:
    text = "x" * (MAX_RECORD_BYTES + 10)
    event = TextDelta(run_id="r", session_id="big", iteration=1, delta=text)
    with pytest.raises(InvalidArgumentError, match="store large payloads elsewhere") as caught:
        client.append(AppendEvent(session_id="big", event=event))
    assert caught.value.reason == "RECORD_TOO_LARGE"
    with pytest.raises(InvalidArgumentError, match=r"events\[1\]"):
        client.append_batch(
            "big",
            [
                NewEvent(event=TextDelta(run_id="r", session_id="big", iteration=1, delta="")),
                NewEvent(event=event),
            ],
        )
    assert client.load_session("big") == []
    assert (
        not (tmp_path / "data" / "big.jsonl").exists()
        or not (tmp_path / "data" / "big.jsonl").read_bytes()
    )


def test_a_batch_whose_answer_would_be_too_large_asks_for_omit_events(target: str) -> None:
    events = [
        pb.BatchEvent(
            event=pb.AgentEvent(
                text_delta=pb.TextDelta(run_id="r", session_id="b", iteration=1, delta="y" * 1000)
            )
        )
        for _ in range(3500)
    ]
    request = pb.AppendBatchRequest(session_id="b" * 200, events=events)
    error: Any = raw_call(target, "AppendBatch", request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "omit_events" in error.details()
    request.omit_events = True
    with grpc.insecure_channel(target) as channel:
        answer = pb_stub(channel).AppendBatch(request, timeout=60)
    assert len(answer.records) == 3500


def pb_stub(channel: grpc.Channel) -> Any:
    from agentlog.v1 import session_pb2_grpc

    return session_pb2_grpc.SessionRepositoryStub(channel)


@pytest.mark.parametrize(
    "token",
    [
        base64.urlsafe_b64encode(b"s-5").decode().rstrip("="),  # what tokens used to be
        "not base64 !",
        "AA",
        base64.urlsafe_b64encode(b"\x01" + b"\x00" * 16 + b"s-5").decode(),
    ],
)
def test_page_tokens_the_server_did_not_give_out_are_refused(
    client: AgentlogClient, token: str
) -> None:
    for i in range(3):
        client.append(AppendEvent(session_id=f"s-{i}", event=tool_call(None)))
    with pytest.raises(InvalidArgumentError) as caught:
        client.list_sessions(page_token=token)
    assert caught.value.reason == "INVALID_PAGE_TOKEN"


def test_page_tokens_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):
        for i in range(3):
            client.append(AppendEvent(session_id=f"s-{i}", event=tool_call(None)))
        token = client.list_sessions(page_size=1).next_page_token
    assert token is not None
    with (
        JsonlSessionRepository(data) as repo,
        running_server(repo) as target,
        AgentlogClient(target) as client,
    ):
        page = client.list_sessions(page_size=1, page_token=token)
    assert [s.session_id for s in page.sessions] == ["s-1"]
