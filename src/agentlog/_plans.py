"""Conversions between the Python event types, the protobuf messages and arcan's JSON.

Nothing here names a field: every conversion is planned once, at import, from
the proto descriptors paired with the generated classes of `_events`. The JSON
rules are arcan's (serde's), stated once:

- a message is an object whose keys are the proto field names;
- an event is its variant's object with `"part_type": <oneof member name>` first;
- an enum is its value name without the enum's prefix, lower-cased;
- `JsonValue` is the JSON value itself; unset means null;
- an absent optional scalar is written as null, an absent optional message is
  omitted (serde's skip_serializing_if), and both read back as None;
- on reading, unknown keys are ignored and a missing scalar takes its zero
  value, as serde's `#[serde(default)]` does for TokenUsage.


This module holds the plans (one per message, from the descriptors) and the
walks that convert by them, field by field; `_converters` (generated from the
plans by `make proto`) does the same work in straight lines for the common
case and hands anything unusual to these walks, which word the errors.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from agentlog import _events, _json
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb

SCALAR, ENUM, MESSAGE, JSON = range(4)
_JSON_MESSAGE = pb.JsonValue.DESCRIPTOR.full_name
NS = 1_000_000_000

# Closed vocabularies the format page gives for fields the proto keeps as strings.
_ALLOWED_STRINGS: dict[tuple[str, str], frozenset[str]] = {
    ("ApprovalRequested", "risk"): frozenset({"low", "medium", "high", "critical"}),
    ("ApprovalResolved", "decision"): frozenset({"approved", "denied", "timeout"}),
}

_PY_SCALARS: dict[int, type] = {
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_INT32: int,
    FieldDescriptor.TYPE_INT64: int,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_DOUBLE: float,
}
_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}


class DecodeError(ValueError):
    """Stored JSON that does not describe a record; the caller adds where it was found."""


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: int
    optional: bool
    py_type: type
    int_range: tuple[int, int] | None = None
    allowed: frozenset[str] | None = None
    enum_numbers: dict[str, int] | None = None
    enum_members: dict[int, StrEnum] | None = None
    message: Plan | None = None

    @property
    def sub(self) -> Plan:
        """The plan of a MESSAGE field."""
        if self.message is None:
            raise TypeError(f"{self.name} is not a message field")
        return self.message

    @property
    def numbers(self) -> dict[str, int]:
        """An ENUM field's numbers by member value."""
        if self.enum_numbers is None:
            raise TypeError(f"{self.name} is not an enum field")
        return self.enum_numbers

    @property
    def members(self) -> dict[int, StrEnum]:
        """An ENUM field's members by number (0, unset, has none)."""
        if self.enum_members is None:
            raise TypeError(f"{self.name} is not an enum field")
        return self.enum_members


@dataclasses.dataclass(slots=True)
class Plan:
    py_cls: type
    proto_cls: Callable[..., Message]
    fields: list[Field]


def _enum_prefix(descriptor: EnumDescriptor) -> str:
    name = descriptor.name
    return "".join("_" + c if c.isupper() else c for c in name).lstrip("_").upper() + "_"


def _build_plans() -> dict[type, Plan]:
    plans: dict[type, Plan] = {}
    for full_name, py_cls in _events.MESSAGE_TYPES.items():
        descriptor: Descriptor = pb.DESCRIPTOR.message_types_by_name[full_name.rsplit(".", 1)[1]]
        plans[py_cls] = Plan(py_cls, getattr(pb, descriptor.name), [])
    for py_cls, plan in plans.items():
        descriptor = getattr(pb, py_cls.__name__).DESCRIPTOR
        defaults = {f.name: f.default for f in dataclasses.fields(py_cls)}
        for fd in descriptor.fields:
            optional = defaults[fd.name] is None
            if fd.message_type is not None and fd.message_type.full_name == _JSON_MESSAGE:
                plan.fields.append(Field(fd.name, JSON, True, object))
            elif fd.message_type is not None:
                sub = plans[_events.MESSAGE_TYPES[fd.message_type.full_name]]
                plan.fields.append(Field(fd.name, MESSAGE, optional, sub.py_cls, message=sub))
            elif fd.enum_type is not None:
                enum_cls = _events.ENUM_TYPES[fd.enum_type.full_name]
                prefix = _enum_prefix(fd.enum_type)
                members = {
                    v.number: enum_cls(v.name.removeprefix(prefix).lower())
                    for v in fd.enum_type.values
                    if v.number != 0
                }
                plan.fields.append(
                    Field(
                        fd.name,
                        ENUM,
                        optional,
                        enum_cls,
                        enum_numbers={m.value: n for n, m in members.items()},
                        enum_members=members,
                    )
                )
            else:
                plan.fields.append(
                    Field(
                        fd.name,
                        SCALAR,
                        optional,
                        _PY_SCALARS[fd.type],
                        int_range=_INT_RANGES.get(fd.type),
                        allowed=_ALLOWED_STRINGS.get((py_cls.__name__, fd.name)),
                    )
                )
    return plans


PLANS = _build_plans()


def encodable(text: str) -> bool:
    """Whether a string is valid Unicode (no lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def invalid(path: str, problem: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{path}: {problem}", field=path, reason="INVALID_EVENT")


def scalar_to_json(value: object, field: Field, path: str, *, closed: bool = True) -> object:
    """A checked scalar; `closed`: a string must be one of its field's closed
    vocabulary, if it has one (what an append may say; reads serve any string
    arcan wrote, since arcan's own types are free strings)."""
    expected = field.py_type
    if expected is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(path, f"must be an integer, not {type(value).__name__}")
        low, high = field.int_range or (-(2**63), 2**64 - 1)
        if not low <= value <= high:
            raise invalid(path, f"{value} is outside the range {low} to {high}")
        return value
    if not isinstance(value, expected) or (expected is float and isinstance(value, bool)):
        raise invalid(path, f"must be a {expected.__name__}, not {type(value).__name__}")
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise invalid(path, "is not valid Unicode (lone surrogate)") from None
        if closed and field.allowed is not None and value not in field.allowed:
            raise invalid(path, f"{value!r} is not one of {', '.join(sorted(field.allowed))}")
    return value


def to_json(obj: object, plan: Plan, path: str) -> dict[str, Any]:
    if type(obj) is not plan.py_cls:
        raise invalid(path, f"must be a {plan.py_cls.__name__}, not {type(obj).__name__}")
    out: dict[str, Any] = {}
    for field in plan.fields:
        value = getattr(obj, field.name)
        where = f"{path}.{field.name}"
        if value is None:
            if field.kind == JSON or (field.optional and field.kind != MESSAGE):
                out[field.name] = None
            elif not field.optional:
                raise invalid(where, "is required")
            continue
        kind = field.kind
        if kind == SCALAR:
            out[field.name] = scalar_to_json(value, field, where)
        elif kind == ENUM:
            if not isinstance(value, str) or value not in field.numbers:
                choices = ", ".join(field.numbers)
                raise invalid(where, f"{value!r} is not a {field.py_type.__name__} ({choices})")
            out[field.name] = str(value)
        elif kind == MESSAGE:
            out[field.name] = to_json(value, field.sub, where)
        else:
            _json.check_json(value, where)
            out[field.name] = value
    return out


def from_json(obj: object, plan: Plan, path: str) -> Any:
    if not isinstance(obj, dict):
        raise DecodeError(f"{path}: expected an object, found {type(obj).__name__}")
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        value = obj.get(field.name)
        where = f"{path}.{field.name}"
        kind = field.kind
        if value is None:
            if kind == JSON or field.optional:
                kwargs[field.name] = None
            elif kind == MESSAGE:
                raise DecodeError(f"{where}: missing")
            elif field.name in obj:
                raise DecodeError(f"{where}: null where a {field.py_type.__name__} belongs")
            else:
                kwargs[field.name] = field.py_type()
            continue
        if kind == SCALAR:
            try:
                kwargs[field.name] = scalar_to_json(value, field, where, closed=False)
            except InvalidArgumentError as exc:
                raise DecodeError(str(exc)) from None
        elif kind == ENUM:
            try:
                kwargs[field.name] = field.py_type(value)
            except ValueError:
                raise DecodeError(f"{where}: unknown value {value!r}") from None
        elif kind == MESSAGE:
            kwargs[field.name] = from_json(value, field.sub, where)
        else:
            kwargs[field.name] = value
    return plan.py_cls(**kwargs)


def to_proto(obj: object, plan: Plan) -> Message:
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        value = getattr(obj, field.name)
        if value is None:
            continue
        kind = field.kind
        if kind == SCALAR:
            kwargs[field.name] = value
        elif kind == ENUM:
            kwargs[field.name] = field.numbers[value]
        elif kind == MESSAGE:
            kwargs[field.name] = to_proto(value, field.sub)
        else:
            kwargs[field.name] = pb.JsonValue(json=_json.dumps(value))
    return plan.proto_cls(**kwargs)


def from_proto(message: Any, plan: Plan, path: str, strict: bool) -> Any:
    kwargs: dict[str, Any] = {}
    for field in plan.fields:
        name = field.name
        kind = field.kind
        where = f"{path}.{name}"
        if (kind >= MESSAGE or field.optional) and not message.HasField(name):
            if kind == MESSAGE and not field.optional:
                raise invalid(where, "is required")
            kwargs[name] = None
            continue
        value = getattr(message, name)
        if kind == SCALAR:
            kwargs[name] = value
        elif kind == ENUM:
            member = field.members.get(value)
            if member is None:
                raise invalid(where, _enum_problem(value, field.members))
            kwargs[name] = member
        elif kind == MESSAGE:
            kwargs[name] = from_proto(value, field.sub, where, strict)
        elif strict:
            kwargs[name] = _json.parse_strict(value.json, where)
        else:
            kwargs[name] = _json.loads(value.json)
    return plan.py_cls(**kwargs)


def holds_json(plan: Plan) -> bool:
    return any(
        f.kind == JSON or (f.message is not None and holds_json(f.message)) for f in plan.fields
    )


def _enum_problem(value: int, members: Mapping[int, Any]) -> str:
    """Why an enum number was refused, with every valid number and both spellings."""
    spelled = []
    for number, member in members.items():
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", type(member).__name__).upper()
        spelled.append(f"{number} = {prefix}_{str(member).upper()} ({member})")
    valid = ", ".join(spelled)
    if value == 0:
        return (
            f"must be set; 0 is the unspecified value, which a protobuf library also sends "
            f"for a name it did not recognise (valid: {valid}; protobuf's JSON mapping takes "
            "the upper-case names, arcan's JSON the lower-case ones)"
        )
    return f"unknown value {value} (valid: {valid})"
