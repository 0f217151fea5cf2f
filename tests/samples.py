"""One sample of every AgentEvent variant, with the JSON traps of the fixtures."""

from __future__ import annotations

from agentlog import (
    AgentEvent,
    ApprovalRequested,
    ApprovalResolved,
    ContextCompacted,
    IterationStarted,
    JsonValue,
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

TRICKY_JSON: dict[str, JsonValue] = {
    "big": 9007199254740993,
    "u64_max": 18446744073709551615,
    "i64_min": -9223372036854775808,
    "exp": 1.5e300,
    "ratio": 0.25,
    "neg_zero": -0.0,
    "nested_null": {"depth": None},
    "empty_object": {},
    "empty_list": [],
    "text": 'Héllo, wörld — "quoted" \\ back\\slash\n\ttab 🚀 中文 \x01 end',
    "flags": [True, False, None],
}


def every_event(session_id: str, run_id: str = "run-1") -> list[AgentEvent]:
    """Every variant once, and the optional fields both absent and present-but-empty."""
    usage = TokenUsage(
        input_tokens=1200, output_tokens=345, cache_read_tokens=2**64 - 1, cache_creation_tokens=0
    )
    zero_usage = TokenUsage(
        input_tokens=0, output_tokens=0, cache_read_tokens=0, cache_creation_tokens=0
    )
    s, r = session_id, run_id
    return [
        RunStarted(run_id=r, session_id=s, provider="anthropic", max_iterations=2**32 - 1),
        IterationStarted(run_id=r, session_id=s, iteration=1),
        ModelOutput(
            run_id=r,
            session_id=s,
            iteration=1,
            stop_reason=ModelStopReason.TOOL_USE,
            directive_count=3,
        ),
        ModelOutput(
            run_id=r,
            session_id=s,
            iteration=1,
            stop_reason=ModelStopReason.MAX_TOKENS,
            directive_count=0,
            usage=zero_usage,
        ),
        TextDelta(run_id=r, session_id=s, iteration=1, delta=str(TRICKY_JSON["text"])),
        TextDelta(run_id=r, session_id=s, iteration=2, delta=""),
        ToolCallRequested(
            run_id=r,
            session_id=s,
            iteration=1,
            call=ToolCall(call_id="call_1", tool_name="read_file", input=TRICKY_JSON),
        ),
        ToolCallRequested(
            run_id=r,
            session_id=s,
            iteration=1,
            call=ToolCall(call_id="call_2", tool_name="noop"),
        ),
        ToolCallCompleted(
            run_id=r,
            session_id=s,
            iteration=1,
            result=ToolResultSummary(
                call_id="call_1", tool_name="read_file", output="fn main() {}\n"
            ),
        ),
        ToolCallFailed(
            run_id=r,
            session_id=s,
            iteration=1,
            call_id="call_1",
            tool_name="read_file",
            error="permission denied",
        ),
        StatePatched(
            run_id=r,
            session_id=s,
            iteration=1,
            revision=2**64 - 1,
            patch=StatePatch(
                format=StatePatchFormat.JSON_PATCH,
                patch=[{"op": "add", "path": "/files/0", "value": "src/main.rs"}],
                source=StatePatchSource.TOOL,
            ),
        ),
        StatePatched(
            run_id=r,
            session_id=s,
            iteration=1,
            revision=0,
            patch=StatePatch(
                format=StatePatchFormat.MERGE_PATCH,
                patch={"cursor": {"line": 3}, "removed": None},
                source=StatePatchSource.SYSTEM,
            ),
        ),
        ContextCompacted(
            run_id=r,
            session_id=s,
            iteration=2,
            dropped_count=14,
            tokens_before=180000,
            tokens_after=42000,
        ),
        ApprovalRequested(
            run_id=r,
            session_id=s,
            approval_id="appr-1",
            call_id="call_9",
            tool_name="bash",
            arguments={"command": "rm -rf build/", "timeout": 30},
            risk="critical",
        ),
        ApprovalResolved(run_id=r, session_id=s, approval_id="appr-1", decision="denied"),
        ApprovalResolved(
            run_id=r,
            session_id=s,
            approval_id="appr-2",
            decision="approved",
            reason="",
        ),
        RunErrored(run_id=r, session_id=s, error="provider timeout after 30s"),
        RunFinished(
            run_id=r,
            session_id=s,
            reason=RunStopReason.COMPLETED,
            total_iterations=2,
            final_answer="Done.",
            usage=usage,
        ),
        RunFinished(
            run_id=r,
            session_id=s,
            reason=RunStopReason.CANCELLED,
            total_iterations=0,
            final_answer="",
        ),
        RunFinished(run_id=r, session_id=s, reason=RunStopReason.ERROR, total_iterations=0),
    ]
