"""Any JSON value goes in and comes out identical: through the store, the wire and the client."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentlog import AgentlogClient, AppendEvent, ToolCall, ToolCallRequested
from agentlog._records import format_timestamp, new_record_ids, parse_timestamp
from agentlog.server import JsonlSessionRepository
from agentlog.server.postgres import PostgresBackend
from tests.pg import database
from tests.servers import running_server
from tests.test_arcan_fixtures import identical

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)


@pytest.fixture(scope="module", params=["jsonl", "postgresql"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentlogClient]:
    if request.param == "jsonl":
        repo = JsonlSessionRepository(tmp_path_factory.mktemp("data"), sync=False)
        with running_server(repo) as target, AgentlogClient(target) as client:
            yield client
        return
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend) as target, AgentlogClient(target) as client:
            yield client


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_any_json_value_round_trips_identically(client: AgentlogClient, value: Any) -> None:
    session = f"json-{uuid.uuid4()}"
    event = ToolCallRequested(
        run_id="r",
        session_id=session,
        iteration=0,
        call=ToolCall(call_id="c", tool_name="t", input=value),
    )
    stored = client.append(AppendEvent(session_id=session, event=event))
    [loaded] = client.load_session(session)
    assert loaded == stored
    assert isinstance(loaded.event, ToolCallRequested)
    assert identical(loaded.event.call.input, value)


@given(
    st.integers(min_value=-62_135_596_800 * 10**9, max_value=253_402_300_799 * 10**9 + 999_999_999)
)
def test_timestamps_round_trip_to_the_nanosecond(timestamp_ns: int) -> None:
    assert parse_timestamp(format_timestamp(timestamp_ns)) == timestamp_ns


@pytest.mark.parametrize(
    ("timestamp_ns", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_500_000_000, "1970-01-01T00:00:01.500Z"),
        (1_000_001_000, "1970-01-01T00:00:01.000001Z"),
        (1_764_034_418_853_460_046, "2025-11-25T01:33:38.853460046Z"),
        (1_764_034_418_853_960_800, "2025-11-25T01:33:38.853960800Z"),
    ],
)
def test_timestamps_are_written_as_chrono_writes_them(timestamp_ns: int, text: str) -> None:
    assert format_timestamp(timestamp_ns) == text
    assert parse_timestamp(text) == timestamp_ns


def test_other_offsets_are_read(tmp_path: Path) -> None:
    assert parse_timestamp("2026-11-25T02:33:38.5+01:00") == parse_timestamp(
        "2026-11-25T01:33:38.500Z"
    )
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_timestamp("yesterday")


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-25T01:33:38.Z",
        "2026-11-25T01:33:38.1234567890Z",
        "2026-13-25T01:33:38Z",
        "2026-11-25T01:33:3xZ",
        "2026-11-25T01:33:38.12a4Z",
        "2026-11-25T01:33:38.\u0663Z",
        "\u0662026-11-25T01:33:38Z",
        "2026-11-25 01:33:38",
    ],
)
def test_malformed_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"RFC 3339|valid date"):
        parse_timestamp(text)


def test_new_record_ids_are_canonical_random_uuids() -> None:
    ids = new_record_ids(2000)
    assert len(set(ids)) == 2000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every variant digit turns up, so the bits are all random where they may be.
    assert {text[19] for text in ids} == set("89ab")
