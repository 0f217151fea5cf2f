"""Listing sessions: what a page asks for (`SessionQuery`), what a backend answers
(`SessionList`), and page tokens.

A page token continues a listing: it holds the last session id of the page it
came with, encrypted and authenticated (AES-256-GCM) with the store's key, bound
to the caller and the filters it was issued for. So a token reveals nothing (not
even the id of a session the caller may not read), a token the server did not
give out is refused, and a token issued to one caller, or for one filter, does
not serve another. The key lives with the store (a file of the JSONL store, a row
of the PostgreSQL schema), so tokens work on every replica and after a restart.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agentlog._records import SessionInfo, check_timestamp
from agentlog._requests import session_to_proto
from agentlog._validation import check_labels, check_page_size
from agentlog.errors import InvalidArgumentError
from agentlog.v1 import session_pb2 as pb


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """One page of sessions, in byte order of their ids."""

    size: int = 100
    """The most sessions to answer."""
    after: str | None = None
    """Continue after this session id (None: from the first)."""
    prefixes: tuple[str, ...] = ("",)
    """Only sessions whose id starts with one of these ("" takes every session)."""
    labels: tuple[tuple[str, str], ...] = ()
    """Only sessions carrying every one of these labels (key, value), sorted by key."""
    updated_after_ns: int | None = None
    """Only sessions last appended to at or after this time."""
    updated_before_ns: int | None = None
    """Only sessions last appended to before this time."""

    @classmethod
    def of(
        cls,
        page_size: int | None,
        after: str | None,
        prefixes: Sequence[str] = ("",),
        *,
        labels: Mapping[str, str] | None = None,
        updated_after_ns: int | None = None,
        updated_before_ns: int | None = None,
    ) -> SessionQuery:
        checked = check_labels(labels, "labels")
        for value, name in (
            (updated_after_ns, "updated_after"),
            (updated_before_ns, "updated_before"),
        ):
            if value is not None:
                check_timestamp(value, name)
        return cls(
            check_page_size(page_size),
            after,
            narrowest(prefixes),
            tuple(sorted(checked.items())),
            updated_after_ns,
            updated_before_ns,
        )

    @property
    def filters(self) -> tuple[object, ...]:
        """What the query filters by, besides the caller's prefixes (for page tokens)."""
        return (self.labels, self.updated_after_ns, self.updated_before_ns)

    def takes_time(self, last_timestamp_ns: int) -> bool:
        """Whether a session last appended to then passes the time filters."""
        return (self.updated_after_ns is None or last_timestamp_ns >= self.updated_after_ns) and (
            self.updated_before_ns is None or last_timestamp_ns < self.updated_before_ns
        )

    def takes_labels(self, labels: Mapping[str, str] | None) -> bool:
        """Whether a session with these labels passes the label filter."""
        if not self.labels:
            return True
        return labels is not None and all(labels.get(k) == v for k, v in self.labels)


@dataclass(frozen=True, slots=True)
class SessionList:
    """A backend's answer to a SessionQuery."""

    sessions: list[SessionInfo] = field(default_factory=list)
    after: str | None = None
    """Where the next page starts (the last session id looked at); None on the last page."""


def narrowest(prefixes: Sequence[str]) -> tuple[str, ...]:
    """The prefixes in byte order, without those another one covers ("a" covers "ab")."""
    kept: list[str] = []
    for prefix in sorted(set(prefixes), key=str.encode):
        if not any(prefix.startswith(shorter) for shorter in kept):
            kept.append(prefix)
    return tuple(kept)


def within(granted: Sequence[str], wanted: str) -> tuple[str, ...]:
    """The prefixes a caller allowed `granted` lists when it asks for `wanted`: the
    sessions that both take (none: an empty tuple)."""
    found = []
    for prefix in granted:
        if wanted.startswith(prefix):
            found.append(wanted)
        elif prefix.startswith(wanted):
            found.append(prefix)
    return narrowest(found)


def prefix_end(prefix: str) -> str | None:
    """The least string after every string that starts with `prefix`, in code point order
    (which is UTF-8 byte order); None if there is none ("" or only U+10FFFF)."""
    text = prefix.rstrip("\U0010ffff")
    if not text:
        return None
    last = ord(text[-1]) + 1
    if 0xD800 <= last <= 0xDFFF:
        last = 0xE000  # no string holds a surrogate
    return text[:-1] + chr(last)


def ids_of(ordered: Sequence[str], query: SessionQuery) -> Iterator[str]:
    """The ids of `ordered` (sorted by their UTF-8 bytes) that the query takes, in order,
    from after `query.after`."""
    for prefix in query.prefixes:
        start = prefix if query.after is None or query.after < prefix else query.after
        index = bisect.bisect_left(ordered, start.encode(), key=str.encode)
        while index < len(ordered):
            session_id = ordered[index]
            if not session_id.startswith(prefix):
                break
            if query.after is None or session_id.encode() > query.after.encode():
                yield session_id
            index += 1


class PageTokens:
    """Page tokens of one store (see the module's doc)."""

    VERSION = b"\x02"
    NONCE_BYTES = 12

    def __init__(self, key: bytes) -> None:
        self._cipher = AESGCM(_key_of(key))

    def encode(self, after: str, scope: bytes = b"") -> str:
        """A token meaning "the sessions after `after`", for callers and filters whose
        `scope` is the same."""
        nonce = os.urandom(self.NONCE_BYTES)
        sealed = self._cipher.encrypt(nonce, after.encode(), self.VERSION + scope)
        return base64.urlsafe_b64encode(self.VERSION + nonce + sealed).decode().rstrip("=")

    def decode(self, token: str | None, scope: bytes = b"") -> str | None:
        """The session id a page token continues after; None for the first page.
        InvalidArgumentError for a token this server did not give out for this scope."""
        if not token:
            return None
        refused = InvalidArgumentError(
            "page_token is not a token this server gave out for this caller and these "
            "filters; pass next_page_token unchanged, with the same filters, or leave it "
            "empty for the first page",
            field="page_token",
            reason="INVALID_PAGE_TOKEN",
        )
        if len(token) > 2048:
            raise refused
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise refused from None
        version, nonce = raw[:1], raw[1 : 1 + self.NONCE_BYTES]
        if version != self.VERSION:
            raise refused
        try:
            plain = self._cipher.decrypt(nonce, raw[1 + self.NONCE_BYTES :], version + scope)
            return plain.decode()
        except (InvalidTag, ValueError, UnicodeDecodeError):
            raise refused from None


def scope_of(*parts: object) -> bytes:
    """The scope a page token is bound to: the caller and the filters, canonically."""
    return orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)


def _key_of(key: bytes) -> bytes:
    """A 32-byte AES key from the store's key (which is 32 bytes; a shorter or longer
    one, from an older store, is hashed to size)."""
    if len(key) == 32:
        return key
    import hashlib

    return hashlib.sha256(b"agentlog page tokens" + key).digest()


class SessionMessages:
    """The SessionInfo messages of sessions listed lately, by everything a message says:
    a session listed again as it was is copied, not built (a listing of 10,000 sessions
    builds 10,000; building one costs several times copying it). Used on the event loop
    only."""

    def __init__(self, size: int = 16384) -> None:
        self._size = size
        self._made: OrderedDict[Hashable, pb.SessionInfo] = OrderedDict()

    def __call__(self, info: SessionInfo) -> pb.SessionInfo:
        key = (
            info.session_id,
            info.event_count,
            info.first_timestamp_ns,
            info.last_timestamp_ns,
            info.head_id,
            info.branches,
            info.labels_version,
            tuple(info.labels.items()),
        )
        message = self._made.get(key)
        if message is None:
            message = self._made[key] = session_to_proto(info)
            if len(self._made) > self._size:
                self._made.popitem(last=False)
        return message
