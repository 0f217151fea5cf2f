"""Rules for the ids a caller chooses, shared by every backend and the server."""

from __future__ import annotations

import re

from agentlog.errors import InvalidArgumentError

MAX_SESSION_ID_BYTES = 200


# Session ids seen to be valid lately: a session is named on every call.
_VALID_SESSION_IDS: dict[str, None] = {}


def check_session_id(session_id: object, field: str = "session_id") -> str:
    """Return `session_id` if it is safe as a file name, else raise InvalidArgumentError.

    The JSONL store names a session's file `<session_id>.jsonl`, as arcan does,
    without escaping, so an unsafe id is refused rather than rewritten.
    """
    if type(session_id) is str and session_id in _VALID_SESSION_IDS:
        return session_id
    checked = _check_session_id(session_id, field)
    if len(_VALID_SESSION_IDS) >= 4096:
        _VALID_SESSION_IDS.clear()
    _VALID_SESSION_IDS[checked] = None
    return checked


def _session_id_bytes(session_id: object, field: str, problem: str) -> tuple[str, int]:
    """`session_id` and its UTF-8 size, if it is a non-empty string of valid Unicode;
    else InvalidArgumentError, worded "<field> <id> <problem>: <rule>"."""
    if not isinstance(session_id, str):
        raise InvalidArgumentError(
            f"{field} must be a string, not {type(session_id).__name__}",
            field=field,
            reason="INVALID_SESSION_ID",
        )
    if not session_id:
        raise _refused(session_id, field, problem, "it is empty")
    try:
        return session_id, len(session_id.encode())
    except UnicodeEncodeError:
        raise _refused(session_id, field, problem, "it is not valid Unicode") from None


def quoted(value: object, limit: int = 64) -> str:
    """`value` as a message quotes it: repr, cut after `limit` characters (a long field
    quoted in full would make the error larger than gRPC's metadata limit)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value.encode(errors='replace'))} bytes)"
    text = repr(value)
    return text if len(text) <= limit + 2 else f"{text[:limit]}... ({len(text)} characters)"


def _refused(session_id: str, field: str, problem: str, rule: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{field} {quoted(session_id)} {problem}: {rule}", field=field, reason="INVALID_SESSION_ID"
    )


def _check_session_id(session_id: object, field: str) -> str:
    problem = "is not a valid session id"
    text, size = _session_id_bytes(session_id, field, problem)

    def refuse(rule: str) -> InvalidArgumentError:
        return _refused(text, field, problem, rule)

    if size > MAX_SESSION_ID_BYTES:
        raise refuse(f"it is {size} bytes long; the limit is {MAX_SESSION_ID_BYTES} bytes of UTF-8")
    if "/" in text or "\\" in text:
        raise refuse("it contains a path separator ('/' or '\\')")
    if "\x00" in text:
        raise refuse("it contains a NUL character")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise refuse("it contains a control character")
    if text.startswith("."):
        raise refuse(
            "it starts with '.' ('.' and '..' name directories, and dot-files are the store's own)"
        )
    return text


MAX_BRANCH_ID_BYTES = 40
MAIN = "main"


def check_branch_id(branch_id: object, field: str = "branch_id") -> str:
    """The branch id, "main" for an empty one, if it may name a branch: 1 to 40 bytes of
    UTF-8 with a session id's rules (no path separator, NUL, control character or
    leading "."), and neither holding "__" nor starting with "_", so that the file name
    `<session>__<branch>.jsonl` of arcan's branch layout splits back into both at its
    last "__". Else InvalidArgumentError."""
    if branch_id in ("", MAIN):
        return MAIN
    if type(branch_id) is str and branch_id in _VALID_BRANCH_IDS:
        return branch_id
    problem = "is not a valid branch id"
    text, size = _session_id_bytes(branch_id, field, problem)

    def refuse(rule: str) -> InvalidArgumentError:
        error = _refused(text, field, problem, rule)
        error.reason = "INVALID_BRANCH_ID"
        return error

    if size > MAX_BRANCH_ID_BYTES:
        raise refuse(f"it is {size} bytes long; the limit is {MAX_BRANCH_ID_BYTES} bytes of UTF-8")
    if "/" in text or "\\" in text or "\x00" in text:
        raise refuse("it contains a path separator ('/' or '\\') or a NUL character")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text):
        raise refuse("it contains a control character")
    if text.startswith((".", "_")):
        raise refuse("it starts with '.' or '_'")
    if "__" in text:
        raise refuse(
            "it contains '__', which joins a session id to a branch id in the name of its file"
        )
    if len(_VALID_BRANCH_IDS) >= 4096:
        _VALID_BRANCH_IDS.clear()
    _VALID_BRANCH_IDS[text] = None
    return text


def check_stored_branch_id(branch_id: object, field: str = "branch_id") -> str:
    """The branch id a read names ("main" for an empty one): looser than a new branch's,
    as arcan may have named one otherwise; only what cannot be part of a file name is
    refused."""
    if branch_id in ("", MAIN):
        return MAIN
    problem = "cannot name a branch"
    text, _ = _session_id_bytes(branch_id, field, problem)
    if "/" in text or "\x00" in text:
        error = _refused(
            text, field, problem, "it contains a path separator ('/') or a NUL character"
        )
        error.reason = "INVALID_BRANCH_ID"
        raise error
    return text


_VALID_BRANCH_IDS: dict[str, None] = {}

# The longest file name most file systems take, less the ".jsonl" suffix.
MAX_STORED_SESSION_ID_BYTES = 255 - len(".jsonl")


def check_stored_session_id(session_id: object, field: str = "session_id") -> str:
    """Return `session_id` if it may name a session file that exists, else raise
    InvalidArgumentError: what reads accept.

    Looser than `check_session_id` (what a new session may be called): arcan
    names files without escaping, so a session it wrote may have a long id, a
    tab, a backslash or a leading dot in it (arcan reads dot-files too), and must
    still be served. Only ids that cannot be a file's name inside the data
    directory are refused.
    """
    if type(session_id) is str and session_id in _VALID_SESSION_IDS:
        return session_id
    problem = "cannot name a session"
    text, size = _session_id_bytes(session_id, field, problem)
    if size > MAX_STORED_SESSION_ID_BYTES:
        raise _refused(
            text,
            field,
            problem,
            f"it is {size} bytes long, and no session file name can be longer than "
            f"{MAX_STORED_SESSION_ID_BYTES} bytes before its .jsonl",
        )
    if "/" in text or "\x00" in text:
        raise _refused(
            text, field, problem, "it contains a path separator ('/') or a NUL character"
        )
    if text in (".", ".."):
        raise _refused(text, field, problem, "'.' and '..' name directories")
    return text


def check_record_id(record_id: object, field: str) -> str:
    """Return a parent or record id if it is a non-empty string, else raise InvalidArgumentError."""
    if not isinstance(record_id, str):
        raise InvalidArgumentError(
            f"{field} must be a string, not {type(record_id).__name__}", field=field
        )
    if not record_id:
        raise InvalidArgumentError(f"{field} must not be empty", field=field)
    try:
        record_id.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"{field} is not valid Unicode", field=field) from None
    return record_id


def check_parent_query(parent_id: object) -> str:
    """Return the parent id LoadChildren asks about: any string, the empty one
    included (arcan can store `"parent_id": ""`, and its children must be found)."""
    if not isinstance(parent_id, str):
        raise InvalidArgumentError(
            f"parent_id must be a string, not {type(parent_id).__name__}", field="parent_id"
        )
    try:
        parent_id.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError("parent_id is not valid Unicode", field="parent_id") from None
    return parent_id


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def check_event_id(record_id: object, field: str = "id") -> str:
    """Return a caller-made record id if it is a canonical UUID, else raise InvalidArgumentError."""
    if isinstance(record_id, str) and CANONICAL_UUID.fullmatch(record_id):
        return record_id
    raise InvalidArgumentError(
        f"{field} {quoted(record_id)} is not a UUID in canonical form "
        "(lower-case hex, hyphenated, e.g. 0c7421a5-7c6f-4b3e-8517-6757d1e510f2)",
        field=field,
        reason="INVALID_EVENT_ID",
    )


def check_count(value: object, field: str, *, minimum: int = 0) -> int:
    """Return `value` if it is an int from `minimum` to 2^64-1, else raise InvalidArgumentError."""
    if isinstance(value, int) and not isinstance(value, bool) and minimum <= value < 2**64:
        return value
    raise InvalidArgumentError(
        f"{field} must be an integer from {minimum} to {2**64 - 1}, not {quoted(value)}",
        field=field,
    )


MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


def check_page_size(size: int | None) -> int:
    """A checked ListSessions page size; None means the default (100)."""
    if size is None:
        return DEFAULT_PAGE_SIZE
    check_count(size, "page_size", minimum=1)
    if size > MAX_PAGE_SIZE:
        raise InvalidArgumentError(
            f"page_size {size} is larger than the limit of {MAX_PAGE_SIZE}", field="page_size"
        )
    return size


MAX_LABELS = 64
MAX_LABEL_KEY_BYTES = 63
MAX_LABEL_VALUE_BYTES = 256
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/:-]*)")


def _labels_refused(message: str, field: str) -> InvalidArgumentError:
    return InvalidArgumentError(message, field=field, reason="INVALID_LABELS")


def check_label_key(key: object, field: str = "labels") -> str:
    """A label key: 1 to 63 bytes of ASCII letters, digits and `._/:-`, starting with a
    letter or digit (`app`, `user`, `example.com/team`). Else InvalidArgumentError."""
    if type(key) is not str or not _LABEL_KEY.fullmatch(key) or len(key) > MAX_LABEL_KEY_BYTES:
        raise _labels_refused(
            f"{quoted(key)} is not a valid label key: keys are 1 to {MAX_LABEL_KEY_BYTES} "
            "ASCII letters, digits and '._/:-', starting with a letter or digit",
            field,
        )
    return key


def check_labels(
    labels: object, field: str = "labels", *, allowed: int = MAX_LABELS
) -> dict[str, str]:
    """Labels as a dict, if each key and value is valid (values: up to 256 bytes of UTF-8
    without control characters) and there are at most `allowed` of them. Else
    InvalidArgumentError naming the label at fault."""
    if labels is None:
        return {}
    if not hasattr(labels, "items"):
        raise _labels_refused(f"{field} must map label keys to values", field)
    checked: dict[str, str] = {}
    for key, value in labels.items():
        check_label_key(key, field)
        if type(value) is not str:
            raise _labels_refused(f"label {key!r} has a value that is not a string", field)
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_LABEL_VALUE_BYTES:
            raise _labels_refused(
                f"label {key!r} has a value of {size} bytes; the limit is "
                f"{MAX_LABEL_VALUE_BYTES} bytes of UTF-8",
                field,
            )
        if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in value):
            raise _labels_refused(f"label {key!r} has a control character in its value", field)
        checked[key] = value
    if len(checked) > allowed:
        raise _labels_refused(
            f"a session carries at most {MAX_LABELS} labels; these would make {len(checked)}"
            if allowed == MAX_LABELS
            else f"{field} names {len(checked)} labels; at most {allowed} may be given",
            field,
        )
    return checked


def check_session_prefix(prefix: object, field: str = "session_id_prefix") -> str:
    """A session id prefix to list by: a string no longer than a session id may be."""
    if type(prefix) is not str:
        raise InvalidArgumentError(f"{field} must be a string", field=field)
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_STORED_SESSION_ID_BYTES:
        raise InvalidArgumentError(
            f"{field} is longer than a session id may be ({MAX_STORED_SESSION_ID_BYTES} bytes)",
            field=field,
        )
    return prefix
