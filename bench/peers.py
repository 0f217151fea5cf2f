"""agentlog beside the session stores agent frameworks embed (`make bench-peers`).

Runs in its own virtual environment (`.venv-peers`, packages from the registries):
the OpenAI Agents SDK's `SQLiteSession` and LangGraph's SQLite checkpointer
(`SqliteSaver`) in this process, and agentlog as a server on loopback (JSONL,
`--sync always`) through its Python client. The same ~300-byte agent events (arcan's
JSON of a text delta) go into each, durable on every system: SQLite in WAL mode with
`synchronous=FULL` (both libraries' default; checked), agentlog syncing before it
answers.

What each figure is, per system:
- one writer appending: one event at a time, each stored before the next is sent
  (agentlog `append`; `SQLiteSession.add_items([item])`; `SqliteSaver.put` of one
  checkpoint holding the event);
- one writer streaming: agentlog's writer (`client.writer()`); the others have no way to
  send an event without waiting for it, so their figure is the one above;
- 16 writers: 16 threads, each appending to its own session;
- reading 10,000 events: agentlog `load_session`; `SQLiteSession.get_items()`;
  `SqliteSaver.list` of the thread's checkpoints;
- listing 10,000 sessions: agentlog `list_sessions` page by page; SQLiteSession has no
  call for it, so a `SELECT` of its sessions table (what a user would write);
  `SqliteSaver.list(None)` over one checkpoint a thread;
- bytes on disk per event: the directory's (agentlog) or database's files (with their
  WAL), after writing the 10,000-event session and the 10,000 sessions.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentlog import AgentlogClient, AppendEvent
from agentlog._codec import event_to_json
from bench.common import all_pages, delta, server

ONE_WRITER = 2_000
STREAMED = 10_000
WRITERS = 16
PER_WRITER = 200
READ = 10_000
SESSIONS = 10_000
RESULTS = Path(__file__).resolve().parent / "peers.json"


def _item(session: str, n: int) -> dict[str, Any]:
    """The event as the embedded stores keep it: arcan's JSON of the same text delta."""
    return event_to_json(delta(session, n))


def _disk_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        if path.is_dir():
            total += sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            total += path.stat().st_size
    return total


def _threads(count: int, work: Callable[[int], None]) -> float:
    """Run `work(i)` on `count` threads at once; the seconds they took together."""
    ready = threading.Barrier(count + 1)

    def run(i: int) -> None:
        ready.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def _rate(count: int, seconds: float) -> float:
    return count / seconds


def bench_agentlog(tmp: Path) -> dict[str, float]:
    data = tmp / "agentlog"
    figures: dict[str, float] = {}
    with server(data) as (target, _), AgentlogClient(target) as client:
        client.head("warm")
        start = time.perf_counter()
        for n in range(ONE_WRITER):
            client.append(AppendEvent(session_id="one", event=delta("one", n)))
        figures["one_writer"] = _rate(ONE_WRITER, time.perf_counter() - start)

        start = time.perf_counter()
        with client.writer() as writer:
            for n in range(STREAMED):
                writer.append(AppendEvent(session_id="read", event=delta("read", n)))
        figures["streaming"] = _rate(STREAMED, time.perf_counter() - start)

        def write(i: int) -> None:
            with AgentlogClient(target) as own:
                for n in range(PER_WRITER):
                    own.append(AppendEvent(session_id=f"w{i}", event=delta(f"w{i}", n)))

        figures["writers_16"] = _rate(WRITERS * PER_WRITER, _threads(WRITERS, write))

        start = time.perf_counter()
        assert len(client.load_session("read")) == READ
        figures["read_10k_ms"] = (time.perf_counter() - start) * 1000

        with client.writer() as writer:
            for n in range(SESSIONS):
                writer.append(AppendEvent(session_id=f"s{n:05d}", event=delta("s", n)))
        start = time.perf_counter()
        assert all_pages(client) >= SESSIONS
        figures["list_10k_ms"] = (time.perf_counter() - start) * 1000
        events = ONE_WRITER + STREAMED + WRITERS * PER_WRITER + SESSIONS
        figures["bytes_per_event_serving"] = _disk_bytes(data) / events
    figures["bytes_per_event"] = _disk_bytes(data) / events
    return figures


def bench_openai_sqlite_session(tmp: Path) -> dict[str, float]:
    from agents import SQLiteSession

    db = tmp / "openai.db"
    figures: dict[str, float] = {}

    async def run() -> None:
        one = SQLiteSession("one", db)
        start = time.perf_counter()
        for n in range(ONE_WRITER):
            await one.add_items([_item("one", n)])
        figures["one_writer"] = _rate(ONE_WRITER, time.perf_counter() - start)
        figures["streaming"] = figures["one_writer"]
        read = SQLiteSession("read", db)
        for n in range(STREAMED):
            await read.add_items([_item("read", n)])
        start = time.perf_counter()
        assert len(await read.get_items()) == READ
        figures["read_10k_ms"] = (time.perf_counter() - start) * 1000
        for n in range(SESSIONS):
            await SQLiteSession(f"s{n:05d}", db).add_items([_item("s", n)])

    asyncio.run(run())

    def write(i: int) -> None:
        async def each() -> None:
            session = SQLiteSession(f"w{i}", db)
            for n in range(PER_WRITER):
                await session.add_items([_item(f"w{i}", n)])

        asyncio.run(each())

    figures["writers_16"] = _rate(WRITERS * PER_WRITER, _threads(WRITERS, write))
    with sqlite3.connect(db) as conn:
        figures["synchronous"] = conn.execute("PRAGMA synchronous").fetchone()[0]
        start = time.perf_counter()
        rows = conn.execute("SELECT session_id FROM agent_sessions ORDER BY session_id").fetchall()
        figures["list_10k_ms"] = (time.perf_counter() - start) * 1000
        assert len(rows) >= SESSIONS
    events = ONE_WRITER + STREAMED + WRITERS * PER_WRITER + SESSIONS
    figures["bytes_per_event"] = _disk_bytes(db, Path(f"{db}-wal")) / events
    return figures


def bench_langgraph_sqlite(tmp: Path) -> dict[str, float]:
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.sqlite import SqliteSaver

    db = tmp / "langgraph.db"
    figures: dict[str, float] = {}
    conn = sqlite3.connect(db, check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()

    def put(thread: str, n: int, parent: dict[str, Any]) -> dict[str, Any]:
        checkpoint = empty_checkpoint()
        checkpoint["id"] = str(uuid.uuid4())
        checkpoint["channel_values"] = {"event": _item(thread, n)}
        checkpoint["channel_versions"] = {"event": n + 1}
        stored: dict[str, Any] = saver.put(
            parent, checkpoint, {"source": "loop", "step": n}, {"event": n + 1}
        )
        return stored

    def config(thread: str) -> dict[str, Any]:
        return {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}

    start = time.perf_counter()
    parent = config("one")
    for n in range(ONE_WRITER):
        parent = put("one", n, parent)
    figures["one_writer"] = _rate(ONE_WRITER, time.perf_counter() - start)
    figures["streaming"] = figures["one_writer"]

    def write(i: int) -> None:
        parent = config(f"w{i}")
        for n in range(PER_WRITER):
            parent = put(f"w{i}", n, parent)

    figures["writers_16"] = _rate(WRITERS * PER_WRITER, _threads(WRITERS, write))
    parent = config("read")
    for n in range(STREAMED):
        parent = put("read", n, parent)
    start = time.perf_counter()
    assert sum(1 for _ in saver.list(config("read"))) == READ
    figures["read_10k_ms"] = (time.perf_counter() - start) * 1000
    for n in range(SESSIONS):
        put(f"s{n:05d}", 0, config(f"s{n:05d}"))
    start = time.perf_counter()
    assert sum(1 for _ in saver.list(None)) >= SESSIONS
    figures["list_10k_ms"] = (time.perf_counter() - start) * 1000
    figures["synchronous"] = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.close()
    events = ONE_WRITER + STREAMED + WRITERS * PER_WRITER + SESSIONS
    figures["bytes_per_event"] = _disk_bytes(db, Path(f"{db}-wal")) / events
    return figures


ROWS = [
    ("one_writer", "one writer appending", "events/s"),
    ("streaming", "one writer streaming", "events/s"),
    ("writers_16", "16 writers", "events/s"),
    ("read_10k_ms", "reading 10,000 events", "ms"),
    ("list_10k_ms", "listing 10,000 sessions", "ms"),
    ("bytes_per_event", "bytes on disk per event", "B"),
]


def main() -> None:
    systems: dict[str, Callable[[Path], dict[str, float]]] = {
        "agentlog (gRPC, JSONL, sync always)": bench_agentlog,
        "OpenAI Agents SQLiteSession": bench_openai_sqlite_session,
        "LangGraph SqliteSaver": bench_langgraph_sqlite,
    }
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for name, run in systems.items():
            here = Path(tmp) / name.split()[0].lower()
            here.mkdir()
            started = time.perf_counter()
            results[name] = run(here)
            print(f"# {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    names = list(results)
    print(f"{'':26}" + "".join(f"{name[:30]:>32}" for name in names))
    for key, label, unit in ROWS:
        cells = "".join(f"{results[name].get(key, float('nan')):>32,.1f}" for name in names)
        print(f"{label + ' (' + unit + ')':26}{cells}")
    for name in names:
        if "synchronous" in results[name]:
            print(f"{name}: PRAGMA synchronous = {int(results[name]['synchronous'])} (2: FULL)")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
