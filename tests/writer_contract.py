"""The writer's contract (`SessionRepository.writer`): appends without a round trip
each, stored and answered as `append` would, in order; a refusal stops what is
behind it. Subclasses provide the `repo` fixture."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agentlog import (
    AbortedError,
    AlreadyExistsError,
    AppendEvent,
    InvalidArgumentError,
    SessionRepository,
    WrongExpectedSequence,
)
from tests.contract import delta, finished, new_session, started
from tests.samples import every_event


def _outcome(writer: Any, event: AppendEvent) -> BaseException | None:
    """Why an append was not stored: raised at once if the writer knew already, else
    its future's error (a writer learns of a refusal when the server answers)."""
    try:
        future = writer.append(event)
    except AbortedError as exc:
        return exc
    try:
        future.result(timeout=30)
    except Exception as exc:
        return exc
    return None


class WriterContract:
    """What every writer does, on every store."""

    @pytest.fixture
    def repo(self) -> Any:
        raise NotImplementedError

    def test_a_writer_stores_events_in_the_order_appended_and_answers_each_with_its_record(
        self, repo: SessionRepository
    ) -> None:
        one, two = new_session(), new_session()
        with repo.writer() as writer:
            futures = [
                writer.append(AppendEvent(session_id=session, event=delta(session, f"t{n}")))
                for n in range(300)
                for session in ((one,) if n % 3 else (one, two))
            ]
        records = [future.result() for future in futures]
        assert [r.sequence for r in records if r.session_id == one] == list(range(1, 301))
        assert [r.sequence for r in records if r.session_id == two] == list(range(1, 101))
        assert repo.load_session(one) == [r for r in records if r.session_id == one]
        assert repo.load_session(two) == [r for r in records if r.session_id == two]

    def test_every_event_kind_written_comes_back_equal(self, repo: SessionRepository) -> None:
        session = new_session()
        events = every_event(session)
        with repo.writer() as writer:
            futures = [writer.append(AppendEvent(session_id=session, event=e)) for e in events]
        loaded = repo.load_session(session)
        assert [r.event for r in loaded] == events
        assert loaded == [future.result() for future in futures]

    def test_a_writer_keeps_ids_parents_and_first_labels(self, repo: SessionRepository) -> None:
        session = new_session()
        root_id, child_id = str(uuid.uuid4()), str(uuid.uuid4())
        with repo.writer() as writer:
            root = writer.append(
                AppendEvent(
                    session_id=session, event=started(session), id=root_id, labels={"team": "a"}
                )
            )
            child = writer.append(
                AppendEvent(
                    session_id=session,
                    event=delta(session, "x"),
                    id=child_id,
                    parent_id=root_id,
                    labels={"team": "ignored"},
                )
            )
        assert root.result().id == root_id
        assert (child.result().id, child.result().parent_id) == (child_id, root_id)
        assert [r.id for r in repo.load_children(root_id)] == [child_id]
        [info] = repo.list_sessions(session_id_prefix=session).sessions
        assert info.labels == {"team": "a"}

    def test_expectations_hold_append_by_append(self, repo: SessionRepository) -> None:
        session = new_session()
        with repo.writer() as writer:
            futures = [
                writer.append(
                    AppendEvent(
                        session_id=session, event=delta(session, f"{n}"), expected_sequence=n
                    )
                )
                for n in range(50)
            ]
        assert [future.result().sequence for future in futures] == list(range(1, 51))

    def test_a_refused_append_fails_alone_and_nothing_behind_it_is_stored(
        self, repo: SessionRepository
    ) -> None:
        session, other = new_session(), new_session()
        writer = repo.writer()
        before = [
            writer.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))
            for n in range(5)
        ]
        refused = writer.append(
            AppendEvent(session_id=session, event=delta(session, "late"), expected_sequence=2)
        )
        behind = [
            _outcome(writer, AppendEvent(session_id=name, event=delta(name, "behind")))
            for name in (session, other)
        ]
        with pytest.raises(WrongExpectedSequence) as raised:
            writer.close()
        assert raised.value.actual_sequence == 5
        assert [future.result().sequence for future in before] == [1, 2, 3, 4, 5]
        assert isinstance(refused.exception(), WrongExpectedSequence)
        for error in behind:
            assert isinstance(error, AbortedError)
            assert error.reason == "EARLIER_APPEND_REFUSED"
        assert [r.sequence for r in repo.load_session(session)] == [1, 2, 3, 4, 5]
        assert repo.load_session(other) == []
        with pytest.raises(AbortedError):
            writer.append(AppendEvent(session_id=other, event=delta(other, "after")))

    def test_a_resent_id_is_answered_with_the_stored_record(self, repo: SessionRepository) -> None:
        session = new_session()
        ids = [str(uuid.uuid4()) for _ in range(4)]
        stored = [
            repo.append(AppendEvent(session_id=session, event=delta(session, f"{n}"), id=ids[n]))
            for n in range(2)
        ]
        with repo.writer() as writer:  # a writer resending what may not have been answered
            futures = [
                writer.append(
                    AppendEvent(session_id=session, event=delta(session, f"{n}"), id=ids[n])
                )
                for n in range(4)
            ]
        records = [future.result() for future in futures]
        assert records[:2] == stored
        assert [r.sequence for r in records] == [1, 2, 3, 4]
        assert [r.id for r in repo.load_session(session)] == ids

    def test_an_id_reused_with_other_content_is_refused(self, repo: SessionRepository) -> None:
        session = new_session()
        reused = repo.append(AppendEvent(session_id=session, event=delta(session, "first"))).id
        writer = repo.writer()
        ok = writer.append(AppendEvent(session_id=session, event=delta(session, "next")))
        refused = writer.append(
            AppendEvent(session_id=session, event=delta(session, "other"), id=reused)
        )
        with pytest.raises(AlreadyExistsError):
            writer.close()
        assert ok.result().sequence == 2
        assert isinstance(refused.exception(), AlreadyExistsError)
        assert len(repo.load_session(session)) == 2

    def test_a_malformed_event_raises_at_append_and_the_writer_goes_on(
        self, repo: SessionRepository
    ) -> None:
        session = new_session()
        with repo.writer() as writer:
            first = writer.append(AppendEvent(session_id=session, event=started(session)))
            with pytest.raises(InvalidArgumentError):
                writer.append(AppendEvent(session_id="", event=started(session)))
            with pytest.raises(InvalidArgumentError):
                writer.append(AppendEvent(session_id=session, event=started(session), id="x"))
            last = writer.append(AppendEvent(session_id=session, event=finished(session)))
        assert (first.result().sequence, last.result().sequence) == (1, 2)

    def test_a_closed_writer_refuses_appends_and_an_empty_one_closes_cleanly(
        self, repo: SessionRepository
    ) -> None:
        session = new_session()
        with repo.writer() as writer:
            pass
        with pytest.raises(InvalidArgumentError) as raised:
            writer.append(AppendEvent(session_id=session, event=started(session)))
        assert raised.value.reason == "WRITER_CLOSED"
        assert repo.load_session(session) == []

    def test_a_small_window_still_takes_everything(self, repo: SessionRepository) -> None:
        session = new_session()
        with repo.writer(window=3) as writer:
            futures = [
                writer.append(AppendEvent(session_id=session, event=delta(session, f"{n}")))
                for n in range(40)
            ]
            assert writer.flush(timeout=30)
            assert all(future.done() for future in futures)
        assert len(repo.load_session(session)) == 40
