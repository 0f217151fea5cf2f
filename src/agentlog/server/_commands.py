"""What the `agentlog` subcommands other than `serve` do: migrate, copy, health, tail,
fork (`cli.py` parses their arguments)."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any

from agentlog.errors import UnavailableError

# How often `tail` says it is still trying to reach the server.
CONNECT_REPORT_SECONDS = 5.0


def _client_tls(args: argparse.Namespace) -> Any:
    """The TlsConfig the client flags ask for, or None (plaintext)."""
    from agentlog import TlsConfig

    name = getattr(args, "tls_server_name", None)
    if not (args.tls_ca or args.tls_client_cert or args.tls_client_key or name):
        return None
    return TlsConfig(
        ca=args.tls_ca, cert=args.tls_client_cert, key=args.tls_client_key, server_name=name
    )


def migrate(args: argparse.Namespace) -> int:
    from agentlog.server.postgres import is_postgres_url, migrate_database
    from agentlog.server.postgres._errors import redact

    if args.store is None or not is_postgres_url(args.store):
        print(
            "agentlog migrate: give --store postgresql://USER@HOST:PORT/DB (or set "
            "AGENTLOG_STORE); a JSONL directory needs no migration",
            file=sys.stderr,
        )
        return 2
    before, after = asyncio.run(migrate_database(args.store, connect_timeout=args.connect_timeout))
    where = redact(args.store)
    if before == after:
        print(f"agentlog migrate: {where} is at schema version {after}; nothing to do")
    else:
        print(f"agentlog migrate: {where} migrated from schema version {before} to {after}")
    return 0


def copy(args: argparse.Namespace) -> int:
    """`agentlog copy`: exit 0 when every session was copied, 1 when some could not be
    (each named, with why), 130 when interrupted (saying what was copied by then)."""
    from agentlog.server.copying import CopySummary, copy_store

    summary = CopySummary()
    try:
        asyncio.run(
            copy_store(
                args.source,
                args.destination,
                progress=sys.stderr,
                connect_timeout=args.connect_timeout,
                summary=summary,
                layout=args.layout,
            )
        )
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        summary.interrupted = True
    if summary.interrupted:
        print(
            f"agentlog copy: interrupted; {summary.describe()}. Run the same copy again to "
            "finish: it continues where this one stopped, without repeating a record",
            file=sys.stderr,
        )
        return 130
    print(summary.describe())
    if summary.failures:
        print(f"agentlog copy: {summary.describe_failures()}", file=sys.stderr)
        return 1
    return 0


def health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from agentlog._status import connection_hint

    problem = _unresolvable(args.addr)
    if problem is not None:  # never answers: the exit code tail gives it too
        print(f"agentlog health: {problem}", file=sys.stderr)
        return 2
    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        tls = _client_tls(args)
        channel = (
            grpc.insecure_channel(args.addr)
            if tls is None
            else grpc.secure_channel(args.addr, tls.credentials(), options=tls.options())
        )
    except (OSError, ValueError) as exc:
        print(f"agentlog health: {exc}", file=sys.stderr)
        return 1
    with channel:
        try:
            metadata = [("authorization", f"Bearer {args.token}")] if args.token else None
            answer = health_pb2_grpc.HealthStub(channel).Check(
                request, timeout=args.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            # The error a channel raises is also a grpc.Call: its code and details.
            text = str(exc)
            code: Any = getattr(exc, "code", lambda: None)()
            details: Any = getattr(exc, "details", lambda: text)()
            name = code.name if code is not None else "UNKNOWN"
            why = "no answer in time" if code == grpc.StatusCode.DEADLINE_EXCEEDED else details
            hint = connection_hint(str(details))
            if hint is not None:
                why = f"{why} ({hint})"
            print(f"agentlog health: {args.addr}: {name}: {why}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    print(f"{args.addr}{' ' + args.service if args.service else ''}: {status}")
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


def tail(args: argparse.Namespace) -> int:
    from agentlog.client import AgentlogClient

    if args.all == (args.session_id is not None):
        print("agentlog tail: name one SESSION, or --all", file=sys.stderr)
        return 2
    if not args.all and (args.prefix or args.kind):
        print(
            "agentlog tail: --prefix and --kind filter --all; with a SESSION, drop them",
            file=sys.stderr,
        )
        return 2
    problem = _unresolvable(args.addr)
    if problem is not None:
        print(f"agentlog tail: {problem}", file=sys.stderr)
        return 2
    try:
        tls = _client_tls(args)
        # Retried here, not in the client: a lost server is said, and its return.
        client = AgentlogClient(args.addr, retries=0, tls=tls, token=args.token)
    except (OSError, ValueError) as exc:
        print(f"agentlog tail: {exc}", file=sys.stderr)
        return 2
    with client:
        _connect(client, args.addr)
        branch = args.branch or "main"
        start = args.from_sequence
        if not args.all and start is None:
            head = client.head(args.session_id, branch)
            start = max((head.sequence if head else 0) - max(args.lines, 0), 0) + 1
        while True:
            try:
                if args.all:
                    start = _follow_feed(client, args, start)
                else:
                    start = _follow_session(client, args, branch, start)
                return 0
            except _Resume as lost:
                start = lost.start
                print(
                    f"agentlog tail: lost {args.addr} ({lost.error.message}); retrying",
                    file=sys.stderr,
                    flush=True,
                )
                _connect(client, args.addr, again=True)


class _Resume(Exception):
    """The server went away: where to resume, and why."""

    def __init__(self, error: Any, start: int | None) -> None:
        super().__init__(error.message)
        self.error = error
        self.start = start


def _follow_feed(client: Any, args: argparse.Namespace, start: int | None) -> int | None:
    """Print the feed from `start`; the position to resume from (_Resume's, if the
    server went away)."""
    from agentlog._records import Checkpoint, FeedGap
    from agentlog.server._tail import describe

    feed = client.subscribe_all(
        from_position=start,
        session_id_prefix=args.prefix,
        part_types=args.kind,
        branch_id=args.branch or "",
    )
    try:
        for entry in feed:
            # Each item says how far the feed has been seen (a gap: to its end).
            start = (entry.last_position if isinstance(entry, FeedGap) else entry.position) + 1
            if isinstance(entry, Checkpoint):
                continue  # progress through what the filters left out
            line = describe(entry)
            if line is not None:
                print(line[: args.width], flush=True)
    except UnavailableError as exc:
        raise _Resume(exc, start) from None
    return start


def _follow_session(client: Any, args: argparse.Namespace, branch: str, start: int) -> int:
    from agentlog._records import CaughtUp, EventRecord
    from agentlog.server._tail import describe

    try:
        for item in client.subscribe_session(
            args.session_id, from_sequence=start, branch_id=branch
        ):
            if isinstance(item, EventRecord | CaughtUp):
                start = item.sequence + 1
            line = describe(item)
            if line is not None:
                print(line[: args.width], flush=True)
    except UnavailableError as exc:
        raise _Resume(exc, start) from None
    return start


def fork(args: argparse.Namespace) -> int:
    """`agentlog fork`: make a branch from another's first records; print it."""
    from agentlog._records import format_timestamp
    from agentlog.client import AgentlogClient
    from agentlog.errors import AgentlogError

    problem = _unresolvable(args.addr)
    if problem is not None:
        print(f"agentlog fork: {problem}", file=sys.stderr)
        return 2
    if not args.to_branch and not args.to_session:
        print(
            "agentlog fork: name the new branch (--to-branch) or session (--to-session)",
            file=sys.stderr,
        )
        return 2
    try:
        client = AgentlogClient(args.addr, tls=_client_tls(args), token=args.token)
    except (OSError, ValueError) as exc:
        print(f"agentlog fork: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            up_to = args.at
            if up_to is None:
                head = client.head(args.session_id, args.branch)
                up_to = head.sequence if head is not None else 0
                if up_to == 0:
                    print(
                        f"agentlog fork: session {args.session_id!r} has no records in branch "
                        f"{args.branch!r}: nothing to fork",
                        file=sys.stderr,
                    )
                    return 1
            made = client.fork_session(
                args.session_id,
                up_to,
                branch_id=args.branch,
                expected_sequence=args.expect,
                new_branch_id=args.to_branch or "",
                new_session_id=args.to_session or "",
            )
        except AgentlogError as exc:
            print(f"agentlog fork: {exc.status_name}: {exc.message}", file=sys.stderr)
            return 1
    session = args.to_session or args.session_id
    origin = made.forked_from
    source = f"{origin.session_id} {origin.branch_id} 1-{origin.sequence}" if origin else "?"
    print(
        f"forked {source} into session {session} branch {made.branch_id}: "
        f"{made.event_count} record(s), head {made.head_id}, last at "
        f"{format_timestamp(made.last_timestamp_ns)}"
    )
    return 0


def _unresolvable(address: str) -> str | None:
    """Why `address` can never be reached (not HOST:PORT, or a host that does not
    resolve), or None: worth connecting to and retrying."""
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        return f"--addr {address!r} is not HOST:PORT (e.g. 127.0.0.1:50051)"
    host = host.removeprefix("[").removesuffix("]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot resolve {host!r} in --addr {address}: {exc}"
    return None


def _connect(client: Any, address: str, *, again: bool = False) -> None:
    """Wait for the server, saying on stderr that it is being tried."""
    if not again:
        print(f"agentlog tail: connecting to {address} ...", file=sys.stderr, flush=True)
    waited = 0.0
    while not client.wait_for_server(CONNECT_REPORT_SECONDS):
        waited += CONNECT_REPORT_SECONDS
        print(
            f"agentlog tail: no answer from {address} after {waited:.0f} s; still retrying "
            "(Ctrl-C to give up)",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"agentlog tail: connected to {address}{' again' if again else ''}",
        file=sys.stderr,
        flush=True,
    )
