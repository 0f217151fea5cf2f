"""Building and running the agentlog gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from agentlog._events import ReadDirection
from agentlog._records import (
    AppendEvent,
    CaughtUp,
    EventRecord,
    FeedGap,
    FeedRecord,
    NewEvent,
    SessionPage,
)
from agentlog.errors import UnavailableError
from agentlog.server._fanout import Waiter, WakeRounds
from agentlog.server._semantics import (
    Answer,
    Appended,
    FeedFilter,
    PendingAppend,
    Store,
    feed_end,
    start_position,
    start_sequence,
)
from agentlog.server.service import SessionRepositoryService, add_to_server
from agentlog.v1 import session_pb2

log = logging.getLogger("agentlog.server")

SERVICE_NAME: str = session_pb2.DESCRIPTOR.services_by_name["SessionRepository"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_GRACE_SECONDS = 10.0
# Storage calls block (file I/O, fsync); they run on these threads so the
# event loop keeps serving other calls meanwhile.
DEFAULT_STORAGE_THREADS = 16
T = TypeVar("T")
READ_CHUNK = 256
# New calls grpc may hold for the server to take up, before it cancels them.
MAX_PENDING_CALLS = 20_000
# Records read from storage at once by all subscribers catching up together,
# about (each reads smaller chunks when many do): bounds their memory.
CATCH_UP_RECORDS = 8192
# Storage reads for subscribers catching up, at once.
CATCH_UP_READS = 4
RECENT_RECORDS = 1024
# How long appends may wait for others before their sync starts (see _release).
MAX_HOLD_SECONDS = 0.005


class _Answers:
    """Settles appends' futures on the event loop from the thread that acknowledged
    them, with one wake-up of the loop for all that a sync round finished."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Answer], Answer]] = []
        self._scheduled = False

    def add(self, future: asyncio.Future[Answer], answer: Answer) -> None:
        with self._lock:
            self._ready.append((future, answer))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for future, answer in ready:
            if not future.cancelled():  # else the call went away; its append stands
                future.set_result(answer)


class ThreadedRepository:
    """An AsyncSessionRepository over a blocking store: appends are stored from the
    event loop itself when that needs no slow work (`Store.submit`) and answered
    when the store acknowledges them; reads and slow appends run on a thread pool.

    Subscriptions wait in the event loop, not on a thread: the store's
    listener wakes them (thread-safely) when their session grows, and they read
    what is new from the store by sequence.
    """

    def __init__(self, repository: Store, executor: ThreadPoolExecutor) -> None:
        self._repository = repository
        self._executor = executor
        self._stopping = False
        self._release_scheduled = False
        self._held_since = 0.0
        self._held = 0  # appends held since the last release
        self._last_group = 0  # appends the last release let go
        self._answers: _Answers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._waiters: dict[str, set[Waiter]] = {}
        self._published: dict[str, int] = {}
        # The latest records of sessions that have subscribers, consecutive by
        # sequence, so that a new record fans out without a storage read each.
        self._recent: dict[str, deque[EventRecord]] = {}
        # The same for the all-sessions feed, while it has subscribers.
        self._feed_waiters: set[Waiter] = set()
        self._recent_feed: deque[FeedRecord] = deque(maxlen=RECENT_RECORDS)
        self._published_position = 0
        self._closing = False
        self._rounds = WakeRounds(lambda s: self._waiters.get(s, ()), lambda: self._feed_waiters)
        self._catching_up = 0  # subscribers reading stored records
        self._catch_up_slots: asyncio.Semaphore | None = None  # made on the loop
        repository.add_listener(self._on_append)

    def _bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def _remember(self, session_id: str, records: list[EventRecord]) -> None:
        recent = self._recent.get(session_id)
        if recent is None:
            return  # nobody is subscribed
        if recent and recent[-1].sequence + 1 != records[0].sequence:
            # Listeners called out of order (they run after the session lock is
            # released): storage is the truth.
            recent.clear()
        recent.extend(records)

    def _cached(self, session_id: str, next_sequence: int) -> list[EventRecord] | None:
        recent = self._recent.get(session_id)
        if not recent or not recent[0].sequence <= next_sequence <= recent[-1].sequence:
            return None
        return list(itertools.islice(recent, next_sequence - recent[0].sequence, None))

    def _on_append(self, appended: Appended, position: int) -> None:
        # Runs on the thread that acknowledged the append: hand over to the event
        # loop, if anyone waits. (A subscriber registers before it reads storage,
        # so one that registers just after this check still reads these records.)
        session_id = appended.session_id
        if not self._feed_waiters and not self._waiters.get(session_id):
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            # On the loop (it acknowledges appends): wake subscribers now, before the
            # writer is answered, so the record reaches them no later than its ack.
            self._wake(session_id, appended.records(), position)
        else:
            loop.call_soon_threadsafe(self._wake, session_id, appended.records(), position)

    def _wake(self, session_id: str, records: list[EventRecord], position: int) -> None:
        if self._feed_waiters:
            last_position = position + len(records) - 1
            self._published_position = max(self._published_position, last_position)
            recent = self._recent_feed
            if recent and recent[-1].position + 1 != position:
                recent.clear()  # listeners called out of order: storage is the truth
            recent.extend(FeedRecord(position + i, r) for i, r in enumerate(records))
            self._rounds.grew(None)
        waiters = self._waiters.get(session_id)
        if waiters:
            last_sequence = records[-1].sequence
            if last_sequence > self._published.get(session_id, 0):
                self._published[session_id] = last_sequence
            self._remember(session_id, records)
            self._rounds.grew(session_id)
        # (Nobody follows this session otherwise: a subscriber reads storage first.)
        self._rounds.wake()

    def close_subscriptions(self) -> None:
        """End every subscription with UNAVAILABLE (at shutdown)."""
        self._closing = True
        for waiters in [*self._waiters.values(), self._feed_waiters]:
            for waiter in waiters:
                waiter.set()

    async def subscribe_all_chunks(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
    ) -> AsyncIterator[list[FeedRecord | FeedGap] | CaughtUp]:
        """The all-sessions feed as runs of kept records (and gaps) and CaughtUp markers.

        A CaughtUp also follows every run of records the filters dropped, so a
        client always knows how far it has been served. Stored records are read a
        run at a time, so a subscriber catching up holds one run, not the feed.
        """
        self._bind_loop()
        keep = FeedFilter.of(session_id_prefix, part_types)
        waiter = Waiter()
        if not self._feed_waiters:
            self._recent_feed.clear()  # nobody kept it up to date
        self._feed_waiters.add(waiter)
        last = await self._run(self._repository.last_position)
        self._published_position = max(self._published_position, last)
        next_position = start_position(last, from_position)
        try:
            caught_up = False
            while True:
                waiter.clear()
                recent = self._recent_feed  # contiguous: cleared at any gap
                runs: AsyncIterator[list[FeedRecord | FeedGap]]
                if (
                    caught_up
                    and recent
                    and recent[0].position <= next_position <= recent[-1].position
                ):
                    runs = _once(
                        list(itertools.islice(recent, next_position - recent[0].position, None))
                    )
                else:
                    runs = self._feed_chunks(next_position)
                async for run in runs:
                    if not run:
                        continue
                    next_position = feed_end(run[-1]) + 1
                    kept = [item for item in run if keep(item)]
                    yield kept if kept else CaughtUp(position=next_position - 1)
                if not caught_up:
                    caught_up = True
                    yield CaughtUp(position=next_position - 1)
                self._rounds.back(waiter)
                if not self._closing and self._published_position < next_position:
                    await waiter.wait()
                if self._closing:
                    raise UnavailableError(
                        "the server is shutting down; subscribe again (here when it is back, "
                        f"or elsewhere) from position {next_position}",
                        reason="SHUTTING_DOWN",
                        metadata={"next_position": str(next_position)},
                    )
        finally:
            self._feed_waiters.discard(waiter)
            self._rounds.back(waiter)

    async def _feed_chunks(self, position: int) -> AsyncIterator[list[FeedRecord | FeedGap]]:
        records: Iterator[FeedRecord | FeedGap] = await self._run(
            self._repository.read_all, position
        )
        while chunk := await self._run(_take, records, READ_CHUNK):
            yield chunk

    async def subscribe_all(
        self,
        *,
        from_position: int | None = None,
        session_id_prefix: str = "",
        part_types: Collection[str] = (),
    ) -> AsyncIterator[FeedRecord | FeedGap | CaughtUp]:
        chunks = self.subscribe_all_chunks(
            from_position=from_position,
            session_id_prefix=session_id_prefix,
            part_types=part_types,
        )
        async for item in chunks:
            if isinstance(item, CaughtUp):
                yield item
            else:
                for record in item:
                    yield record

    async def subscribe_chunks(
        self, session_id: str, *, from_sequence: int | None = None
    ) -> AsyncIterator[list[EventRecord] | CaughtUp]:
        """The subscription as runs of records (each at most READ_CHUNK long) and CaughtUp."""
        self._bind_loop()
        next_sequence = start_sequence(await self.head(session_id), from_sequence)
        waiter = Waiter()
        self._waiters.setdefault(session_id, set()).add(waiter)
        self._recent.setdefault(session_id, deque(maxlen=RECENT_RECORDS))
        try:
            caught_up = False
            while True:
                waiter.clear()
                cached = self._cached(session_id, next_sequence) if caught_up else None
                if cached:
                    yield cached
                    next_sequence = cached[-1].sequence + 1
                else:
                    # A bounded read at a time, no file or iterator held between:
                    # thousands of subscribers catching up hold little memory.
                    self._catching_up += 1
                    try:
                        while True:
                            size = self._catch_up_chunk()
                            chunk = await self._catch_up_read(session_id, next_sequence, size)
                            if chunk:
                                yield chunk
                                next_sequence = chunk[-1].sequence + 1
                            if len(chunk) < size:
                                break
                    finally:
                        self._catching_up -= 1
                if not caught_up:
                    caught_up = True
                    yield CaughtUp(next_sequence - 1)
                self._rounds.back(waiter)
                if not self._closing and self._published.get(session_id, 0) < next_sequence:
                    await waiter.wait()
                if self._closing:
                    raise UnavailableError(
                        "the server is shutting down; subscribe again (here when it is back, "
                        f"or elsewhere) from sequence {next_sequence}",
                        reason="SHUTTING_DOWN",
                        metadata={"session_id": session_id, "next_sequence": str(next_sequence)},
                    )
        finally:
            self._rounds.back(waiter)
            waiters = self._waiters.get(session_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[session_id]
                    self._recent.pop(session_id, None)
                    self._published.pop(session_id, None)

    async def subscribe_session(
        self, session_id: str, *, from_sequence: int | None = None
    ) -> AsyncIterator[EventRecord | CaughtUp]:
        async for item in self.subscribe_chunks(session_id, from_sequence=from_sequence):
            if isinstance(item, CaughtUp):
                yield item
            else:
                for record in item:
                    yield record

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def append(self, event: AppendEvent) -> EventRecord:
        appended = await self.submit(self._repository.prepare_append(event))
        return appended.records()[0]

    async def submit(self, append: PendingAppend) -> Appended:
        """Store a checked append: what was appended, once acknowledged; or raise."""
        answer = await self._submit([append])
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _submit(self, appends: list[PendingAppend]) -> Answer:
        if self._stopping:
            raise UnavailableError(
                "the server is shutting down; retry the append (here when it is back, or "
                "elsewhere)",
                reason="SHUTTING_DOWN",
            )
        loop = asyncio.get_running_loop()
        if self._answers is None:
            self._answers = _Answers(loop)
            # Acknowledge durable appends here, on the loop, where they are answered.
            acknowledge = self._repository.acknowledge_durable
            self._repository.on_durable(lambda: self._answers_soon(loop, acknowledge))
        answers, on_loop = self._answers, threading.get_ident()
        future: asyncio.Future[Answer] = loop.create_future()

        def done(results: list[Answer]) -> None:
            if threading.get_ident() == on_loop:
                future.set_result(results[0])  # acknowledged at once
            else:
                answers.add(future, results[0])

        if self._repository.submit(appends, done, block=False, hold=True):
            self._held += 1
            if not self._release_scheduled:
                self._release_scheduled = True
                self._held_since = loop.time()
                loop.call_soon(self._release, loop)
        else:
            submit = functools.partial(self._repository.submit, appends, done)
            await loop.run_in_executor(self._executor, submit)
        return await future

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the appends held since `_held_since` be synced (group commit).

        At once, unless appends have been arriving together (the last group had
        more than one) and the loop has more to run (calls that may append too):
        then once it has not, or MAX_HOLD_SECONDS after the first. A server under
        concurrent appends syncs many at once; one with a single writer, or idle,
        syncs each at once.
        """
        ready = getattr(loop, "_ready", None)  # asyncio's run queue; absent elsewhere
        waited = loop.time() - self._held_since
        if ready and self._last_group > 1 and waited < MAX_HOLD_SECONDS:
            # Busy: look again a little later rather than at every pass.
            later = min(MAX_HOLD_SECONDS / 4, MAX_HOLD_SECONDS - waited)
            loop.call_later(later, self._release, loop)
            return
        self._release_scheduled = False
        self._last_group, self._held = self._held, 0
        self._repository.release()

    @staticmethod
    def _answers_soon(loop: asyncio.AbstractEventLoop, acknowledge: Callable[[], None]) -> bool:
        if not loop.is_running():
            return False  # stopped: it would never run (the store acknowledges instead)
        try:
            loop.call_soon_threadsafe(acknowledge)
        except RuntimeError:  # the loop is closed
            return False
        return True

    def stop_writing(self) -> None:
        """Refuse appends from now on (at shutdown); those in flight still finish."""
        self._stopping = True
        self._repository.on_durable(None)  # the loop is going: the store answers itself

    def close(self) -> None:
        """Let the storage threads go (after the server stopped): queued work is
        dropped, a call still running ends on its own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def load_children(self, parent_id: str) -> list[EventRecord]:
        records: list[EventRecord] = await self._run(self._repository.load_children, parent_id)
        return records

    async def head(self, session_id: str) -> EventRecord | None:
        record: EventRecord | None = await self._run(self._repository.head, session_id)
        return record

    async def append_batch(
        self,
        session_id: str,
        events: Sequence[NewEvent],
        *,
        expected_sequence: int | None = None,
    ) -> list[EventRecord]:
        pending = self._repository.prepare_batch(session_id, events, expected_sequence)
        return (await self.submit(pending)).records()

    async def read_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> AsyncIterator[EventRecord]:
        # The blocking iterator is advanced a chunk at a time on the storage
        # threads, so a long read holds one chunk in memory, not the session.
        async for chunk in self._read_chunks(
            session_id, from_sequence=from_sequence, limit=limit, direction=direction
        ):
            for record in chunk:
                yield record

    async def _read_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> AsyncIterator[list[EventRecord]]:
        """A read's records, READ_CHUNK records at a time, each read on a storage thread."""
        open_read = functools.partial(
            self._repository.read_session,
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
        )
        records: Iterator[EventRecord] = await self._run(open_read)
        while run := await self._run(_take, records, READ_CHUNK):
            yield run

    async def _catch_up_read(
        self, session_id: str, from_sequence: int, limit: int
    ) -> list[EventRecord]:
        """Stored records for a subscriber catching up; a few such reads at a time, so
        that appends keep their storage threads."""
        if self._catch_up_slots is None:
            self._catch_up_slots = asyncio.Semaphore(CATCH_UP_READS)
        read = functools.partial(
            self._repository.read_session, session_id, from_sequence=from_sequence, limit=limit
        )
        async with self._catch_up_slots:
            records: list[EventRecord] = await self._run(lambda: list(read()))
        return records

    def _catch_up_chunk(self) -> int:
        """Records a subscriber catching up reads at once: fewer when many do."""
        return max(16, min(READ_CHUNK, CATCH_UP_RECORDS // max(self._catching_up, 1)))

    async def read_session_chunks(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> AsyncIterator[list[Any]]:
        """A ranged read as the runs of messages LoadSession sends (Store.read_session_chunks)."""
        open_read = functools.partial(
            self._repository.read_session_chunks,
            session_id,
            from_sequence=from_sequence,
            limit=limit,
            direction=direction,
        )
        chunks: Iterator[list[Any]] = await self._run(open_read)
        while chunk := await self._run(next, chunks, None):
            yield chunk

    async def load_session(
        self,
        session_id: str,
        *,
        from_sequence: int = 0,
        limit: int | None = None,
        direction: ReadDirection = ReadDirection.FORWARDS,
    ) -> list[EventRecord]:
        read = self.read_session(
            session_id, from_sequence=from_sequence, limit=limit, direction=direction
        )
        return [record async for record in read]

    async def list_sessions(
        self, *, page_size: int | None = None, page_token: str | None = None
    ) -> SessionPage:
        call = functools.partial(
            self._repository.list_sessions, page_size=page_size, page_token=page_token
        )
        page: SessionPage = await self._run(call)
        return page


async def _once(run: list[T]) -> AsyncIterator[list[T]]:
    yield run


def _take(records: Iterator[T], count: int) -> list[T]:
    return list(itertools.islice(records, count))


class Server(NamedTuple):
    """A built server: the grpc.aio server, its bound port, health service and storage."""

    server: grpc.aio.Server
    port: int
    health: Any
    repository: ThreadedRepository
    service: SessionRepositoryService

    async def start(self) -> None:
        """Start serving and report SERVING to health checks."""
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish within `grace`.

        Subscriptions keep delivering while other calls are in flight (appends
        whose records they would deliver), then end with UNAVAILABLE, at the
        latest just before the grace period runs out, rather than with the
        CANCELLED that grpc gives calls it cuts off.
        """
        await self.health.enter_graceful_shutdown()
        margin = min(0.5, (grace or 0) / 2)
        stopping = asyncio.ensure_future(self.server.stop(grace))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.in_flight.quiet(), max((grace or 0) - margin, 0))
        try:
            self.repository.close_subscriptions()
            await stopping
        finally:
            self.repository.close_subscriptions()
            self.repository.stop_writing()
            self.repository.close()

    async def stop_now(self) -> None:
        """Cut every call in flight off now (a second signal). Appends already
        acknowledged are durable; those cut off were never acknowledged."""
        self.repository.close_subscriptions()
        await self.server.stop(0)


def create_server(
    address: str,
    repository: Store,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    storage_threads: int = DEFAULT_STORAGE_THREADS,
) -> Server:
    """Build (not start: see `Server.start`) a server for `repository`.

    `address` is "host:port"; port 0 picks a free port, returned in `Server.port`.

    Registers the SessionRepository service, grpc.health.v1 (SERVING once
    started, since the repository is already open) and server reflection. Requests larger than
    `max_message_bytes` are refused with RESOURCE_EXHAUSTED.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            # grpc shares a busy port by default (SO_REUSEPORT): refuse instead.
            ("grpc.so_reuseport", 0),
            # Keep idle connections (and, later, long streams) alive through
            # proxies: accept client pings every 10 s even without calls.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            # grpc cancels calls beyond 1,000 that arrive faster than the asyncio
            # server takes them up (a burst of reconnecting subscribers, say).
            ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
        ]
    )
    executor = ThreadPoolExecutor(storage_threads, thread_name_prefix="agentlog-storage")
    threaded = ThreadedRepository(repository, executor)
    service = SessionRepositoryService(threaded)
    add_to_server(service, server)

    health_service = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lack aio
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = bind(server, address)
    return Server(server, port, health_service, threaded, service)


def bind(server: grpc.aio.Server, address: str) -> int:
    """Listen on `address` ("host:port"); the port bound. OSError unless every address
    the host names is bound: grpc binds what it can of a name (both 127.0.0.1 and ::1
    for localhost) and only warns about the rest, so each is bound here on its own."""
    host, colon, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise OSError(f"cannot listen on {address!r}: give HOST:PORT, e.g. 127.0.0.1:50051")
    targets = [address]
    if host and not _is_ip_literal(host):
        try:
            found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OSError(
                f"cannot listen on {address}: {host!r} does not resolve ({exc.strerror})"
            ) from None
        ips = list(dict.fromkeys(str(info[4][0]) for info in found))
        if host == "localhost":  # grpc, like most servers, takes it as both loopbacks
            ips += [ip for ip in ("127.0.0.1", "::1") if ip not in ips and _can_bind(ip)]
        targets = [f"[{ip}]" if ":" in ip else ip for ip in ips]
    port = int(port_text)
    for index, target in enumerate(targets):
        where = target if index == 0 and target == address else f"{target}:{port}"
        try:
            bound = server.add_insecure_port(where)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {where}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {where}: the address is in use or invalid")
        port = bound  # port 0: every other address takes the port the first got
    return port


def _can_bind(ip: str) -> bool:
    """Whether this host has the address `ip` (IPv6 may be switched off)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def serve(
    address: str,
    data_dir: Path,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    grace: float = DEFAULT_GRACE_SECONDS,
    sync: str = "always",
    sync_interval_ms: int = 100,
    metrics_address: str | None = None,
    version: str = "",
) -> None:
    """Run the JSONL-backed server until SIGTERM or SIGINT, then stop gracefully."""
    from agentlog.server._files import raise_open_files_limit
    from agentlog.server.jsonl import JsonlSessionRepository

    raise_open_files_limit()
    repository = JsonlSessionRepository(data_dir, sync=sync, sync_interval_ms=sync_interval_ms)
    try:
        built = create_server(address, repository, max_message_bytes=max_message_bytes)
    except BaseException:
        repository.close()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        signals.append(signum.name)
        if len(signals) == 1:
            in_flight = built.service.in_flight
            log.info(
                "%s received: stopping. New calls are refused; %d call(s) in flight get up to "
                "%.1f s to finish, and %d subscription(s) end once they have. Send %s again "
                "to stop at once (nothing acknowledged is lost).",
                signum.name,
                in_flight.calls,
                grace,
                in_flight.subscriptions,
                signum.name,
            )
            stop.set()
        elif len(signals) == 2:
            log.warning("%s received again: stopping now, cutting off calls in flight", signum.name)
            hurry.append(asyncio.ensure_future(built.stop_now()))

    hurry: list[asyncio.Future[None]] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await built.start()
    started = time.monotonic()
    if metrics_address is not None:
        from agentlog.server.metrics import serve_metrics

        try:
            metrics_port = serve_metrics(metrics_address)
        except (OSError, ValueError) as exc:
            await built.stop(0)
            repository.close()
            raise OSError(f"cannot serve metrics on {metrics_address}: {exc}") from None
    host = address.rsplit(":", 1)[0]
    log.info(
        "agentlog %s serving on %s:%d, data dir %s, sync %s",
        version,
        host,
        built.port,
        repository.root,
        repository.sync_policy,
    )
    if metrics_address is not None:
        log.info("metrics at http://%s:%d/metrics", metrics_address.rsplit(":", 1)[0], metrics_port)
    try:
        await stop.wait()
    finally:
        await built.stop(grace)
        for task in hurry:
            await task
        log.info("calls ended; syncing and closing the data directory")
        repository.close()
        log.info(
            "agentlog stopped after %.1f s of service (grace for calls in flight: %.1f s)",
            time.monotonic() - started,
            grace,
        )
