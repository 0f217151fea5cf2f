"""The SessionRepository contract: one suite that every implementation must pass.

Subclasses provide the `repo` fixture; the tests never look behind the protocol.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest

from agentlog import (
    AppendEvent,
    EventRecord,
    InvalidArgumentError,
    IterationStarted,
    ModelOutput,
    ModelStopReason,
    RunFinished,
    RunStarted,
    RunStopReason,
    SessionRepository,
    StatePatch,
    StatePatched,
    StatePatchFormat,
    StatePatchSource,
    TextDelta,
    ToolCall,
    ToolCallRequested,
)
from tests.samples import every_event

UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def new_session() -> str:
    return f"sess-{uuid.uuid4()}"


def started(session_id: str) -> RunStarted:
    return RunStarted(run_id="run-1", session_id=session_id, provider="test", max_iterations=4)


def delta(session_id: str, text: str) -> TextDelta:
    return TextDelta(run_id="run-1", session_id=session_id, iteration=1, delta=text)


class SessionRepositoryContract:
    """Every SessionRepository behaves like this."""

    @pytest.fixture
    def repo(self) -> Any:
        raise NotImplementedError

    def test_satisfies_the_protocol(self, repo: SessionRepository) -> None:
        assert isinstance(repo, SessionRepository)

    def test_append_returns_the_stored_record(self, repo: SessionRepository) -> None:
        session = new_session()
        before = time.time_ns()
        record = repo.append(AppendEvent(session_id=session, event=started(session)))
        after = time.time_ns()
        assert isinstance(record, EventRecord)
        assert UUID_V4.fullmatch(record.id)
        assert record.session_id == session
        assert record.parent_id is None
        assert record.event == started(session)
        # The store's clock, to the nanosecond (allow for clock granularity).
        assert before - 10**6 <= record.timestamp_ns <= after + 10**6

    def test_load_session_returns_records_in_append_order(self, repo: SessionRepository) -> None:
        session = new_session()
        appended = [
            repo.append(AppendEvent(session_id=session, event=delta(session, f"token {i}")))
            for i in range(25)
        ]
        assert repo.load_session(session) == appended
        assert len({r.id for r in appended}) == 25

    def test_every_event_kind_comes_back_equal(self, repo: SessionRepository) -> None:
        session = new_session()
        events = every_event(session)
        appended = [repo.append(AppendEvent(session_id=session, event=e)) for e in events]
        loaded = repo.load_session(session)
        assert [r.event for r in loaded] == events
        assert loaded == appended
        # Optional fields keep absent apart from empty.
        finals = [r.event for r in loaded if isinstance(r.event, RunFinished)]
        assert [f.final_answer for f in finals] == ["Done.", "", None]
        assert [f.usage is None for f in finals] == [False, True, True]
        outputs = [r.event for r in loaded if isinstance(r.event, ModelOutput)]
        assert outputs[0].usage is None
        assert outputs[1].usage is not None
        assert outputs[1].usage.input_tokens == 0

    def test_json_values_keep_exact_types(self, repo: SessionRepository) -> None:
        session = new_session()
        value = {"big": 9007199254740993, "u64": 2**64 - 1, "float_one": 1.0, "one": 1}
        event = ToolCallRequested(
            run_id="r",
            session_id=session,
            iteration=0,
            call=ToolCall(call_id="c", tool_name="t", input=value),
        )
        repo.append(AppendEvent(session_id=session, event=event))
        [record] = repo.load_session(session)
        assert isinstance(record.event, ToolCallRequested)
        loaded = record.event.call.input
        assert loaded == value
        assert isinstance(loaded, dict)
        assert type(loaded["big"]) is int
        assert type(loaded["float_one"]) is float
        assert type(loaded["one"]) is int

    def test_head(self, repo: SessionRepository) -> None:
        session = new_session()
        assert repo.head(session) is None
        repo.append(AppendEvent(session_id=session, event=started(session)))
        last = repo.append(AppendEvent(session_id=session, event=delta(session, "last")))
        assert repo.head(session) == last

    def test_unknown_session_is_empty_not_an_error(self, repo: SessionRepository) -> None:
        assert repo.load_session(new_session()) == []
        assert repo.head(new_session()) is None

    def test_sessions_are_independent(self, repo: SessionRepository) -> None:
        a, b = new_session(), new_session()
        ra = repo.append(AppendEvent(session_id=a, event=started(a)))
        rb = repo.append(AppendEvent(session_id=b, event=started(b)))
        assert repo.load_session(a) == [ra]
        assert repo.load_session(b) == [rb]

    def test_load_children_spans_sessions(self, repo: SessionRepository) -> None:
        caller, sub = new_session(), new_session()
        root = repo.append(AppendEvent(session_id=caller, event=started(caller)))
        first = repo.append(
            AppendEvent(session_id=caller, parent_id=root.id, event=delta(caller, "a"))
        )
        in_sub = repo.append(AppendEvent(session_id=sub, parent_id=root.id, event=started(sub)))
        repo.append(AppendEvent(session_id=caller, parent_id=first.id, event=delta(caller, "b")))
        second = repo.append(
            AppendEvent(session_id=caller, parent_id=root.id, event=delta(caller, "c"))
        )
        children = repo.load_children(root.id)
        expected = sorted([first, second, in_sub], key=lambda r: r.session_id.encode())
        # Grouped by session in byte order; append order within a session.
        assert children == expected
        assert repo.load_children(str(uuid.uuid4())) == []

    def test_parent_may_name_a_record_that_does_not_exist(self, repo: SessionRepository) -> None:
        session = new_session()
        ghost = str(uuid.uuid4())
        record = repo.append(
            AppendEvent(session_id=session, parent_id=ghost, event=started(session))
        )
        assert record.parent_id == ghost
        assert repo.load_children(ghost) == [record]

    def test_unicode_session_ids_work(self, repo: SessionRepository) -> None:
        session = f"séance-🚀-{uuid.uuid4()}"
        record = repo.append(AppendEvent(session_id=session, event=started(session)))
        assert repo.load_session(session) == [record]

    @pytest.mark.parametrize(
        ("session_id", "rule"),
        [
            ("", "empty"),
            ("a/b", "path separator"),
            ("../escape", "path separator"),
            ("..", "starts with '.'"),
            (".", "starts with '.'"),
            ("a\\b", "path separator"),
            ("nul\x00byte", "NUL"),
            ("tab\there", "control character"),
            ("line\nbreak", "control character"),
            ("x" * 201, "201 bytes"),
            ("é" * 101, "202 bytes"),
        ],
    )
    def test_unsafe_session_ids_are_refused(
        self, repo: SessionRepository, session_id: str, rule: str
    ) -> None:
        for call in (
            lambda: repo.append(AppendEvent(session_id=session_id, event=started("s"))),
            lambda: repo.load_session(session_id),
            lambda: repo.head(session_id),
        ):
            with pytest.raises(InvalidArgumentError, match=re.escape(rule)) as caught:
                call()
            assert caught.value.reason == "INVALID_SESSION_ID"
            assert caught.value.field == "session_id"

    def test_longest_session_id_is_accepted(self, repo: SessionRepository) -> None:
        session = "x" * 200
        record = repo.append(AppendEvent(session_id=session, event=started(session)))
        assert repo.head(session) == record

    @pytest.mark.parametrize(
        ("event", "field", "problem"),
        [
            (
                ToolCallRequested(
                    run_id="r",
                    session_id="s",
                    iteration=0,
                    call=ToolCall(call_id="c", tool_name="t", input={"x": float("nan")}),
                ),
                "event.tool_call_requested.call.input",
                "not a JSON number",
            ),
            (
                ToolCallRequested(
                    run_id="r",
                    session_id="s",
                    iteration=0,
                    call=ToolCall(call_id="c", tool_name="t", input=[2**64]),
                ),
                "event.tool_call_requested.call.input",
                "outside the 64-bit range",
            ),
            (
                ToolCallRequested(
                    run_id="r",
                    session_id="s",
                    iteration=0,
                    call=ToolCall(call_id="c", tool_name="t", input={"s": {1, 2}}),  # type: ignore[dict-item]
                ),
                "event.tool_call_requested.call.input",
                "not a JSON value",
            ),
            (
                IterationStarted(run_id="r", session_id="s", iteration=-1),
                "event.iteration_started.iteration",
                "outside the range",
            ),
            (
                IterationStarted(run_id="r", session_id="s", iteration=2**32),
                "event.iteration_started.iteration",
                "outside the range",
            ),
            (
                ModelOutput(
                    run_id="r",
                    session_id="s",
                    iteration=0,
                    stop_reason="sleepy",  # type: ignore[arg-type]
                    directive_count=0,
                ),
                "event.model_output.stop_reason",
                "not a ModelStopReason",
            ),
            (
                RunStarted(run_id="r", session_id="s", provider=7, max_iterations=1),  # type: ignore[arg-type]
                "event.run_started.provider",
                "must be a str",
            ),
            (
                StatePatched(
                    run_id="r",
                    session_id="s",
                    iteration=0,
                    revision=1,
                    patch=StatePatch(
                        format=StatePatchFormat.JSON_PATCH,
                        patch=None,
                        source="user",  # type: ignore[arg-type]
                    ),
                ),
                "event.state_patched.patch.source",
                "not a StatePatchSource",
            ),
            (
                RunFinished(
                    run_id="r",
                    session_id="s",
                    reason=RunStopReason.COMPLETED,
                    total_iterations=True,
                ),
                "event.run_finished.total_iterations",
                "must be an integer",
            ),
        ],
    )
    def test_invalid_events_are_refused_and_nothing_is_written(
        self, repo: SessionRepository, event: Any, field: str, problem: str
    ) -> None:
        session = new_session()
        with pytest.raises(InvalidArgumentError, match=re.escape(problem)) as caught:
            repo.append(AppendEvent(session_id=session, event=event))
        assert caught.value.field == field
        assert repo.load_session(session) == []

    def test_closed_vocabularies_are_checked(self, repo: SessionRepository) -> None:
        from agentlog import ApprovalRequested, ApprovalResolved

        session = new_session()
        with pytest.raises(InvalidArgumentError, match="not one of critical, high, low, medium"):
            repo.append(
                AppendEvent(
                    session_id=session,
                    event=ApprovalRequested(
                        run_id="r",
                        session_id=session,
                        approval_id="a",
                        call_id="c",
                        tool_name="t",
                        risk="extreme",
                    ),
                )
            )
        with pytest.raises(InvalidArgumentError, match="decision"):
            repo.append(
                AppendEvent(
                    session_id=session,
                    event=ApprovalResolved(
                        run_id="r", session_id=session, approval_id="a", decision="maybe"
                    ),
                )
            )
        assert repo.load_session(session) == []

    def test_a_non_event_is_refused(self, repo: SessionRepository) -> None:
        with pytest.raises(InvalidArgumentError, match="AgentEvent classes"):
            repo.append(AppendEvent(session_id=new_session(), event="hello"))  # type: ignore[arg-type]

    def test_empty_parent_id_is_refused(self, repo: SessionRepository) -> None:
        session = new_session()
        with pytest.raises(InvalidArgumentError, match="parent_id must not be empty"):
            repo.append(AppendEvent(session_id=session, parent_id="", event=started(session)))
        with pytest.raises(InvalidArgumentError, match="parent_id must not be empty"):
            repo.load_children("")
        assert repo.load_session(session) == []

    def test_enum_members_compare_as_arcan_strings(self, repo: SessionRepository) -> None:
        session = new_session()
        event = ModelOutput(
            run_id="r",
            session_id=session,
            iteration=1,
            stop_reason=ModelStopReason.END_TURN,
            directive_count=0,
        )
        repo.append(AppendEvent(session_id=session, event=event))
        [record] = repo.load_session(session)
        assert isinstance(record.event, ModelOutput)
        assert record.event.stop_reason == "end_turn"
        assert record.event.stop_reason is ModelStopReason.END_TURN

    def test_state_patch_source_and_format_round_trip(self, repo: SessionRepository) -> None:
        session = new_session()
        events = [
            StatePatched(
                run_id="r",
                session_id=session,
                iteration=0,
                revision=i,
                patch=StatePatch(format=fmt, patch={"i": i}, source=src),
            )
            for i, (fmt, src) in enumerate(
                (f, s) for f in StatePatchFormat for s in StatePatchSource
            )
        ]
        for event in events:
            repo.append(AppendEvent(session_id=session, event=event))
        assert [r.event for r in repo.load_session(session)] == events

    def test_lone_surrogates_are_refused(self, repo: SessionRepository) -> None:
        session = new_session()
        bad = ToolCallRequested(
            run_id="r",
            session_id=session,
            iteration=0,
            call=ToolCall(call_id="c", tool_name="t", input={"k": ["\ud800"]}),
        )
        with pytest.raises(InvalidArgumentError, match="not valid Unicode") as caught:
            repo.append(AppendEvent(session_id=session, event=bad))
        assert caught.value.field == "event.tool_call_requested.call.input"
        with pytest.raises(InvalidArgumentError, match="not valid Unicode"):
            repo.append(AppendEvent(session_id=session, event=delta(session, "\udfff")))
        assert repo.load_session(session) == []
