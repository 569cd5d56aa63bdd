"""The batcher in front of an engine whose pass costs about the same for 2 items as for 100 (a GPU).

    python -m loadtests.flat_engine [--pass-ms 1.5] [--seconds 3]

On a GPU a small forward pass is bound by launching its kernels, not by arithmetic: on an NVIDIA H200,
MiniLM scored 20 pairs of ~117 tokens in ~1.3-2.4 ms, and a batch of 32 short texts took ~1.2 ms. So
how many passes a request is cut into decides its cost there. This drives the real `DynamicBatcher`
with closed-loop clients (each submits its next request when the last is answered) against such an
engine: each pass sleeps `--pass-ms` plus 2 us per item, releasing the GIL as a GPU pass does, with the
CUDA layout (two workers, a second pass beside a running one only when small: 256 padded tokens). Each
scenario runs once keeping requests whole (as served on CUDA) and once not (the CPU's rule), and
prints items per second, passes per request and items per pass. No HTTP, tokenizer or model is in the
loop, so these are the batcher's ceilings, not the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

from service.batching.batcher import DynamicBatcher
from service.engines.tokenizer import TokenizedItem

# (clients, items per request, tokens per item): the load tests' rerank, 8 x 32 texts, 32 x 1 text and
# long-text scenarios.
SCENARIOS = ((8, 20, 117), (8, 32, 16), (32, 1, 16), (8, 1, 256))


@dataclass
class Outcome:
    items_per_s: float
    passes_per_request: float
    items_per_pass: float


def drive(keep_requests_whole: bool, clients: int, items: int, tokens: int, seconds: float = 3.0,
          pass_ms: float = 1.5) -> Outcome:
    """Closed-loop clients against the batcher and a flat-cost engine for `seconds`."""
    sizes: list[int] = []
    lock = threading.Lock()

    def engine(batch: list[TokenizedItem], tags: list[str], lone: bool = False) -> list[Any]:
        time.sleep(pass_ms / 1e3 + 2e-6 * len(batch))
        with lock:
            sizes.append(len(batch))
        return [0] * len(batch)

    batcher = DynamicBatcher("flat", engine, max_batch_tokens=16384, max_batch_requests=None, workers=2,
                             overlap_tokens=256, keep_requests_whole=keep_requests_whole)
    request = [TokenizedItem(ids=[5] * tokens, type_ids=[0] * tokens, truncated=False)] * items
    answered = 0

    async def client(deadline: float) -> None:
        nonlocal answered
        while time.perf_counter() < deadline:
            await batcher.submit(request).future
            answered += 1

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client(started + seconds) for _ in range(clients)))
        return time.perf_counter() - started

    try:
        elapsed = asyncio.run(main())
    finally:
        batcher.stop()
    return Outcome(answered * items / elapsed, len(sizes) / max(1, answered), sum(sizes) / max(1, len(sizes)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pass-ms", type=float, default=1.5, help="the engine's cost of a pass, any size")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each run lasts")
    args = parser.parse_args()
    print("| clients x items (tokens each) | requests kept whole | items/s | passes per request | items per pass |")
    print("|---|---|---:|---:|---:|")
    for clients, items, tokens in SCENARIOS:
        for keep in (False, True):
            outcome = drive(keep, clients, items, tokens, args.seconds, args.pass_ms)
            print(f"| {clients} x {items} ({tokens}) | {'yes' if keep else 'no'} | {outcome.items_per_s:,.0f} | "
                  f"{outcome.passes_per_request:.1f} | {outcome.items_per_pass:.1f} |", flush=True)


if __name__ == "__main__":
    main()
