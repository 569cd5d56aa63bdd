"""Two versions of the server side by side: one scenario, two live servers, wrk runs taken in turn.

    git worktree add /tmp/baseline HEAD~1
    python -m loadtests.interleave --baseline /tmp/baseline --bundle models/all-MiniLM-L6-v2 \\
        --dtype int8 --scenario "32 clients x 1 text" --runs 8

On this project's machine two servers started one after the other can differ by 25% on the same
code, and its speed drifts by as much within an hour, so alternating whole `loadtests.run` passes
cannot resolve a change of 5-10%. Here a server of each version (`--baseline`, another checkout of
this repository, and `--candidate`, this one by default) is started at the same time, both are warmed
up, and each round drives one and then the other with wrk for `--seconds`, the order swapped every
round so that neither always goes first. Each run prints texts (pairs)/s, p50, the forward passes'
mean size, the share of the tokens they computed that was padding, and the server's CPU per request
(event loop, other threads); the summary gives both means, their ratio and in how many rounds the
candidate was ahead. Both servers run this interpreter with the same arguments (`--server-arg`,
repeatable) and each its own (`--baseline-arg`, `--candidate-arg`), so two settings compare on one
checkout too (`--baseline .`), and so do two exports of a model (`--baseline-bundle` for the baseline's
server); the idle one costs nothing while the other runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from loadtests import run as scenarios


def _pass_counters(url: str) -> tuple[float, ...]:
    """(items, forward passes, real tokens, padding tokens) so far."""
    return scenarios.metric_totals(url, "embedrank_batch_size_sum", "embedrank_batch_size_count",
                                   "embedrank_tokens_total", "embedrank_padding_tokens_total")


def pass_figures(before: tuple[float, ...], after: tuple[float, ...]) -> dict[str, float]:
    """Items per forward pass and the share of computed tokens that were padding, between two readings
    of `_pass_counters`: a change in how passes are cut can trade one for the other (more texts a pass,
    but texts of more different lengths padded to the longest)."""
    items, passes, real, padding = (later - earlier for later, earlier in zip(after, before, strict=True))
    return {"items": items, "items_per_pass": items / max(1.0, passes),
            "padding_waste": scenarios.padding_share(real, padding)}


def measure(url: str, pid: int, bodies: Path, connections: int, route: str, seconds: float) -> dict[str, Any]:
    before = _pass_counters(url)
    result = scenarios.run_wrk(url, bodies, connections, seconds, pid, path=route)
    passes = pass_figures(before, _pass_counters(url))
    return {"items_per_s": passes["items"] / result["seconds"], "p50_ms": result["p50_ms"],
            "items_per_pass": passes["items_per_pass"], "padding_waste": passes["padding_waste"],
            "loop_us_per_request": result["loop_cpu_us_per_request"],
            "other_threads_ms_per_request": result["engine_cpu_ms_per_request"],
            "errors": result["socket_errors"] + result["non_2xx"]}


def interleave(baseline: Path, candidate: Path, bundle: Path, scenario: str, runs: int, seconds: float,
               arguments: dict[str, tuple[str, ...]], baseline_bundle: Path | None = None) -> dict[str, Any]:
    """`arguments["baseline"]` and `arguments["candidate"]`: each server's settings (see `server_arguments`);
    `baseline_bundle`: the bundle the baseline's server serves instead of `bundle` (two exports compared)."""
    versions = {"baseline": baseline.resolve(), "candidate": candidate.resolve()}
    bundles = {"baseline": baseline_bundle or bundle, "candidate": bundle}
    measured: dict[str, list[dict[str, Any]]] = {name: [] for name in versions}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        load = scenarios.scenario_load(scenario, Path(scratch))
        bodies, connections, route = load.bodies, load.connections, load.route
        servers = {name: stack.enter_context(scenarios.serving(bundles[name], *arguments[name], checkout=checkout))
                   for name, checkout in versions.items()}
        for url, server in servers.values():
            scenarios.run_wrk(url, bodies, connections, min(3.0, seconds), server.pid, path=route)
        for round_number in range(runs):
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for name in order:
                url, server = servers[name]
                entry = measure(url, server.pid, bodies, connections, route, seconds)
                measured[name].append(entry)
                print(f"round {round_number + 1:2d} {name:9s} {entry['items_per_s']:8.1f}/s  p50 "
                      f"{entry['p50_ms']:8.2f} ms  {entry['items_per_pass']:5.1f} per pass  padding "
                      f"{entry['padding_waste']:4.0%}  loop "
                      f"{entry['loop_us_per_request']:6.0f} us  other threads "
                      f"{entry['other_threads_ms_per_request']:7.3f} ms  errors {entry['errors']}", flush=True)
    means = {name: statistics.mean(entry["items_per_s"] for entry in entries) for name, entries in measured.items()}
    ahead = sum(new["items_per_s"] > old["items_per_s"]
                for old, new in zip(measured["baseline"], measured["candidate"], strict=True))
    return {"scenario": scenario, "server_args": {name: list(arguments[name]) for name in versions},
            "bundles": {name: str(path) for name, path in bundles.items()}, "seconds": seconds, "runs": measured,
            "mean_items_per_s": means, "ratio": means["candidate"] / means["baseline"], "candidate_ahead": ahead,
            "loop_us_per_request": {name: statistics.mean(entry["loop_us_per_request"] for entry in entries)
                                    for name, entries in measured.items()}}


def server_arguments(options: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """Each server's settings: the dtype and `--server-arg`s, then its own `--baseline-arg`s or
    `--candidate-arg`s (given later, so they win where both name a setting)."""
    shared = ("--dtype", options.dtype, *options.server_args)
    return {"baseline": (*shared, *options.baseline_args), "candidate": (*shared, *options.candidate_args)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of this repository")
    parser.add_argument("--candidate", type=Path, default=Path("."), help="the checkout to compare (this one)")
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="the bundle both serve (a cross-encoder for the rerank scenario)")
    parser.add_argument("--baseline-bundle", type=Path,
                        help="a bundle for the baseline's server instead of --bundle: two exports of a model "
                             "compared on one checkout (--baseline .)")
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--scenario", default="32 clients x 1 text",
                        help="a scenario name of loadtests.run, or 'rerank'")
    parser.add_argument("--runs", type=int, default=8, help="wrk runs of each server")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--server-arg", action="append", default=[], dest="server_args", metavar="ARG",
                        help="a setting for both servers (repeatable)")
    parser.add_argument("--baseline-arg", action="append", default=[], dest="baseline_args", metavar="ARG",
                        help="a setting for the baseline's server only (repeatable)")
    parser.add_argument("--candidate-arg", action="append", default=[], dest="candidate_args", metavar="ARG",
                        help="a setting for the candidate's server only (repeatable)")
    parser.add_argument("--output", type=Path, help="write the runs and the summary here as JSON")
    return parser


def main() -> None:
    options = build_parser().parse_args()
    if options.runs < 1:
        raise SystemExit("--runs must be at least 1")
    report = interleave(options.baseline, options.candidate, options.bundle, options.scenario, options.runs,
                        options.seconds, server_arguments(options), options.baseline_bundle)
    means = report["mean_items_per_s"]
    print(f"baseline {means['baseline']:.1f}/s, candidate {means['candidate']:.1f}/s: {report['ratio']:.3f}x, "
          f"candidate ahead in {report['candidate_ahead']} of {options.runs} rounds; loop "
          f"{report['loop_us_per_request']['baseline']:.0f} -> {report['loop_us_per_request']['candidate']:.0f}"
          " us per request")
    if options.output is not None:
        options.output.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
