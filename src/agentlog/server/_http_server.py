"""The HTTP listener (`--http-addr`): the SessionRepository service over Connect and
gRPC-Web (`_http_calls`), the web console's files at `/`, and `/healthz`, served by
uvicorn on the server's own event loop, beside gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mimetypes
import socket
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from importlib import resources
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from agentlog.server._http_calls import PeerCertificates
from agentlog.server._tls import RotatingSslContext, TlsFiles

log = logging.getLogger("agentlog.server")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

SERVICE_PATH = "/agentlog.v1.SessionRepository/"
# The console's page may load only from its own origin, and call only it.
_PAGE_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


_GRPC_ELSEWHERE = (
    b"this is agentlog's HTTP port (Connect and gRPC-Web); gRPC is served on the address "
    b"given by --addr (AGENTLOG_ADDR)\n"
)


class ConsoleFiles:
    """The built console (src/agentlog/server/console, made by `make console`), read
    once: a fixed set of files, so no request path reaches the file system."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, bytes, bytes]] = {}
        folder = resources.files("agentlog.server") / "console"
        if not folder.is_dir():
            return
        for item in folder.iterdir():
            if item.name.startswith(".") or not item.is_file():
                continue
            body = item.read_bytes()
            kind = mimetypes.guess_type(item.name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            tag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
            self.files["/" + item.name] = (body, kind.encode(), tag)
        if "/index.html" in self.files:
            self.files["/"] = self.files["/index.html"]

    def find(self, path: str) -> tuple[bytes, bytes, bytes] | None:
        return self.files.get(path)  # the console's own links are in the fragment (#/...)


def http_application(
    connect: Asgi, console: ConsoleFiles | None, available: Callable[[], bool]
) -> Asgi:
    """The ASGI application: the service's paths to Connect, GET of a console file,
    /healthz (200 SERVING or 503 NOT_SERVING), anything else 404."""

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets: none here
        path: str = scope["path"]
        if path.startswith(SERVICE_PATH):
            kind = dict(scope.get("headers") or ()).get(b"content-type", b"")
            if kind.startswith(b"application/grpc") and not kind.startswith(
                b"application/grpc-web"
            ):
                # gRPC needs HTTP/2 trailers: it has a port of its own (--addr).
                await _plain(send, 415, _GRPC_ELSEWHERE)
                return
            await connect(scope, receive, send)
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _plain(send, 405, b"only GET and HEAD here; calls go to " + SERVICE_PATH.encode())
            return
        if path == "/healthz":
            up = available()
            await _plain(send, 200 if up else 503, b"SERVING\n" if up else b"NOT_SERVING\n")
            return
        found = console.find(path) if console is not None else None
        if found is None:
            await _plain(send, 404, b"not found\n")
            return
        body, kind, tag = found
        headers = dict(scope.get("headers") or ())
        fresh = headers.get(b"if-none-match") == tag
        await send(
            {
                "type": "http.response.start",
                "status": 304 if fresh else 200,
                "headers": [
                    (b"content-type", kind),
                    (b"etag", tag),
                    (b"cache-control", b"no-cache"),
                    (b"content-length", b"0" if fresh else str(len(body)).encode()),
                    *_PAGE_HEADERS,
                ],
            }
        )
        await send(
            {"type": "http.response.body", "body": b"" if fresh or method == "HEAD" else body}
        )

    return application


async def _plain(send: Send, status: int, text: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(text)).encode()),
                (b"x-content-type-options", b"nosniff"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": text})


def _recording(peers: PeerCertificates) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, noting each TLS connection's client certificate
    (uvicorn does not pass it to the application) for `PeerCertificates`."""

    class Recording(H11Protocol):
        _address = ""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and peer:
                self._address = f"{peer[0]}:{peer[1]}"
                der = ssl_object.getpeercert(binary_form=True)
                if der:
                    peers.connected(self._address, ssl_object.getpeercert(), der)
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._address:
                peers.lost(self._address)
            super().connection_lost(exc)

    return Recording


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: `agentlog serve` owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(address: str) -> socket.socket:
    """A listening socket on `address` ("host:port"; port 0 picks one); OSError in
    agentlog's words when it cannot be had."""
    from agentlog.server.app import check_can_listen

    host, colon, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not port_text.isdigit() or int(port_text) > 65535:
        raise OSError(
            f"cannot serve HTTP on {address!r}: give HOST:PORT, e.g. 127.0.0.1:8080 "
            "(--http-addr, AGENTLOG_HTTP_ADDR)"
        )
    check_can_listen(address, "--http-addr (AGENTLOG_HTTP_ADDR)")
    try:
        found = socket.getaddrinfo(host or None, int(port_text), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(
            f"cannot serve HTTP on {address}: {host!r} does not resolve ({exc.strerror})"
        ) from None
    family, _, _, _, sockaddr = found[0]
    try:
        return socket.create_server(sockaddr[:2], family=family, backlog=1024)
    except OSError as exc:
        raise OSError(f"cannot serve HTTP on {address}: {exc.strerror}") from None


class HttpServer:
    """The HTTP listener, bound when made (so its port is known), serving once started."""

    def __init__(
        self,
        address: str,
        application: Asgi,
        peers: PeerCertificates,
        tls: TlsFiles | None,
    ) -> None:
        self.socket = listen(address)
        self.address = address
        self.port: int = self.socket.getsockname()[1]
        rotating = RotatingSslContext(tls) if tls is not None else None
        config = uvicorn.Config(
            application,
            http=_recording(peers),
            lifespan="off",
            ws="none",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            ssl_context_factory=(lambda _c, _d: rotating.context) if rotating else None,
            timeout_graceful_shutdown=None,
            timeout_keep_alive=75,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self.socket]))
        while not self._server.started:
            if self._task.done():
                await self._task  # it failed: say why
                raise OSError("the HTTP server did not start")
            await asyncio.sleep(0.01)

    async def stop(self, grace: float) -> None:
        """Stop listening; let requests in flight end within `grace` seconds (the
        service ends its streams meanwhile), then close what is left."""
        self._server.config.timeout_graceful_shutdown = max(1, round(grace))
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self.socket.close()

    def stop_now(self) -> None:
        self._server.force_exit = True
        self._server.should_exit = True
