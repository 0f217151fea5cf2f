"""The branch and fork contract: what every store that holds branches does (memory,
JSONL in the branch layout, PostgreSQL), called directly or through either client.

Subclasses provide the `repo` fixture; the tests never look behind the protocol.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agentlog import (
    AlreadyExistsError,
    AppendEvent,
    BranchInfo,
    CaughtUp,
    EventRecord,
    FeedRecord,
    ForkedFrom,
    InvalidArgumentError,
    NewEvent,
    NotFoundError,
    ReadDirection,
    WrongExpectedSequence,
)
from tests.contract import UUID_V4, Follower, delta, new_session, records_only, started


def chain(repo: Any, session: str, count: int, branch: str = "main") -> list[EventRecord]:
    """`count` records appended one at a time, each the child of the one before."""
    records: list[EventRecord] = []
    for i in range(count):
        parent = records[-1].id if records else None
        records.append(
            repo.append(
                AppendEvent(
                    session_id=session,
                    event=delta(session, f"{branch}-{i}"),
                    parent_id=parent,
                    branch_id=branch,
                )
            )
        )
    return records


def branch_of(repo: Any, session: str, branch: str) -> BranchInfo:
    """A branch's summary as ListSessions gives it."""
    token = None
    while True:
        page = repo.list_sessions(page_size=1000, page_token=token)
        for info in page.sessions:
            if info.session_id == session:
                found: dict[str, BranchInfo] = {b.branch_id: b for b in info.branches}
                return found[branch]
        token = page.next_page_token
        assert token is not None, f"session {session} is not listed"


class BranchContract:
    """Branches: logs of their own within a session; forks: branches made from one."""

    @pytest.fixture
    def repo(self) -> Any:
        raise NotImplementedError

    def test_a_writer_keeps_each_branchs_sequences_and_expectations(self, repo: Any) -> None:
        session = new_session()
        repo.append(AppendEvent(session_id=session, event=started(session)))
        with repo.writer() as writer:
            futures = [
                writer.append(
                    AppendEvent(
                        session_id=session,
                        event=delta(session, f"{branch} {n}"),
                        branch_id=branch,
                        expected_sequence=n + (1 if branch == "main" else 0),
                    )
                )
                for n in range(20)
                for branch in ("main", "alt")
            ]
        records = [future.result() for future in futures]
        assert [r.sequence for r in records if r.branch_id == "alt"] == list(range(1, 21))
        assert [r.sequence for r in records if r.branch_id == "main"] == list(range(2, 22))
        assert repo.load_session(session, branch_id="alt") == [
            r for r in records if r.branch_id == "alt"
        ]
        assert len(repo.load_session(session)) == 21

    def test_each_branch_has_its_own_sequences_heads_and_reads(self, repo: Any) -> None:
        session = new_session()
        main = chain(repo, session, 3)
        alt = chain(repo, session, 2, "alt")
        assert [r.sequence for r in main] == [1, 2, 3]
        assert [(r.branch_id, r.sequence) for r in alt] == [("alt", 1), ("alt", 2)]
        assert [r.id for r in repo.load_session(session)] == [r.id for r in main]
        assert repo.load_session(session, branch_id="alt") == alt
        assert repo.load_session(session, branch_id="main") == main
        head = repo.head(session, "alt")
        assert head == alt[-1]
        assert repo.head(session) == main[-1]
        assert repo.head(session, "nowhere") is None
        assert repo.load_session(session, branch_id="nowhere") == []
        backwards = repo.load_session(
            session,
            branch_id="alt",
            from_sequence=2,
            limit=1,
            direction=ReadDirection.BACKWARDS,
        )
        assert backwards == [alt[1]]
        batch = repo.append_batch(
            session, [NewEvent(event=delta(session, str(i))) for i in range(2)], branch_id="alt"
        )
        assert [(r.branch_id, r.sequence) for r in batch] == [("alt", 3), ("alt", 4)]
        assert repo.head(session).sequence == 3  # main did not move

    def test_expectations_are_per_branch(self, repo: Any) -> None:
        session = new_session()
        chain(repo, session, 2)
        first = repo.append(
            AppendEvent(
                session_id=session,
                event=started(session),
                branch_id="b",
                expected_sequence=0,
            )
        )
        assert first.sequence == 1
        with pytest.raises(WrongExpectedSequence) as caught:
            repo.append(
                AppendEvent(
                    session_id=session, event=started(session), branch_id="b", expected_sequence=2
                )
            )
        assert caught.value.metadata["branch_id"] == "b"
        assert caught.value.metadata["actual_sequence"] == "1"
        assert "branch 'b'" in caught.value.message
        with pytest.raises(WrongExpectedSequence):
            repo.append_batch(
                session, [NewEvent(event=started(session))], expected_sequence=1, branch_id="main"
            )
        assert [r.sequence for r in repo.load_session(session, branch_id="b")] == [1]

    def test_a_retry_is_recognised_in_its_branch_and_refused_in_another(self, repo: Any) -> None:
        session = new_session()
        record_id = str(uuid.uuid4())
        append = AppendEvent(
            session_id=session, event=started(session), id=record_id, branch_id="x"
        )
        stored = repo.append(append)
        assert repo.append(append) == stored  # the same branch: a retry, stored once
        elsewhere = AppendEvent(
            session_id=session, event=started(session), id=record_id, branch_id="y"
        )
        with pytest.raises(AlreadyExistsError) as caught:
            repo.append(elsewhere)
        assert caught.value.reason == "EVENT_ID_CONFLICT"
        assert caught.value.metadata["branch_id"] == "x"
        assert "branch 'x'" in caught.value.message
        assert repo.load_session(session, branch_id="y") == []
        assert len(repo.load_session(session, branch_id="x")) == 1

    def test_branch_ids_are_checked(self, repo: Any) -> None:
        session = new_session()
        for bad in ["a__b", "_x", ".x", "a/b", "x" * 41, "tab\there"]:
            with pytest.raises(InvalidArgumentError) as caught:
                repo.append(AppendEvent(session_id=session, event=started(session), branch_id=bad))
            assert caught.value.reason == "INVALID_BRANCH_ID", bad
        assert repo.head(session) is None
        empty = repo.append(AppendEvent(session_id=session, event=started(session), branch_id=""))
        assert empty.branch_id == "main"  # "": the default branch

    def test_a_subscription_follows_one_branch(self, repo: Any) -> None:
        session = new_session()
        chain(repo, session, 2, "alt")
        follower = Follower(repo.subscribe_session(session, from_sequence=1, branch_id="alt"), 5)
        follower.wait_for(3)
        chain(repo, session, 2)  # main: not followed
        repo.append(AppendEvent(session_id=session, event=delta(session, "x"), branch_id="alt"))
        repo.append(AppendEvent(session_id=session, event=delta(session, "y"), branch_id="alt"))
        items = follower.finish()
        assert items == [1, 2, CaughtUp(2), 3, 4]
        assert all(r.branch_id == "alt" for r in follower.items if isinstance(r, EventRecord))

    def test_the_feed_carries_branches_and_filters_by_branch(self, repo: Any) -> None:
        session = new_session()
        start = self._feed_end(repo) + 1
        chain(repo, session, 2)
        chain(repo, session, 2, "side")
        chain(repo, session, 1)
        everything = records_only(
            item
            for item in Follower(repo.subscribe_all(from_position=start), 6).finish()
            if isinstance(item, FeedRecord)
        )
        assert [(f.record.branch_id, f.record.sequence) for f in everything] == [
            ("main", 1),
            ("main", 2),
            ("side", 1),
            ("side", 2),
            ("main", 3),
        ]
        side = Follower(
            repo.subscribe_all(from_position=start, branch_id="side", session_id_prefix=session),
            3,
        ).finish()
        kept = [i for i in side if isinstance(i, FeedRecord)]
        assert [(f.position, f.record.branch_id, f.record.sequence) for f in kept] == [
            (everything[2].position, "side", 1),
            (everything[3].position, "side", 2),
        ]
        assert isinstance(side[-1], CaughtUp)

    def test_children_are_found_in_every_branch(self, repo: Any) -> None:
        session = new_session()
        parent = repo.append(AppendEvent(session_id=session, event=started(session)))
        for branch in ["zeta", "alpha", "main"]:
            repo.append(
                AppendEvent(
                    session_id=session,
                    event=delta(session, branch),
                    parent_id=parent.id,
                    branch_id=branch,
                )
            )
        children = repo.load_children(parent.id)
        assert [c.branch_id for c in children] == ["alpha", "main", "zeta"]

    def test_listing_shows_each_session_once_with_its_branches(self, repo: Any) -> None:
        session = new_session()
        main = chain(repo, session, 3)
        side = chain(repo, session, 1, "side")
        page = repo.list_sessions(page_size=1000)
        found = [info for info in page.sessions if info.session_id == session]
        assert len(found) == 1
        info = found[0]
        assert [b.branch_id for b in info.branches] == ["main", "side"]
        assert info.event_count == 4
        assert info.head_id == main[-1].id
        assert info.last_timestamp_ns == side[-1].timestamp_ns
        assert info.branches[1].event_count == 1
        assert info.branches[1].forked_from is None

    def test_a_fork_copies_records_with_new_ids_and_repointed_parents(self, repo: Any) -> None:
        session, other = new_session(), new_session()
        outside = repo.append(AppendEvent(session_id=other, event=started(other)))
        source = chain(repo, session, 3)
        # A parent outside the copied records (another session's), and one past them.
        source.append(
            repo.append(
                AppendEvent(session_id=session, event=delta(session, "x"), parent_id=outside.id)
            )
        )
        source += chain(repo, session, 2)
        made = repo.fork_session(session, 4, new_branch_id="retry")
        assert made.forked_from == ForkedFrom(session, "main", 4)
        assert made.branch_id == "retry"
        assert made.event_count == 4
        copies = repo.load_session(session, branch_id="retry")
        assert [c.sequence for c in copies] == [1, 2, 3, 4]
        assert made.head_id == copies[-1].id
        for copy, original in zip(copies, source, strict=False):
            assert copy.id != original.id
            assert UUID_V4.fullmatch(copy.id)
            assert (copy.event, copy.timestamp_ns) == (original.event, original.timestamp_ns)
            assert (copy.session_id, copy.branch_id) == (session, "retry")
        assert copies[0].parent_id is None
        assert copies[1].parent_id == copies[0].id  # re-pointed to the copy
        assert copies[2].parent_id == copies[1].id
        assert copies[3].parent_id == outside.id  # outside the copy: kept
        assert branch_of(repo, session, "retry").forked_from == ForkedFrom(session, "main", 4)
        # Both go their own way.
        after = repo.append(
            AppendEvent(session_id=session, event=delta(session, "new"), branch_id="retry")
        )
        assert after.sequence == 5
        assert after.timestamp_ns >= copies[-1].timestamp_ns
        assert repo.head(session).id == source[-1].id
        assert [c.branch_id for c in repo.load_children(copies[0].id)] == ["retry"]
        originals = repo.load_children(source[0].id)
        assert [c.id for c in originals] == [source[1].id]

    def test_a_fork_may_make_a_new_session(self, repo: Any) -> None:
        session, target = new_session(), new_session()
        source = chain(repo, session, 2)
        made = repo.fork_session(session, 2, new_session_id=target)
        assert made.branch_id == "main"
        copies = repo.load_session(target)
        assert [(c.session_id, c.sequence) for c in copies] == [(target, 1), (target, 2)]
        assert [c.event for c in copies] == [r.event for r in source]
        assert copies[1].parent_id == copies[0].id
        assert branch_of(repo, target, "main").forked_from == ForkedFrom(session, "main", 2)

    def test_a_forks_records_reach_the_feed(self, repo: Any) -> None:
        session = new_session()
        chain(repo, session, 3)
        start = self._feed_end(repo) + 1
        repo.fork_session(session, 2, new_branch_id="f")
        items = Follower(repo.subscribe_all(from_position=start), 3).finish()
        records = [i for i in items if isinstance(i, FeedRecord)]
        assert [(f.record.branch_id, f.record.sequence) for f in records] == [("f", 1), ("f", 2)]
        assert [f.position for f in records] == [start, start + 1]

    def test_a_fork_is_refused_with_a_status_that_says_why(self, repo: Any) -> None:
        session = new_session()
        chain(repo, session, 3)
        with pytest.raises(NotFoundError) as missing:
            repo.fork_session(session, 4, new_branch_id="f")
        assert missing.value.reason == "FORK_SOURCE_NOT_FOUND"
        assert missing.value.metadata["last_sequence"] == "3"
        with pytest.raises(NotFoundError):
            repo.fork_session(new_session(), 1, new_branch_id="f")
        with pytest.raises(NotFoundError):
            repo.fork_session(session, 1, branch_id="nowhere", new_branch_id="f")
        with pytest.raises(WrongExpectedSequence) as moved:
            repo.fork_session(session, 2, expected_sequence=2, new_branch_id="f")
        assert moved.value.metadata["actual_sequence"] == "3"
        chain(repo, session, 1, "taken")
        with pytest.raises(AlreadyExistsError) as exists:
            repo.fork_session(session, 2, new_branch_id="taken")
        assert exists.value.reason == "BRANCH_EXISTS"
        repo.fork_session(session, 2, expected_sequence=3, new_branch_id="once")
        with pytest.raises(AlreadyExistsError):
            repo.fork_session(session, 1, new_branch_id="once")
        with pytest.raises(InvalidArgumentError):
            repo.fork_session(session, 2, new_branch_id="main")  # onto itself
        with pytest.raises(InvalidArgumentError):
            repo.fork_session(session, 2)  # the same session needs a new branch
        with pytest.raises(InvalidArgumentError):
            repo.fork_session(session, 0, new_branch_id="g")
        with pytest.raises(InvalidArgumentError):
            repo.fork_session(session, 1, new_branch_id="a__b")
        assert len(repo.load_session(session, branch_id="taken")) == 1
        assert repo.load_session(session, branch_id="f") == []
        assert len(repo.load_session(session, branch_id="once")) == 2

    def test_a_fork_of_a_fork_repoints_to_its_own_copies(self, repo: Any) -> None:
        session = new_session()
        chain(repo, session, 3)
        repo.fork_session(session, 3, new_branch_id="one")
        repo.fork_session(session, 2, branch_id="one", new_branch_id="two")
        one = repo.load_session(session, branch_id="one")
        two = repo.load_session(session, branch_id="two")
        assert two[1].parent_id == two[0].id
        assert {r.id for r in two}.isdisjoint({r.id for r in one})
        assert branch_of(repo, session, "two").forked_from == ForkedFrom(session, "one", 2)

    @staticmethod
    def _feed_end(repo: Any) -> int:
        """The feed's last position now (the position CaughtUp names)."""
        feed = repo.subscribe_all()
        try:
            item = next(iter(feed))
        finally:
            feed.close()
        assert isinstance(item, CaughtUp)
        position: int = item.position
        return position
