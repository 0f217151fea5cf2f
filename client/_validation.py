"""Rules for the ids a caller chooses, shared by every backend and the server."""

from __future__ import annotations

from agentlog.errors import InvalidArgumentError

MAX_SESSION_ID_BYTES = 200


def check_session_id(session_id: object, field: str = "session_id") -> str:
    """Return `session_id` if it is safe as a file name, else raise InvalidArgumentError.

    The JSONL store names a session's file `<session_id>.jsonl`, as arcan does,
    without escaping, so an unsafe id is refused rather than rewritten.
    """

    def refuse(rule: str) -> InvalidArgumentError:
        return InvalidArgumentError(
            f"{field} {session_id!r} is not a valid session id: {rule}",
            field=field,
            reason="INVALID_SESSION_ID",
        )

    if not isinstance(session_id, str):
        raise InvalidArgumentError(
            f"{field} must be a string, not {type(session_id).__name__}",
            field=field,
            reason="INVALID_SESSION_ID",
        )
    if not session_id:
        raise refuse("it is empty")
    try:
        size = len(session_id.encode())
    except UnicodeEncodeError:
        raise refuse("it is not valid Unicode") from None
    if size > MAX_SESSION_ID_BYTES:
        raise refuse(f"it is {size} bytes long; the limit is {MAX_SESSION_ID_BYTES} bytes of UTF-8")
    if "/" in session_id or "\\" in session_id:
        raise refuse("it contains a path separator ('/' or '\\')")
    if "\x00" in session_id:
        raise refuse("it contains a NUL character")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in session_id):
        raise refuse("it contains a control character")
    if session_id.startswith("."):
        raise refuse(
            "it starts with '.' ('.' and '..' name directories, and dot-files are the store's own)"
        )
    return session_id


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
