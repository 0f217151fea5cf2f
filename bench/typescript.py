"""The TypeScript client beside the Python one (`python -m bench --only typescript`).

Append at 1 and 64 in flight and LoadSession records/s, each client against the same
server in interleaved rounds (medians), so the ratio TypeScript / Python is what the
machine's drift leaves alone. The TypeScript side runs clients/typescript/dist/bench.
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from agentlog import AgentlogClient, AppendEvent, NewEvent
from bench.common import Results, append_rate_c64, delta, load_rate, rate, server

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "clients" / "typescript" / "dist" / "bench" / "run.js"
LOAD_RECORDS = 20_000

CEILINGS = {
    "typescript_append_rps_c1": "python_append_rps_c1",
    "typescript_append_rps_c64": "python_append_rps_c64",
    "typescript_load_session_records_per_s": "python_load_session_records_per_s",
}


def node_figure(*args: str) -> float:
    """The figure clients/typescript/dist/bench/run.js prints for `args`."""
    if not RUNNER.exists():
        raise SystemExit(f"{RUNNER} is missing: build the client (make bench does)")
    result = subprocess.run(
        ["node", str(RUNNER), *args], capture_output=True, text=True, check=True, timeout=600
    )
    return float(result.stdout.strip().splitlines()[-1])


def _python_c1(target: str, calls: int) -> float:
    with AgentlogClient(target) as client:
        counter = iter(range(10**9))

        def append() -> None:
            n = next(counter)
            session = f"p-{n % 64}"
            client.append(AppendEvent(session_id=session, event=delta(session, n)))

        rate(min(200, calls), append)  # warm up, as the TypeScript runner does
        return rate(calls, append)


def run(tmp: Path, results: Results, scale: int, rounds: int) -> None:
    with server(tmp / "data") as (target, _):
        with AgentlogClient(target) as client:
            events = [NewEvent(event=delta("load", n)) for n in range(500)]
            for _ in range(LOAD_RECORDS // 500):
                client.append_batch("load", events)
        figures: dict[str, list[float]] = {name: [] for name in [*CEILINGS, *CEILINGS.values()]}
        append_rate_c64(target, {}, scale)  # warm the server
        for _ in range(rounds):
            figures["python_append_rps_c1"].append(_python_c1(target, scale))
            figures["typescript_append_rps_c1"].append(
                node_figure(target, "append", str(scale), "1")
            )
            figures["python_append_rps_c64"].append(append_rate_c64(target, {}, scale * 4))
            figures["typescript_append_rps_c64"].append(
                node_figure(target, "append", str(scale * 4), "64")
            )
            figures["python_load_session_records_per_s"].append(load_rate(target, {}))
            figures["typescript_load_session_records_per_s"].append(
                node_figure(target, "load", "load")
            )
        for name in [*CEILINGS.values(), *CEILINGS]:
            results[name] = (statistics.median(figures[name]), "1/s")
