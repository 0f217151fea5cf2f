"""`agentlog sessions`, `show`, `delete` and `label`: looking at sessions and changing
them through a server, as a person would (`cli.py` adds their arguments here)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from agentlog._codec import event_to_json, record_line, record_to_json
from agentlog._records import EventRecord, SessionInfo, format_timestamp

# What `show` prints of a long value, at most, unless --full.
SHOWN_CHARS = 400


def add_session_commands(
    commands: Any, add_client_options: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The four commands' parsers, each with the client options (`--addr`, TLS, token)."""
    sessions = commands.add_parser(
        "sessions",
        help="list sessions (by label, id prefix)",
        description="List sessions, newest information from the server: id, branches, "
        "records, last update and labels; --json prints one JSON object a session.",
    )
    sessions.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only sessions with this label (repeatable: all must match)",
    )
    sessions.add_argument("--prefix", default="", help="only sessions whose id starts with this")
    sessions.add_argument(
        "--limit", type=int, default=100, help="list at most this many (0: every one)"
    )
    sessions.add_argument("--json", action="store_true", help="JSON lines, for scripts")
    add_client_options(sessions)

    show = commands.add_parser(
        "show",
        help="print a session's events as a person reads them",
        description="Print a branch's events: runs and iterations, text joined as it was "
        "streamed, tool calls with their inputs and outputs, approvals and state patches. "
        "--json prints the records as JSON lines, exactly as stored.",
    )
    show.add_argument("session_id", metavar="SESSION", help="the session to show")
    show.add_argument("--branch", default="main", help="the branch to show")
    show.add_argument("--json", action="store_true", help="the records as stored, as JSON lines")
    show.add_argument("--full", action="store_true", help="do not shorten long values")
    add_client_options(show)

    delete = commands.add_parser(
        "delete",
        help="delete a branch, or a whole session, for good",
        description="Delete a branch (or, with --all-branches, every branch and the "
        "session's labels) for good: its records are erased from the store. Asks first "
        "unless --yes.",
    )
    delete.add_argument("session_id", metavar="SESSION", help="the session to delete from")
    delete.add_argument("--branch", default="main", help="the branch to delete")
    delete.add_argument("--all-branches", action="store_true", help="delete every branch")
    delete.add_argument(
        "--expect", type=int, default=None, help="delete only if the branch's last sequence is this"
    )
    delete.add_argument("--yes", "-y", action="store_true", help="do not ask")
    add_client_options(delete)

    label = commands.add_parser(
        "label",
        help="set or remove a session's labels",
        description="Set labels (KEY=VALUE) and remove them (KEY-) on a session; prints the "
        "labels after the change and their version.",
    )
    label.add_argument("session_id", metavar="SESSION", help="the session to label")
    label.add_argument(
        "changes", nargs="+", metavar="KEY=VALUE|KEY-", help="labels to set, and to remove"
    )
    label.add_argument(
        "--expect-version",
        type=int,
        default=None,
        help="change them only if their version is this (so two editors do not overwrite "
        "each other)",
    )
    add_client_options(label)


def run_session_command(args: argparse.Namespace, client_of: Callable[[], Any]) -> int:
    """Run one of the four commands with a client `client_of()` makes; the exit code."""
    from agentlog.errors import AgentlogError

    name = args.command
    handlers = {"sessions": _sessions, "show": _show, "delete": _delete, "label": _label}
    try:
        client = client_of()
    except (OSError, ValueError) as exc:
        print(f"agentlog {name}: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            return handlers[name](args, client)
        except AgentlogError as exc:
            print(f"agentlog {name}: {exc.status_name}: {exc.message}", file=sys.stderr)
            return 1
        except _Usage as exc:
            print(f"agentlog {name}: {exc}", file=sys.stderr)
            return 2


class _Usage(Exception):
    """A command line that cannot mean anything."""


def _pairs(texts: Iterable[str], flag: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for text in texts:
        key, equals, value = text.partition("=")
        if not equals:
            raise _Usage(f"{flag} {text!r}: write KEY=VALUE")
        found[key] = value
    return found


def _all_sessions(client: Any, args: argparse.Namespace) -> Iterator[SessionInfo]:
    labels = _pairs(args.label, "--label")
    token = None
    while True:
        page = client.list_sessions(
            page_size=1000, page_token=token, labels=labels, session_id_prefix=args.prefix
        )
        yield from page.sessions
        token = page.next_page_token
        if token is None:
            return


def _sessions(args: argparse.Namespace, client: Any) -> int:
    shown = 0
    rows: list[tuple[str, ...]] = []
    for info in _all_sessions(client, args):
        if args.limit and shown == args.limit:
            break
        shown += 1
        if args.json:
            print(json.dumps(_info_json(info), ensure_ascii=False))
            continue
        rows.append(
            (
                info.session_id,
                ",".join(b.branch_id for b in info.branches),
                str(info.event_count),
                format_timestamp(info.last_timestamp_ns)[:19].replace("T", " "),
                " ".join(f"{k}={v}" for k, v in sorted(info.labels.items())),
            )
        )
    if not args.json:
        if not rows:
            print("no sessions", file=sys.stderr)
            return 0
        header = ("SESSION", "BRANCHES", "RECORDS", "LAST UPDATE (UTC)", "LABELS")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        for row in [header, *rows]:
            cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
            print("  ".join([*cells, row[4]]).rstrip())
    return 0


def _info_json(info: SessionInfo) -> dict[str, Any]:
    return {
        "session_id": info.session_id,
        "event_count": info.event_count,
        "first_timestamp": format_timestamp(info.first_timestamp_ns),
        "last_timestamp": format_timestamp(info.last_timestamp_ns),
        "labels": dict(info.labels),
        "labels_version": info.labels_version,
        "branches": [
            {
                "branch_id": b.branch_id,
                "event_count": b.event_count,
                "last_timestamp": format_timestamp(b.last_timestamp_ns),
                "forked_from": None
                if b.forked_from is None
                else {
                    "session_id": b.forked_from.session_id,
                    "branch_id": b.forked_from.branch_id,
                    "sequence": b.forked_from.sequence,
                },
            }
            for b in info.branches
        ],
    }


def _show(args: argparse.Namespace, client: Any) -> int:
    records = client.read_session(args.session_id, branch_id=args.branch)
    if args.json:
        branches = args.branch != "main"
        count = 0
        for record in records:
            sys.stdout.write(record_line(record_to_json(record, branches=branches)).decode())
            count += 1
        return 0 if count or _exists(client, args) else _missing(args)
    lines = list(readable_lines(records, full=args.full))
    if not lines:
        return _missing(args)
    for line in lines:
        print(line)
    return 0


def _exists(client: Any, args: argparse.Namespace) -> bool:
    return client.head(args.session_id, args.branch) is not None


def _missing(args: argparse.Namespace) -> int:
    print(
        f"agentlog show: branch {args.branch!r} of session {args.session_id!r} has no records",
        file=sys.stderr,
    )
    return 1


def _short(value: Any, full: bool) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if not full and len(text) > SHOWN_CHARS:
        return f"{text[:SHOWN_CHARS]}… ({len(text)} chars; --full shows all)"
    return text


def readable_lines(records: Iterable[EventRecord], *, full: bool = False) -> Iterator[str]:
    """A session's events as a person reads them: one line per event, text deltas of
    one iteration joined into the text they made."""
    text: list[str] = []
    text_at = ""

    def flush() -> Iterator[str]:
        if text:
            yield f"{text_at}  text: {_short(''.join(text), full)}"
            text.clear()

    for record in records:
        event = event_to_json(record.event)
        kind = event["part_type"]
        at = f"#{record.sequence:<5} {format_timestamp(record.timestamp_ns)[11:23]}"
        if kind == "text_delta":
            if not text:
                text_at = at
            text.append(event["delta"])
            continue
        yield from flush()
        yield f"{at}  {_described(kind, event, full)}"
    yield from flush()


def _described(kind: str, event: dict[str, Any], full: bool) -> str:
    def short(value: Any) -> str:
        return _short(value, full)

    if kind == "run_started":
        return (
            f"run {event['run_id']} started ({event['provider']}, "
            f"at most {event['max_iterations']} iterations)"
        )
    if kind == "iteration_started":
        return f"iteration {event['iteration']}"
    if kind == "tool_call_requested":
        call = event["call"]
        where = f"{call['tool_name']} [{call['call_id']}]"
        return f"tool call {where} input: {short(call.get('input'))}"
    if kind == "tool_call_completed":
        result = event["result"]
        where = f"{result['tool_name']} [{result['call_id']}]"
        return f"tool result {where} output: {short(result.get('output'))}"
    if kind == "tool_call_failed":
        where = f"{event['tool_name']} [{event['call_id']}]"
        return f"tool failed {where} error: {short(event['error'])}"
    if kind == "approval_requested":
        where = f"[{event['approval_id']}] {event['tool_name']} risk={event.get('risk')}"
        return f"approval asked {where} arguments: {short(event.get('arguments'))}"
    if kind == "approval_resolved":
        why = f" ({event['reason']})" if event.get("reason") else ""
        return f"approval {event['decision']} [{event['approval_id']}]{why}"
    if kind == "state_patched":
        return f"state revision {event['revision']}: {short(event.get('patch'))}"
    if kind == "run_finished":
        answer = event.get("final_answer")
        said = f": {short(answer)}" if answer else ""
        how = f"{event['reason']}, {event['total_iterations']} iterations"
        return f"run {event['run_id']} finished ({how}){said}"
    if kind == "run_errored":
        return f"run {event['run_id']} errored: {short(event['error'])}"
    rest = {k: v for k, v in event.items() if k not in ("part_type", "run_id", "session_id")}
    return f"{kind.replace('_', ' ')} {short(rest)}"


def _delete(args: argparse.Namespace, client: Any) -> int:
    what = (
        f"every branch of session {args.session_id!r}"
        if args.all_branches
        else f"branch {args.branch!r} of session {args.session_id!r}"
    )
    if not args.yes:
        if not sys.stdin.isatty():
            raise _Usage(f"refusing to delete {what} without asking: pass --yes")
        answer = input(f"Delete {what} for good? Its records cannot be brought back. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    markers = client.delete_session(
        args.session_id,
        args.branch,
        all_branches=args.all_branches,
        expected_sequence=args.expect,
    )
    for marker in markers:
        print(
            f"deleted branch {marker.branch_id} of session {marker.session_id}: "
            f"{marker.last_sequence} record(s); feed position {marker.position}"
        )
    return 0


def _label(args: argparse.Namespace, client: Any) -> int:
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for change in args.changes:
        if "=" in change:
            set_labels.update(_pairs([change], "label"))
        elif change.endswith("-") and len(change) > 1:
            remove.append(change[:-1])
        else:
            raise _Usage(f"{change!r}: write KEY=VALUE to set a label, KEY- to remove one")
    labels = client.update_session_labels(
        args.session_id, set_labels, remove, expected_version=args.expect_version
    )
    shown = " ".join(f"{k}={v}" for k, v in sorted(labels.labels.items())) or "(none)"
    print(f"{args.session_id}: {shown} (version {labels.version})")
    return 0
