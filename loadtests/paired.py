"""The server against its own ceiling in alternated windows: one scenario, one live server, the ceiling
measured in this process between the server's wrk runs.

    python -m loadtests.paired --bundle models/minilm-cross-encoder --scenario rerank --dtype int8 --rounds 6

`loadtests.run` measures each ceiling first, as the best of every configuration and of two rounds, and
then drives the server. On a machine whose speed drifts by 20-25% within minutes (this project's 2-core
virtual machines do), its ratio also says whether the server's minutes were slower than the ceiling's
best ones. Here the ceiling's configuration is chosen once, as `loadtests.run` chooses it (every
configuration of the scenario's kind, the best of `--ceiling-rounds` rounds), and then each round runs
that configuration in this process for a window and drives the server with wrk for a window as long,
the order swapped every round, so that both sides see the same minutes of the machine. The server is
started before the first window and idles, costing nothing, while the ceiling runs.

Printed, and written as JSON with `--output`: every window's figure; the server's mean over the
ceiling's mean (the same minutes); the median and range of the rounds' own ratios; in how many rounds
the server reached `--target`; and the server's mean over the best ceiling window, the way
`loadtests.run` holds the server to the best the machine did. The server's figure counts the items of
the requests answered inside the window, as `loadtests.run` does; the items it scored in the window
(from its own counters, so work on requests still in flight at the end counts too) are printed beside
it. Scenarios: those of `loadtests.run` held to a throughput ceiling (8, 32 and 128 single-text
clients, 8 clients x 32 texts, long texts) or `rerank` (with a cross-encoder as `--bundle`). `--device
cuda` runs both on the CUDA provider (the ceiling then tries one pass at a time and two at once).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from loadtests import run as scenarios
from service.engines.ort_engine import Device, cuda_available

THROUGHPUT_CEILINGS = ("batch32", "long", "rerank")


def load_for(scenario: str, scratch: Path) -> scenarios.Load:
    """The load of a scenario of `loadtests.run` that has a throughput ceiling, or of `rerank`."""
    held = [candidate.name for candidate in scenarios.SCENARIOS if candidate.ceiling in THROUGHPUT_CEILINGS]
    if scenario != "rerank" and scenario not in held:
        names = ", ".join(repr(name) for name in held)
        raise SystemExit(f"no throughput ceiling for scenario {scenario!r}: one of {names} or 'rerank'")
    return scenarios.scenario_load(scenario, scratch)


def choose(configurations: list[scenarios.ThroughputConfiguration], seconds: float,
           rounds: int) -> tuple[scenarios.ThroughputConfiguration, dict[str, float]]:
    """The configuration with the best window over `rounds` rounds, and each one's best figure."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for configuration in configurations:
            best[configuration.key] = max(best.get(configuration.key, 0.0), configuration.measure(seconds))
    winner = max(configurations, key=lambda configuration: best[configuration.key])
    return winner, best


def summarize(ceiling: list[float], server: list[float], target: float) -> dict[str, Any]:
    """Ratios of alternated windows (the i-th of each taken in the same round)."""
    if not ceiling or len(ceiling) != len(server):
        raise ValueError("one ceiling window and one server window per round")
    per_round = [served / base for served, base in zip(server, ceiling, strict=True)]
    return {
        "ceiling_mean": statistics.mean(ceiling), "server_mean": statistics.mean(server),
        "ratio_of_means": statistics.mean(server) / statistics.mean(ceiling),
        "round_ratios": per_round, "round_ratio_median": statistics.median(per_round),
        "round_ratio_range": [min(per_round), max(per_round)],
        "rounds_at_target": sum(ratio >= target for ratio in per_round), "target": target,
        "ratio_to_best_ceiling_window": statistics.mean(server) / max(ceiling),
    }


def paired(bundle: Path, dtype: str, scenario: str, rounds: int, seconds: float, ceiling_rounds: int,
           target: float, server_args: tuple[str, ...] = (), device: Device = "cpu") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        load = load_for(scenario, Path(scratch))
        window = seconds * load.window_factor
        task = "rerank" if load.ceiling == "rerank" else "embed"
        every = scenarios.throughput_configurations(bundle, dtype, device, task)
        candidates = [configuration for configuration in every if configuration.kind == load.ceiling]
        configuration, choice = choose(candidates, max(2.0, seconds / 3), ceiling_rounds)
        print(f"ceiling: {configuration.key} ({choice[configuration.key]:.1f}/s at its best while choosing)",
              flush=True)
        ceiling: list[float] = []
        served: list[dict[str, Any]] = []
        with scenarios.serving(bundle, "--device", device, "--dtype", dtype, *server_args) as (url, server):
            scenarios.run_wrk(url, load.bodies, load.connections, 3.0, server.pid, path=load.route)  # warm-up

            def drive() -> dict[str, Any]:
                scored_before = scenarios.metric_totals(url, "embedrank_batch_size_sum")[0]
                result = scenarios.run_wrk(url, load.bodies, load.connections, window, server.pid, path=load.route)
                scored = scenarios.metric_totals(url, "embedrank_batch_size_sum")[0] - scored_before
                return {"items_per_s": result["requests"] * load.items_per_request / result["seconds"],
                        "scored_items_per_s": scored / result["seconds"], "p50_ms": result["p50_ms"],
                        "p99_ms": result["p99_ms"], "errors": result["socket_errors"] + result["non_2xx"],
                        "loop_us_per_request": result["loop_cpu_us_per_request"],
                        "other_threads_ms_per_request": result["engine_cpu_ms_per_request"]}

            for round_number in range(rounds):
                ceiling_first = round_number % 2 == 0
                entry, alongside = scenarios.beside_ceiling(drive, configuration, window, ceiling_first)
                assert alongside is not None
                ceiling.append(alongside)
                served.append(entry)
                lines = [f"round {round_number + 1:2d} ceiling {alongside:8.1f}/s",
                         f"round {round_number + 1:2d} server  {entry['items_per_s']:8.1f}/s answered, "
                         f"{entry['scored_items_per_s']:8.1f}/s scored, p50 {entry['p50_ms']:.1f} ms, "
                         f"errors {entry['errors']}"]
                print("\n".join(lines if ceiling_first else lines[::-1]), flush=True)
    summary = summarize(ceiling, [entry["items_per_s"] for entry in served], target)
    machine = {"cpu": scenarios._cpu_name(), "cores": len(os.sched_getaffinity(0)),
               "gpu": scenarios._gpu_name() if device == "cuda" else None}
    return {"machine": machine,
            "device": device, "bundle": str(bundle), "dtype": dtype, "scenario": scenario, "window_seconds": window,
            "server_args": list(server_args), "ceiling_configuration": configuration.key,
            "ceiling_choice": choice, "ceiling_windows": ceiling, "server_windows": served, **summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="the bundle served and measured (a cross-encoder for the rerank scenario)")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="the execution provider of both the ceiling and the server")
    parser.add_argument("--scenario", default="32 clients x 1 text",
                        help="a scenario name of loadtests.run, or 'rerank'")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one ceiling window and one server window")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="each window (the rerank scenario's are three times as long, as in loadtests.run)")
    parser.add_argument("--ceiling-rounds", type=int, default=scenarios.CEILING_ROUNDS,
                        help="rounds over every configuration to choose the ceiling's")
    parser.add_argument("--target", type=float, default=0.9, help="the ratio each round is checked against")
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args", metavar="ARG")
    parser.add_argument("--output", type=Path, help="write every window and the summary here as JSON")
    options = parser.parse_args()
    if options.rounds < 1 or options.ceiling_rounds < 1:
        raise SystemExit("--rounds and --ceiling-rounds must be at least 1")
    if options.device == "cuda" and not cuda_available():
        raise SystemExit("--device cuda needs onnxruntime-gpu and an NVIDIA GPU (pip install -e '.[gpu]')")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    report = paired(options.bundle, options.dtype, options.scenario, options.rounds, options.seconds,
                    options.ceiling_rounds, options.target, tuple(options.server_args), options.device)
    low, high = report["round_ratio_range"]
    print(f"{options.dtype} {options.scenario}: ceiling {report['ceiling_mean']:.1f}/s, server "
          f"{report['server_mean']:.1f}/s on average: {report['ratio_of_means']:.3f}x in the same minutes; per round "
          f"{report['round_ratio_median']:.3f}x [{low:.3f}, {high:.3f}], at {options.target}x or more in "
          f"{report['rounds_at_target']} of {options.rounds}; against the best ceiling window "
          f"{report['ratio_to_best_ceiling_window']:.3f}x")
    if options.output is not None:
        options.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
