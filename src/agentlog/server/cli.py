"""The `agentlog` command: its arguments (every flag with an AGENTLOG_* variable) and
`serve`; the other subcommands are in `_commands.py`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from agentlog.errors import AgentlogError
from agentlog.server._commands import copy, fork, health, migrate, tail
from agentlog.server._session_commands import add_session_commands, run_session_command
from agentlog.server.app import (
    DEFAULT_CONNECTION_AGE_GRACE,
    DEFAULT_GRACE_SECONDS,
    DEFAULT_MAX_MESSAGE_BYTES,
    serve,
)

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "./data"


def _version() -> str:
    try:
        return version("agentlog")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Says an option's default only when it has one worth saying (not None, empty or
    off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "", [], False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentlog",
        description="agentlog stores the event logs of AI-agent sessions, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"agentlog {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve_cmd = commands.add_parser(
        "serve",
        help="run the gRPC server (on a JSONL directory, or on PostgreSQL)",
        description=(
            "Serve the SessionRepository gRPC service (plus grpc.health.v1 and server "
            "reflection, and with --http-addr the same service over HTTP and a web "
            "console) from a directory of arcan-compatible JSONL session files, or from "
            "PostgreSQL (--store postgresql://...). Stops gracefully on SIGTERM or SIGINT."
        ),
        formatter_class=_Defaults,
    )
    serve_cmd.add_argument(
        "--addr",
        default=os.environ.get("AGENTLOG_ADDR", DEFAULT_ADDR),
        help="host:port to listen on; port 0 picks a free port (env AGENTLOG_ADDR)",
    )
    serve_cmd.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get("AGENTLOG_DATA_DIR", DEFAULT_DATA_DIR),
        help="directory of <session_id>.jsonl files, created if missing (env AGENTLOG_DATA_DIR)",
    )
    _add_store_options(serve_cmd)
    serve_cmd.add_argument(
        "--max-connection-age",
        type=_positive_float,
        # A string default goes through `type` too: a bad value is a usage error.
        default=os.environ.get("AGENTLOG_MAX_CONNECTION_AGE") or None,
        help="seconds after which a client connection is asked to go away (GOAWAY), so "
        "long-lived clients move to other replicas behind an L4 balancer; unset: never "
        "(env AGENTLOG_MAX_CONNECTION_AGE)",
    )
    serve_cmd.add_argument(
        "--max-connection-age-grace",
        type=_positive_float,
        default=os.environ.get("AGENTLOG_MAX_CONNECTION_AGE_GRACE")
        or str(DEFAULT_CONNECTION_AGE_GRACE),
        help="seconds calls in flight on such a connection may go on; then they end with "
        "UNAVAILABLE and subscriptions resume elsewhere (env AGENTLOG_MAX_CONNECTION_AGE_GRACE)",
    )
    serve_cmd.add_argument(
        "--max-message-bytes",
        type=_positive_int,
        default=int(os.environ.get("AGENTLOG_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)),
        help="largest request accepted; larger ones get RESOURCE_EXHAUSTED "
        "(env AGENTLOG_MAX_MESSAGE_BYTES)",
    )
    serve_cmd.add_argument(
        "--sync",
        choices=["always", "interval", "never"],
        default=os.environ.get("AGENTLOG_SYNC", "always"),
        help="when appends reach the disk: always (acknowledged only once durable; concurrent "
        "appends share fsyncs), interval (synced every --sync-interval-ms; a power loss may "
        "lose that long of acknowledged appends), never (left to the OS) (env AGENTLOG_SYNC)",
    )
    serve_cmd.add_argument(
        "--sync-interval-ms",
        type=_positive_int,
        default=os.environ.get("AGENTLOG_SYNC_INTERVAL_MS", "100"),
        help="with --sync interval: how often to sync (env AGENTLOG_SYNC_INTERVAL_MS)",
    )
    serve_cmd.add_argument(
        "--layout",
        choices=["seed", "branches"],
        default=os.environ.get("AGENTLOG_LAYOUT") or None,
        help="arcan's file layout for a new JSONL directory: seed (<session>.jsonl, the "
        "branch main only; what arcan's first store reads) or branches "
        "(<session>__<branch>.jsonl, as newest arcan; needed for branches and forks "
        "within a session); an existing directory keeps the layout its files have, and "
        "one that differs from this is refused; unset: seed (env AGENTLOG_LAYOUT)",
    )
    serve_cmd.add_argument(
        "--retention",
        type=_duration,
        default=os.environ.get("AGENTLOG_RETENTION") or None,
        help="delete branches whose last record is older than this (30d, 12h, 90m), in "
        "the background, as DeleteSession does; unset: keep everything (env "
        "AGENTLOG_RETENTION)",
    )
    serve_cmd.add_argument(
        "--retention-interval",
        type=_duration,
        default=os.environ.get("AGENTLOG_RETENTION_INTERVAL") or "60s",
        help="how often retention sweeps (env AGENTLOG_RETENTION_INTERVAL)",
    )
    serve_cmd.add_argument(
        "--read-only",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("AGENTLOG_READ_ONLY", "").lower() in ("1", "true", "yes", "on"),
        help="serve a JSONL directory without writing anything in it (one this process may "
        "not write, say): every read works, appends are refused (env AGENTLOG_READ_ONLY=1)",
    )
    serve_cmd.add_argument(
        "--http-addr",
        default=os.environ.get("AGENTLOG_HTTP_ADDR") or None,
        help="host:port to also serve the service over HTTP on (Connect and gRPC-Web, for "
        "browsers and curl), with the web console at /; same TLS, credentials and metrics; "
        "unset: not served (env AGENTLOG_HTTP_ADDR)",
    )
    serve_cmd.add_argument(
        "--metrics-addr",
        default=os.environ.get("AGENTLOG_METRICS_ADDR") or None,
        help="host:port to serve Prometheus metrics on, at /metrics; unset: not served "
        "(env AGENTLOG_METRICS_ADDR)",
    )
    serve_cmd.add_argument(
        "--tls-cert",
        type=Path,
        default=os.environ.get("AGENTLOG_TLS_CERT") or None,
        help="serve TLS with this PEM certificate chain (with --tls-key); re-read when the "
        "file changes, without a restart (env AGENTLOG_TLS_CERT)",
    )
    serve_cmd.add_argument(
        "--tls-key",
        type=Path,
        default=os.environ.get("AGENTLOG_TLS_KEY") or None,
        help="the PEM private key of --tls-cert (env AGENTLOG_TLS_KEY)",
    )
    serve_cmd.add_argument(
        "--tls-client-ca",
        type=Path,
        default=os.environ.get("AGENTLOG_TLS_CLIENT_CA") or None,
        help="require client certificates signed by this PEM CA (mTLS) "
        "(env AGENTLOG_TLS_CLIENT_CA)",
    )
    serve_cmd.add_argument(
        "--auth-file",
        type=Path,
        default=os.environ.get("AGENTLOG_AUTH_FILE") or None,
        help="require credentials: a JSON file of callers (SHA-256 of each bearer token, or "
        "an mTLS identity), their permissions and session-id prefixes; re-read when it "
        "changes (env AGENTLOG_AUTH_FILE)",
    )
    serve_cmd.add_argument(
        "--jwks-file",
        type=Path,
        default=os.environ.get("AGENTLOG_JWKS_FILE") or None,
        help="require credentials, taking bearer JWTs signed by a key of this JWKS file "
        "(env AGENTLOG_JWKS_FILE)",
    )
    serve_cmd.add_argument(
        "--jwt-issuer",
        default=os.environ.get("AGENTLOG_JWT_ISSUER") or None,
        help="the `iss` a JWT must carry (env AGENTLOG_JWT_ISSUER)",
    )
    serve_cmd.add_argument(
        "--jwt-audience",
        default=os.environ.get("AGENTLOG_JWT_AUDIENCE") or None,
        help="the `aud` a JWT must carry (env AGENTLOG_JWT_AUDIENCE)",
    )
    serve_cmd.add_argument(
        "--reflection",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("AGENTLOG_REFLECTION", "1").lower() not in ("0", "false", "no"),
        help="serve gRPC server reflection (env AGENTLOG_REFLECTION=0 to turn it off)",
    )
    serve_cmd.add_argument(
        "--log-format",
        choices=["text", "json"],
        default=os.environ.get("AGENTLOG_LOG_FORMAT", "text"),
        help="logs on stderr as text lines, or one JSON object per line (env AGENTLOG_LOG_FORMAT)",
    )
    serve_cmd.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("AGENTLOG_ACCESS_LOG", "").lower() in ("1", "true", "yes", "on"),
        help="log every call when it ends: method, status, duration, peer "
        "(env AGENTLOG_ACCESS_LOG=1)",
    )
    serve_cmd.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("AGENTLOG_GRACE_SECONDS", DEFAULT_GRACE_SECONDS)),
        help="seconds calls in flight may take to finish at shutdown (env AGENTLOG_GRACE_SECONDS)",
    )
    migrate_cmd = commands.add_parser(
        "migrate",
        help="create or update the schema of a PostgreSQL store",
        description=(
            "Bring the agentlog schema of a PostgreSQL database up to date, as every "
            "replica also does at start: run it before a rollout to migrate once, ahead "
            "of the replicas. Safe to run while replicas start or serve."
        ),
    )
    migrate_cmd.add_argument(
        "--store",
        default=os.environ.get("AGENTLOG_STORE") or None,
        help="postgresql://USER@HOST:PORT/DB (env AGENTLOG_STORE); the password from the "
        "URL or libpq's environment (PGPASSWORD, PGPASSFILE, PGSERVICEFILE)",
    )
    copy_cmd = commands.add_parser(
        "copy",
        help="copy every session from one store to another",
        description=(
            "Copy every record from FROM to TO, each a JSONL data directory or a "
            "postgresql:// URL, keeping ids, sequences, parents, timestamps and JSON "
            "values. Sessions TO already holds are continued, not repeated: run it again "
            "after an interruption to finish. Neither store may be served meanwhile "
            "(a JSONL directory is locked; a PostgreSQL one must not be written)."
        ),
    )
    copy_cmd.add_argument(
        "source", metavar="FROM", help="the store to copy from: a JSONL directory or a URL"
    )
    copy_cmd.add_argument(
        "destination",
        metavar="TO",
        help="the store to copy into: a JSONL directory (made if new) or a postgresql:// URL",
    )
    copy_cmd.add_argument(
        "--layout",
        choices=["seed", "branches"],
        default=None,
        help="with a new JSONL directory TO: arcan's layout to write it in, seed "
        "(<session>.jsonl; one branch, main) or branches (<session>__<branch>.jsonl, as "
        "newest arcan); default: TO's own layout if it has one, else seed",
    )
    for command in (migrate_cmd, copy_cmd):
        command.add_argument(
            "--connect-timeout",
            type=float,
            default=float(os.environ.get("AGENTLOG_CONNECT_TIMEOUT", "30")),
            help="seconds to wait for PostgreSQL (env AGENTLOG_CONNECT_TIMEOUT)",
        )
    health_cmd = commands.add_parser(
        "health",
        help="check a server's health: exit 0 if SERVING, 1 otherwise, 2 for a bad address",
        description=(
            "Ask a server's grpc.health.v1 service, as an exec probe or a container health "
            "check does: prints the status and exits 0 when it is SERVING, 1 when it is "
            "anything else or does not answer within --timeout."
        ),
        formatter_class=_Defaults,
    )
    health_cmd.add_argument(
        "--addr",
        default=os.environ.get("AGENTLOG_ADDR", DEFAULT_ADDR),
        help="the server's host:port (env AGENTLOG_ADDR)",
    )
    health_cmd.add_argument(
        "--service",
        default="",
        help="the service to ask about; empty: the server as a whole "
        "(agentlog.v1.SessionRepository: the store's service)",
    )
    health_cmd.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for an answer"
    )
    _add_client_tls_options(health_cmd)
    tail_cmd = commands.add_parser(
        "tail",
        help="print a session's events as they happen",
        description=(
            "Print a session's last events, then each new one as it is appended, one line "
            "each: sequence, time (UTC), kind, and the event's fields. Stops on Ctrl-C. "
            "Survives server restarts without losing or repeating an event."
        ),
        formatter_class=_Defaults,
    )
    tail_cmd.add_argument(
        "session_id", metavar="SESSION", nargs="?", help="the session to follow (or --all)"
    )
    tail_cmd.add_argument(
        "--all", action="store_true", help="follow every session, in commit order"
    )
    tail_cmd.add_argument(
        "--prefix", default="", help="with --all: only sessions whose id starts with this"
    )
    tail_cmd.add_argument(
        "--kind",
        action="append",
        default=[],
        metavar="PART_TYPE",
        help="with --all: only events of this kind (repeatable), e.g. run_finished",
    )
    tail_cmd.add_argument(
        "--branch",
        default=None,
        help="the branch to follow (default: main); with --all, only records of branches "
        "with this id",
    )
    tail_cmd.add_argument(
        "--addr",
        default=os.environ.get("AGENTLOG_ADDR", DEFAULT_ADDR),
        help="the server's host:port (env AGENTLOG_ADDR)",
    )
    start = tail_cmd.add_mutually_exclusive_group()
    start.add_argument(
        "-n", "--lines", type=int, default=10, help="how many stored events to show first"
    )
    start.add_argument(
        "--from",
        dest="from_sequence",
        type=_positive_int,
        help="start at this sequence instead (with --all: at this position; default: now)",
    )
    _add_client_tls_options(tail_cmd)
    tail_cmd.add_argument(
        "--width", type=_positive_int, default=160, help="cut lines longer than this"
    )
    fork_cmd = commands.add_parser(
        "fork",
        help="make a new branch from another branch's first records",
        description=(
            "Ask a server to fork a branch: a new branch (of the same session, or of a new "
            "one) whose records 1 to --at are copies of the source's (same events and "
            "timestamps, new ids), after which both go their own way. Prints the new branch."
        ),
        formatter_class=_Defaults,
    )
    fork_cmd.add_argument("session_id", metavar="SESSION", help="the session to fork from")
    fork_cmd.add_argument("--branch", default="main", help="the branch to fork from")
    fork_cmd.add_argument(
        "--at",
        type=_positive_int,
        default=None,
        help="copy records 1 to this sequence (default: the branch's last)",
    )
    fork_cmd.add_argument(
        "--to-branch", default=None, help="the new branch (required within the same session)"
    )
    fork_cmd.add_argument(
        "--to-session",
        default=None,
        help="make the new branch in this new session (its branch: main unless --to-branch)",
    )
    fork_cmd.add_argument(
        "--expect",
        type=int,
        default=None,
        help="fork only if the source branch's last sequence is this",
    )
    fork_cmd.add_argument(
        "--addr",
        default=os.environ.get("AGENTLOG_ADDR", DEFAULT_ADDR),
        help="the server's host:port (env AGENTLOG_ADDR)",
    )
    _add_client_tls_options(fork_cmd)
    add_session_commands(commands, _add_client_options)
    return parser


def _add_client_options(command: argparse.ArgumentParser) -> None:
    """--addr, TLS and the token: how a command reaches a server."""
    command.add_argument(
        "--addr",
        default=os.environ.get("AGENTLOG_ADDR", DEFAULT_ADDR),
        help="the server's host:port (env AGENTLOG_ADDR)",
    )
    _add_client_tls_options(command)


def _add_client_tls_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--tls-ca",
        default=os.environ.get("AGENTLOG_TLS_CA") or None,
        help="speak TLS, trusting the server's certificate if this PEM CA signed it "
        "(env AGENTLOG_TLS_CA)",
    )
    command.add_argument(
        "--tls-client-cert",
        default=os.environ.get("AGENTLOG_TLS_CLIENT_CERT") or None,
        help="with mTLS: this client's PEM certificate (env AGENTLOG_TLS_CLIENT_CERT)",
    )
    command.add_argument(
        "--tls-client-key",
        default=os.environ.get("AGENTLOG_TLS_CLIENT_KEY") or None,
        help="with mTLS: its PEM private key (env AGENTLOG_TLS_CLIENT_KEY)",
    )
    command.add_argument(
        "--tls-server-name",
        default=os.environ.get("AGENTLOG_TLS_SERVER_NAME") or None,
        help="the name the server's certificate must carry, when it differs from the "
        "--addr host (a probe reaching 127.0.0.1 a certificate issued for "
        "agentlog.NAMESPACE.svc) (env AGENTLOG_TLS_SERVER_NAME)",
    )
    command.add_argument(
        "--token",
        default=os.environ.get("AGENTLOG_TOKEN") or None,
        help="a bearer token (or JWT) to send with every call (env AGENTLOG_TOKEN)",
    )


def _server_tls(args: argparse.Namespace) -> Any:
    """The TlsFiles the serve flags ask for, or None (plaintext)."""
    from agentlog.server._tls import TlsFiles

    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise OSError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS)")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise OSError("give both --tls-cert and --tls-key to serve TLS")
    for path in (args.tls_cert, args.tls_key, args.tls_client_ca):
        if path is not None and not path.is_file():
            raise OSError(f"{path}: no such file (a TLS setting)")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)


def _authenticator(args: argparse.Namespace) -> Any:
    """The Authenticator the serve flags ask for, or None (no authentication)."""
    from agentlog.server._auth import Authenticator, JwtSettings

    if args.auth_file is None and args.jwks_file is None:
        return None
    jwt_settings = None
    if args.jwks_file is not None:
        jwt_settings = JwtSettings(args.jwks_file, args.jwt_issuer, args.jwt_audience)
    import jwt

    try:
        return Authenticator(args.auth_file, jwt_settings)
    except (ValueError, KeyError, jwt.PyJWTError) as exc:
        raise OSError(f"the authentication settings do not load: {exc}") from None


def _add_store_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--store",
        default=os.environ.get("AGENTLOG_STORE") or None,
        help="where records live: postgresql://USER@HOST:PORT/DB for PostgreSQL (many "
        "replicas may share it; the password from the URL or libpq's environment), or a "
        "JSONL directory; unset: the JSONL store at --data-dir (env AGENTLOG_STORE)",
    )
    command.add_argument(
        "--pool-size",
        type=_positive_int,
        default=os.environ.get("AGENTLOG_POOL_SIZE", "10"),
        help="with PostgreSQL: connections this replica keeps at most (env AGENTLOG_POOL_SIZE)",
    )
    command.add_argument(
        "--statement-timeout-ms",
        type=_positive_int,
        default=os.environ.get("AGENTLOG_STATEMENT_TIMEOUT_MS", "30000"),
        help="with PostgreSQL: a statement running longer is cancelled and its call "
        "answered UNAVAILABLE (env AGENTLOG_STATEMENT_TIMEOUT_MS)",
    )
    command.add_argument(
        "--connect-timeout",
        type=float,
        default=float(os.environ.get("AGENTLOG_CONNECT_TIMEOUT", "30")),
        help="with PostgreSQL: seconds to wait for the database at start "
        "(env AGENTLOG_CONNECT_TIMEOUT)",
    )


def _client(args: argparse.Namespace) -> Any:
    from agentlog.client import AgentlogClient
    from agentlog.server._commands import _client_tls, _unresolvable

    problem = _unresolvable(args.addr)
    if problem is not None:
        raise ValueError(problem)
    return AgentlogClient(args.addr, tls=_client_tls(args), token=args.token)


def _duration(text: str) -> float:
    from agentlog.server._retention import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":
        return health(args)
    if args.command == "fork":
        return fork(args)
    if args.command in ("sessions", "show", "delete", "label"):
        return run_session_command(args, lambda: _client(args))
    if args.command == "tail":
        try:
            return tail(args)
        except KeyboardInterrupt:
            return 0
        except AgentlogError as exc:
            print(f"agentlog tail: {exc}", file=sys.stderr)
            return 1
    from agentlog.server._logs import configure

    configure(getattr(args, "log_format", "text"))
    if args.command in ("migrate", "copy"):
        try:
            return migrate(args) if args.command == "migrate" else copy(args)
        except KeyboardInterrupt:
            print(f"agentlog {args.command}: interrupted", file=sys.stderr)
            return 130
        except (AgentlogError, OSError) as exc:
            print(f"agentlog {args.command}: {exc}", file=sys.stderr)
            return 1
    try:
        asyncio.run(
            serve(
                args.addr,
                args.data_dir,
                store=args.store,
                pool_size=args.pool_size,
                statement_timeout_ms=args.statement_timeout_ms,
                connect_timeout=args.connect_timeout,
                max_connection_age=args.max_connection_age,
                max_connection_age_grace=args.max_connection_age_grace,
                access_log=args.access_log,
                tls=_server_tls(args),
                authenticator=_authenticator(args),
                reflection_enabled=args.reflection,
                max_message_bytes=args.max_message_bytes,
                grace=args.grace,
                sync=args.sync,
                sync_interval_ms=args.sync_interval_ms,
                read_only=args.read_only,
                layout=args.layout,
                metrics_address=args.metrics_addr,
                http_address=args.http_addr,
                version=_version(),
                retention_seconds=args.retention,
                retention_interval=args.retention_interval,
            )
        )
    except (AgentlogError, OSError) as exc:
        print(f"agentlog: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
