"""The compiled conversions agree with the plan walk they replace, on good input and bad."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from agentlog import _codec, _plans
from agentlog._codec import (
    record_to_json,
    record_to_proto,
)
from agentlog._converters import CHECKED_FIELDS as _FAST_CHECKED_FIELDS
from agentlog._converters import FROM_JSON as _FAST_FROM_JSON
from agentlog._converters import FROM_PROTO as _FAST_FROM_PROTO
from agentlog._converters import PROTO_TO_JSON as _FAST_PROTO_TO_JSON
from agentlog._converters import TO_JSON as _FAST_TO_JSON
from agentlog._converters import TO_PROTO as _FAST_TO_PROTO
from agentlog._lines import (
    record_fields_from_line,
    record_fields_from_lines,
    record_from_line,
    record_proto_from_line,
)
from agentlog._plans import (
    PLANS as _PLANS,
)
from agentlog._plans import (
    from_json as _from_json,
)
from agentlog._plans import (
    from_proto as _from_proto,
)
from agentlog._plans import (
    to_json as _to_json,
)
from agentlog._plans import (
    to_proto as _to_proto,
)
from agentlog._records import EventRecord
from tests.samples import every_event
from tests.test_arcan_fixtures import FIXTURES

EVENTS = every_event("s")
# Values of every kind, for every field: each is wrong somewhere, right elsewhere.
ODD_VALUES: list[Any] = [None, "", "x", "\ud800", 0, -1, 2**64, 1.5, True, {}, []]
ODD_VALUES += ["low", "end_turn"]  # words of closed vocabularies


def through_records(line: bytes, sequence: int) -> Any:
    return record_to_proto(record_from_line(line, sequence))


def outcome(function: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    try:
        return "ok", function(*args)
    except Exception as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_the_compiled_conversions_give_what_the_walk_gives(event: Any) -> None:
    cls, plan = type(event), _PLANS[type(event)]
    as_json = _to_json(event, plan, "e")
    assert _FAST_TO_JSON[cls](event, "e") == as_json
    assert list(_FAST_TO_JSON[cls](event, "e")) == list(as_json)  # key order: arcan's
    assert _FAST_FROM_JSON[cls](as_json, "e") == _from_json(as_json, plan, "e") == event
    message = _to_proto(event, plan)
    assert plan.proto_cls(**_FAST_TO_PROTO[cls](event)) == message
    for strict in (True, False):
        assert _FAST_FROM_PROTO[cls](message, "e", strict) == event
        assert _from_proto(message, plan, "e", strict) == event


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_the_compiled_conversions_refuse_what_the_walk_refuses(event: Any) -> None:
    cls, plan = type(event), _PLANS[type(event)]
    as_json = _to_json(event, plan, "e")
    for field in plan.fields:
        for value in ODD_VALUES:
            odd = dataclasses.replace(event, **{field.name: value})
            fast = outcome(_FAST_TO_JSON[cls], odd, "e")
            assert fast == outcome(_to_json, odd, plan, "e")
            odd_json = {**as_json, field.name: value}
            fast = outcome(_FAST_FROM_JSON[cls], odd_json, "e")
            assert fast == outcome(_from_json, odd_json, plan, "e")
        missing = {k: v for k, v in as_json.items() if k != field.name}
        fast = outcome(_FAST_FROM_JSON[cls], missing, "e")
        assert fast == outcome(_from_json, missing, plan, "e")


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_messages_from_clients_become_the_json_their_events_become(event: Any) -> None:
    cls, plan = type(event), _PLANS[type(event)]
    message = _to_proto(event, plan)
    as_json = _FAST_PROTO_TO_JSON[cls](message, "e")
    assert as_json == _to_json(event, plan, "e")
    assert list(as_json) == list(_to_json(event, plan, "e"))  # key order: arcan's
    event_message = _codec.event_to_proto(event)
    assert _codec.event_json_from_proto(event_message) == _codec.event_to_json(event)


def checked_then_built(event: Any, plan: Any) -> Any:
    _to_json(event, plan, "e")  # raises what is wrong
    return _to_proto(event, plan)


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_a_client_sends_are_checked_as_the_walk_checks_them(event: Any) -> None:
    cls, plan = type(event), _PLANS[type(event)]
    assert plan.proto_cls(**_FAST_CHECKED_FIELDS[cls](event, "e")) == _to_proto(event, plan)
    for field in plan.fields:
        for value in ODD_VALUES:
            odd = dataclasses.replace(event, **{field.name: value})
            fast = outcome(lambda e: plan.proto_cls(**_FAST_CHECKED_FIELDS[cls](e, "e")), odd)
            assert fast == outcome(checked_then_built, odd, plan)


def walk_from_client(message: Any, plan: Any) -> Any:
    return _to_json(_from_proto(message, plan, "e", True), plan, "e")


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_messages_from_clients_are_refused_alike(event: Any) -> None:
    cls, plan = type(event), _PLANS[type(event)]
    for field in plan.fields:
        message = _to_proto(event, plan)
        odd: list[Any] = []
        if field.kind == _plans.ENUM:
            odd = [0, 99]
        elif field.kind == _plans.JSON:
            odd = ["{", "NaN", "1e999", '"\\ud800"', "[1,]", "null", '{"a": 1}']
        elif field.allowed is not None:
            odd = ["", "LOW", "x"]
        for value in odd:
            message = _to_proto(event, plan)
            if field.kind == _plans.JSON:
                getattr(message, field.name).json = value
            else:
                setattr(message, field.name, value)
            fast = outcome(_FAST_PROTO_TO_JSON[cls], message, "e")
            assert fast == outcome(walk_from_client, message, plan)
        if field.kind == _plans.MESSAGE:
            message = _to_proto(event, plan)
            message.ClearField(field.name)
            fast = outcome(_FAST_PROTO_TO_JSON[cls], message, "e")
            assert fast == outcome(walk_from_client, message, plan)


def test_unknown_enum_values_in_a_message_are_refused_alike() -> None:
    event = next(e for e in EVENTS if type(e).__name__ == "ModelOutput")
    cls, plan = type(event), _PLANS[type(event)]
    message = _to_proto(event, plan)
    for number in (0, 99):
        message.stop_reason = number  # type: ignore[attr-defined]
        fast = outcome(_FAST_FROM_PROTO[cls], message, "e", True)
        assert fast[0] == "InvalidArgumentError"
        assert fast == outcome(_from_proto, message, plan, "e", True)
    assert _codec.event_to_json(event)["part_type"] == "model_output"


def test_lines_become_the_same_messages_directly_as_through_records() -> None:
    lines = [line for path in FIXTURES.rglob("*.jsonl") for line in path.read_bytes().split(b"\n")]
    lines = [line for line in lines if line.strip()]
    assert len(lines) > 2000
    for line in lines:
        direct = outcome(record_proto_from_line, line, 1)
        assert direct == outcome(through_records, line, 1)
        assert direct[0] == "ok"


def test_runs_of_lines_become_what_each_line_becomes() -> None:
    for path in FIXTURES.rglob("*.jsonl"):
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        lines = [line for line in lines if b'"sequence"' not in line]  # sequence: position
        each = [record_fields_from_line(line, n) for n, line in enumerate(lines, 7)]
        assert record_fields_from_lines(lines, 7) == each


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-11-25T01:33:38.853460046Z",  # the common form: the fast path
        "2026-11-25T01:33:38.853460Z",
        "2026-11-25T01:33:38Z",
        "2026-11-25T03:33:38.853460046+02:00",
        "2026-11-25T01:33:38.85346004\u0666Z",  # a non-ASCII digit: refused
        "2026-13-25T01:33:38.853460046Z",
        "2026-11-25T01:33:38.853460046z",
        "2026-11-25 01:33:38.853460046Z",
    ],
)
def test_runs_of_lines_refuse_and_accept_what_each_line_does(timestamp: str) -> None:
    record = EventRecord(
        id=str(uuid.uuid4()),
        session_id="s",
        sequence=3,
        parent_id=None,
        timestamp_ns=1_700_000_000_123_456_789,
        event=EVENTS[0],
    )
    good = record_to_json(record)
    variants = [{**good, "timestamp": timestamp}, {**good, "sequence": 4}, {**good, "id": 5}]
    variants += [{**good, "event": {**good["event"], "part_type": "nothing"}}]
    for variant in variants:
        line = json.dumps(variant).encode()
        one = outcome(record_fields_from_line, line, 3)
        run = outcome(record_fields_from_lines, [line], 3)
        assert run == (one[0], [one[1]] if one[0] == "ok" else one[1])


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_bad_lines_are_refused_alike_directly_and_through_records(event: Any) -> None:
    record = EventRecord(
        id=str(uuid.uuid4()),
        session_id="s",
        sequence=3,
        parent_id=None,
        timestamp_ns=1_700_000_000_123_456_789,
        event=event,
    )
    good = record_to_json(record)
    variants: list[Any] = [
        {**good, "event": {**good["event"], key: value}}
        for key in good["event"]
        for value in ODD_VALUES
    ]
    variants += [{**good, key: value} for key in good for value in [*ODD_VALUES, "2024-13-01"]]
    variants += [{**good, "event": {"part_type": "nothing"}}, [], "x"]
    for variant in variants:
        line = json.dumps(variant).encode(errors="surrogatepass")
        direct = outcome(record_proto_from_line, line, 3)
        assert direct == outcome(through_records, line, 3)
