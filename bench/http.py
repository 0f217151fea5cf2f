"""The service over HTTP beside gRPC, and the console in a browser
(`python -m bench --only http`).

Append at 64 in flight and LoadSession records/s through the TypeScript client, over
the Connect protocol (HTTP/1.1, binary) and over gRPC, against the same server in
interleaved rounds (medians): the ratio is HTTP / gRPC. Then, in headless chromium,
the time to first paint and to a fully rendered first screen of a 100,000-record
session, and the delay from an append's answer to its element on the page (p50, p99
over 200 appends).
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time
from pathlib import Path

from agentlog import AgentlogClient, NewEvent
from bench.common import Results, delta, server, write_arcan_session
from bench.typescript import ROOT, node_figure

CONSOLE_RUNNER = ROOT / "clients" / "typescript" / "dist" / "bench" / "console.js"
LOAD_RECORDS = 20_000
BIG_SESSION = 100_000

CEILINGS = {
    "http_connect_append_rps_c64": "http_grpc_append_rps_c64",
    "http_connect_load_session_records_per_s": "http_grpc_load_session_records_per_s",
}


def _http_target(log: list[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log:
            found = re.search(r"web console on http://(127\.0\.0\.1:\d+)/", line)
            if found:
                return found.group(1)
        time.sleep(0.05)
    raise SystemExit("the server did not say where it serves HTTP")


def run(tmp: Path, results: Results, scale: int, rounds: int) -> None:
    data = tmp / "data"
    data.mkdir()
    write_arcan_session(data / "big.jsonl", "big", BIG_SESSION)
    log: list[str] = []
    with server(data, "--http-addr", "127.0.0.1:0", log=log) as (target, _):
        http = _http_target(log)
        with AgentlogClient(target) as client:
            events = [NewEvent(event=delta("load", n)) for n in range(500)]
            for _ in range(LOAD_RECORDS // 500):
                client.append_batch("load", events)
            client.append_batch("live", [NewEvent(event=delta("live", 0))])
        figures: dict[str, list[float]] = {name: [] for name in [*CEILINGS, *CEILINGS.values()]}
        node_figure(target, "append", str(scale), "64")  # warm the server
        for _ in range(rounds):
            figures["http_grpc_append_rps_c64"].append(
                node_figure(target, "append", str(scale * 4), "64")
            )
            figures["http_connect_append_rps_c64"].append(
                node_figure(http, "append", str(scale * 4), "64", "connect")
            )
            figures["http_grpc_load_session_records_per_s"].append(
                node_figure(target, "load", "load")
            )
            figures["http_connect_load_session_records_per_s"].append(
                node_figure(http, "load", "load", "connect")
            )
        for name in [*CEILINGS.values(), *CEILINGS]:
            results[name] = (statistics.median(figures[name]), "1/s")
        if not CONSOLE_RUNNER.exists():
            raise SystemExit(f"{CONSOLE_RUNNER} is missing: build the client (make bench does)")
        done = subprocess.run(
            ["node", str(CONSOLE_RUNNER), http, target, "big", "live"],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        browser = json.loads(done.stdout.strip().splitlines()[-1])
        results["console_first_paint_ms_100k"] = (browser["first_paint_ms"], "ms")
        results["console_first_screen_ms_100k"] = (browser["first_screen_ms"], "ms")
        results["console_live_delay_p50_ms"] = (browser["live_p50_ms"], "ms")
        results["console_live_delay_p99_ms"] = (browser["live_p99_ms"], "ms")
