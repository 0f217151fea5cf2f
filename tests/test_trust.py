"""Nothing a caller may not read reaches it: not by an answer, an error, a page token,
or a stream that outlives its credential; and identities come from what a CA vouches
for. Every check here is one a credential's scope must pass, on every RPC."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from agentlog import (
    AgentlogClient,
    AlreadyExistsError,
    AppendEvent,
    CaughtUp,
    Checkpoint,
    FeedRecord,
    InvalidArgumentError,
    NewEvent,
    PermissionDeniedError,
    TlsConfig,
    UnauthenticatedError,
)
from agentlog.server import MemorySessionRepository
from agentlog.server._auth import Authenticator, JwtSettings
from agentlog.server._tls import TlsFiles
from agentlog.server.postgres import PostgresBackend
from agentlog.v1 import session_pb2 as pb
from agentlog.v1 import session_pb2_grpc
from tests.certs import CertificateAuthority
from tests.contract import delta
from tests.pg import database
from tests.servers import Servable, running_server

TOKENS = {
    "a": "token-of-a",
    "b": "token-of-b",
    "admin": "token-of-admin",
    "narrow": "t-narrow",
    "writer": "token-of-writer",
    "deleter": "token-of-deleter",
}


def caller(name: str, permissions: list[str], sessions: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256(TOKENS[name].encode()).hexdigest()
    return {"name": name, "token_sha256": digest, "permissions": permissions, "sessions": sessions}


ACCESS = [
    caller("a", ["read", "append"], ["agent-a-"]),
    caller("b", ["read", "append"], ["agent-b-"]),
    caller("admin", ["admin"], []),
    caller("narrow", ["read", "append"], ["agent-a-"]),
    caller("writer", ["append"], ["agent-a-"]),
    caller("deleter", ["read", "delete"], ["agent-a-"]),
]


@pytest.fixture
def keys() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def settings(tmp_path: Path, keys: rsa.RSAPrivateKey) -> tuple[Path, JwtSettings]:
    access = tmp_path / "access.json"
    access.write_text(json.dumps({"callers": ACCESS}))
    public = json.loads(RSAAlgorithm.to_jwk(keys.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256"}]}))
    return access, JwtSettings(jwks, "https://issuer.test", "agentlog")


def memory() -> Servable:
    return MemorySessionRepository()


@pytest.fixture
def target(settings: tuple[Path, JwtSettings]) -> Iterator[str]:
    with running_server(memory(), authenticator=Authenticator(*settings)) as address:
        yield address


def client(target: str, name: str, **options: Any) -> AgentlogClient:
    return AgentlogClient(target, token=TOKENS[name], retries=0, **options)


def a_jwt(keys: rsa.RSAPrivateKey, **claims: Any) -> str:
    body = {
        "iss": "https://issuer.test",
        "aud": "agentlog",
        "sub": "svc",
        "exp": int(time.time()) + 300,
        "scope": "agentlog:read agentlog:append",
        **claims,
    }
    return jwt.encode(body, keys, algorithm="RS256", headers={"kid": "k1"})


def rewrite_access(settings: tuple[Path, JwtSettings], callers: list[dict[str, Any]]) -> None:
    path = settings[0]
    new = path.with_name("access.new")
    new.write_text(json.dumps({"callers": callers}))
    new.replace(path)


# --- page tokens ---


def test_page_tokens_reveal_nothing_and_serve_only_their_caller_and_filter(target: str) -> None:
    with client(target, "admin") as admin:
        for name in ["agent-a-1", "agent-a-2", "agent-a-3", "agent-b-secret", "agent-c-x"]:
            admin.append(AppendEvent(session_id=name, event=delta(name, "x")))
    with client(target, "a") as a, client(target, "b") as b:
        seen, tokens, token = [], [], None
        while True:
            page = a.list_sessions(page_size=1, page_token=token)
            seen += [s.session_id for s in page.sessions]
            token = page.next_page_token
            if token is None:
                break
            tokens.append(token)
        assert seen == ["agent-a-1", "agent-a-2", "agent-a-3"]
        for token in tokens:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            assert b"agent" not in raw  # encrypted: no session id in it
        # A token serves the caller (and filter) it was issued to, and no other.
        with pytest.raises(InvalidArgumentError) as other:
            b.list_sessions(page_size=1, page_token=tokens[0])
        assert other.value.reason == "INVALID_PAGE_TOKEN"
        forged = tokens[0][:-4] + ("AAAA" if not tokens[0].endswith("AAAA") else "BBBB")
        with pytest.raises(InvalidArgumentError):
            a.list_sessions(page_size=1, page_token=forged)


# --- forks ---


def test_a_fork_needs_read_on_its_source_and_append_on_its_target(any_backend: str) -> None:
    with client(any_backend, "admin") as admin:
        for name in ["agent-a-1", "agent-b-1"]:
            admin.append(AppendEvent(session_id=name, event=delta(name, "x")))
            admin.append(AppendEvent(session_id=name, event=delta(name, "y")))
    with client(any_backend, "a") as a, client(any_backend, "writer") as writer:
        made = a.fork_session("agent-a-1", 2, new_session_id="agent-a-2")
        assert made.event_count == 2
        refused: list[Callable[[], object]] = [
            lambda: a.fork_session("agent-b-1", 1, new_session_id="agent-a-3"),  # source
            lambda: a.fork_session("agent-b-404", 1, new_session_id="agent-a-3"),
            lambda: a.fork_session("agent-a-1", 1, new_session_id="agent-b-2"),  # target
            lambda: writer.fork_session("agent-a-1", 1, new_session_id="agent-a-4"),
        ]
        for attempt in refused:
            with pytest.raises(PermissionDeniedError) as denied:
                attempt()
            # Nothing said of what the caller may not read: not whether it exists.
            assert "ends at" not in str(denied.value)
            assert "last_sequence" not in denied.value.metadata
        assert a.load_session("agent-a-3") == []
    with client(any_backend, "admin") as admin:
        assert admin.load_session("agent-b-2") == []
        assert admin.load_session("agent-a-4") == []


def test_deletes_labels_and_listings_keep_to_the_callers_sessions(any_backend: str) -> None:
    with client(any_backend, "admin") as admin:
        for name in ["agent-a-1", "agent-a-2", "agent-b-1"]:
            admin.append(AppendEvent(session_id=name, event=delta(name, "x"), labels={"app": "x"}))
    with (
        client(any_backend, "a") as a,
        client(any_backend, "deleter") as deleter,
        client(any_backend, "writer") as writer,
    ):
        refused: list[Callable[[], object]] = [
            lambda: a.delete_session("agent-a-1"),  # read and append, not delete
            lambda: deleter.delete_session("agent-b-1"),
            lambda: deleter.delete_session("agent-b-404", all_branches=True),
            lambda: a.update_session_labels("agent-b-1", {"app": "y"}),
            lambda: a.update_session_labels("agent-b-404", {"app": "y"}),
            lambda: deleter.update_session_labels("agent-a-1", {"app": "y"}),  # no append
        ]
        for attempt in refused:
            with pytest.raises(PermissionDeniedError) as denied:
                attempt()
            assert "does not exist" not in str(denied.value)
        # Listing by label or prefix shows only what the caller may read.
        assert [i.session_id for i in a.list_sessions(labels={"app": "x"}).sessions] == [
            "agent-a-1",
            "agent-a-2",
        ]
        assert a.list_sessions(session_id_prefix="agent-b-").sessions == []
        assert a.list_sessions(session_id_prefix="agent").sessions[-1].session_id == "agent-a-2"
        assert writer.list_sessions(labels={"app": "x"}).sessions == []  # may not read
        assert a.update_session_labels("agent-a-1", {"user": "u"}).version == 2
        [marker] = deleter.delete_session("agent-a-1")
        assert marker.session_id == "agent-a-1"
        # Reusing a deleted record's id says nothing of where it was.
    with client(any_backend, "admin") as admin:
        assert admin.load_session("agent-a-1") == []
        assert len(admin.load_session("agent-b-1")) == 1
        assert admin.list_sessions(labels={"app": "x"}).sessions[-1].labels == {"app": "x"}


# --- errors ---


@pytest.fixture(params=["memory", "postgresql"])
def any_backend(
    request: pytest.FixtureRequest, settings: tuple[Path, JwtSettings]
) -> Iterator[str]:
    authenticator = Authenticator(*settings)
    if request.param == "memory":
        with running_server(memory(), authenticator=authenticator) as address:
            yield address
        return
    with database() as url:

        async def open_backend() -> PostgresBackend:
            return await PostgresBackend.open(url)

        with running_server(open_backend, authenticator=authenticator) as address:
            yield address


def test_an_id_taken_elsewhere_is_refused_without_naming_a_session_the_caller_may_not_read(
    any_backend: str,
) -> None:
    secret_id = str(uuid.uuid4())
    with client(any_backend, "admin") as admin:
        admin.append(
            AppendEvent(
                session_id="agent-b-secret", event=delta("agent-b-secret", "s"), id=secret_id
            )
        )
    with client(any_backend, "a") as a:
        attempts: list[Callable[[], object]] = [
            lambda: a.append(
                AppendEvent(session_id="agent-a-1", event=delta("agent-a-1", "x"), id=secret_id)
            ),
            lambda: a.append_batch(
                "agent-a-1",
                [
                    NewEvent(event=delta("agent-a-1", "y")),
                    NewEvent(event=delta("a", "z"), id=secret_id),
                ],
            ),
        ]
        for attempt in attempts:
            with pytest.raises(AlreadyExistsError) as taken:
                attempt()
            # It learns that the id is taken (ids are unique across the store), not where.
            assert taken.value.reason == "EVENT_ID_CONFLICT"
            assert "agent-b" not in str(taken.value)
            assert "agent-b" not in json.dumps(taken.value.metadata)
            assert taken.value.metadata.get("id") == secret_id
    with client(any_backend, "admin") as admin, pytest.raises(AlreadyExistsError) as seen:
        admin.append(AppendEvent(session_id="agent-a-9", event=delta("x", "x"), id=secret_id))
    assert seen.value.metadata["session_id"] == "agent-b-secret"  # it may read it


def test_oversized_fields_are_quoted_short_and_refused_as_invalid(target: str) -> None:
    huge = "x" * 10_000
    with client(target, "admin") as admin:
        with pytest.raises(InvalidArgumentError) as refused:
            admin.append(AppendEvent(session_id=huge, event=delta("x", "x")))
        assert len(str(refused.value)) < 400
        with pytest.raises(InvalidArgumentError):
            admin.head(huge)
        with pytest.raises(InvalidArgumentError):
            admin.load_session(huge)
        with pytest.raises(InvalidArgumentError) as kinds:
            next(iter(admin.subscribe_all(part_types=[huge])))
        assert len(str(kinds.value)) < 1200
    # Straight from the proto, past the client's own checks.
    with grpc.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionRepositoryStub(channel)
        metadata = [("authorization", f"Bearer {TOKENS['admin']}")]
        for call, request in (
            (stub.Head, pb.HeadRequest(session_id=huge)),
            (stub.Append, pb.AppendRequest(session_id="s", id=huge, event=pb.AgentEvent())),
        ):
            with pytest.raises(grpc.RpcError) as failed:
                call(request, metadata=metadata, timeout=10)
            assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- prefixes mean "starts with" ---


def test_a_prefix_grants_sessions_that_start_with_it_and_no_others(target: str) -> None:
    elsewhere = "x-agent-a-1"  # holds the prefix, but not at its start
    with client(target, "admin") as admin:
        parent = admin.append(AppendEvent(session_id="agent-a-p", event=delta("p", "p")))
        admin.append(AppendEvent(session_id=elsewhere, parent_id=parent.id, event=delta("x", "x")))
        admin.append(
            AppendEvent(session_id="agent-a-c", parent_id=parent.id, event=delta("c", "c"))
        )
    with client(target, "a") as a:
        for denied in (
            lambda: a.append(AppendEvent(session_id=elsewhere, event=delta("x", "x"))),
            lambda: a.append_batch(elsewhere, [NewEvent(event=delta("x", "x"))]),
            lambda: a.head(elsewhere),
            lambda: a.load_session(elsewhere),
            lambda: next(iter(a.subscribe_session(elsewhere, from_sequence=1))),
        ):
            with pytest.raises(PermissionDeniedError):
                denied()
        assert [s.session_id for s in a.list_sessions().sessions] == ["agent-a-c", "agent-a-p"]
        assert [r.session_id for r in a.load_children(parent.id)] == ["agent-a-c"]
        delivered = []
        for item in a.subscribe_all(from_position=1):
            if isinstance(item, CaughtUp):
                break
            if isinstance(item, FeedRecord):
                delivered.append(item.record.session_id)
        assert elsewhere not in delivered
        assert delivered == ["agent-a-p", "agent-a-c"]


# --- streams end when their credential does ---


def follow_until_ended(stream: Iterator[Any]) -> tuple[list[Any], BaseException]:
    """Read a subscription until it fails; what it delivered, and how it failed."""
    got: list[Any] = []
    try:
        for item in stream:
            got.append(item)
    except (UnauthenticatedError, PermissionDeniedError) as exc:
        return got, exc
    raise AssertionError("the stream ended without an error")


def writer_meanwhile(target: str, session: str, stop: list[bool]) -> Callable[[], None]:
    def write() -> None:
        with client(target, "admin") as admin:
            while not stop:
                admin.append(AppendEvent(session_id=session, event=delta(session, "more")))
                time.sleep(0.1)

    return write


def ends_within(stream: Iterator[Any], seconds: float, target: str, session: str) -> BaseException:
    import threading

    stop: list[bool] = []
    thread = threading.Thread(target=writer_meanwhile(target, session, stop), daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        _, error = follow_until_ended(stream)
    finally:
        stop.append(True)
        thread.join(5)
    assert time.monotonic() - started < seconds, "the stream outlived its credential"
    return error


def test_a_token_removed_from_the_access_file_ends_its_streams(
    target: str, settings: tuple[Path, JwtSettings]
) -> None:
    with client(target, "narrow") as narrow:
        session_stream = narrow.subscribe_session("agent-a-s", from_sequence=1)
        feed_stream = narrow.subscribe_all(from_position=1)
        assert isinstance(next(session_stream), CaughtUp)
        assert isinstance(next(feed_stream), CaughtUp | Checkpoint)
        rewrite_access(settings, [c for c in ACCESS if c["name"] != "narrow"])
        error = ends_within(session_stream, 6, target, "agent-a-s")
        assert isinstance(error, UnauthenticatedError)
        assert "resume from sequence" in str(error)
        assert error.metadata["next_sequence"] >= "1"
        error = ends_within(feed_stream, 6, target, "agent-a-s")
        assert isinstance(error, UnauthenticatedError)
        assert "next_position" in error.metadata


def test_a_grant_that_shrank_ends_its_streams_with_permission_denied(
    target: str, settings: tuple[Path, JwtSettings]
) -> None:
    with client(target, "narrow") as narrow:
        stream = narrow.subscribe_session("agent-a-s", from_sequence=1)
        assert isinstance(next(stream), CaughtUp)
        feed = narrow.subscribe_all(from_position=1)
        assert isinstance(next(feed), CaughtUp | Checkpoint)
        rewritten = [c for c in ACCESS if c["name"] != "narrow"]
        rewritten.append(caller("narrow", ["read", "append"], ["agent-a-other-"]))
        rewrite_access(settings, rewritten)
        assert isinstance(ends_within(stream, 6, target, "agent-a-s"), PermissionDeniedError)
        assert isinstance(ends_within(feed, 6, target, "agent-a-s"), PermissionDeniedError)


def test_a_jwt_whose_exp_passes_ends_its_stream(target: str, keys: rsa.RSAPrivateKey) -> None:
    token = a_jwt(keys, exp=int(time.time()) + 2, agentlog_sessions=["agent-a-"])
    with AgentlogClient(target, token=token, retries=0) as short:
        stream = short.subscribe_session("agent-a-j", from_sequence=1)
        assert isinstance(next(stream), CaughtUp)
        error = ends_within(stream, 6, target, "agent-a-j")
        assert isinstance(error, UnauthenticatedError)
        assert error.reason == "INVALID_JWT"


def test_a_jwt_whose_key_leaves_the_jwks_ends_its_stream(
    target: str, keys: rsa.RSAPrivateKey, settings: tuple[Path, JwtSettings]
) -> None:
    with AgentlogClient(target, token=a_jwt(keys), retries=0) as holder:
        stream = holder.subscribe_all(from_position=1)
        next(stream)
        # Every key revoked: an empty set is a JWKS too (every JWT is then refused).
        settings[1].jwks_file.write_text(json.dumps({"keys": []}))
        error = ends_within(stream, 6, target, "agent-a-k")
        assert isinstance(error, UnauthenticatedError)
        with pytest.raises(UnauthenticatedError):
            holder.head("agent-a-k")


def test_a_client_certificate_that_expires_ends_its_stream(
    tmp_path: Path, settings: tuple[Path, JwtSettings]
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "ca")
    server = ca.server()
    access, jwt_settings = settings
    callers = [*ACCESS]
    callers.append(
        {
            "name": "agent-by-cert",
            "identity": "spiffe://agents.test/short",
            "permissions": ["read", "append"],
            "sessions": ["agent-a-"],
        }
    )
    rewrite_access(settings, callers)
    short = ca.issue("short", uris=("spiffe://agents.test/short",), client=True, valid_seconds=4)
    files = TlsFiles(server.cert, server.key, client_ca=ca.pem)
    with running_server(
        memory(), tls=files, authenticator=Authenticator(access, jwt_settings)
    ) as target:
        tls = TlsConfig(ca=ca.pem, cert=short.cert, key=short.key)
        with AgentlogClient(target, tls=tls, retries=0) as holder:
            stream = holder.subscribe_session("agent-a-m", from_sequence=1)
            assert isinstance(next(stream), CaughtUp)
            started = time.monotonic()
            with pytest.raises(UnauthenticatedError) as expired:
                for _ in stream:
                    pass
            assert time.monotonic() - started < 8
            assert expired.value.reason == "CERTIFICATE_EXPIRED"


# --- identities and credentials at the edges ---


def test_an_identity_is_taken_from_sans_never_from_the_common_name(
    tmp_path: Path, settings: tuple[Path, JwtSettings]
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "ca")
    server = ca.server()
    access, jwt_settings = settings
    rewrite_access(
        settings,
        [
            *ACCESS,
            {
                "name": "billing",
                "identity": "spiffe://example.org/billing",
                "permissions": ["admin"],
            },
        ],
    )
    impostor = ca.issue("spiffe://example.org/billing", client=True)  # a CN, no URI SAN
    honest = ca.issue("billing", uris=("spiffe://example.org/billing",), client=True)
    files = TlsFiles(server.cert, server.key, client_ca=ca.pem)
    with running_server(
        memory(), tls=files, authenticator=Authenticator(access, jwt_settings)
    ) as target:
        tls = TlsConfig(ca=ca.pem, cert=impostor.cert, key=impostor.key)
        with (
            AgentlogClient(target, tls=tls, retries=0) as caller,
            pytest.raises(UnauthenticatedError),
        ):
            caller.head("anything")
        tls = TlsConfig(ca=ca.pem, cert=honest.cert, key=honest.key)
        with AgentlogClient(target, tls=tls, retries=0) as caller:
            assert caller.head("anything") is None


def test_two_authorization_headers_are_refused(target: str) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = session_pb2_grpc.SessionRepositoryStub(channel)
        metadata = [
            ("authorization", f"Bearer {TOKENS['a']}"),
            ("authorization", f"Bearer {TOKENS['admin']}"),
        ]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Head(pb.HeadRequest(session_id="agent-b-x"), metadata=metadata, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "2 authorization headers" in (refused.value.details() or "")


def test_a_jwt_exp_must_be_a_number(target: str, keys: rsa.RSAPrivateKey) -> None:
    token = a_jwt(keys, exp=str(int(time.time()) + 300))
    with (
        AgentlogClient(target, token=token, retries=0) as holder,
        pytest.raises(UnauthenticatedError) as refused,
    ):
        holder.head("agent-a-1")
    assert "'exp'" in str(refused.value)


def test_an_unknown_agentlog_scope_grants_nothing_and_refuses_nothing(
    target: str, keys: rsa.RSAPrivateKey
) -> None:
    token = a_jwt(keys, scope="agentlog:read agentlog:teleport")
    with AgentlogClient(target, token=token, retries=0) as holder:
        assert holder.head("agent-a-1") is None  # read still granted
        with pytest.raises(PermissionDeniedError):
            holder.append(AppendEvent(session_id="agent-a-1", event=delta("a", "x")))


def test_an_emptied_jwks_refuses_every_jwt_until_a_key_returns(
    target: str, keys: rsa.RSAPrivateKey, settings: tuple[Path, JwtSettings]
) -> None:
    jwks = settings[1].jwks_file
    kept = jwks.read_text()
    jwks.write_text(json.dumps({"keys": []}))
    time.sleep(1.2)
    with AgentlogClient(target, token=a_jwt(keys), retries=0) as holder:
        with pytest.raises(UnauthenticatedError) as refused:
            holder.head("agent-a-1")
        assert "holds no key" in str(refused.value)
        jwks.write_text(kept)
        time.sleep(1.2)
        assert holder.head("agent-a-1") is None
