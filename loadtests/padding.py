"""What padding costs the batch-32 ceiling: its batches as the 32-text requests are sent, against the same
texts in batches sorted by length, in-process, measured in alternation.

    python -m loadtests.padding --bundle models/all-MiniLM-L6-v2 --dtype int8

The ceiling of `loadtests.run` (and `loadtests.paired`) runs the first eight 32-text requests of its
scenarios as they are sent, so each batch pads its texts to its longest; the server's passes group queued
texts of like length. This prints each arrangement's share of padding tokens and its texts per second
in every round (`--rounds`, `--seconds` each, one single-threaded pass per core, as the ceiling's best
layout runs on this project's machines), and each one's mean against the requests as sent.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path
from typing import Any

from loadtests import run as scenarios
from service.engines.bundle import BundleModel
from service.engines.ort_engine import SessionConfig


def arrangements(tokenizer: Any) -> dict[str, tuple[list[Any], int, float]]:
    """{name: (padded batches, texts per batch, share of padding tokens)}: the ceiling's batches and the
    same texts sorted by length in batches of 32 and 64."""
    requests = [tokenizer.encode([scenarios.short_text(index, offset) for offset in range(32)])
                for index in range(scenarios.CEILING_BATCHES)]
    by_length = sorted((item for items in requests for item in items), key=len)
    chosen = {"as sent, 32": (requests, 32),
              "sorted by length, 32": ([by_length[start:start + 32] for start in range(0, len(by_length), 32)], 32),
              "sorted by length, 64": ([by_length[start:start + 64] for start in range(0, len(by_length), 64)], 64)}
    real = sum(len(item) for item in by_length)
    result = {}
    for name, (groups, size) in chosen.items():
        batches = [tokenizer.pad(group) for group in groups]
        result[name] = (batches, size, 1 - real / sum(batch.input_ids.size for batch in batches))
    return result


def measure(bundle: Path, dtype: str, rounds: int, seconds: float) -> dict[str, dict[str, Any]]:
    model = BundleModel(bundle, variant=dtype, device="cpu", session_config=SessionConfig(intra_op_threads=1))
    workers = len(os.sched_getaffinity(0))
    chosen = arrangements(model.tokenizer)
    runs: dict[str, list[float]] = {name: [] for name in chosen}
    for round_number in range(rounds):
        order = list(chosen) if round_number % 2 == 0 else list(reversed(chosen))
        for name in order:
            batches, size, _ = chosen[name]
            model.forward_pooled(batches[0])
            runs[name].append(scenarios.throughput(model.forward_pooled, batches, size, workers, seconds))
    base = statistics.mean(runs["as sent, 32"])
    return {name: {"padding": chosen[name][2], "texts_per_s": runs[name], "mean": statistics.mean(runs[name]),
                   "against_as_sent": statistics.mean(runs[name]) / base} for name in chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"))
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    options = parser.parse_args()
    if options.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    print("| batches | padding | texts/s, each round | mean | against the requests as sent |")
    print("|---|---:|---|---:|---:|")
    for name, figures in measure(options.bundle, options.dtype, options.rounds, options.seconds).items():
        rounds = ", ".join(f"{value:,.0f}" for value in figures["texts_per_s"])
        print(f"| {name} | {figures['padding']:.1%} | {rounds} | {figures['mean']:,.0f} | "
              f"{figures['against_as_sent']:.2f}x |")


if __name__ == "__main__":
    main()
