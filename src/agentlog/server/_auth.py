"""Who is calling, and what they may do.

A caller is known by one of:
- a bearer token (`authorization: Bearer <token>`) whose SHA-256 is listed in the
  access file, with a name, permissions and the session-id prefixes it may touch;
- a bearer JWT verified against a JWKS file (signature, issuer, audience, expiry),
  whose `scope` (or `scp`) grants `agentlog:read`, `agentlog:append`, `agentlog:delete`,
  `agentlog:admin`
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeAlias, TypeVar

import jwt
import orjson

from agentlog._validation import quoted
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
    DELETE = "delete"
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

    def readable_prefixes(self) -> tuple[str, ...]:
        """The prefixes of the sessions it may read (("",): all; (): none)."""
        if Permission.ADMIN in self.permissions:
            return ("",)
        return self.prefixes if Permission.READ in self.permissions else ()

    def covers(self, earlier: Grant) -> bool:
        """Whether this grant lets its caller read every session `earlier` did (a
        stream authorized by `earlier` may go on under it)."""
        if Permission.ADMIN in self.permissions:
            return True
        wanted = earlier.readable_prefixes()
        granted = self.readable_prefixes()
        return all(prefix.startswith(granted) for prefix in wanted) if wanted else True

    def require(self, permission: Permission, session_id: str) -> None:
        if not self.may(permission, session_id):
            raise PermissionDeniedError(
                f"caller {quoted(self.name)} may not {permission.value} session "
                f"{quoted(session_id)}; ask for a credential that grants it",
                reason="PERMISSION_DENIED",
                metadata={
                    "caller": self.name,
                    "permission": permission.value,
                    "session_id": session_id,
                },
            )


EVERYONE = Grant("anonymous", frozenset(Permission), ("",))

Metadata: TypeAlias = "Sequence[tuple[str, str]]"
"""A call's metadata as gRPC gives it: (key, value) pairs, a key possibly repeated."""

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


_unknown_scopes: set[str] = set()


def _scopes(values: Iterable[str]) -> frozenset[Permission]:
    """The permissions a JWT's `agentlog:*` scopes grant. A scope this server does not
    know (a newer one, say) grants nothing here and is logged once: it neither widens
    the grant nor refuses a token that is otherwise good."""
    found = set()
    for value in values:
        try:
            found.add(Permission(value.removeprefix("agentlog:")))
        except ValueError:
            if value not in _unknown_scopes and len(_unknown_scopes) < 100:
                _unknown_scopes.add(value)
                log.warning(
                    "a JWT carries the scope %r, which this server does not know: ignored",
                    value[:80],
                )
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
        document = orjson.loads(text)
        if isinstance(document, dict) and document.get("keys") == []:
            # Every key revoked: a valid set that verifies nothing (PyJWT refuses to build
            # an empty one).
            empty = jwt.PyJWKSet.__new__(jwt.PyJWKSet)
            empty.keys = []
            return empty
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
class Peer:
    """What the TLS layer says of the caller: its certificate's identities (URI SANs,
    then DNS SANs, as SPIFFE and Kubernetes name workloads; never the subject's common
    name, which any CA-signed certificate may set to anything) and when it expires."""

    identities: tuple[str, ...] = ()
    expires: float | None = None


NO_PEER = Peer()
_PEERS: dict[bytes, Peer] = {}  # by certificate: parsed once, not at every call


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

    def grant(self, metadata: Metadata, peer: Peer = NO_PEER) -> Grant:
        """The caller's grant: from its one `authorization` header, else (under mTLS) its
        certificate's identity. UnauthenticatedError if it has no credential this server
        accepts (or two authorization headers, or a client certificate that expired)."""
        if peer.expires is not None and time.time() >= peer.expires:
            raise _refused(
                "the client certificate expired at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(peer.expires))}; "
                "renew it and connect again",
                "CERTIFICATE_EXPIRED",
            )
        authorizations = [value for key, value in metadata if key == "authorization"]
        if len(authorizations) > 1:
            raise _refused(
                f"the call carries {len(authorizations)} authorization headers; send one",
                "DUPLICATE_CREDENTIAL",
            )
        if authorizations:
            scheme, _, credential = authorizations[0].partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise _refused("the authorization header must be 'Bearer <token>'", "BAD_SCHEME")
            return self._bearer(credential.strip())
        if self._access is not None:
            identities = self._access.current().identities
            for identity in peer.identities:
                grant = identities.get(identity)
                if grant is not None:
                    return grant
        raise _refused(
            "this server needs a credential: send 'authorization: Bearer <token>' (or, "
            "under mTLS, a client certificate whose URI or DNS name it knows)",
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
        if not keys.keys:
            raise _refused(
                f"the JWT was refused: {settings.jwks_file} holds no key (every JWT is refused "
                "until one is added)",
                "INVALID_JWT",
            )
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
        for claim in ("exp", "nbf", "iat"):
            value = claims.get(claim)
            if claim in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
                # RFC 7519: a NumericDate is a JSON number (PyJWT takes a string too).
                raise _refused(
                    f"the JWT was refused: its {claim!r} claim must be a number of seconds, "
                    f"not {type(value).__name__}",
                    "INVALID_JWT",
                )
        scopes = claims.get("scope", claims.get("scp", []))
        values = scopes.split() if isinstance(scopes, str) else scopes
        wanted = [v for v in values if isinstance(v, str) and v.startswith("agentlog:")]
        try:
            prefixes = _prefixes(claims.get("agentlog_sessions", [""]), "JWT agentlog_sessions")
        except ValueError as exc:
            raise _refused(str(exc), "INVALID_JWT") from None
        return (
            Grant(str(claims.get("sub", "jwt")), _scopes(wanted), prefixes),
            float(claims["exp"]),
        )


def _refused(message: str, reason: str) -> UnauthenticatedError:
    return UnauthenticatedError(message, reason=reason)


def peer_of(auth_context: Mapping[str, Iterable[bytes]]) -> Peer:
    """The caller's TLS identity (NO_PEER without a client certificate)."""
    certificates = list(auth_context.get("x509_pem_cert", ()))
    if not certificates:
        return NO_PEER
    pem = certificates[0]
    found = _PEERS.get(pem)
    if found is None:
        names = [v.decode(errors="replace") for v in auth_context.get("peer_uri", ())]
        names += [v.decode(errors="replace") for v in auth_context.get("peer_dns", ())]
        found = Peer(tuple(names), _not_after(pem))
        if len(_PEERS) >= 4096:
            _PEERS.clear()
        _PEERS[pem] = found
    return found


def _not_after(pem: bytes) -> float | None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return certificate.not_valid_after_utc.timestamp()
