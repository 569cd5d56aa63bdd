"""The event loop's CPU time per request, measured in-process: the low-noise figure for serving overhead.

    python -m loadtests.loop_cost --bundle models/all-MiniLM-L6-v2 [--requests 3200] [--clients 32] [--profile]

On a 2-core machine every microsecond the event loop spends on a request (middleware, validation,
tokenization, batching hand-offs, post-processing, JSON, headers, metrics) is taken from the engine,
so at 32 single-text clients this cost, not the engine, sets how close the server gets to the
in-process ceiling. Over HTTP the figure moves with the machine's noise; here the real app (every
middleware, the direct routes, the batcher's worker threads) is called as an ASGI app by `--clients`
concurrent coroutines on uvloop, with a deterministic engine that answers at once (the bundle's real
tokenizer, no forward pass), and the loop thread's own CPU time is divided by the requests served.
Sockets and HTTP parsing are not included (uvicorn adds about 30 us per request at saturation).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import time
from pathlib import Path
from typing import Any

from loadtests.run import short_text
from service.app import create_app
from service.config import Settings
from service.core.manifest import load_manifest
from service.core.registry import ModelRegistry, ServedModel
from service.engines.bundle import BundleModel
from service.engines.fake import FakeEngine
from service.server import settle_garbage_collector


def _app(bundle: Path, engine_class: type[FakeEngine] = FakeEngine) -> Any:
    manifest = load_manifest(bundle)
    engine = engine_class(manifest.hidden_size)
    model = ServedModel(name=manifest.name, bundle=BundleModel(bundle, manifest=manifest, engine=engine),
                        variant="float32", device="cpu")
    return create_app(Settings(log_level="warning"), ModelRegistry([model]))


async def _request(app: Any, body: bytes) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/embed", "raw_path": b"/embed", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "state": {}}
    delivered = False
    finished = asyncio.Event()
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the connection stays open until the answer is sent, as a client's does
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    finished.set()
    if statuses != [200]:
        raise RuntimeError(f"unexpected answer {statuses}")


async def measure(app: Any, requests: int, clients: int, profile: bool) -> dict[str, float]:
    bodies = [json.dumps({"inputs": short_text(index)}).encode()
              for index in range(1000)]

    async def client(number: int, count: int) -> None:
        for index in range(count):
            await _request(app, bodies[(number * 97 + index) % len(bodies)])

    await asyncio.gather(*(client(number, 20) for number in range(4)))  # warm-up
    settle_garbage_collector()  # as `embedrank serve` does once warmed up
    per_client = max(1, requests // clients)
    profiler = cProfile.Profile() if profile else None
    cpu, wall = time.thread_time(), time.perf_counter()
    if profiler is not None:
        profiler.enable()
    await asyncio.gather(*(client(number, per_client) for number in range(clients)))
    if profiler is not None:
        profiler.disable()
    served = per_client * clients
    result = {"requests": served, "loop_cpu_us_per_request": (time.thread_time() - cpu) / served * 1e6,
              "wall_us_per_request": (time.perf_counter() - wall) / served * 1e6}
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    parser.add_argument("--requests", type=int, default=3200)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--profile", action="store_true", help="print the loop's hottest functions (slower)")
    args = parser.parse_args()
    import uvloop

    app = _app(args.bundle)
    runs = [uvloop.run(measure(app, args.requests, args.clients, args.profile)) for _ in range(args.repeat)]
    costs = sorted(run["loop_cpu_us_per_request"] for run in runs)
    print(json.dumps({"clients": args.clients, "runs_us": [round(cost) for cost in costs],
                      "median_loop_cpu_us_per_request": round(costs[len(costs) // 2])}))


if __name__ == "__main__":
    main()
