"""agentlog errors <-> gRPC statuses with rich details (google.rpc.Status).

The server turns an AgentlogError into a status carrying an ErrorInfo (reason,
metadata) and, when a field is at fault, a BadRequest; the clients turn that
status back into the same exception class with the same attributes.
"""

from __future__ import annotations

import re
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentlog.errors import ERRORS_BY_REASON, ERRORS_BY_STATUS, AgentlogError, ServerError

DOMAIN = "agentlog"


# A status travels in the call's trailers (gRPC refuses more than 8 KiB of them by
# default, and a client then sees RESOURCE_EXHAUSTED instead of the error): its
# message and each detail are cut to these lengths, whatever the error quotes.
MAX_MESSAGE_CHARS = 1000
MAX_METADATA_CHARS = 200


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_grpc_status(error: AgentlogError) -> Any:
    """A grpc.Status (code, message, trailing metadata with the rich details)."""
    code = grpc.StatusCode[error.status_name]
    message = _cut(error.message, MAX_MESSAGE_CHARS)
    metadata = {
        _cut(key, 64): _cut(value, MAX_METADATA_CHARS)
        for key, value in list(error.metadata.items())[:16]
    }
    info = error_details_pb2.ErrorInfo(
        reason=_cut(error.reason, 64), domain=DOMAIN, metadata=metadata
    )
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(info)
    if error.field is not None:
        bad_request = error_details_pb2.BadRequest()
        bad_request.field_violations.add(
            field=_cut(error.field, MAX_METADATA_CHARS), description=message
        )
        status.details.add().Pack(bad_request)
    return rpc_status.to_status(status)


def from_rpc_error(error: grpc.RpcError) -> AgentlogError:
    """The agentlog exception for a failed call (sync or aio)."""
    call: Any = error
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    cls = ERRORS_BY_STATUS.get(code.name, ServerError)
    reason, field, metadata = None, None, {}
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        status = None  # details whose code disagrees with the call's: ignore them
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(info) and info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Unpack(bad_request) and bad_request.field_violations:
                field = bad_request.field_violations[0].field
    specific = ERRORS_BY_REASON.get(reason or "")
    if specific is not None and issubclass(specific, cls):
        cls = specific
    if cls is ServerError and code.name != "INTERNAL":
        message = f"{code.name}: {message}"
    hint = connection_hint(message) if code.name == "UNAVAILABLE" and reason is None else None
    if hint is not None:
        message = f"{message} ({hint})"
    too_large = _TOO_LARGE.search(message) if reason is None else None
    if too_large is not None:
        sent, limit = too_large.group(1), too_large.group(2)
        side = "server" if "SERVER" in message or "Received" in message else "client"
        message = (
            f"the request is {int(sent):,} bytes, more than the {side} accepts "
            f"({int(limit):,} bytes: the server's --max-message-bytes, "
            "AGENTLOG_MAX_MESSAGE_BYTES, or this client's max message options); "
            "whatever the limits, one record's stored line may be at most 4,177,920 bytes: "
            "send smaller events, or a batch in parts"
        )
        reason = "REQUEST_TOO_LARGE"
        metadata = {"request_bytes": sent, "limit_bytes": limit}
    return cls(message, reason=reason or code.name, field=field, metadata=metadata)


# gRPC's own words for a message over a limit (either side's).
_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


_NAME_MISMATCH = (
    "the server's certificate does not name the host connected to: give the name it "
    "carries (TlsConfig(server_name=...), --tls-server-name)"
)
# What gRPC's words for a failed connection most likely mean, said so a person can act.
_HINTS = (
    (
        "WRONG_VERSION_NUMBER",
        "the server does not speak TLS at this address: connect without TLS (no tls=, no "
        "--tls-ca), or to the address where it serves TLS",
    ),
    ("Hostname Verification Check failed", _NAME_MISMATCH),
    ("Peer name", _NAME_MISMATCH),
    (
        "CERTIFICATE_VERIFY_FAILED",
        "the server's certificate is not signed by the CA trusted here (--tls-ca, "
        "TlsConfig(ca=...))",
    ),
    (
        "Socket closed",
        "the server closed the connection at once: if it speaks TLS, connect with TLS "
        "(TlsConfig, --tls-ca); if it asks for client certificates (mTLS), give one "
        "(--tls-client-cert and --tls-client-key)",
    ),
)


def connection_hint(details: str) -> str | None:
    """What a failed connection's details most likely mean, for a person; None if
    nothing more can be said."""
    return next((hint for marker, hint in _HINTS if marker in details), None)
