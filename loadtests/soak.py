"""Memory soak: random-length inputs against a real server, sampling its RSS once a second.

    python -m loadtests.soak --bundle models/all-MiniLM-L6-v2 --seconds 120

Every request has a different mix of lengths (1 to the model's max), so every batch has a new shape:
the case where ONNX Runtime servers are known to grow. Reports RSS after warm-up and at the end.
Bounded in time and in concurrency; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = ("model server request batch token latency memory cache queue worker thread network river mountain city "
         "history music science garden market energy language").split(" ")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def soak(url: str, pid: int, seconds: float, concurrency: int, warmup: float) -> dict[str, Any]:
    rng = random.Random(7)
    samples: list[tuple[float, float]] = []
    errors = 0
    requests = 0
    started = time.monotonic()
    stop = started + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, requests
        while time.monotonic() < stop:
            count = rng.randint(1, 16)
            texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 300))) for _ in range(count)]
            response = await http.post("/embed", json={"inputs": texts})
            requests += 1
            errors += response.status_code != 200

    async def sampler() -> None:
        while time.monotonic() < stop:
            samples.append((time.monotonic() - started, _rss_mb(pid)))
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        await asyncio.gather(sampler(), *(client(http) for _ in range(concurrency)))
    after_warmup = [rss for at, rss in samples if at >= warmup]
    baseline = after_warmup[0] if after_warmup else samples[0][1]
    final = samples[-1][1]
    return {"seconds": seconds, "requests": requests, "errors": errors, "rss_after_warmup_mb": round(baseline, 1),
            "rss_final_mb": round(final, 1), "rss_max_mb": round(max(rss for _, rss in samples), 1),
            "growth_after_warmup": round((final - baseline) / baseline, 4), "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    from loadtests.run import serving

    with serving(args.bundle, "--dtype", args.dtype) as (url, server):
        result = asyncio.run(soak(url, server.pid, args.seconds, args.concurrency, args.warmup))
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    summary = {key: value for key, value in result.items() if key != "samples"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
