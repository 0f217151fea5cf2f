"""Who is calling, and what they may do.

A caller is known by one of:
- a bearer token (`authorization: Bearer <token>`) whose SHA-256 is listed in the
  access file, with a name, permissions and the session-id prefixes it may touch;
- a bearer JWT verified against a JWKS file (signature, issuer, audience, expiry),
  whose `scope` (or `scp`) grants `agentlog:read`, `agentlog:append`, `agentlog:admin`
  and whose `agentlog_sessions` claim (absent: every session) lists its prefixes;
- under mTLS, its certificate's identity (a SPIFFE URI or a DNS name) listed in the
  access file.

The access file (JSON) and the JWKS file are re-read when they change:

    {"callers": [
      {"name": "agent-a", "token_sha256": "<hex>", "permissions": ["read", "append"],
       "sessions": ["agent-a-"]},
      {"name": "billing", "identity": "spiffe://example.org/billing",
       "permissions": ["read"], "sessions": [""]}
    ]}

`admin` implies every permission on every session. A missing or bad credential is
UNAUTHENTICATED; a known caller doing what it may not is PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import jwt
import orjson

from agentlog.errors import PermissionDeniedError, UnauthenticatedError

log = logging.getLogger("agentlog.server")

# How often the access and JWKS files' identities are looked at (each is re-read
# when it changed).
RELOAD_CHECK_SECONDS = 1.0
# Verified JWTs remembered (until they expire or the keys change).
VERIFIED_JWTS = 4096

T = TypeVar("T")


class Permission(StrEnum):
    READ = "read"
    APPEND = "append"
    ADMIN = "admin"


@dataclass(frozen=True)
class Grant:
    """What one caller may do: `permissions` on sessions whose id starts with one of
    `prefixes` ("" matches every session)."""

    name: str
    permissions: frozenset[Permission]
    prefixes: tuple[str, ...]

    def may(self, permission: Permission, session_id: str) -> bool:
        if Permission.ADMIN in self.permissions:
            return True
        return permission in self.permissions and session_id.startswith(self.prefixes)

    def may_read(self, session_id: str) -> bool:
        return self.may(Permission.READ, session_id)

    @property
    def reads_everything(self) -> bool:
        return Permission.ADMIN in self.permissions or (
            Permission.READ in self.permissions and "" in self.prefixes
        )

    def require(self, permission: Permission, session_id: str) -> None:
        if not self.may(permission, session_id):
            raise PermissionDeniedError(
                f"caller {self.name!r} may not {permission.value} session {session_id!r}; "
                "ask for a credential that grants it",
                reason="PERMISSION_DENIED",
                metadata={
                    "caller": self.name,
                    "permission": permission.value,
                    "session_id": session_id,
                },
            )


EVERYONE = Grant("anonymous", frozenset(Permission), ("",))

# Where the access log learns who called: the call's interceptor opens a slot in
# the call's context, the service writes the caller's name into it once known.
_caller_slot: ContextVar[list[str] | None] = ContextVar("agentlog_caller_slot", default=None)


def open_caller_slot() -> list[str]:
    """A slot, in the current call's context, that `name_caller` fills."""
    slot = [""]
    _caller_slot.set(slot)
    return slot


def name_caller(grant: Grant) -> Grant:
    slot = _caller_slot.get()
    if slot is not None:
        slot[0] = grant.name
    return grant


def _permissions(values: Iterable[object], where: str) -> frozenset[Permission]:
    found = set()
    for value in values:
        try:
            found.add(Permission(str(value).removeprefix("agentlog:")))
        except ValueError:
            raise ValueError(f"{where}: unknown permission {value!r}") from None
    return frozenset(found)


def _prefixes(value: object, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{where}: sessions must be a list of session-id prefixes")
    return tuple(value)


class _WatchedFile(Generic[T]):
    """A file's parsed content, re-read when the file changes (looked at once every
    RELOAD_CHECK_SECONDS at most); the last good content is kept if a new one does
    not parse. A bad file at start is an error."""

    def __init__(self, path: Path, parse: Callable[[bytes, Path], T]) -> None:
        self._path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._checked = time.monotonic()
        self._stamp = self._stamp_now()
        try:
            self.value: T = parse(path.read_bytes(), path)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def _stamp_now(self) -> tuple[int, int, int]:
        info = os.stat(self._path)
        return (info.st_ino, info.st_size, info.st_mtime_ns)

    def current(self) -> T:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_SECONDS:
            with self._lock:
                if now - self._checked >= RELOAD_CHECK_SECONDS:
                    self._checked = now
                    self._reload()
        return self.value

    def _reload(self) -> None:
        try:
            stamp = self._stamp_now()
            if stamp == self._stamp:
                return
            self._stamp = stamp
            self.value = self._parse(self._path.read_bytes(), self._path)
        except (ValueError, OSError) as exc:
            log.error("%s: not re-read (%s); keeping the last good one", self._path, exc)
            return
        log.info("%s changed: re-read", self._path)


@dataclass(frozen=True)
class _Access:
    tokens: dict[str, Grant]  # by the SHA-256 (hex) of the token
    identities: dict[str, Grant]  # by certificate identity


def _parse_access(text: bytes, path: Path) -> _Access:
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    return _Access(*_parse(document, path))


def _parse_jwks(text: bytes, path: Path) -> jwt.PyJWKSet:
    try:
        return jwt.PyJWKSet.from_json(text.decode())
    except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a JWKS ({exc})") from None


def _parse(document: Any, path: Path) -> tuple[dict[str, Grant], dict[str, Grant]]:
    if not isinstance(document, dict) or not isinstance(document.get("callers"), list):
        raise ValueError('expected {"callers": [...]}')
    tokens: dict[str, Grant] = {}
    identities: dict[str, Grant] = {}
    for index, entry in enumerate(document["callers"]):
        where = f"{path}: callers[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: each caller needs a name")
        grant = Grant(
            entry["name"],
            _permissions(entry.get("permissions", []), where),
            _prefixes(entry.get("sessions", [""]), where),
        )
        digest, identity = entry.get("token_sha256"), entry.get("identity")
        if (digest is None) == (identity is None):
            raise ValueError(f"{where}: give token_sha256 or identity (one of them)")
        if digest is not None:
            tokens[str(digest).lower()] = grant
        else:
            identities[str(identity)] = grant
    return tokens, identities


@dataclass(frozen=True)
class JwtSettings:
    jwks_file: Path
    issuer: str | None
    audience: str | None


class Authenticator:
    """Turns a call's metadata (and TLS peer) into a Grant, or refuses it."""

    def __init__(self, access_file: Path | None, jwt_settings: JwtSettings | None) -> None:
        self._access = _WatchedFile(access_file, _parse_access) if access_file else None
        self._jwt = jwt_settings
        self._keys = _WatchedFile(jwt_settings.jwks_file, _parse_jwks) if jwt_settings else None
        # JWTs verified lately, so that one sent on every call costs one signature
        # check: token -> (the key set that verified it, its grant, its expiry).
        self._verified: dict[str, tuple[jwt.PyJWKSet, Grant, float]] = {}

    def grant(self, metadata: Mapping[str, str], peer_identities: Iterable[str]) -> Grant:
        authorization = metadata.get("authorization")
        if authorization is not None:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise _refused("the authorization header must be 'Bearer <token>'", "BAD_SCHEME")
            return self._bearer(credential.strip())
        if self._access is not None:
            identities = self._access.current().identities
            for identity in peer_identities:
                grant = identities.get(identity)
                if grant is not None:
                    return grant
        raise _refused(
            "this server needs a credential: send 'authorization: Bearer <token>' (or, "
            "under mTLS, a client certificate it knows)",
            "MISSING_CREDENTIAL",
        )

    def _bearer(self, credential: str) -> Grant:
        # A listed token first: an opaque token may have two dots as a JWT does.
        if self._access is not None:
            digest = hashlib.sha256(credential.encode()).hexdigest()
            grant = self._access.current().tokens.get(digest)
            if grant is not None:
                return grant
        if credential.count(".") == 2 and self._keys is not None:
            return self._jwt_grant(credential)
        raise _refused("the bearer token is not one this server knows", "UNKNOWN_TOKEN")

    def _jwt_grant(self, token: str) -> Grant:
        if self._keys is None:
            raise _refused("this server takes no JWTs", "UNKNOWN_TOKEN")
        keys = self._keys.current()
        known = self._verified.get(token)
        if known is not None and known[0] is keys and time.time() < known[2]:
            return known[1]
        grant, expires = self._from_jwt(token, keys)
        if len(self._verified) >= VERIFIED_JWTS:
            self._verified.clear()  # simpler than LRU, and as good for a working set
        self._verified[token] = (keys, grant, expires)
        return grant

    def _from_jwt(self, token: str, keys: jwt.PyJWKSet) -> tuple[Grant, float]:
        """The grant of a JWT verified against `keys`, and when it expires."""
        settings = self._jwt
        if settings is None:
            raise _refused("this server takes no JWTs", "UNKNOWN_TOKEN")
        try:
            header = jwt.get_unverified_header(token)
            key = keys[header["kid"]] if "kid" in header else keys.keys[0]
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"],
                issuer=settings.issuer,
                audience=settings.audience,
                options={"require": ["exp"]},
            )
        except (jwt.PyJWTError, KeyError, IndexError, TypeError) as exc:
            raise _refused(f"the JWT was refused: {exc}", "INVALID_JWT") from None
        scopes = claims.get("scope", claims.get("scp", []))
        values = scopes.split() if isinstance(scopes, str) else scopes
        wanted = [v for v in values if isinstance(v, str) and v.startswith("agentlog:")]
        try:
            permissions = _permissions(wanted, "JWT scope")
            prefixes = _prefixes(claims.get("agentlog_sessions", [""]), "JWT agentlog_sessions")
        except ValueError as exc:
            raise _refused(str(exc), "INVALID_JWT") from None
        return Grant(str(claims.get("sub", "jwt")), permissions, prefixes), float(claims["exp"])


def _refused(message: str, reason: str) -> UnauthenticatedError:
    return UnauthenticatedError(message, reason=reason)


def peer_identities(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """The identities in a TLS peer's certificate: its SANs (URI, DNS) and common name."""
    names: list[str] = []
    for key in ("x509_subject_alternative_name", "peer_dns", "x509_common_name"):
        names += [value.decode(errors="replace") for value in auth_context.get(key, ())]
    return names
