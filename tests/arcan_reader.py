"""A reader of arcan's session directories written from `../shared/arcan-format.md`
alone, with the standard library: what the tests hold agentlog's files and answers
to. It shares no code with agentlog (no codec, no converters), so a mistake in
agentlog's reading or writing cannot hide behind the same mistake here.

`read_file(path, layout)` gives a file's records as plain dicts, checked as the
format says a record of that layout is; `load_children(root, parent)` is newest
arcan's: it reads every `*.jsonl` of the directory (dot-files too) and fails if any
line is not a record of the branch layout.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import re
from pathlib import Path
from typing import Any

SEED, BRANCHES = "seed", "branches"
U32, U64 = 2**32 - 1, 2**64 - 1
TIMESTAMP = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{3}|\d{6}|\d{9}))?Z")
STOP_REASONS = {"end_turn", "tool_use", "needs_user", "max_tokens", "safety", "unknown"}
RUN_STOP_REASONS = {
    "completed",
    "needs_user",
    "blocked_by_policy",
    "budget_exceeded",
    "cancelled",
    "error",
}
ANY = object()  # any JSON value
# Each AgentEvent variant's fields beyond run_id and session_id, by type.
VARIANTS: dict[str, dict[str, Any]] = {
    "run_started": {"provider": str, "max_iterations": U32},
    "iteration_started": {"iteration": U32},
    "model_output": {
        "iteration": U32,
        "stop_reason": STOP_REASONS,
        "directive_count": U64,
        "usage?": "usage",
    },
    "text_delta": {"iteration": U32, "delta": str},
    "tool_call_requested": {"iteration": U32, "call": "call"},
    "tool_call_completed": {"iteration": U32, "result": "result"},
    "tool_call_failed": {"iteration": U32, "call_id": str, "tool_name": str, "error": str},
    "state_patched": {"iteration": U32, "patch": "patch", "revision": U64},
    "context_compacted": {
        "iteration": U32,
        "dropped_count": U64,
        "tokens_before": U64,
        "tokens_after": U64,
    },
    "approval_requested": {
        "approval_id": str,
        "call_id": str,
        "tool_name": str,
        "arguments": ANY,
        "risk": {"low", "medium", "high", "critical"},
    },
    "approval_resolved": {
        "approval_id": str,
        "decision": {"approved", "denied", "timeout"},
        "reason": (str, None),
    },
    "run_errored": {"error": str},
    "run_finished": {
        "reason": RUN_STOP_REASONS,
        "total_iterations": U32,
        "final_answer": (str, None),
        "usage?": "usage",
    },
}
NESTED: dict[str, dict[str, Any]] = {
    "call": {"call_id": str, "tool_name": str, "input?": ANY},
    "result": {"call_id": str, "tool_name": str, "output?": ANY},
    "patch": {
        "format": {"json_patch", "merge_patch"},
        "patch": ANY,
        "source": {"model", "tool", "system"},
    },
    "usage": {
        "input_tokens?": U64,
        "output_tokens?": U64,
        "cache_read_tokens?": U64,
        "cache_creation_tokens?": U64,
    },
}


class NotARecord(ValueError):
    """A line that is not an arcan record of the layout asked for."""


def parse_timestamp(text: str) -> int:
    """Nanoseconds since the epoch for an RFC 3339 UTC timestamp as chrono writes it."""
    match = TIMESTAMP.fullmatch(text)
    if match is None:
        raise NotARecord(f"timestamp {text!r} is not RFC 3339 in UTC with Z")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    when = datetime.datetime(year, month, day, hour, minute, second, tzinfo=datetime.UTC)
    fraction = (match.group(7) or "").ljust(9, "0")
    return int(when.timestamp()) * 10**9 + int(fraction)


def _check(value: Any, kind: Any, where: str) -> None:
    if kind is ANY:
        return
    if isinstance(kind, int) and not isinstance(kind, bool):  # an unsigned bound
        if type(value) is not int or not 0 <= value <= kind:
            raise NotARecord(f"{where}: {value!r} is not an unsigned integer <= {kind}")
    elif kind is str:
        if type(value) is not str:
            raise NotARecord(f"{where}: {value!r} is not a string")
    elif isinstance(kind, tuple):
        if value is not None:
            _check(value, kind[0], where)
    elif isinstance(kind, set):
        if value not in kind:
            raise NotARecord(f"{where}: {value!r} is not one of {sorted(kind)}")
    else:
        _check_object(value, NESTED[kind], where)


def _check_object(value: Any, fields: dict[str, Any], where: str) -> None:
    if type(value) is not dict:
        raise NotARecord(f"{where}: not an object")
    for spelled, kind in fields.items():
        name = spelled.rstrip("?")
        if name not in value:
            if spelled.endswith("?"):
                continue
            raise NotARecord(f"{where}.{name}: missing")
        _check(value[name], kind, f"{where}.{name}")


def check_event(event: Any) -> None:
    if type(event) is not dict or event.get("part_type") not in VARIANTS:
        raise NotARecord(f"event: not an AgentEvent ({event!r:.80})")
    _check_object(
        event,
        {"run_id": str, "session_id": str, **VARIANTS[event["part_type"]]},
        f"event.{event['part_type']}",
    )


def parse_record(line: str, layout: str) -> dict[str, Any]:
    """A line's record, checked as a record of `layout`; NotARecord if it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise NotARecord(f"not JSON: {exc}") from None
    if type(record) is not dict:
        raise NotARecord("not an object")
    required: dict[str, Any] = {"id": str, "session_id": str, "timestamp": str}
    if layout == BRANCHES:
        required |= {"branch_id": str, "sequence": U64}
    for name, kind in required.items():
        if name not in record:
            raise NotARecord(f"{name}: missing")
        _check(record[name], kind, name)
    if "parent_id" not in record:
        raise NotARecord("parent_id: missing (it is always present, null for a root)")
    _check(record["parent_id"], (str, None), "parent_id")
    parse_timestamp(record["timestamp"])
    check_event(record.get("event"))
    return record


def read_file(path: Path, layout: str) -> list[dict[str, Any]]:
    """A session file's records in file order (blank lines skipped; a last line without
    its newline read, as arcan reads it); NotARecord for any line that is not one. In
    the branch layout, `sequence` must count the file's records from 1."""
    records: list[dict[str, Any]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = parse_record(line, layout)
        except NotARecord as exc:
            raise NotARecord(f"{path.name}, line {number}: {exc}") from None
        if layout == BRANCHES and record["sequence"] != len(records) + 1:
            raise NotARecord(f"{path.name}, line {number}: sequence {record['sequence']}")
        records.append(record)
    return records


def read_dir(root: Path, layout: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every branch of a directory: (session, branch) -> records. Names come from the
    lines; every line of a file must name the same session (and branch)."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(root.glob("*.jsonl")):
        records = read_file(path, layout)
        if not records:
            continue
        names = {(r["session_id"], r.get("branch_id", "main")) for r in records}
        assert len(names) == 1, f"{path.name} names {names}"
        [place] = names
        stem = path.name.removesuffix(".jsonl")
        expected = place[0] if layout == SEED else f"{place[0]}__{place[1]}"
        assert stem == expected, f"{path.name} holds {place}"
        found[place] = records
    return found


def load_children(root: Path, parent_id: str) -> list[dict[str, Any]]:
    """Newest arcan's load_children: every record in every `*.jsonl` of the directory
    (dot-files included) whose parent_id is `parent_id`; NotARecord if any line of any
    file is not a branch layout record."""
    children = []
    for path in sorted(root.iterdir()):
        if path.suffix == ".jsonl" and path.is_file():
            children += [r for r in read_file(path, BRANCHES) if r["parent_id"] == parent_id]
    return children


def event_as_json(event: Any) -> dict[str, Any]:
    """An agentlog event object (a dataclass of the client's) as the JSON object the
    format describes, built field by field (None usage left out, as serde omits it)."""

    def value(item: Any) -> Any:
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return {
                f.name: value(getattr(item, f.name))
                for f in dataclasses.fields(item)
                if not (f.name == "usage" and getattr(item, f.name) is None)
            }
        if isinstance(item, enum.Enum):
            return item.value
        if isinstance(item, dict):
            return {k: value(v) for k, v in item.items()}
        if isinstance(item, (list, tuple)):
            return [value(v) for v in item]
        return item

    fields = value(event)
    return {"part_type": event.part_type, **fields}


def with_defaults(event: dict[str, Any]) -> dict[str, Any]:
    """An event object with the defaults the format gives absent fields filled in
    (a tool call's input and a result's output null, usage counts 0)."""
    event = dict(event)
    for name, default_fields in (("call", {"input": None}), ("result", {"output": None})):
        if name in event and type(event[name]) is dict:
            event[name] = {**default_fields, **event[name]}
    if type(event.get("usage")) is dict:
        counts = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")
        event["usage"] = {**dict.fromkeys(counts, 0), **event["usage"]}
    return event


def identical(a: Any, b: Any) -> bool:
    """Equal JSON values of equal types all the way down (1 != 1.0, True != 1); object
    key order is not compared (readers must not depend on it)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return set(a) == set(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
