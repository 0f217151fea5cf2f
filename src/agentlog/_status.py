"""agentlog errors <-> gRPC statuses with rich details (google.rpc.Status).

The server turns an AgentlogError into a status carrying an ErrorInfo (reason,
metadata) and, when a field is at fault, a BadRequest; the clients turn that
status back into the same exception class with the same attributes.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentlog.errors import ERRORS_BY_REASON, ERRORS_BY_STATUS, AgentlogError, ServerError

DOMAIN = "agentlog"


def to_grpc_status(error: AgentlogError) -> Any:
    """A grpc.Status (code, message, trailing metadata with the rich details)."""
    code = grpc.StatusCode[error.status_name]
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    status = status_pb2.Status(code=code.value[0], message=error.message)
    status.details.add().Pack(info)
    if error.field is not None:
        bad_request = error_details_pb2.BadRequest()
        bad_request.field_violations.add(field=error.field, description=error.message)
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
    return cls(message, reason=reason or code.name, field=field, metadata=metadata)
