"""Branches: Append at 64 clients in the branch layout beside the seed layout (JSONL),
and to a named branch beside "main" (PostgreSQL), in interleaved rounds; and the fork
of a 1,000,000-record branch: its records per second beside a plain copy of the
branch's file (read, written, synced) and the server's memory before and at its peak."""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from agentlog import AgentlogClient, AppendEvent
from bench.common import DELTA_TEXT, Results, concurrent_rate, delta, server


def branch_call(handles: Any, n: int) -> Any:
    """An append to branch "b" of one of 64 sessions (see common.append_call)."""
    session = f"c-{n % 64}"
    return handles[0].append(
        AppendEvent(session_id=session, event=delta(session, n), branch_id="b")
    )


def main_call(handles: Any, n: int) -> Any:
    session = f"c-{n % 64}"
    return handles[0].append(AppendEvent(session_id=session, event=delta(session, n)))


def write_branch(path: Path, session: str, branch: str, count: int) -> None:
    """A branch file as newest arcan writes it, each record the child of the one before."""
    with path.open("wb") as file:
        lines: list[bytes] = []
        parent = None
        for i in range(count):
            record_id = str(uuid.uuid4())
            lines.append(
                orjson.dumps(
                    {
                        "id": record_id,
                        "session_id": session,
                        "branch_id": branch,
                        "sequence": i + 1,
                        "parent_id": parent,
                        "timestamp": "2026-11-25T01:33:38.853460046Z",
                        "event": {
                            "part_type": "text_delta",
                            "run_id": "r",
                            "session_id": session,
                            "iteration": i % 1000,
                            "delta": DELTA_TEXT,
                        },
                    },
                    option=orjson.OPT_APPEND_NEWLINE,
                )
            )
            parent = record_id
            if len(lines) == 10_000:
                file.write(b"".join(lines))
                lines = []
        file.write(b"".join(lines))


def memory_mb(process: subprocess.Popen[str], field: str) -> float:
    """The server's resident memory now (VmRSS) or at its peak (VmHWM), in MB."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def raw_copy_records_per_s(path: Path, count: int) -> float:
    """Records per second of copying a file a block at a time and syncing the copy."""
    copy = path.with_name("raw-copy")
    start = time.perf_counter()
    with path.open("rb") as source, copy.open("wb") as target:
        while block := source.read(1 << 20):
            target.write(block)
        target.flush()
        os.fsync(target.fileno())
    elapsed = time.perf_counter() - start
    copy.unlink()
    return count / elapsed


def fork_figures(
    target: str, process: subprocess.Popen[str], results: Results, prefix: str, count: int
) -> None:
    with AgentlogClient(target, timeout=3600) as client:
        client.head("big")  # the branch's state is built before the clock starts
        before = memory_mb(process, "VmRSS")
        start = time.perf_counter()
        made = client.fork_session("big", count, new_branch_id="forked")
        elapsed = time.perf_counter() - start
        assert made.event_count == count
    results[f"{prefix}fork_records_per_s_1m"] = (count / elapsed, "1/s")
    results[f"{prefix}fork_server_rss_mb_before"] = (before, "MB")
    results[f"{prefix}fork_server_peak_rss_mb"] = (memory_mb(process, "VmHWM"), "MB")


def bench_jsonl(tmp: Path, results: Results, scale: int, rounds: int, big: int) -> None:
    seed, branches = tmp / "seed", tmp / "branches"
    with (
        server(seed) as (seed_target, _),
        server(branches, "--layout", "branches") as (branch_target, _),
    ):
        calls = scale * 4
        concurrent_rate(seed_target, 64, calls // 4, main_call)
        concurrent_rate(branch_target, 64, calls // 4, branch_call)
        rates: dict[str, list[float]] = {"seed": [], "branches": []}
        for _ in range(rounds):
            rates["seed"].append(concurrent_rate(seed_target, 64, calls, main_call))
            rates["branches"].append(concurrent_rate(branch_target, 64, calls, branch_call))
    results["seed_layout_append_rps_c64_always"] = (statistics.median(rates["seed"]), "1/s")
    results["branch_layout_append_rps_c64_always"] = (
        statistics.median(rates["branches"]),
        "1/s",
    )
    data = tmp / "fork"
    data.mkdir()
    write_branch(data / "big__main.jsonl", "big", "main", big)
    results["fork_raw_copy_records_per_s"] = (
        raw_copy_records_per_s(data / "big__main.jsonl", big),
        "1/s",
    )
    with server(data) as (target, process):
        fork_figures(target, process, results, "", big)


def bench_postgres(tmp: Path, results: Results, server_url: str, args: Any) -> None:
    from bench.postgres import bench_database, copy_in

    scale, rounds = int(args.scale), int(args.rounds)
    big = int(args.big)
    with (
        bench_database(server_url) as url,
        server(tmp / "pg-unused", "--store", url) as (
            target,
            process,
        ),
    ):
        calls = scale * 4
        concurrent_rate(target, 64, calls // 4, main_call)
        concurrent_rate(target, 64, calls // 4, branch_call)
        rates: dict[str, list[float]] = {"main": [], "branch": []}
        for _ in range(rounds):
            rates["main"].append(concurrent_rate(target, 64, calls, main_call))
            rates["branch"].append(concurrent_rate(target, 64, calls, branch_call))
        results["pg_main_append_rps_c64"] = (statistics.median(rates["main"]), "1/s")
        results["pg_branch_append_rps_c64"] = (statistics.median(rates["branch"]), "1/s")
        data = tmp / "pg-fork"
        data.mkdir()
        write_branch(data / "big__main.jsonl", "big", "main", big)
        with contextlib.suppress(FileNotFoundError):
            (data / ".agentlog.layout").unlink()
        copy_in(data, url)
        fork_figures(target, process, results, "pg_", big)


def run(tmp: Path, results: Results, args: Any) -> None:
    bench_jsonl(tmp, results, int(args.scale), int(args.rounds), int(args.big))
    if args.store:
        bench_postgres(tmp, results, args.store, args)


CEILINGS = {
    "branch_layout_append_rps_c64_always": "seed_layout_append_rps_c64_always",
    "pg_branch_append_rps_c64": "pg_main_append_rps_c64",
    "fork_records_per_s_1m": "fork_raw_copy_records_per_s",
    "fork_server_peak_rss_mb": "fork_server_rss_mb_before",
    "pg_fork_records_per_s_1m": "fork_raw_copy_records_per_s",
    "pg_fork_server_peak_rss_mb": "pg_fork_server_rss_mb_before",
}
