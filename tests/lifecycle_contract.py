"""The session lifecycle contract: delete, labels and finding sessions, on every store
(memory, JSONL in both layouts, PostgreSQL), called directly or through either client.

Subclasses provide the `repo` fixture; the tests never look behind the protocol.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from agentlog import (
    AlreadyExistsError,
    AppendEvent,
    CaughtUp,
    EventRecord,
    FailedPreconditionError,
    FeedRecord,
    InvalidArgumentError,
    NewEvent,
    NotFoundError,
    SessionDeleted,
    SessionInfo,
    WrongExpectedSequence,
)
from tests.contract import Follower, delta, new_session, started


def add(repo: Any, session: str, text: str, **kwargs: Any) -> EventRecord:
    record: EventRecord = repo.append(
        AppendEvent(session_id=session, event=delta(session, text), **kwargs)
    )
    return record


def feed_from(repo: Any, position: int) -> list[Any]:
    """The stored feed from `position` to its end (up to CaughtUp)."""
    follower = Follower(
        repo.subscribe_all(from_position=position), 10**6, lambda i: isinstance(i, CaughtUp)
    )
    return [item for item in follower.finish() if not isinstance(item, CaughtUp)]


def last_position(repo: Any) -> int:
    follower = Follower(repo.subscribe_all(), 1)
    [caught_up] = follower.finish()
    assert isinstance(caught_up, CaughtUp)
    return caught_up.position


def listed(repo: Any, **filters: Any) -> list[SessionInfo]:
    """Every session a listing with these filters gives, page by page."""
    infos: list[SessionInfo] = []
    token = None
    while True:
        page = repo.list_sessions(page_size=2, page_token=token, **filters)
        infos += page.sessions
        token = page.next_page_token
        if token is None:
            return infos


class LifecycleContract:
    """Delete for good; labels; listing by label, prefix and time, paged stably."""

    @pytest.fixture
    def repo(self) -> Any:
        raise NotImplementedError

    def test_a_deleted_branch_reads_as_empty_everywhere_and_the_feed_marks_it(
        self, repo: Any
    ) -> None:
        session, keep = new_session(), new_session()
        kept = [add(repo, keep, "kept")]
        root = kept[0]
        gone = [add(repo, session, f"gone-{i}", parent_id=root.id) for i in range(3)]
        before = last_position(repo)
        markers = repo.delete_session(session)
        assert [(m.session_id, m.branch_id, m.last_sequence) for m in markers] == [
            (session, "main", 3)
        ]
        assert markers[0].position > before
        assert repo.load_session(session) == []
        assert repo.head(session) is None
        assert [r.id for r in repo.load_children(root.id)] == []
        assert session not in [i.session_id for i in listed(repo, session_id_prefix=session)]
        feed = feed_from(repo, 1)
        ids = {i.record.id for i in feed if isinstance(i, FeedRecord)}
        assert not ids & {r.id for r in gone}
        assert root.id in ids
        assert [i for i in feed if isinstance(i, SessionDeleted) and i.session_id == session] == (
            markers
        )
        assert repo.load_session(keep) == kept

    def test_deleting_every_branch_deletes_the_session_and_its_labels(self, repo: Any) -> None:
        session = new_session()
        add(repo, session, "m", labels={"app": "x"})
        markers = repo.delete_session(session, all_branches=True)
        assert [m.branch_id for m in markers] == ["main"]
        assert listed(repo, session_id_prefix=session) == []
        reborn = add(repo, session, "new", labels={"app": "y"})
        assert reborn.sequence == 1
        [info] = listed(repo, session_id_prefix=session)
        assert (info.labels, info.labels_version) == ({"app": "y"}, 1)

    def test_an_old_retry_cannot_bring_a_deleted_record_back(self, repo: Any) -> None:
        session = new_session()
        record_id = str(uuid.uuid4())
        event = AppendEvent(session_id=session, event=delta(session, "x"), id=record_id)
        repo.append(event)
        repo.delete_session(session)
        with pytest.raises(AlreadyExistsError) as refused:
            repo.append(event)
        assert refused.value.reason == "RECORD_ID_DELETED"
        with pytest.raises(AlreadyExistsError):
            repo.append_batch(session, [NewEvent(event=delta(session, "x"), id=record_id)])
        assert repo.load_session(session) == []
        assert add(repo, session, "fresh").sequence == 1

    def test_a_delete_checks_its_expectation_and_that_there_is_something_to_delete(
        self, repo: Any
    ) -> None:
        session = new_session()
        records = [add(repo, session, str(i)) for i in range(2)]
        with pytest.raises(WrongExpectedSequence):
            repo.delete_session(session, expected_sequence=1)
        assert repo.load_session(session) == records
        repo.delete_session(session, expected_sequence=2)
        with pytest.raises(NotFoundError) as nothing:
            repo.delete_session(session)
        assert nothing.value.reason == "BRANCH_NOT_FOUND"
        with pytest.raises(NotFoundError):
            repo.delete_session(new_session(), all_branches=True)
        with pytest.raises(InvalidArgumentError):
            repo.delete_session(session, all_branches=True, expected_sequence=0)

    def test_positions_are_never_reused_after_a_delete(self, repo: Any) -> None:
        session = new_session()
        add(repo, session, "a")
        [marker] = repo.delete_session(session)
        after = add(repo, session, "b")
        [item] = [
            i
            for i in feed_from(repo, marker.position)
            if isinstance(i, FeedRecord) and i.record.id == after.id
        ]
        assert item.position > marker.position

    def test_subscribers_of_a_deleted_branch_end_and_the_feed_carries_the_marker(
        self, repo: Any
    ) -> None:
        session = new_session()
        add(repo, session, "a")
        follower = Follower(repo.subscribe_session(session, from_sequence=1), 10)
        feed = Follower(
            repo.subscribe_all(session_id_prefix=session),
            10,
            lambda i: isinstance(i, SessionDeleted),
        )
        follower.wait_for(2)  # the record, CaughtUp
        feed.wait_for(1)
        [marker] = repo.delete_session(session)
        deadline = time.monotonic() + 20
        while follower.error is None:
            assert time.monotonic() < deadline, follower.items
            time.sleep(0.01)
        assert isinstance(follower.error, NotFoundError)
        assert follower.error.reason == "BRANCH_DELETED"
        assert feed.finish()[-1] == marker

    def test_labels_are_set_by_the_first_append_and_changed_with_a_version(self, repo: Any) -> None:
        session = new_session()
        repo.append_batch(session, [NewEvent(event=started(session))], labels={"app": "chat"})
        add(repo, session, "later", labels={"app": "ignored"})
        [info] = listed(repo, session_id_prefix=session)
        assert (info.labels, info.labels_version) == ({"app": "chat"}, 1)
        changed = repo.update_session_labels(
            session, {"user": "ana", "title": "Ünïcode ✓"}, expected_version=1
        )
        assert (changed.labels, changed.version) == (
            {"app": "chat", "user": "ana", "title": "Ünïcode ✓"},
            2,
        )
        with pytest.raises(FailedPreconditionError) as conflict:
            repo.update_session_labels(session, {"user": "bob"}, expected_version=1)
        assert conflict.value.reason == "WRONG_LABELS_VERSION"
        removed = repo.update_session_labels(session, remove=["title"])
        assert (removed.labels, removed.version) == ({"app": "chat", "user": "ana"}, 3)
        [info] = listed(repo, session_id_prefix=session)
        assert (info.labels, info.labels_version) == ({"app": "chat", "user": "ana"}, 3)

    def test_labels_beyond_the_limits_are_refused_and_change_nothing(self, repo: Any) -> None:
        session = new_session()
        add(repo, session, "a", labels={"app": "x"})
        too_many = {f"k{i}": "v" for i in range(64)}
        for bad in (too_many, {"app": "v" * 257}, {"bad key": "v"}, {"": "v"}, {"a": "x\x00"}):
            with pytest.raises(InvalidArgumentError) as refused:
                repo.update_session_labels(session, bad)
            assert refused.value.reason == "INVALID_LABELS"
        with pytest.raises(InvalidArgumentError):
            add(repo, new_session(), "a", labels={"bad key": "v"})
        with pytest.raises(NotFoundError):
            repo.update_session_labels(new_session(), {"app": "x"})
        [info] = listed(repo, session_id_prefix=session)
        assert (info.labels, info.labels_version) == ({"app": "x"}, 1)

    def test_sessions_are_found_by_labels_prefix_and_time(self, repo: Any) -> None:
        tag = uuid.uuid4().hex
        a, b, c = (f"find-{tag}-{n}" for n in "abc")
        add(repo, a, "1", labels={"app": tag, "user": "ana"})
        add(repo, b, "1", labels={"app": tag, "user": "bob"})
        add(repo, c, "1", labels={"app": "other", "user": "ana"})
        ids = [i.session_id for i in listed(repo, labels={"app": tag})]
        assert ids == [a, b]
        assert [i.session_id for i in listed(repo, labels={"app": tag, "user": "ana"})] == [a]
        assert [i.session_id for i in listed(repo, session_id_prefix=f"find-{tag}-")] == [a, b, c]
        assert listed(repo, labels={"app": tag}, session_id_prefix=c) == []
        [info_c] = listed(repo, session_id_prefix=c)
        late = info_c.last_timestamp_ns
        assert [i.session_id for i in listed(repo, labels={"user": "ana"}, updated_after_ns=late)][
            -1:
        ] == [c]
        before = listed(repo, session_id_prefix=f"find-{tag}-", updated_before_ns=late)
        assert c not in [i.session_id for i in before]
        page = repo.list_sessions(page_size=1, labels={"app": tag})
        assert page.next_page_token is not None
        with pytest.raises(InvalidArgumentError):  # a token serves its own filters only
            repo.list_sessions(page_token=page.next_page_token, labels={"app": "other"})
        for bad in (
            {"labels": {"bad key": "x"}},
            {"session_id_prefix": "x" * 300},
            {"updated_after_ns": 10**30},
        ):
            with pytest.raises(InvalidArgumentError):
                repo.list_sessions(**bad)

    def test_paging_is_stable_while_sessions_are_added_and_deleted(self, repo: Any) -> None:
        tag = uuid.uuid4().hex
        names = [f"page-{tag}-{n:02d}" for n in range(0, 20, 2)]
        for name in names:
            add(repo, name, "x", labels={"app": tag})
        seen: list[str] = []
        token = None
        step = 0
        while True:
            page = repo.list_sessions(page_size=3, page_token=token, labels={"app": tag})
            seen += [i.session_id for i in page.sessions]
            # Churn between pages: a session added before and after where paging is,
            # and a session not yet seen deleted.
            add(repo, f"page-{tag}-{2 * step + 1:02d}", "x", labels={"app": tag})
            step += 1
            token = page.next_page_token
            if token is None:
                break
            if step == 1:
                repo.delete_session(names[-1])
        assert seen == sorted(set(seen))  # in order, none twice
        assert set(names[:-1]) <= set(seen)
        assert names[-1] not in seen


class BranchLifecycleContract:
    """Deleting one branch of a session that has others."""

    @pytest.fixture
    def repo(self) -> Any:
        raise NotImplementedError

    def test_one_branch_is_deleted_and_the_others_stay(self, repo: Any) -> None:
        session = new_session()
        main = [add(repo, session, "m", labels={"app": "x"})]
        add(repo, session, "a", branch_id="alt")
        [marker] = repo.delete_session(session, "alt")
        assert marker.branch_id == "alt"
        assert repo.load_session(session, branch_id="alt") == []
        assert repo.load_session(session) == main
        [info] = listed(repo, session_id_prefix=session)
        assert [b.branch_id for b in info.branches] == ["main"]
        assert info.labels == {"app": "x"}  # the session lives on, with its labels
        again = add(repo, session, "again", branch_id="alt")
        assert (again.branch_id, again.sequence) == ("alt", 1)

    def test_deleting_every_branch_deletes_each_with_its_own_marker(self, repo: Any) -> None:
        session = new_session()
        add(repo, session, "m")
        add(repo, session, "a", branch_id="alt")
        add(repo, session, "b", branch_id="b2")
        markers = repo.delete_session(session, all_branches=True)
        assert sorted(m.branch_id for m in markers) == ["alt", "b2", "main"]
        assert len({m.position for m in markers}) == 3
        assert listed(repo, session_id_prefix=session) == []
        for branch in ("main", "alt", "b2"):
            assert repo.head(session, branch) is None
