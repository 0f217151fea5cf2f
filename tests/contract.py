"""The SessionRepository contract: one suite that every implementation must pass.

Subclasses provide the `repo` fixture; the tests never look behind the protocol.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from agentlog import (
    AlreadyExistsError,
    AppendEvent,
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedItem,
    FeedRecord,
    InvalidArgumentError,
    IterationStarted,
    ModelOutput,
    ModelStopReason,
    NewEvent,
    ReadDirection,
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
    WrongExpectedSequence,
)
from tests.samples import every_event

UUID_V4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def records_only(feed: Iterable[FeedItem]) -> list[FeedRecord]:
    """The feed's items, every one a record (a FeedGap or a deletion fails the test)."""
    items = list(feed)
    gaps = [item for item in items if not isinstance(item, FeedRecord)]
    assert not gaps, f"the feed skipped records: {gaps}"
    return [item for item in items if isinstance(item, FeedRecord)]


def new_session() -> str:
    return f"sess-{uuid.uuid4()}"


def started(session_id: str) -> RunStarted:
    return RunStarted(run_id="run-1", session_id=session_id, provider="test", max_iterations=4)


def delta(session_id: str, text: str) -> TextDelta:
    return TextDelta(run_id="run-1", session_id=session_id, iteration=1, delta=text)


def finished(session_id: str) -> RunFinished:
    return RunFinished(
        run_id="run-1",
        session_id=session_id,
        reason=RunStopReason.COMPLETED,
        total_iterations=1,
        final_answer="done",
    )


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
    def test_unsafe_session_ids_are_refused_for_appends(
        self, repo: SessionRepository, session_id: str, rule: str
    ) -> None:
        with pytest.raises(InvalidArgumentError, match=re.escape(rule)) as caught:
            repo.append(AppendEvent(session_id=session_id, event=started("s")))
        assert caught.value.reason == "INVALID_SESSION_ID"
        assert caught.value.field == "session_id"

    @pytest.mark.parametrize(
        ("session_id", "rule"),
        [
            ("", "empty"),
            ("a/b", "path separator"),
            ("../escape", "path separator"),
            ("nul\x00byte", "NUL"),
            ("..", "name directories"),
            (".", "name directories"),
            ("x" * 250, "250 bytes"),
        ],
    )
    def test_reads_refuse_only_ids_that_cannot_name_a_file(
        self, repo: SessionRepository, session_id: str, rule: str
    ) -> None:
        for call in (lambda: repo.load_session(session_id), lambda: repo.head(session_id)):
            with pytest.raises(InvalidArgumentError, match=re.escape(rule)) as caught:
                call()
            assert caught.value.reason == "INVALID_SESSION_ID"
            assert caught.value.field == "session_id"

    @pytest.mark.parametrize("session_id", ["a\\b", "tab\there", "x" * 249, ".hidden"])
    def test_reads_of_ids_arcan_could_have_written_are_answered(
        self, repo: SessionRepository, session_id: str
    ) -> None:
        assert repo.load_session(session_id) == []
        assert repo.head(session_id) is None

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

    def test_empty_parent_id_is_refused_for_appends_but_can_be_asked_about(
        self, repo: SessionRepository
    ) -> None:
        session = new_session()
        with pytest.raises(InvalidArgumentError, match="parent_id must not be empty"):
            repo.append(AppendEvent(session_id=session, parent_id="", event=started(session)))
        assert repo.load_session(session) == []
        assert repo.load_children("") == []  # arcan can store "", so it can be asked about

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


class EventStoreContract(SessionRepositoryContract):
    """Sequences, expectations, idempotent ids, atomic batches, ranged reads, listing."""

    def test_sequences_are_gapless_from_one(self, repo: SessionRepository) -> None:
        session = new_session()
        records = [
            repo.append(AppendEvent(session_id=session, event=delta(session, str(i))))
            for i in range(5)
        ]
        assert [r.sequence for r in records] == [1, 2, 3, 4, 5]
        assert [r.sequence for r in repo.load_session(session)] == [1, 2, 3, 4, 5]
        head = repo.head(session)
        assert head is not None
        assert head.sequence == 5

    def test_expecting_no_session(self, repo: SessionRepository) -> None:
        session = new_session()
        first = repo.append(
            AppendEvent(session_id=session, event=started(session), expected_sequence=0)
        )
        assert first.sequence == 1
        with pytest.raises(WrongExpectedSequence) as caught:
            repo.append(
                AppendEvent(session_id=session, event=started(session), expected_sequence=0)
            )
        assert caught.value.actual_sequence == 1
        assert caught.value.expected_sequence == 0
        assert caught.value.status_name == "FAILED_PRECONDITION"
        assert "Reload" in caught.value.message
        assert len(repo.load_session(session)) == 1

    def test_expecting_an_exact_sequence(self, repo: SessionRepository) -> None:
        session = new_session()
        repo.append(AppendEvent(session_id=session, event=started(session)))
        second = repo.append(
            AppendEvent(session_id=session, event=delta(session, "a"), expected_sequence=1)
        )
        assert second.sequence == 2
        for stale in (0, 1, 3, 99):
            with pytest.raises(WrongExpectedSequence) as caught:
                repo.append(
                    AppendEvent(
                        session_id=session, event=delta(session, "x"), expected_sequence=stale
                    )
                )
            assert caught.value.actual_sequence == 2
        with pytest.raises(WrongExpectedSequence) as caught:
            repo.append(
                AppendEvent(session_id=new_session(), event=started("s"), expected_sequence=4)
            )
        assert caught.value.actual_sequence == 0
        assert [r.id for r in repo.load_session(session)][-1] == second.id

    def test_an_id_appended_twice_is_stored_once(self, repo: SessionRepository) -> None:
        session = new_session()
        record_id = str(uuid.uuid4())
        append = AppendEvent(session_id=session, event=started(session), id=record_id)
        first = repo.append(append)
        repo.append(AppendEvent(session_id=session, event=delta(session, "after")))
        again = repo.append(append)
        assert first.id == again.id == record_id
        assert again == first  # the stored record: same sequence and timestamp
        # A retry succeeds even when its expectation has gone stale by its own success.
        retried = repo.append(
            AppendEvent(
                session_id=session, event=started(session), id=record_id, expected_sequence=0
            )
        )
        assert retried == first
        assert len(repo.load_session(session)) == 2

    def test_an_id_with_other_content_is_already_exists(self, repo: SessionRepository) -> None:
        session = new_session()
        record_id = str(uuid.uuid4())
        repo.append(AppendEvent(session_id=session, event=delta(session, "one"), id=record_id))
        for changed in (
            AppendEvent(session_id=session, event=delta(session, "two"), id=record_id),
            AppendEvent(
                session_id=session, event=delta(session, "one"), id=record_id, parent_id=record_id
            ),
        ):
            with pytest.raises(AlreadyExistsError, match=record_id) as caught:
                repo.append(changed)
            assert caught.value.reason == "EVENT_ID_CONFLICT"
        assert len(repo.load_session(session)) == 1

    def test_types_count_as_content(self, repo: SessionRepository) -> None:
        session = new_session()
        record_id = str(uuid.uuid4())

        def call(value: Any) -> AppendEvent:
            event = ToolCallRequested(
                run_id="r",
                session_id=session,
                iteration=0,
                call=ToolCall(call_id="c", tool_name="t", input=value),
            )
            return AppendEvent(session_id=session, event=event, id=record_id)

        repo.append(call({"n": 1}))
        repo.append(call({"n": 1}))
        with pytest.raises(AlreadyExistsError):
            repo.append(call({"n": 1.0}))
        with pytest.raises(AlreadyExistsError):
            repo.append(call({"n": True}))

    @pytest.mark.parametrize(
        "bad_id",
        [
            "not-a-uuid",
            "",
            "0C7421A5-7C6F-4B3E-8517-6757D1E510F2",
            "{0c7421a5-7c6f-4b3e-8517-6757d1e510f2}",
        ],
    )
    def test_ids_must_be_canonical_uuids(self, repo: SessionRepository, bad_id: str) -> None:
        session = new_session()
        with pytest.raises(InvalidArgumentError, match="canonical form") as caught:
            repo.append(AppendEvent(session_id=session, event=started(session), id=bad_id))
        assert caught.value.reason == "INVALID_EVENT_ID"
        assert repo.load_session(session) == []

    def test_a_batch_lands_at_consecutive_sequences(self, repo: SessionRepository) -> None:
        session = new_session()
        root = repo.append(AppendEvent(session_id=session, event=started(session)))
        records = repo.append_batch(
            session,
            [
                NewEvent(event=delta(session, "a"), parent_id=root.id),
                NewEvent(event=delta(session, "b")),
                NewEvent(event=delta(session, "c"), parent_id="elsewhere"),
            ],
            expected_sequence=1,
        )
        assert [r.sequence for r in records] == [2, 3, 4]
        assert [r.parent_id for r in records] == [root.id, None, "elsewhere"]
        assert repo.load_session(session)[1:] == records
        assert repo.load_children(root.id) == [records[0]]

    def test_a_batch_is_all_or_none(self, repo: SessionRepository) -> None:
        session = new_session()
        repo.append(AppendEvent(session_id=session, event=started(session)))
        good = [NewEvent(event=delta(session, str(i))) for i in range(3)]
        with pytest.raises(WrongExpectedSequence) as caught:
            repo.append_batch(session, good, expected_sequence=0)
        assert caught.value.actual_sequence == 1
        bad = [
            *good,
            NewEvent(event=IterationStarted(run_id="r", session_id=session, iteration=-1)),
        ]
        with pytest.raises(InvalidArgumentError) as invalid:
            repo.append_batch(session, bad)
        assert invalid.value.field == "events[3].event.iteration_started.iteration"
        same = str(uuid.uuid4())
        with pytest.raises(InvalidArgumentError, match=r"also the id of events\[0\]"):
            repo.append_batch(session, [NewEvent(event=delta(session, "x"), id=same)] * 2)
        with pytest.raises(InvalidArgumentError, match="at least one event"):
            repo.append_batch(session, [])
        assert len(repo.load_session(session)) == 1

    def test_a_retried_batch_is_stored_once(self, repo: SessionRepository) -> None:
        session = new_session()
        batch = [NewEvent(event=delta(session, str(i)), id=str(uuid.uuid4())) for i in range(4)]
        first = repo.append_batch(session, batch, expected_sequence=0)
        again = repo.append_batch(session, batch, expected_sequence=0)
        assert again == first
        assert len(repo.load_session(session)) == 4
        # Overlapping a stored batch with new content is a conflict, not a retry.
        with pytest.raises(AlreadyExistsError):
            repo.append_batch(session, [*batch[:2], NewEvent(event=delta(session, "new"))])
        with pytest.raises(AlreadyExistsError):
            repo.append_batch(session, [NewEvent(event=delta(session, "new")), batch[3]])
        assert len(repo.load_session(session)) == 4

    def test_ranged_reads(self, repo: SessionRepository) -> None:
        session = new_session()
        repo.append_batch(session, [NewEvent(event=delta(session, str(i))) for i in range(50)])

        def sequences(**kwargs: Any) -> list[int]:
            return [r.sequence for r in repo.load_session(session, **kwargs)]

        assert sequences() == list(range(1, 51))
        assert sequences(from_sequence=41) == list(range(41, 51))
        assert sequences(from_sequence=10, limit=3) == [10, 11, 12]
        assert sequences(direction=ReadDirection.BACKWARDS, limit=20) == list(range(50, 30, -1))
        assert sequences(direction=ReadDirection.BACKWARDS, from_sequence=3) == [3, 2, 1]
        assert sequences(direction=ReadDirection.BACKWARDS, from_sequence=99, limit=2) == [50, 49]
        assert sequences(from_sequence=51) == []
        assert sequences(limit=1) == [1]
        assert [r.sequence for r in repo.read_session(session, from_sequence=49)] == [49, 50]
        assert repo.load_session(new_session(), direction=ReadDirection.BACKWARDS) == []
        bad_ranges: list[dict[str, Any]] = [{"limit": 0}, {"limit": -1}, {"from_sequence": -1}]
        for bad in bad_ranges:
            with pytest.raises(InvalidArgumentError):
                repo.load_session(session, **bad)

    def test_listing_sessions_in_pages(self, repo: SessionRepository) -> None:
        prefix = f"list-{uuid.uuid4()}"
        made = {}
        for i in [3, 0, 2, 4, 1]:
            session = f"{prefix}-{i}"
            repo.append(AppendEvent(session_id=session, event=started(session)))
            made[session] = repo.append(AppendEvent(session_id=session, event=delta(session, "x")))
        seen: list[Any] = []
        token = None
        while True:
            page = repo.list_sessions(page_size=2, page_token=token)
            assert len(page.sessions) <= 2
            seen.extend(page.sessions)
            token = page.next_page_token
            if token is None:
                break
        ours = [s for s in seen if s.session_id.startswith(prefix)]
        assert [s.session_id for s in ours] == [f"{prefix}-{i}" for i in range(5)]
        ids = [s.session_id.encode() for s in seen]
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        for info in ours:
            head = made[info.session_id]
            assert info.event_count == 2
            assert info.head_id == head.id
            assert info.last_timestamp_ns == head.timestamp_ns
            assert info.first_timestamp_ns <= info.last_timestamp_ns
        first = repo.list_sessions()
        assert first.sessions[0].session_id.encode() == min(ids)

    def test_listing_rejects_bad_parameters(self, repo: SessionRepository) -> None:
        bad_pages: list[dict[str, Any]] = [
            {"page_size": 0},
            {"page_size": 1001},
            {"page_token": "%%%"},
        ]
        for kwargs in bad_pages:
            with pytest.raises(InvalidArgumentError):
                repo.list_sessions(**kwargs)


class Follower:
    """Consumes a subscription on a thread until it has `count` items."""

    def __init__(
        self, items: Iterator[Any], count: int, until: Callable[[Any], bool] | None = None
    ) -> None:
        self.items: list[Any] = []
        self.error: BaseException | None = None
        self._count = count
        self._until = until
        self._source = items
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for item in self._source:
                self.items.append(item)
                if len(self.items) >= self._count or (self._until and self._until(item)):
                    break
        except BaseException as exc:
            self.error = exc
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()  # ends the subscription now, not when garbage collected
            self._done.set()

    def wait_for(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.items) < count and not self._done.is_set():
            assert time.monotonic() < deadline, f"got {self.items}"
            time.sleep(0.005)
        assert self.error is None, self.error

    def finish(self, timeout: float = 20) -> list[Any]:
        assert self._done.wait(timeout), f"got {self.items}"
        assert self.error is None, self.error
        return [i.sequence if isinstance(i, EventRecord) else i for i in self.items]


class SubscriptionContract(EventStoreContract):
    """Catch-up-then-live subscriptions to one session."""

    def test_history_then_caught_up_then_live(self, repo: SessionRepository) -> None:
        session = new_session()
        for i in range(3):
            repo.append(AppendEvent(session_id=session, event=delta(session, str(i))))
        follower = Follower(repo.subscribe_session(session, from_sequence=1), count=6)
        follower.wait_for(4)
        repo.append(AppendEvent(session_id=session, event=delta(session, "live")))
        repo.append_batch(session, [NewEvent(event=delta(session, "batch"))])
        assert follower.finish() == [1, 2, 3, CaughtUp(3), 4, 5]

    def test_from_now_delivers_only_new_records(self, repo: SessionRepository) -> None:
        session = new_session()
        repo.append(AppendEvent(session_id=session, event=started(session)))
        repo.append(AppendEvent(session_id=session, event=delta(session, "old")))
        follower = Follower(repo.subscribe_session(session), count=3)
        follower.wait_for(1)
        repo.append_batch(session, [NewEvent(event=delta(session, str(i))) for i in range(2)])
        assert follower.finish() == [CaughtUp(2), 3, 4]

    def test_resuming_from_a_sequence(self, repo: SessionRepository) -> None:
        session = new_session()
        repo.append_batch(session, [NewEvent(event=delta(session, str(i))) for i in range(5)])
        follower = Follower(repo.subscribe_session(session, from_sequence=4), count=3)
        assert follower.finish() == [4, 5, CaughtUp(5)]

    def test_a_session_that_does_not_exist_yet(self, repo: SessionRepository) -> None:
        session = new_session()
        follower = Follower(repo.subscribe_session(session), count=2)
        follower.wait_for(1)
        repo.append(AppendEvent(session_id=session, event=started(session)))
        items = follower.finish()
        assert items == [CaughtUp(0), 1]

    def test_no_gap_or_duplicate_while_writers_race_the_switch(
        self, repo: SessionRepository
    ) -> None:
        session = new_session()
        total = 300

        def write() -> None:
            for i in range(0, total, 3):
                if i % 2:
                    repo.append(AppendEvent(session_id=session, event=delta(session, str(i))))
                    repo.append_batch(
                        session, [NewEvent(event=delta(session, "b")) for _ in range(2)]
                    )
                else:
                    repo.append_batch(
                        session, [NewEvent(event=delta(session, "c")) for _ in range(3)]
                    )

        writer = threading.Thread(target=write)
        writer.start()
        followers = []
        for _ in range(3):
            time.sleep(0.01)
            followers.append(Follower(repo.subscribe_session(session, from_sequence=1), total + 1))
        writer.join(60)
        for follower in followers:
            items = follower.finish()
            records = [i for i in items if isinstance(i, int)]
            assert records == list(range(1, total + 1))
            assert sum(isinstance(i, CaughtUp) for i in items) == 1

    def test_subscriptions_check_their_arguments(self, repo: SessionRepository) -> None:
        with pytest.raises(InvalidArgumentError, match="path separator"):
            next(iter(repo.subscribe_session("a/b")))
        with pytest.raises(InvalidArgumentError, match="from_sequence"):
            next(iter(repo.subscribe_session(new_session(), from_sequence=0)))


class FeedContract(SubscriptionContract):
    """The all-sessions feed: commit order, positions, filters, resume."""

    def feed(self, repo: SessionRepository, count: int, **kwargs: Any) -> Follower:
        return Follower(repo.subscribe_all(**kwargs), count)

    def test_the_feed_is_every_append_in_commit_order(self, repo: SessionRepository) -> None:
        a, b = new_session(), new_session()
        follower = self.feed(repo, 6)
        follower.wait_for(1)
        start = follower.items[0]
        assert isinstance(start, CaughtUp)
        appended = [
            repo.append(AppendEvent(session_id=a, event=started(a))),
            *repo.append_batch(b, [NewEvent(event=delta(b, str(i))) for i in range(3)]),
            repo.append(AppendEvent(session_id=a, event=delta(a, "x"))),
        ]
        items = follower.finish()
        feed = [i for i in follower.items[1:] if isinstance(i, FeedRecord)]
        assert [f.record for f in feed] == appended
        positions = [f.position for f in feed]
        assert positions == list(range(start.position + 1, start.position + 6))
        assert items[0] == start
        # Reading from a position again gives the same records at the same positions.
        again = Follower(repo.subscribe_all(from_position=positions[2]), 4).finish()
        assert again == [*feed[2:], CaughtUp(position=positions[-1])]

    def test_filters_by_session_prefix_and_kind(self, repo: SessionRepository) -> None:
        prefix = f"team-{uuid.uuid4()}"
        mine, other = f"{prefix}-a", new_session()
        follower = Follower(
            repo.subscribe_all(session_id_prefix=prefix, part_types=["run_started"]),
            10,
            until=lambda item: isinstance(item, FeedRecord),
        )
        follower.wait_for(1)
        repo.append(AppendEvent(session_id=other, event=started(other)))
        repo.append(AppendEvent(session_id=mine, event=delta(mine, "no")))
        wanted = repo.append(AppendEvent(session_id=mine, event=started(mine)))
        items = follower.finish()
        records = [i.record for i in items if isinstance(i, FeedRecord)]
        assert records == [wanted]
        # CaughtUp once, first; what the filters skipped only as Checkpoints.
        assert isinstance(items[0], CaughtUp)
        assert all(isinstance(i, Checkpoint) for i in items[1:-1])

    def test_a_filtered_feed_catches_up_past_its_first_runs_before_saying_caught_up(
        self, repo: SessionRepository
    ) -> None:
        # Over a thousand records the filters drop, matches among and after them: every
        # match stored at the start comes before the one CaughtUp, which a consumer may
        # take as "live from here"; how far the skipped runs were examined comes as
        # Checkpoints.
        start = next(iter(repo.subscribe_all()))
        assert isinstance(start, CaughtUp)
        prefix = new_session()
        noise, mine = f"{prefix}-noise", f"{prefix}-mine"
        wanted = []
        for block in range(11):
            repo.append_batch(noise, [NewEvent(event=delta(noise, str(i))) for i in range(100)])
            if block in (3, 7, 10):
                wanted.append(repo.append(AppendEvent(session_id=mine, event=finished(mine))))
        items: list[Any] = []
        for item in repo.subscribe_all(
            from_position=start.position + 1,
            session_id_prefix=prefix,
            part_types=["run_finished"],
        ):
            items.append(item)
            if isinstance(item, CaughtUp):
                break
        assert [i.record for i in items if isinstance(i, FeedRecord)] == wanted
        assert [i for i in items if isinstance(i, CaughtUp)] == [items[-1]]
        assert items[-1].position >= start.position + 1103
        checkpoints = [i.position for i in items if isinstance(i, Checkpoint)]
        assert checkpoints == sorted(checkpoints)
        assert checkpoints  # the runs of noise were examined

    def test_subscribers_with_other_filters_each_get_only_their_records(
        self, repo: SessionRepository
    ) -> None:
        prefix = new_session()
        first, other, unrelated = f"{prefix}-a", f"{prefix}-b", f"x{prefix}"
        now = iter(repo.subscribe_all())
        caught_up = next(now)  # from now on: says where the feed ends
        assert isinstance(caught_up, CaughtUp)
        start = caught_up.position + 1
        close = getattr(now, "close", None)
        if close is not None:
            close()
        repo.append(AppendEvent(session_id=first, event=delta(first, "1")))
        repo.append(AppendEvent(session_id=other, event=started(other)))
        repo.append(AppendEvent(session_id=unrelated, event=delta(unrelated, "3")))
        repo.append(AppendEvent(session_id=first, event=delta(first, "4")))

        def feed(**filters: Any) -> list[tuple[int, str]]:
            kept: list[tuple[int, str]] = []
            for item in repo.subscribe_all(from_position=start, **filters):
                if isinstance(item, CaughtUp):
                    return kept
                if isinstance(item, Checkpoint):
                    continue
                assert isinstance(item, FeedRecord)
                kept.append((item.position, item.record.session_id))
            raise AssertionError("the feed ended")

        # The same first and last record, different ones between: each its own.
        assert feed(session_id_prefix=prefix) == [
            (start, first),
            (start + 1, other),
            (start + 3, first),
        ]
        by_kind = feed(part_types=["text_delta"])
        assert (start + 1, other) not in by_kind
        assert [p for p, s in by_kind if s in (first, unrelated)] == [start, start + 2, start + 3]

    def test_the_prefix_filter_matches_the_start_of_the_id_only(
        self, repo: SessionRepository
    ) -> None:
        prefix = f"p{uuid.uuid4().hex[:8]}"
        inside, starts = f"x-{prefix}-in-the-middle", f"{prefix}-at-the-start"
        follower = Follower(
            repo.subscribe_all(session_id_prefix=prefix),
            10,
            until=lambda item: isinstance(item, FeedRecord),
        )
        follower.wait_for(1)
        repo.append(AppendEvent(session_id=inside, event=started(inside)))
        wanted = repo.append(AppendEvent(session_id=starts, event=started(starts)))
        items = follower.finish()
        assert [i.record for i in items if isinstance(i, FeedRecord)] == [wanted]

    def test_resuming_the_feed_from_a_position(self, repo: SessionRepository) -> None:
        session = new_session()
        follower = self.feed(repo, 1)
        start = follower.finish()[0]
        assert isinstance(start, CaughtUp)
        records = repo.append_batch(
            session, [NewEvent(event=delta(session, str(i))) for i in range(4)]
        )
        items = Follower(repo.subscribe_all(from_position=start.position + 3), 2).finish()
        assert isinstance(items[0], FeedRecord)
        assert items[0].position == start.position + 3
        assert items[0].record == records[2]

    def test_no_gap_or_duplicate_across_sessions_under_load(self, repo: SessionRepository) -> None:
        start_item = self.feed(repo, 1).finish()[0]
        assert isinstance(start_item, CaughtUp)
        start = start_item.position
        sessions = [new_session() for _ in range(6)]
        per_session = 30
        acknowledged: list[EventRecord] = []
        lock = threading.Lock()

        def write(session: str) -> None:
            for i in range(0, per_session, 3):
                if i % 2:
                    got = repo.append_batch(
                        session, [NewEvent(event=delta(session, str(i))) for _ in range(3)]
                    )
                else:
                    got = [
                        repo.append(AppendEvent(session_id=session, event=delta(session, str(i))))
                        for _ in range(3)
                    ]
                with lock:
                    acknowledged.extend(got)

        total = len(sessions) * per_session
        follower = Follower(repo.subscribe_all(from_position=start + 1), total + 1)
        writers = [threading.Thread(target=write, args=(s,)) for s in sessions]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(60)
        items = [i for i in follower.finish() if isinstance(i, FeedRecord)]
        ours = [i for i in items if i.record.session_id in sessions]
        assert len(ours) == total
        assert sorted(i.record.id for i in ours) == sorted(r.id for r in acknowledged)
        positions = [i.position for i in items]
        assert positions == sorted(set(positions))  # increasing, no repeats
        for session in sessions:
            sequences = [i.record.sequence for i in ours if i.record.session_id == session]
            assert sequences == list(range(1, per_session + 1))  # each session's order kept

    def test_feed_arguments_are_checked(self, repo: SessionRepository) -> None:
        with pytest.raises(InvalidArgumentError, match="unknown event kinds 'telepathy'"):
            next(iter(repo.subscribe_all(part_types=["telepathy"])))
        with pytest.raises(InvalidArgumentError, match="from_position"):
            next(iter(repo.subscribe_all(from_position=0)))

    def test_record_ids_are_unique_across_sessions(self, repo: SessionRepository) -> None:
        first, second = new_session(), new_session()
        record_id = str(uuid.uuid4())
        repo.append(AppendEvent(session_id=first, event=started(first), id=record_id))
        with pytest.raises(AlreadyExistsError, match=f"already used by session '{first}'"):
            repo.append(AppendEvent(session_id=second, event=started(second), id=record_id))
        with pytest.raises(AlreadyExistsError):
            repo.append_batch(
                second,
                [NewEvent(event=started(second)), NewEvent(event=started(second), id=record_id)],
            )
        assert repo.load_session(second) == []
