"""What both clients share besides the codec: retry pacing, where a subscription
stands across reconnects, and opening a channel."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Any

import grpc

from agentlog import _codec, _requests
from agentlog._call_metadata import Token, aio_interceptors
from agentlog._records import (
    CaughtUp,
    Checkpoint,
    EventRecord,
    FeedGap,
    FeedItem,
    FeedRecord,
)
from agentlog._status import from_rpc_error
from agentlog._tls import TlsConfig
from agentlog._validation import MAIN
from agentlog.v1 import session_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Records come back with an id and timestamp added, so a reply may be a
    # little larger than the largest request a server accepts.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a server restart, so retries find it back up.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Keep idle connections alive through proxies and notice dead ones.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (0-based): full jitter, capped."""
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))


def should_retry(exc: grpc.RpcError, attempt: int, retries: int) -> bool:
    return attempt < retries and exc.code() in RETRYABLE


class Reconnects:
    """Counts a subscription's reconnects in a row and paces them."""

    attempt = 0

    def retry(self, exc: grpc.RpcError, retries: int) -> float:
        """Seconds to wait before resuming, or raise the error when it is not to be retried."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or self.attempt >= retries:
            raise from_rpc_error(exc) from None
        self.attempt += 1
        return backoff(self.attempt - 1)


class SessionResume(Reconnects):
    """Where a subscription stands, so that a reconnect continues exactly after it."""

    def __init__(self, session_id: str, from_sequence: int | None, branch_id: str = MAIN) -> None:
        self.session_id = session_id
        self.branch_id = "" if branch_id == MAIN else branch_id
        self.next_sequence = from_sequence

    def request(self) -> pb.SubscribeSessionRequest:
        return pb.SubscribeSessionRequest(
            session_id=self.session_id, from_sequence=self.next_sequence, branch_id=self.branch_id
        )

    def items(self, response: pb.SubscribeSessionResponse) -> list[EventRecord | CaughtUp]:
        self.attempt = 0  # the stream works again: a later failure gets all its retries
        if response.HasField("caught_up"):
            sequence = response.caught_up.sequence
            self.next_sequence = sequence + 1
            return [CaughtUp(sequence)]
        records = [_codec.record_from_proto(r) for r in response.records.records]
        if records:
            self.next_sequence = records[-1].sequence + 1
        return list(records)


class FeedResume(Reconnects):
    """Where an all-sessions subscription stands (its next position) across reconnects."""

    def __init__(
        self,
        from_position: int | None,
        session_id_prefix: str,
        part_types: Collection[str],
        branch_id: str = "",
    ) -> None:
        self.next_position = from_position
        self.prefix = session_id_prefix
        self.part_types = list(part_types)
        self.branch_id = branch_id

    def request(self) -> pb.SubscribeAllRequest:
        return pb.SubscribeAllRequest(
            from_position=self.next_position,
            session_id_prefix=self.prefix,
            part_types=self.part_types,
            branch_id=self.branch_id,
        )

    def items(self, response: pb.SubscribeAllResponse) -> list[FeedItem | CaughtUp | Checkpoint]:
        self.attempt = 0
        if response.HasField("caught_up"):
            position = response.caught_up.position
            self.next_position = position + 1
            return [CaughtUp(position=position)]
        if response.HasField("checkpoint"):
            position = response.checkpoint.position
            self.next_position = position + 1
            return [Checkpoint(position)]
        if response.HasField("gap"):
            gap = response.gap
            self.next_position = gap.last_position + 1
            return [
                FeedGap(
                    gap.first_position,
                    gap.last_position,
                    gap.session_id,
                    gap.reason,
                    gap.message,
                    gap.branch_id or MAIN,
                )
            ]
        if response.HasField("deleted"):
            marker = _requests.deleted_from_proto(response.deleted)
            self.next_position = marker.position + 1
            return [marker]
        items = [
            FeedRecord(f.position, _codec.record_from_proto(f.record))
            for f in response.records.records
        ]
        if items:
            self.next_position = items[-1].position + 1
        return list(items)


def open_channel(
    channels: Any,
    target: str,
    credentials: grpc.ChannelCredentials | None,
    extra_options: Sequence[tuple[str, Any]],
    *,
    tls: TlsConfig | None = None,
    aio_token: Token | None = None,
) -> Any:
    """A channel from `channels` (the grpc or grpc.aio module): both have the same factories
    (an asyncio channel takes its bearer-token interceptors here; a blocking one is
    wrapped by the caller)."""
    if tls is not None:
        if credentials is not None:
            raise ValueError("give tls or credentials, not both")
        credentials = tls.credentials()
        extra_options = [*tls.options(), *extra_options]
    given = {name for name, _ in extra_options}
    options = [opt for opt in _CHANNEL_OPTIONS if opt[0] not in given] + list(extra_options)
    extra: dict[str, Any] = {}
    if channels is grpc.aio:
        extra["interceptors"] = aio_interceptors(aio_token)
    if credentials is not None:
        return channels.secure_channel(target, credentials, options=options, **extra)
    return channels.insecure_channel(target, options=options, **extra)
