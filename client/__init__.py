"""agentlog: a session store for AI-agent event logs, compatible with arcan.

Everything a caller needs is importable from here: the event types, the record
types, the SessionRepository protocols, the errors, and the gRPC clients. The
in-process stores and the server live in `agentlog.server`.
"""

from agentlog._events import (
    AgentEvent,
    ApprovalRequested,
    ApprovalResolved,
    ContextCompacted,
    IterationStarted,
    ModelOutput,
    ModelStopReason,
    RunErrored,
    RunFinished,
    RunStarted,
    RunStopReason,
    StatePatch,
    StatePatched,
    StatePatchFormat,
    StatePatchSource,
    TextDelta,
    TokenUsage,
    ToolCall,
    ToolCallCompleted,
    ToolCallFailed,
    ToolCallRequested,
    ToolResultSummary,
)
from agentlog._json import JsonValue
from agentlog._records import AppendEvent, EventRecord
from agentlog.client import AgentlogClient, AsyncAgentlogClient
from agentlog.errors import (
    AgentlogError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    ServerError,
    UnavailableError,
)
from agentlog.protocol import AsyncSessionRepository, SessionRepository

__all__ = [
    "AgentEvent",
    "AgentlogClient",
    "AgentlogError",
    "AlreadyExistsError",
    "AppendEvent",
    "ApprovalRequested",
    "ApprovalResolved",
    "AsyncAgentlogClient",
    "AsyncSessionRepository",
    "CancelledError",
    "ContextCompacted",
    "DataLossError",
    "DeadlineExceededError",
    "EventRecord",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "IterationStarted",
    "JsonValue",
    "ModelOutput",
    "ModelStopReason",
    "NotFoundError",
    "ResourceExhaustedError",
    "RunErrored",
    "RunFinished",
    "RunStarted",
    "RunStopReason",
    "ServerError",
    "SessionRepository",
    "StatePatch",
    "StatePatchFormat",
    "StatePatchSource",
    "StatePatched",
    "TextDelta",
    "TokenUsage",
    "ToolCall",
    "ToolCallCompleted",
    "ToolCallFailed",
    "ToolCallRequested",
    "ToolResultSummary",
    "UnavailableError",
]
