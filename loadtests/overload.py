"""Overload: offer several times the server's capacity for 30 s, and check it degrades the right way.

    python -m loadtests.overload --bundle models/all-MiniLM-L6-v2 [--factor 4 | --factor 0]

1. capacity: 32 closed-loop clients for 10 s (texts/s and p99 of a normal load);
2. overload: 256 connections for 30 s against --max-concurrent-requests 64, paced to offer --factor
   times the capacity (default 4; 0: a closed-loop flood of 512 connections, as fast as refusals are
   answered); meanwhile /health is probed every 100 ms on a kept-alive connection, the p99 of
   accepted requests is measured by a separate client, and RSS is sampled;
3. recovery: the normal load again; throughput should be back at once.
Only 200 and 429 may be answered. 127.0.0.1 only; bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests.run import _bodies, serving
from loadtests.soak import _rss_mb

HERE = Path(__file__).resolve().parent


def wrk(url: str, script: Path, bodies: Path, connections: int, seconds: int,
        delay_ms: float | None = None) -> dict[str, Any]:
    pacing = {"DELAY_MS": f"{delay_ms:.3f}"} if delay_ms else {}
    output = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s",
                             str(script), url], capture_output=True, text=True, check=True, timeout=seconds + 60,
                            env={**os.environ, "BODIES_FILE": str(bodies), **pacing}).stdout
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--factor", type=float, default=4.0,
                        help="offered load as a multiple of the measured capacity (0: unpaced flood)")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with serving(args.bundle, "--max-concurrent-requests", "64") as (url, server), \
            tempfile.TemporaryDirectory() as scratch:
        bodies = _bodies(Path(scratch), 1)
        report["capacity"] = wrk(url, HERE / "overload.lua", bodies, 32, 10)
        health_ms: list[float] = []
        accepted_ms: list[float] = []
        rss: list[float] = []
        statuses: dict[int, int] = {}
        stop = threading.Event()

        def probe_health() -> None:
            # A load balancer's prober: one kept-alive connection, a probe every 100 ms.
            with httpx.Client(base_url=url, timeout=10) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        client.get("/health")
                        health_ms.append((time.perf_counter() - started) * 1000)
                    except httpx.HTTPError:
                        health_ms.append(float("inf"))
                    rss.append(_rss_mb(server.pid))
                    time.sleep(0.1)

        def measure_accepted() -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                while not stop.is_set():
                    started = time.perf_counter()
                    try:
                        response = client.post("/embed", json={"inputs": "a request during the overload"})
                    except httpx.HTTPError:
                        statuses[0] = statuses.get(0, 0) + 1
                        continue
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    if response.status_code == 200:
                        accepted_ms.append((time.perf_counter() - started) * 1000)

        capacity = report["capacity"]["ok"] / report["capacity"]["seconds"]
        connections, delay_ms = 512, None
        if args.factor > 0:
            # Pace 256 connections to the target rate; refusals and accepted requests take time too, so
            # a 4-second calibration run corrects the pause before the measured run.
            connections = 256
            target = args.factor * capacity
            delay_ms = connections * 1000 / target
            trial = wrk(url, HERE / "overload.lua", bodies, connections, 4, delay_ms)
            delay_ms *= trial["requests"] / trial["seconds"] / target
            report["overload_delay_ms"] = round(delay_ms, 2)
        threads = [threading.Thread(target=probe_health), threading.Thread(target=measure_accepted)]
        for thread in threads:
            thread.start()
        report["overload"] = wrk(url, HERE / "overload.lua", bodies, connections, args.seconds, delay_ms)
        stop.set()
        for thread in threads:
            thread.join()
        report["recovery"] = wrk(url, HERE / "overload.lua", bodies, 32, 10)
    capacity = report["capacity"]["ok"] / report["capacity"]["seconds"]
    overload = report["overload"]
    report["summary"] = {
        "capacity_texts_per_s": round(capacity, 1),
        "offered_per_s_during_overload": round(overload["requests"] / overload["seconds"], 1),
        "offered_vs_capacity": round(overload["requests"] / overload["seconds"] / capacity, 1),
        "accepted_per_s_during_overload": round(overload["ok"] / overload["seconds"], 1),
        "statuses_other_than_200_429": overload["other"] + report["recovery"]["other"],
        "health_max_ms": round(max(health_ms), 2),
        "health_p99_ms": round(statistics.quantiles(health_ms, n=100)[98], 2),
        "health_over_100ms": sum(value > 100 for value in health_ms), "health_probes": len(health_ms),
        "accepted_p99_ms_during_overload": round(statistics.quantiles(accepted_ms, n=100)[98], 2)
        if len(accepted_ms) > 10 else None,
        "probe_statuses": statuses,
        "rss_min_mb": round(min(rss), 1), "rss_max_mb": round(max(rss), 1),
        "recovery_texts_per_s": round(report["recovery"]["ok"] / report["recovery"]["seconds"], 1),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"overload-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))


if __name__ == "__main__":
    main()
