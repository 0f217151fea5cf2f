"""The SessionRepository service over HTTP (the Connect protocol and gRPC-Web): the
application generated from the .proto by protoc-gen-connectrpc, each of whose
methods calls the one gRPC implementation (`service.SessionRepositoryService`),
through the same metrics and tracing wrappers, with a call context that answers
what that implementation asks of a gRPC one. Nothing of the service's rules is
written here: checks, credentials, statuses and error details are the gRPC ones.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from connectrpc.code import Code
from connectrpc.errors import ConnectError, ErrorDetail
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from protobuf.wkt import Any as AnyDetail

from agentlog._status import to_grpc_status
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb
from agentlog.v1.session_connect import SessionRepositoryASGIApplication

# A call's behaviour as the gRPC service has it: (request, context) -> answer.
Behavior = Callable[[Any, Any], Any]
# Wraps a behaviour with what every gRPC call gets too (metrics, a span, the access
# log: `CallObserver.wrap`): (behavior, full method name, server streaming?) -> behavior.
Wrapper = Callable[[Behavior, str, bool], Behavior]

_DETAILS_KEY = "grpc-status-details-bin"
_CODES: dict[grpc.StatusCode, Code] = {
    status: Code[status.name.replace("CANCELLED", "CANCELED")]
    for status in grpc.StatusCode
    if status is not grpc.StatusCode.OK
}
_STATUSES = {code: status for status, code in _CODES.items()}


class PeerCertificates:
    """The client certificate of each TLS connection the HTTP server holds, by the
    connection's "host:port" (the address Connect reports a call from), in the shape
    of a gRPC auth context, so that mTLS identities are read as on gRPC."""

    def __init__(self) -> None:
        self._by_address: dict[str, dict[str, list[bytes]]] = {}

    def connected(self, address: str, certificate: Mapping[str, Any] | None, der: bytes) -> None:
        if not der:
            return
        import ssl

        names = (certificate or {}).get("subjectAltName", ())
        self._by_address[address] = {
            "x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()],
            "peer_uri": [value.encode() for kind, value in names if kind == "URI"],
            "peer_dns": [value.encode() for kind, value in names if kind == "DNS"],
        }

    def lost(self, address: str) -> None:
        self._by_address.pop(address, None)

    def of(self, address: str | None) -> Mapping[str, list[bytes]]:
        return self._by_address.get(address or "", {})


class _Encoded:
    """A response already encoded (shared by many streams): the codec sends its bytes
    as they are, or, for JSON, decodes them into `message_class` first."""

    __slots__ = ("data", "message_class")

    def __init__(self, data: bytes, message_class: type[Message]) -> None:
        self.data = data
        self.message_class = message_class


class _HttpCall:
    """What the service and its wrappers ask of a gRPC call's context, for one HTTP
    call: its headers (as metadata), its TLS peer, its status and the end of it."""

    def __init__(self, ctx: Any, peers: PeerCertificates) -> None:
        self._ctx = ctx
        self._peers = peers
        self._code: grpc.StatusCode | None = None
        self._cancelled = False
        self._done: list[Callable[[Any], None]] = []

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return tuple(self._ctx.request_headers.allitems())

    def auth_context(self) -> Mapping[str, list[bytes]]:
        return self._peers.of(self._ctx.client_address)

    def peer(self) -> str:
        address = self._ctx.client_address or "unknown"
        return f"ipv6:{address}" if address.count(":") > 1 else f"ipv4:{address}"

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def cancelled(self) -> bool:
        return self._cancelled

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self._done.append(callback)

    async def abort(
        self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, Any]]
    ) -> None:
        self._code = code
        raise _connect_error(code, details, trailing_metadata)

    def finish(self, code: grpc.StatusCode | None, *, cancelled: bool = False) -> None:
        if self._code is None:
            self._code = code
        self._cancelled = cancelled
        for callback in self._done:
            callback(self)


def _connect_error(
    code: grpc.StatusCode, message: str, trailing_metadata: Sequence[tuple[str, Any]]
) -> ConnectError:
    """The gRPC status as a Connect error, its rich details (ErrorInfo, BadRequest)
    carried over unchanged."""
    details: list[ErrorDetail] = []
    for key, value in trailing_metadata or ():
        if key == _DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            details = [
                ErrorDetail(AnyDetail(type_url=item.type_url, value=item.value))
                for item in status.details
            ]
    return ConnectError(_CODES[code], message, details)


def _malformed(message_class: type[Message], error: Exception) -> ConnectError:
    status = to_grpc_status(
        InvalidArgumentError(
            f"the request is not a valid {message_class.DESCRIPTOR.full_name} message "
            f"({error}); it may come from a client built from another .proto",
            reason="MALFORMED_REQUEST",
        )
    )
    return _connect_error(status.code, status.details, status.trailing_metadata)


class ProtoBinaryCodec:
    """Protobuf binary, as on gRPC; a response encoded once is sent as is."""

    def name(self) -> str:
        return "proto"

    def encode(self, message: Any) -> bytes:
        if type(message) is _Encoded:
            return message.data
        data: bytes = message.SerializeToString()
        return data

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        try:
            return message_class.FromString(bytes(data))
        except DecodeError as exc:
            raise _malformed(message_class, exc) from None


class ProtoJsonCodec:
    """Protobuf's canonical JSON (what curl sends and reads). JSON values stay exact:
    they travel as JSON text inside a string, as on gRPC; 64-bit integers are
    strings. A field this server does not know is refused, not ignored."""

    def name(self) -> str:
        return "json"

    def encode(self, message: Any) -> bytes:
        if type(message) is _Encoded:
            message = message.message_class.FromString(message.data)
        return json_format.MessageToJson(message, indent=None, ensure_ascii=False).encode()

    def decode(self, data: bytes | bytearray, message_class: type[Message]) -> Message:
        message = message_class()
        try:
            json_format.Parse(bytes(data), message)
        except json_format.ParseError as exc:
            raise _malformed(message_class, exc) from None
        return message


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _HttpSessionRepository:
    """The generated application's service: one method per RPC, each calling the gRPC
    implementation's method (wrapped as gRPC calls are)."""

    def __init__(self, service: Any, wrap: Wrapper, peers: PeerCertificates) -> None:
        descriptor = pb.DESCRIPTOR.services_by_name["SessionRepository"]
        for method in descriptor.methods:
            full_name = f"/{descriptor.full_name}/{method.name}"
            if method.client_streaming:
                setattr(self, _snake(method.name), _grpc_only(method.name))
                continue
            behavior = wrap(getattr(service, method.name), full_name, method.server_streaming)
            if method.server_streaming:
                answer = getattr(pb, method.output_type.name)
                setattr(self, _snake(method.name), _streamed(behavior, answer, peers))
            else:
                setattr(self, _snake(method.name), _unary(behavior, peers))


def _grpc_only(name: str) -> Callable[[Any, Any], AsyncIterator[Any]]:
    """A method that takes a stream of requests: HTTP/1.1 cannot carry one while its
    answers come back (browsers cannot send one at all), so it is served over gRPC."""

    refusal = (
        f"{name} streams requests and answers at once, which needs HTTP/2: call it over "
        "gRPC (the server's gRPC port), or send Append or AppendBatch over HTTP"
    )

    async def call(request: Any, ctx: Any) -> AsyncIterator[Any]:
        if refusal:  # always; the yield makes this the async generator a stream method is
            raise ConnectError(Code.UNIMPLEMENTED, refusal)
        yield None

    return call


def _unary(behavior: Behavior, peers: PeerCertificates) -> Callable[[Any, Any], Any]:
    async def call(request: Any, ctx: Any) -> Any:
        context = _HttpCall(ctx, peers)
        try:
            answer = await behavior(request, context)
        except ConnectError as exc:  # from abort (its code is kept), or from Connect itself
            context.finish(_STATUSES.get(exc.code, grpc.StatusCode.UNKNOWN))
            raise
        except asyncio.CancelledError:
            context.finish(grpc.StatusCode.CANCELLED, cancelled=True)
            raise
        context.finish(grpc.StatusCode.OK)
        return answer

    return call


def _streamed(
    behavior: Behavior, answer: type[Message], peers: PeerCertificates
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def call(request: Any, ctx: Any) -> AsyncIterator[Any]:
        context = _HttpCall(ctx, peers)
        stream = behavior(request, context)
        try:
            async for message in stream:
                yield _Encoded(message, answer) if type(message) is bytes else message
        except ConnectError as exc:
            context.finish(_STATUSES.get(exc.code, grpc.StatusCode.UNKNOWN))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            context.finish(grpc.StatusCode.CANCELLED, cancelled=True)
            raise
        finally:
            await stream.aclose()
        context.finish(grpc.StatusCode.OK)

    return call


def connect_application(
    service: Any,
    wrap: Wrapper,
    peers: PeerCertificates,
    *,
    max_message_bytes: int,
) -> SessionRepositoryASGIApplication:
    """The ASGI application serving `service` (a SessionRepositoryService) over the
    Connect protocol and gRPC-Web, in protobuf binary and JSON."""
    return SessionRepositoryASGIApplication(
        _HttpSessionRepository(service, wrap, peers),  # type: ignore[arg-type]  # methods set in __init__
        read_max_bytes=max_message_bytes,
        codecs=[ProtoBinaryCodec(), ProtoJsonCodec()],
    )
