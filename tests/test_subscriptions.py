"""Subscriptions as a server runs them: shutdown, disconnects, and resuming across a restart."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from agentlog import AgentlogClient, AppendEvent, CaughtUp, FeedRecord, NewEvent
from agentlog.server import JsonlSessionRepository
from agentlog.server._live import RECENT_RECORDS
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc
from tests.contract import Follower, delta
from tests.servers import served


def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_shutdown_ends_subscriptions_with_unavailable(tmp_path: Path) -> None:
    repo = JsonlSessionRepository(tmp_path)
    with served(repo) as (built, loop):
        channel = grpc.insecure_channel(f"127.0.0.1:{built.port}")
        stub = session_pb2_grpc.SessionRepositoryStub(channel)
        call = stub.SubscribeSession(pb.SubscribeSessionRequest(session_id="s"))
        first = next(call)
        assert first.HasField("caught_up")
        loop.run(built.stop(0.5))
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
        error: Any = caught.value
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "subscribe again" in error.details()
        assert "from sequence 1" in error.details()
        channel.close()


def test_a_subscriber_that_leaves_frees_its_resources_at_once(tmp_path: Path) -> None:
    repo = JsonlSessionRepository(tmp_path)
    with served(repo) as (built, _), AgentlogClient(f"127.0.0.1:{built.port}") as client:
        items = client.subscribe_session("s")
        assert next(items) == CaughtUp(0)
        assert built.live.subscribers_of("s") == 1
        items.close()
        wait_until(lambda: built.live.subscribers_of("s") == 0 and not built.live.recent_of("s"))


def test_the_client_resumes_across_a_server_restart(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = JsonlSessionRepository(tmp_path)
    target = f"127.0.0.1:{port}"
    with AgentlogClient(target, retries=20) as client:
        with served(repo, port):
            for i in range(3):
                client.append(AppendEvent(session_id="s", event=delta("s", str(i))))
            follower = Follower(client.subscribe_session("s", from_sequence=1), count=8)
            follower.wait_for(4)
        # The server is gone; the subscription waits and retries. Appends made
        # while nobody serves (in-process here) must still reach the follower.
        for i in range(2):
            repo.append(AppendEvent(session_id="s", event=delta("s", f"offline {i}")))
        repo.close()  # hand the directory to the next server
        with served(JsonlSessionRepository(tmp_path), port):
            client.append(AppendEvent(session_id="s", event=delta("s", "back")))
            items = follower.finish(timeout=30)
    # After the reconnect the follower gets 4 and 5 (written while it was away),
    # a CaughtUp, and 6; or 6 too before the CaughtUp if it landed first.
    assert items in (
        [1, 2, 3, CaughtUp(3), 4, 5, CaughtUp(5), 6],
        [1, 2, 3, CaughtUp(3), 4, 5, 6, CaughtUp(6)],
    )


def test_a_stalled_subscriber_neither_blocks_writers_nor_grows_memory(tmp_path: Path) -> None:
    repo = JsonlSessionRepository(tmp_path, sync=False)
    total = 5000
    with served(repo) as (built, _), AgentlogClient(f"127.0.0.1:{built.port}") as client:
        stalled = client.subscribe_session("busy", from_sequence=1)
        assert next(stalled) == CaughtUp(0)  # then it stops reading
        batch = [NewEvent(event=delta("busy", "x" * 200)) for _ in range(100)]
        for _ in range(total // 100):
            client.append_batch("busy", batch)  # would hang here if writers waited on readers
        recent = built.live.recent_of("busy")
        assert len(recent) == RECENT_RECORDS == 1024  # the only per-session buffer, bounded
        assert recent[-1].sequence == total
        # The stalled subscriber resumes reading and sees everything, in order, once.
        sequences = []
        for item in stalled:
            assert not isinstance(item, CaughtUp)
            sequences.append(item.sequence)
            if item.sequence == total:
                break
        stalled.close()
    assert sequences == list(range(1, total + 1))


def test_the_feed_resumes_across_a_server_restart(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with AgentlogClient(f"127.0.0.1:{port}", retries=20) as client:
        repo = JsonlSessionRepository(tmp_path)
        with served(repo, port):
            client.append(AppendEvent(session_id="a", event=delta("a", "1")))
            follower = Follower(
                client.subscribe_all(from_position=1),
                10,
                until=lambda item: isinstance(item, FeedRecord) and item.position == 4,
            )
            follower.wait_for(2)
        repo.append(AppendEvent(session_id="b", event=delta("b", "offline")))
        repo.close()
        with served(JsonlSessionRepository(tmp_path), port):
            client.append_batch("a", [NewEvent(event=delta("a", str(i))) for i in range(2)])
            items = follower.finish(timeout=30)
    feed = [
        (i.position, i.record.session_id, i.record.sequence)
        for i in items
        if isinstance(i, FeedRecord)
    ]
    assert feed == [(1, "a", 1), (2, "b", 1), (3, "a", 2), (4, "a", 3)]


def test_subscribers_that_join_drop_and_resume_at_random_see_exactly_one_to_n(
    tmp_path: Path,
) -> None:
    import random
    import threading

    total = 600
    rng = random.Random(20261125)
    plans = [[rng.randint(1, 120) for _ in range(40)] for _ in range(4)]
    seen: list[list[int]] = [[] for _ in plans]
    errors: list[BaseException] = []
    repo = JsonlSessionRepository(tmp_path, sync=False)
    with served(repo) as (built, _):
        target = f"127.0.0.1:{built.port}"

        def follow(index: int) -> None:
            # Read a random number of records, drop the stream, resume after the
            # last one seen; repeat until every record has been seen.
            try:
                with AgentlogClient(target) as client:
                    time.sleep(rng.random() * 0.2)
                    for chunk in plans[index]:
                        start = (seen[index][-1] + 1) if seen[index] else 1
                        items = client.subscribe_session("busy", from_sequence=start)
                        for item in items:
                            if isinstance(item, CaughtUp):
                                continue
                            seen[index].append(item.sequence)
                            if item.sequence == total or len(seen[index]) % chunk == 0:
                                break
                        items.close()
                        if seen[index] and seen[index][-1] == total:
                            return
                        time.sleep(rng.random() * 0.01)
                    raise AssertionError("ran out of plan before the end")
            except BaseException as exc:
                errors.append(exc)

        followers = [threading.Thread(target=follow, args=(i,)) for i in range(len(plans))]
        for follower in followers:
            follower.start()
        with AgentlogClient(target) as writer:
            for i in range(total):
                writer.append(AppendEvent(session_id="busy", event=delta("busy", str(i))))
        for follower in followers:
            follower.join(60)
    assert errors == []
    for sequences in seen:
        assert sequences == list(range(1, total + 1))


SUBSCRIBERS_SCRIPT = """
import asyncio, sys, grpc
from agentlog.v1 import session_pb2 as pb
target, count, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def follow(channel, n):
    call = channel.unary_stream(
        "/agentlog.v1.SessionRepository/SubscribeSession",
        request_serializer=pb.SubscribeSessionRequest.SerializeToString,
        response_deserializer=pb.SubscribeSessionResponse.FromString,
    )(pb.SubscribeSessionRequest(session_id=f"s{n % 10}", from_sequence=1))
    seen = 0
    async for message in call:
        for record in message.records.records:
            assert record.sequence == seen + 1, (record.sequence, seen)
            seen = record.sequence
        if seen == last:
            return
async def main():
    local = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=local) for _ in range(30)]
    await asyncio.wait_for(
        asyncio.gather(*(follow(channels[n % 30], n) for n in range(count))), 120
    )
    print("all", count, flush=True)
asyncio.run(main())
"""


def test_fifteen_hundred_subscribers_at_once_each_get_every_record_in_order(
    tmp_path: Path,
) -> None:
    repo = JsonlSessionRepository(tmp_path, sync="never")
    with served(repo) as (built, _), AgentlogClient(f"127.0.0.1:{built.port}") as client:
        target = f"127.0.0.1:{built.port}"
        for i in range(10):
            client.append_batch(f"s{i}", [NewEvent(event=delta(f"s{i}", str(k))) for k in range(5)])
        followers = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBERS_SCRIPT, target, "1500", "25"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)  # while they start and catch up, the sessions grow
        for k in range(20):
            for i in range(10):
                client.append(AppendEvent(session_id=f"s{i}", event=delta(f"s{i}", f"new-{k}")))
        out, err = followers.communicate(timeout=150)
    repo.close()
    assert followers.returncode == 0, err[-2000:]
    assert out.strip() == "all 1500"
