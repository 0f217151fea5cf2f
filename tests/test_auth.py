"""Who may do what: bearer tokens from an access file, JWTs from a JWKS file, mTLS
identities; scopes hold wherever a record could leak."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from jwt.algorithms import RSAAlgorithm

from agentlog import (
    AgentlogClient,
    AppendEvent,
    AsyncAgentlogClient,
    CaughtUp,
    Checkpoint,
    FeedRecord,
    PermissionDeniedError,
    TlsConfig,
    UnauthenticatedError,
)
from agentlog.server import MemorySessionRepository
from agentlog.server._auth import RELOAD_CHECK_SECONDS, Authenticator, JwtSettings
from agentlog.server._tls import TlsFiles
from tests.certs import CertificateAuthority
from tests.contract import delta
from tests.servers import LoopThread, running_server

TOKENS = {"writer": "w-secret", "reader": "r-secret", "admin": "a-secret"}


def entry(name: str, permissions: list[str], sessions: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256(TOKENS[name].encode()).hexdigest()
    return {"name": name, "token_sha256": digest, "permissions": permissions, "sessions": sessions}


@pytest.fixture
def keys() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def access(tmp_path: Path, keys: rsa.RSAPrivateKey) -> tuple[Path, JwtSettings]:
    path = tmp_path / "access.json"
    path.write_text(
        json.dumps(
            {
                "callers": [
                    entry("writer", ["read", "append"], ["team-a-"]),
                    entry("reader", ["read"], [""]),
                    entry("admin", ["admin"], []),
                    {
                        "name": "agent-by-cert",
                        "identity": "spiffe://agents.test/agent",
                        "permissions": ["append", "read"],
                        "sessions": ["certs-"],
                    },
                ]
            }
        )
    )
    public = json.loads(RSAAlgorithm.to_jwk(keys.public_key()))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256"}]}))
    return path, JwtSettings(jwks, "https://issuer.test", "agentlog")


@pytest.fixture
def target(access: tuple[Path, JwtSettings]) -> Iterator[str]:
    authenticator = Authenticator(*access)
    with running_server(MemorySessionRepository(), authenticator=authenticator) as address:
        yield address


def client(target: str, name: str | None) -> AgentlogClient:
    return AgentlogClient(target, token=TOKENS[name] if name else None, retries=0)


def a_jwt(keys: rsa.RSAPrivateKey, **claims: Any) -> str:
    body = {
        "iss": "https://issuer.test",
        "aud": "agentlog",
        "sub": "svc-1",
        "exp": int(time.time()) + 300,
        "scope": "agentlog:read agentlog:append",
        **claims,
    }
    return jwt.encode(body, keys, algorithm="RS256", headers={"kid": "k1"})


def test_a_call_without_a_known_credential_is_unauthenticated(target: str) -> None:
    with client(target, None) as anonymous, pytest.raises(UnauthenticatedError) as missing:
        anonymous.head("team-a-s")
    assert missing.value.reason == "MISSING_CREDENTIAL"
    with (
        AgentlogClient(target, token="not-a-token", retries=0) as stranger,
        pytest.raises(UnauthenticatedError) as unknown,
    ):
        stranger.append(AppendEvent(session_id="team-a-s", event=delta("team-a-s", "x")))
    assert unknown.value.reason == "UNKNOWN_TOKEN"
    with grpc.insecure_channel(target) as channel:  # health stays open
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_permissions_and_session_prefixes_hold(target: str) -> None:
    with client(target, "writer") as writer, client(target, "reader") as reader:
        writer.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "ok")))
        with pytest.raises(PermissionDeniedError) as outside:
            writer.append(AppendEvent(session_id="team-b-1", event=delta("team-b-1", "no")))
        assert outside.value.metadata == {
            "caller": "writer",
            "permission": "append",
            "session_id": "team-b-1",
        }
        with pytest.raises(PermissionDeniedError):
            writer.head("team-b-1")
        with pytest.raises(PermissionDeniedError):
            reader.append(AppendEvent(session_id="team-a-1", event=delta("team-a-1", "no")))
        assert reader.head("team-a-1") is not None
        with pytest.raises(PermissionDeniedError):
            next(iter(writer.subscribe_session("team-b-1", from_sequence=1)))


def test_scopes_hold_wherever_a_record_could_leak(target: str) -> None:
    with client(target, "admin") as admin, client(target, "writer") as writer:
        parent = admin.append(AppendEvent(session_id="team-a-p", event=delta("team-a-p", "p")))
        for session in ("team-a-c", "team-b-c"):
            admin.append(
                AppendEvent(session_id=session, parent_id=parent.id, event=delta(session, "c"))
            )
        children = writer.load_children(parent.id)
        assert [c.session_id for c in children] == ["team-a-c"]
        listed = writer.list_sessions(page_size=1000).sessions
        assert {s.session_id for s in listed} == {"team-a-p", "team-a-c"}
        for prefix in ("", "team-b-"):
            seen = []
            for item in writer.subscribe_all(from_position=1, session_id_prefix=prefix):
                if isinstance(item, CaughtUp):
                    break
                if isinstance(item, Checkpoint):
                    continue  # examined, not kept
                assert isinstance(item, FeedRecord)
                seen.append(item.record.session_id)
            assert seen == ([] if prefix else ["team-a-p", "team-a-c"])
        assert len(admin.load_children(parent.id)) == 2  # admin sees all


def test_jwts_are_verified_and_their_scopes_apply(target: str, keys: rsa.RSAPrivateKey) -> None:
    good = a_jwt(keys, agentlog_sessions=["jwt-"])
    with AgentlogClient(target, token=good, retries=0) as caller:
        caller.append(AppendEvent(session_id="jwt-1", event=delta("jwt-1", "ok")))
        with pytest.raises(PermissionDeniedError):
            caller.append(AppendEvent(session_id="other", event=delta("other", "no")))
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for bad in (
        a_jwt(keys, exp=int(time.time()) - 10),  # expired
        a_jwt(keys, aud="someone-else"),
        a_jwt(keys, iss="https://evil.test"),
        a_jwt(other_key),  # not signed by a key of the JWKS
    ):
        with (
            AgentlogClient(target, token=bad, retries=0) as caller,
            pytest.raises(UnauthenticatedError) as refused,
        ):
            caller.head("jwt-1")
        assert refused.value.reason == "INVALID_JWT"
    read_only = a_jwt(keys, scope="agentlog:read")
    with (
        AgentlogClient(target, token=read_only, retries=0) as caller,
        pytest.raises(PermissionDeniedError),
    ):
        caller.append(AppendEvent(session_id="jwt-2", event=delta("jwt-2", "no")))


def test_a_token_callable_is_asked_on_every_call_and_the_async_client_sends_it(
    target: str,
) -> None:
    asked: list[int] = []

    def fresh() -> str:
        asked.append(1)
        return TOKENS["writer"]

    with AgentlogClient(target, token=fresh, retries=0) as caller:
        caller.append(AppendEvent(session_id="team-a-t", event=delta("team-a-t", "1")))
        assert len(caller.load_session("team-a-t")) == 1
        for item in caller.subscribe_session("team-a-t", from_sequence=1):
            if isinstance(item, CaughtUp):
                break
    assert len(asked) == 3
    loop = LoopThread()

    async def use() -> int:
        async with AsyncAgentlogClient(target, token=TOKENS["reader"], retries=0) as caller:
            return len(await caller.load_session("team-a-t"))

    try:
        assert loop.run(use()) == 1
    finally:
        loop.close()


def test_the_access_file_is_reread_when_it_changes(
    target: str, access: tuple[Path, JwtSettings]
) -> None:
    path, _ = access
    document = json.loads(path.read_text())
    TOKENS["late"] = "l-secret"
    document["callers"].append(entry("late", ["read"], [""]))
    path.write_text(json.dumps(document))
    time.sleep(RELOAD_CHECK_SECONDS + 0.2)
    with client(target, "late") as late:
        assert late.head("anything") is None
    path.write_text("{ not json")  # a bad edit keeps the last good file
    time.sleep(RELOAD_CHECK_SECONDS + 0.2)
    with client(target, "late") as late:
        assert late.head("anything") is None


def test_an_mtls_identity_can_stand_for_the_caller(
    tmp_path: Path, access: tuple[Path, JwtSettings]
) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "ca")
    server = ca.server()
    agent, unknown = ca.client("agent"), ca.client("nobody")
    files = TlsFiles(server.cert, server.key, client_ca=ca.pem)
    with running_server(
        MemorySessionRepository(), tls=files, authenticator=Authenticator(*access)
    ) as target:
        tls = TlsConfig(ca=ca.pem, cert=agent.cert, key=agent.key)
        with AgentlogClient(target, tls=tls, retries=0) as caller:
            caller.append(AppendEvent(session_id="certs-1", event=delta("certs-1", "ok")))
            with pytest.raises(PermissionDeniedError):
                caller.append(AppendEvent(session_id="other", event=delta("other", "no")))
        tls = TlsConfig(ca=ca.pem, cert=unknown.cert, key=unknown.key)
        with (
            AgentlogClient(target, tls=tls, retries=0) as caller,
            pytest.raises(UnauthenticatedError),
        ):
            caller.head("certs-1")


def test_no_authentication_beyond_loopback_is_warned_about(tmp_path: Path) -> None:
    command = ["serve", "--addr", "0.0.0.0:0", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "-m", "agentlog.server", *command],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        lines = [process.stderr.readline() for _ in range(2)]
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert any("no authentication is set up" in line for line in lines), lines


def test_a_listed_token_shaped_like_a_jwt_is_still_a_token(
    tmp_path: Path, access: tuple[Path, JwtSettings], keys: rsa.RSAPrivateKey
) -> None:
    path, settings = access
    document = json.loads(path.read_text())
    TOKENS["dotted"] = "opaque.with.dots"
    document["callers"].append(entry("dotted", ["read"], [""]))
    path.write_text(json.dumps(document))
    with running_server(
        MemorySessionRepository(), authenticator=Authenticator(path, settings)
    ) as target:
        with client(target, "dotted") as dotted:
            assert dotted.head("any") is None
        odd_kid = jwt.encode(
            {"exp": int(time.time()) + 60}, keys, algorithm="RS256", headers={"kid": "nope"}
        )
        with (
            AgentlogClient(target, token=odd_kid, retries=0) as caller,
            pytest.raises(UnauthenticatedError) as refused,
        ):
            caller.head("any")
        assert refused.value.reason == "INVALID_JWT"


def test_a_remembered_jwt_still_expires_and_a_rotated_jwks_is_picked_up(
    target: str, access: tuple[Path, JwtSettings], keys: rsa.RSAPrivateKey
) -> None:
    short = a_jwt(keys, exp=int(time.time()) + 2)
    with AgentlogClient(target, token=short, retries=0) as caller:
        assert caller.head("any") is None  # verified, then remembered
        assert caller.head("any") is None
        time.sleep(2.5)
        with pytest.raises(UnauthenticatedError) as expired:
            caller.head("any")
        assert expired.value.reason == "INVALID_JWT"
    old = a_jwt(keys)
    with AgentlogClient(target, token=old, retries=0) as caller:
        assert caller.head("any") is None  # remembered under the old keys
    _, settings = access
    rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(RSAAlgorithm.to_jwk(rotated.public_key()))
    settings.jwks_file.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "RS256"}]}))
    time.sleep(RELOAD_CHECK_SECONDS + 0.2)
    with (
        AgentlogClient(target, token=old, retries=0) as caller,
        pytest.raises(UnauthenticatedError),
    ):
        caller.head("any")  # the key that signed it is gone
    with AgentlogClient(target, token=a_jwt(rotated), retries=0) as caller:
        assert caller.head("any") is None
