"""The JSONL index while serving (`python -m bench --only index`): `--big` events
(1,000,000 by default) appended through a server in batches of 100 over 100 sessions;
the index's size on disk per event while serving and after a stop, its write-ahead
log's peak (sampled every 50 ms) and size when quiet, and the time to restart on it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agentlog import AgentlogClient, NewEvent
from bench.common import Results, delta, server

INDEX = ".agentlog.index"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def run(tmp: Path, results: Results, events: int) -> None:
    data = tmp / "data"
    index, wal = data / INDEX, data / f"{INDEX}-wal"
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak[0] = max(peak[0], _size(wal))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with server(data) as (target, _), AgentlogClient(target) as client:
        started = time.perf_counter()
        for batch in range(events // 100):
            session = f"s-{batch % 100}"
            client.append_batch(session, [NewEvent(event=delta(session, n)) for n in range(100)])
        results["index_append_events_per_s"] = (
            events // 100 * 100 / (time.perf_counter() - started),
            "1/s",
        )
        time.sleep(1)  # quiet: the log is folded into the main file
        serving = _size(index) + _size(wal)
        results["index_wal_bytes_quiet"] = (float(_size(wal)), "B")
    sampling.set()
    sampler.join()
    results["index_bytes_per_event_serving"] = (serving / events, "B")
    results["index_wal_peak_bytes"] = (float(peak[0]), "B")
    results["index_bytes_per_event_stopped"] = ((_size(index) + _size(wal)) / events, "B")
    started = time.perf_counter()
    with server(data):
        results["index_restart_ms"] = ((time.perf_counter() - started) * 1000, "ms")
