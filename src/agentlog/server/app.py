"""Assembling and running the agentlog gRPC server: the service, health,
reflection and live subscriptions over one backend, bound to its addresses."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.trace import TracerProvider

from agentlog.server import metrics
from agentlog.server._auth import Authenticator
from agentlog.server._http_calls import PeerCertificates, connect_application
from agentlog.server._http_server import ConsoleFiles, HttpServer, http_application
from agentlog.server._live import LiveSubscriptions
from agentlog.server._observe import CallObserver
from agentlog.server._tls import TlsFiles, server_credentials
from agentlog.server._tracing import CallTracer, configure_from_environment
from agentlog.server.backend import Backend
from agentlog.server.blocking import BlockingStore
from agentlog.server.service import SessionRepositoryService, add_to_server
from agentlog.v1 import session_pb2

log = logging.getLogger("agentlog.server")

SERVICE_NAME: str = session_pb2.DESCRIPTOR.services_by_name["SessionRepository"].full_name
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_CONNECTION_AGE_GRACE = 30.0
# A blocking store's calls (file I/O, fsync) run on these threads so the
# event loop keeps serving other calls meanwhile.
DEFAULT_STORAGE_THREADS = 16
# New calls grpc may hold for the server to take up, before it cancels them.
MAX_PENDING_CALLS = 20_000
# Calls (streams) one connection may have open at once (HTTP/2's
# SETTINGS_MAX_CONCURRENT_STREAMS); its client queues the rest.
MAX_STREAMS_PER_CONNECTION = 1000


# Health updates under way (asyncio keeps only weak references to tasks).
_health_updates: set[asyncio.Future[None]] = set()


class Server(NamedTuple):
    """A built server: the grpc.aio server, its bound port, health service, backend,
    live subscriptions and service."""

    server: grpc.aio.Server
    port: int
    health: Any
    backend: Backend
    live: LiveSubscriptions
    service: SessionRepositoryService
    http: HttpServer | None = None

    async def start(self) -> None:
        """Start serving and report SERVING to health checks (NOT_SERVING while the
        backend cannot reach its storage, e.g. a database that is down)."""
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        self.backend.on_availability(self._report)
        await self._set_health(self.backend.available)

    def _report(self, available: bool) -> None:
        task = asyncio.ensure_future(self._set_health(available))
        _health_updates.add(task)
        task.add_done_callback(_health_updates.discard)

    async def _set_health(self, available: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if available
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float | None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish within `grace`.

        Subscriptions keep delivering while other calls are in flight (appends
        whose records they would deliver), then end with UNAVAILABLE, at the
        latest just before the grace period runs out, rather than with the
        CANCELLED that grpc gives calls it cuts off.
        """
        await self.health.enter_graceful_shutdown()
        self.service.stop_append_streams()
        margin = min(0.5, (grace or 0) / 2)
        stopping = asyncio.ensure_future(self.server.stop(grace))
        http_stopping = (
            asyncio.ensure_future(self.http.stop(grace or 0)) if self.http is not None else None
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.service.in_flight.quiet(), max((grace or 0) - margin, 0))
        try:
            self.live.close()
            # Every call the service serves has ended (subscriptions say where to resume
            # as they end). What grpc still holds are streams whose request never came
            # (half-open): nothing of them started, so they are cut off now rather than
            # waited for to the end of the grace period.
            await self.service.in_flight.idle(max((grace or 0) - margin, 0))
            await asyncio.wait({stopping}, timeout=0.1)
            if not stopping.done():
                log.info("calls ended; closing connections whose request never arrived")
                await self.server.stop(0)
            await stopping
            if http_stopping is not None:
                await http_stopping
        finally:
            self.live.close()
            await self.service.close()
            self.backend.stop_writing()
            await self.backend.close()

    async def stop_now(self) -> None:
        """Cut every call in flight off now (a second signal). Appends already
        acknowledged are durable; those cut off were never acknowledged."""
        self.live.close()
        if self.http is not None:
            self.http.stop_now()
        await self.server.stop(0)


def create_server(
    address: str,
    repository: BlockingStore | Backend,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    storage_threads: int = DEFAULT_STORAGE_THREADS,
    max_connection_age: float | None = None,
    max_connection_age_grace: float = DEFAULT_CONNECTION_AGE_GRACE,
    access_log: bool = False,
    tls: TlsFiles | None = None,
    authenticator: Authenticator | None = None,
    reflection_enabled: bool = True,
    tracer_provider: TracerProvider | None = None,
    http_address: str | None = None,
) -> Server:
    """Build (not start: see `Server.start`) a server for `repository`: a Backend, or a
    blocking store (memory, JSONL), whose calls then run on `storage_threads` threads.

    `address` is "host:port"; port 0 picks a free port, returned in `Server.port`.

    Registers the SessionRepository service, grpc.health.v1 (SERVING once
    started, since the repository is already open) and server reflection. Requests larger than
    `max_message_bytes` are refused with RESOURCE_EXHAUSTED.

    With `max_connection_age` (seconds), a connection is asked to go away (HTTP/2 GOAWAY)
    once that old, so that long-lived clients move to other replicas behind an L4
    balancer; calls in flight get `max_connection_age_grace` more seconds, then end with
    UNAVAILABLE (subscriptions of the agentlog clients resume where they were).

    Every call is counted and timed (`grpc_server_*` metrics); with `access_log`, each is
    also logged on `agentlog.access` when it ends (method, status, duration, peer).

    With `tls`, it speaks only TLS, from certificate files re-read when they are rotated
    (and, with `tls.client_ca`, requires client certificates that CA signed: mTLS).
    With `authenticator`, every SessionRepository call needs a credential and is held
    to its scopes (health stays open); `reflection_enabled=False` leaves reflection out.
    With `tracer_provider`, each call gets a server span (joined to the caller's trace)
    and the store's write and sync spans beneath it.

    With `http_address`, the same service is also served there over HTTP (Connect and
    gRPC-Web, with the same TLS files, credentials, metrics and traces), with the web
    console at `/`; its port is `Server.http.port`.
    """
    age_options = []
    if max_connection_age is not None:
        age_options = [
            ("grpc.max_connection_age_ms", max(1, int(max_connection_age * 1000))),
            ("grpc.max_connection_age_grace_ms", max(0, int(max_connection_age_grace * 1000))),
        ]
    # One interceptor: the call's metrics, its span (when tracing), its access log line.
    observer = CallObserver(
        access_log=access_log,
        tracer=CallTracer(tracer_provider) if tracer_provider is not None else None,
    )
    server = grpc.aio.server(
        interceptors=[observer],
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
            # One connection's flood of streams waits at its client beyond this many,
            # rather than taking the server from every other client.
            ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
            *age_options,
        ],
    )
    if isinstance(repository, Backend):
        backend = repository
    else:
        executor = ThreadPoolExecutor(storage_threads, thread_name_prefix="agentlog-storage")
        backend = repository.backend(executor)
    live = LiveSubscriptions(backend)
    metrics.watch_server(backend, live)
    service = SessionRepositoryService(backend, live, authenticator)
    add_to_server(service, server)

    health_service = health.aio.HealthServicer()  # type: ignore[attr-defined]  # stubs lack aio
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            [
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
    port = bind(server, address, server_credentials(tls) if tls is not None else None)
    http = None
    if http_address is not None:
        peers = PeerCertificates()
        connect = connect_application(
            service, observer.wrap, peers, max_message_bytes=max_message_bytes
        )
        application = http_application(connect, ConsoleFiles(), lambda: backend.available)
        http = HttpServer(http_address, application, peers, tls)
    return Server(server, port, health_service, backend, live, service, http)


def bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
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
        if port:
            _check_free(where, port)
        try:
            if credentials is None:
                bound = server.add_insecure_port(where)
            else:
                bound = server.add_secure_port(where, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {where}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {where}: the address is in use or invalid")
        port = bound  # port 0: every other address takes the port the first got
    return port


def check_can_listen(address: str, flag: str = "--addr (AGENTLOG_ADDR)") -> None:
    """OSError, in agentlog's words, if `address` is HOST:PORT with a port some process
    already listens on (checked before anything else is opened or made)."""
    port_text = address.rpartition(":")[2]
    if not port_text.isdigit() or int(port_text) == 0:
        return  # bind() says what is wrong with it
    _check_free(address, int(port_text), flag)


def _check_free(where: str, port: int, flag: str = "--addr (AGENTLOG_ADDR)") -> None:
    host = where.rpartition(":")[0].removeprefix("[").removesuffix("]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # bind() says the name does not resolve
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the server binds: a port left in TIME_WAIT by a restart is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    ip = str(sockaddr[0])
                    named = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
                    raise OSError(
                        f"cannot listen on {named}: address already in use (another process "
                        f"listens there); stop it, or give another {flag}"
                    ) from None
                return  # not an address of this host: bind() says so


def _can_bind(ip: str) -> bool:
    """Whether this host has the address `ip` (IPv6 may be switched off)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((ip, 0))
    except OSError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    store: str | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    grace: float = DEFAULT_GRACE_SECONDS,
    sync: str = "always",
    sync_interval_ms: int = 100,
    read_only: bool = False,
    layout: str | None = None,
    pool_size: int = 10,
    statement_timeout_ms: int = 30_000,
    connect_timeout: float = 30.0,
    max_connection_age: float | None = None,
    max_connection_age_grace: float = DEFAULT_CONNECTION_AGE_GRACE,
    access_log: bool = False,
    tls: TlsFiles | None = None,
    authenticator: Authenticator | None = None,
    reflection_enabled: bool = True,
    metrics_address: str | None = None,
    http_address: str | None = None,
    version: str = "",
    retention_seconds: float | None = None,
    retention_interval: float = 60.0,
) -> None:
    """Run the server until SIGTERM or SIGINT, then stop gracefully: on the PostgreSQL
    database `store` names (a postgresql:// URL), else on the JSONL directory
    `store` (or `data_dir`)."""
    from agentlog.server.postgres import PostgresBackend, check_store_path, is_postgres_url

    check_can_listen(address)  # before a data directory or a database is touched
    if http_address is not None:
        check_can_listen(http_address, "--http-addr (AGENTLOG_HTTP_ADDR)")
    tracer_provider = configure_from_environment()
    repository: BlockingStore | None = None
    served: BlockingStore | Backend
    if store is not None and is_postgres_url(store):
        from agentlog.server.postgres._errors import redact

        if read_only:
            raise OSError(
                "--read-only serves a JSONL directory; to keep callers of a PostgreSQL store "
                "to reads, give them credentials that grant only read (--auth-file)"
            )
        if layout is not None:
            raise OSError(
                "--layout is a JSONL directory's file layout; PostgreSQL holds branches "
                "in every case: leave it unset (and AGENTLOG_LAYOUT) with --store postgresql://"
            )

        served = await PostgresBackend.open(
            store,
            pool_size=pool_size,
            statement_timeout_ms=statement_timeout_ms,
            connect_timeout=connect_timeout,
        )
        where = f"PostgreSQL {redact(store)} (pool of {pool_size})"
    else:
        from agentlog.server.jsonl import JsonlSessionRepository
        from agentlog.server.jsonl.files import raise_open_files_limit

        check_store_path(store)

        raise_open_files_limit()
        root = Path(store) if store else data_dir
        jsonl = JsonlSessionRepository(
            root,
            sync=sync,
            sync_interval_ms=sync_interval_ms,
            read_only=read_only,
            layout=layout,
        )
        repository = served = jsonl
        where = f"data dir {jsonl.root} ({jsonl.layout} layout), " + (
            "read-only" if read_only else f"sync {jsonl.sync_policy}"
        )
    try:
        built = create_server(
            address,
            served,
            max_message_bytes=max_message_bytes,
            max_connection_age=max_connection_age,
            max_connection_age_grace=max_connection_age_grace,
            access_log=access_log,
            tls=tls,
            authenticator=authenticator,
            reflection_enabled=reflection_enabled,
            tracer_provider=tracer_provider,
            http_address=http_address,
        )
    except BaseException:
        if repository is not None:
            repository.close()
        elif isinstance(served, Backend):
            await served.close()
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
    sweeper = None
    if retention_seconds is not None:
        from agentlog.server._retention import RetentionSweeper

        sweeper = RetentionSweeper(built.backend, retention_seconds, retention_interval)
        sweeper.start()
    metrics_server = None
    if metrics_address is not None:
        from agentlog.server.metrics import serve_metrics

        try:
            metrics_server = serve_metrics(metrics_address)
            metrics_port = metrics_server.port
        except (OSError, ValueError) as exc:
            await built.stop(0)
            if repository is not None:
                repository.close()
            raise OSError(f"cannot serve metrics on {metrics_address}: {exc}") from None
    host = address.rsplit(":", 1)[0]
    security = "plaintext" if tls is None else ("mTLS" if tls.client_ca else "TLS")
    if authenticator is None and not _is_loopback(host):
        log.warning(
            "no authentication is set up (--auth-file, --jwks-file) and the server listens "
            "on %s, not only loopback: anyone who reaches it may read and write every session",
            host or "every address",
        )
    log.info("agentlog %s serving on %s:%d (%s), %s", version, host, built.port, security, where)
    if built.http is not None:
        log.info(
            "HTTP (Connect, gRPC-Web) and the web console on %s://%s:%d/",
            "http" if tls is None else "https",
            built.http.address.rsplit(":", 1)[0],
            built.http.port,
        )
    if tracer_provider is not None:
        log.info("tracing: spans exported as the OTEL_* settings say")
    if metrics_server is not None and metrics_address is not None:
        log.info("metrics at http://%s:%d/metrics", metrics_address.rsplit(":", 1)[0], metrics_port)
    try:
        await stop.wait()
    finally:
        if sweeper is not None:
            await sweeper.stop()
        await built.stop(grace)
        for task in hurry:
            await task
        if metrics_server is not None:
            metrics_server.close()
        if repository is not None:
            log.info("calls ended; syncing and closing the data directory")
            repository.close()
        shutdown = getattr(tracer_provider, "shutdown", None)
        if shutdown is not None:
            shutdown()  # export the spans still buffered
        log.info(
            "agentlog stopped after %.1f s of service (grace for calls in flight: %.1f s)",
            time.monotonic() - started,
            grace,
        )
