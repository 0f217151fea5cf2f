"""Arbitrary JSON values: checking, canonical text, and strict parsing.

arcan stores tool inputs, outputs, patches and approval arguments as
serde_json::Value, which holds integers in the signed or unsigned 64-bit range
and finite doubles. agentlog accepts exactly what arcan can read back
unchanged and refuses the rest with a message naming where the fault is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import orjson

from agentlog.errors import InvalidArgumentError

JsonValue: TypeAlias = (
    bool | int | float | str | Sequence["JsonValue"] | Mapping[str, "JsonValue"] | None
)
"""Any JSON value: None, bool, int, float, str, a list of values, or a dict of them."""

I64_MIN = -(2**63)
U64_MAX = 2**64 - 1
# How deep arrays and objects may nest inside one value. arcan's reader
# (serde_json) stops at 128 levels in a whole line, of which the record, its
# event and the event's own messages take a few; every path (the clients, an
# in-process append, the server's parser) applies this one limit.
MAX_DEPTH = 100
# Digits an integer in range can have (U64_MAX has 20): longer text is refused
# before Python converts it (which it refuses itself past 4,300 digits).
_MAX_INT_DIGITS = 20


def _too_deep(path: str, field: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{path}: arrays and objects are nested more than {MAX_DEPTH} levels deep, more than "
        "arcan can read back",
        field=field,
        reason="INVALID_JSON",
    )


def _out_of_range(path: str, field: str, number: int | str) -> InvalidArgumentError:
    if isinstance(number, int):
        # Huge integers are not spelled out (Python refuses past 4,300 digits).
        text = str(number) if abs(number) < 10**40 else f"of {number.bit_length()} bits"
    elif len(number) > 40:
        text = f"{number[:20]}... ({len(number)} digits)"
    else:
        text = number
    return InvalidArgumentError(
        f"{path}: the integer {text} is outside the 64-bit range [{I64_MIN}, {U64_MAX}] that "
        "arcan can store exactly",
        field=field,
        reason="INVALID_JSON",
    )


def check_json(value: object, field: str) -> None:
    """Raise InvalidArgumentError unless `value` is JSON arcan can hold exactly."""
    stack: list[tuple[object, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            _check_text(item, path, field)
            continue
        if isinstance(item, dict | list | tuple):
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(path, field)
        if isinstance(item, int):
            if not I64_MIN <= item <= U64_MAX:
                raise _out_of_range(path, field, item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidArgumentError(
                    f"{path}: {item} is not a JSON number (NaN and infinities are not JSON)",
                    field=field,
                    reason="INVALID_JSON",
                )
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidArgumentError(
                        f"{path}: object keys must be strings, not {type(key).__name__}",
                        field=field,
                        reason="INVALID_JSON",
                    )
                _check_text(key, path, field)
                stack.append((child, f"{path}.{key}", depth))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth) for i, child in enumerate(item))
        else:
            raise InvalidArgumentError(
                f"{path}: a {type(item).__name__} is not a JSON value",
                field=field,
                reason="INVALID_JSON",
            )


def _check_text(text: str, path: str, field: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise InvalidArgumentError(
            f"{path}: the string is not valid Unicode ({exc.reason})",
            field=field,
            reason="INVALID_JSON",
        ) from None


def dumps(value: JsonValue) -> str:
    """Compact JSON text of an already checked value (keys in their given order)."""
    return orjson.dumps(value).decode()


def loads(text: str | bytes) -> JsonValue:
    """Parse JSON text the store itself wrote (fast; trusts the writer)."""
    result: JsonValue = orjson.loads(text)
    return result


def parse_strict(text: str, field: str) -> JsonValue:
    """Parse JSON text from a client, refusing what arcan could not read back unchanged."""

    def reject_constant(name: str) -> None:
        raise InvalidArgumentError(
            f"{field}: {name} is not a JSON number", field=field, reason="INVALID_JSON"
        )

    def checked_int(digits: str) -> int:
        if len(digits) - digits.startswith("-") > _MAX_INT_DIGITS:
            raise _out_of_range(field, field, digits)
        number = int(digits)
        if not I64_MIN <= number <= U64_MAX:
            raise _out_of_range(field, field, digits)
        return number

    def unique_keys(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
        result: dict[str, JsonValue] = {}
        for key, value in pairs:
            if key in result:
                raise InvalidArgumentError(
                    f"{field}: the object key {key!r} appears more than once",
                    field=field,
                    reason="INVALID_JSON",
                )
            result[key] = value
        return result

    if not text.strip():
        raise InvalidArgumentError(
            f"{field}: the JsonValue's json text is empty; it must hold the value as JSON "
            'text (e.g. {"json": "{\\"path\\": \\"x\\"}"}), or leave the field unset for null',
            field=field,
            reason="INVALID_JSON",
        )
    try:
        value: JsonValue = json.loads(
            text,
            parse_constant=reject_constant,
            parse_int=checked_int,
            object_pairs_hook=unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(
            f"{field}: not valid JSON text: {exc.msg} at line {exc.lineno} column {exc.colno}",
            field=field,
            reason="INVALID_JSON",
        ) from None
    except RecursionError:
        raise _too_deep(field, field) from None
    check_json(value, field)  # floats overflowing to inf, lone surrogates
    return value
