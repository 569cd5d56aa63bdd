"""Load scenarios against a real `embedrank serve`, each reported against the in-process ceiling
measured in the same run on the same machine.

    python -m loadtests.run --bundle models/all-MiniLM-L6-v2 --dtype float32 --dtype int8

For each dtype: the ceiling is measured first (ONNX Runtime called directly, nothing else running),
then a server is started on 127.0.0.1 and wrk drives each scenario. wrk's own CPU use is measured
and reported, since on a small machine the load generator competes with the server.
Results go to loadtests/results/ as JSON and a Markdown table. With `--same-minutes`, each scenario
with a throughput ceiling is also held to the best ceiling configuration measured again right before or
after the server's window, for as long, so the report says how much of a shortfall is the machine's
drift between the ceiling's minutes and the server's.

With `--device cuda` (onnxruntime-gpu and an NVIDIA GPU), the ceiling and the server both use the
CUDA execution provider, and the dtypes default to float32 and float16:

    python -m loadtests.run --device cuda --reranker models/minilm-cross-encoder
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from service.bench import DEVICE_VARIANTS, SHORT_TEXTS, long_text
from service.core.manifest import load_manifest
from service.engines.bundle import BundleModel, lone_model_file
from service.engines.ort_engine import Device, SessionConfig
from service.engines.priority import set_pass_slot

HERE = Path(__file__).resolve().parent
LUA = HERE / "post.lua"


@dataclass
class Scenario:
    name: str
    connections: int
    texts_per_request: int
    ceiling: str  # "batch1": latency target; "batch32": short-text throughput; "long": long-text throughput
    kind: str = "short"  # short texts (~12 tokens), long (~256 tokens), or mixed (5-250 words)
    sweep: bool = False  # part of the concurrency sweep that the plot draws


SCENARIOS = [
    Scenario("1 client x 1 text", 1, 1, "batch1", sweep=True),
    Scenario("8 clients x 1 text", 8, 1, "batch32", sweep=True),
    Scenario("32 clients x 1 text", 32, 1, "batch32", sweep=True),
    Scenario("128 clients x 1 text", 128, 1, "batch32", sweep=True),
    Scenario("8 clients x 32 texts", 8, 32, "batch32"),
    Scenario("8 clients x 1 long text (~256 tokens)", 8, 1, "long", kind="long"),
    Scenario("32 clients x 1 text of 5-250 words", 32, 1, "mixed", kind="mixed"),
]
LONG_WORDS = 240  # about 256 tokens for MiniLM's vocabulary
CEILING_BATCHES = 8  # distinct batch-32 inputs the ceiling cycles through (8 x 8 for batch 1)
CEILING_ROUNDS = 2  # every ceiling configuration is measured this many times, interleaved; the best counts


def short_text(index: int, offset: int = 0) -> str:
    """The short text the scenarios send as text `offset` of request `index` (about 13 tokens for MiniLM);
    the ceiling is measured on these same texts, so both sides see the same token counts."""
    return f"{SHORT_TEXTS[(index + offset) % len(SHORT_TEXTS)]} {index}-{offset}"


def throughput(forward: Callable[[Any], Any], batches: list[Any], size: int, workers: int, seconds: float) -> float:
    """Items per second when `workers` threads run `forward` back to back for `seconds`, on each of
    `batches` in turn. Thread i runs on its model's session i where it has one per pass (as batcher
    worker i does in the server)."""
    done = [0]
    stop = time.perf_counter() + seconds

    def work(slot: int) -> None:
        set_pass_slot(slot)
        turn = 0
        while time.perf_counter() < stop:
            forward(batches[turn % len(batches)])
            turn += 1
            done[0] += size

    started = time.perf_counter()
    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - started)


def _layouts(device: Device) -> dict[str, tuple[SessionConfig, int, int]]:
    """The ways of running passes a ceiling tries, as (session settings, passes at once, sessions). On
    the CPU: one pass at a time on all cores, two such passes at once, or one single-threaded pass per
    core, on one session with or without ONNX Runtime's CPU arena (as the server runs float32) or each
    on a session of its own (as the server runs int8). On CUDA the GPU runs each pass: one at a time, or
    two at once (one's host work overlapping the other's kernels)."""
    layouts = {"1_pass": (SessionConfig(), 1, 1), "2_pass": (SessionConfig(), 2, 1)}
    if device == "cpu":
        cores = len(os.sched_getaffinity(0))
        layouts[f"{cores}_single_thread_passes"] = (SessionConfig(intra_op_threads=1), cores, 1)
        layouts[f"{cores}_single_thread_passes_no_arena"] = (SessionConfig(intra_op_threads=1, cpu_arena=False),
                                                             cores, 1)
        layouts[f"{cores}_single_thread_sessions"] = (SessionConfig(intra_op_threads=1), cores, cores)
    return layouts


@dataclass
class ThroughputConfiguration:
    """One way a ceiling runs passes back to back: batches of `size` items, cycled through, in one of
    `_layouts`' layouts (`workers` passes at once)."""

    key: str  # e.g. "batch32_items_per_s_2_single_thread_passes"
    kind: str  # "batch32" (short texts), "long" (256-token texts) or "rerank"
    forward: Callable[[Any], Any]
    batches: list[Any]
    size: int
    workers: int
    # Tokens per item: the mean real length (short texts, pairs), or the padded width (long texts, which
    # differ by a few tokens).
    tokens_per_item: float

    def measure(self, seconds: float) -> float:
        """Items per second over `seconds`, after one untimed pass."""
        self.forward(self.batches[0])
        return throughput(self.forward, self.batches, self.size, self.workers, seconds)


def throughput_configurations(bundle: Path, variant: str, device: Device, task: str) -> list[ThroughputConfiguration]:
    """What a ceiling measures for throughput, layout by layout. `task` "embed": batches of 32 short texts
    (the 32-text scenario's first requests) and 4 and 8 texts of ~256 tokens (a 1024-token pass, the
    server's CPU target, holds four); "rerank": the rerank scenario's query with 10 documents (half a
    request's, about what a 1024-token pass holds), 20 (one request's) and 32."""
    configurations = []
    pairs = [(SHORT_TEXTS[0], document) for document in rerank_documents(0) + rerank_documents(1)]
    for label, (config, workers, sessions) in _layouts(device).items():
        model = BundleModel(bundle, variant=variant, device=device, session_config=config, sessions=sessions)
        tokenizer = model.tokenizer
        if task == "rerank":
            tokens = statistics.mean(len(item) for item in tokenizer.encode(pairs))
            for size in (RERANK_DOCUMENTS // 2, RERANK_DOCUMENTS, 32):
                batch = tokenizer.pad(tokenizer.encode(pairs[:size]))
                configurations.append(ThroughputConfiguration(f"batch{size}_pairs_per_s_{label}", "rerank",
                                                              model.forward_logits, [batch], size, workers, tokens))
            continue
        full = [tokenizer.encode([short_text(index, offset) for offset in range(32)])
                for index in range(CEILING_BATCHES)]
        configurations.append(ThroughputConfiguration(
            f"batch32_items_per_s_{label}", "batch32", model.forward_pooled, [tokenizer.pad(items) for items in full],
            32, workers, statistics.mean(len(item) for items in full for item in items)))
        long_items = tokenizer.encode([long_text(LONG_WORDS, seed=index) for index in range(8)])
        width = float(tokenizer.pad(long_items).input_ids.shape[1])
        configurations += [ThroughputConfiguration(f"long{size}_items_per_s_{label}", "long", model.forward_pooled,
                                                   [tokenizer.pad(long_items[:size])], size, workers, width)
                           for size in (4, 8)]
    return configurations


def best_of_each_kind(configurations: list[ThroughputConfiguration],
                      figures: dict[str, float]) -> dict[str, ThroughputConfiguration]:
    """The configuration of each kind ("batch32", "long", "rerank") whose figure in `figures` is the highest:
    the one a ceiling measured in the same minutes as the server runs again (see `--same-minutes`)."""
    best: dict[str, ThroughputConfiguration] = {}
    for configuration in configurations:
        held = best.get(configuration.kind)
        if held is None or figures[configuration.key] > figures[held.key]:
            best[configuration.kind] = configuration
    return best


def ceiling(bundle: Path, variant: str, seconds: float, device: Device = "cpu",
            rounds: int = CEILING_ROUNDS,
            configurations: list[ThroughputConfiguration] | None = None) -> dict[str, float]:
    """Batch-1 latency and batch-32 throughput ONNX Runtime reaches in this process, each the best of
    the configurations tried (on the CPU: thread spinning on or off, or one thread; and the layouts of
    `_layouts`) and of `rounds` rounds, so the server is held to the best the machine does, not to its
    own settings nor to a moment when the machine was slow. The inputs are the scenarios' own texts:
    batch 1 cycles through the first single-text requests, batch 32 through the first 32-text ones.
    `configurations`: the throughput configurations to measure (`throughput_configurations`' embed ones
    by default), for a caller that measures the best of them again later."""
    result: dict[str, float] = {}
    # A lone request runs on the server's lone-pass session, which keeps the SkipLayerNormalization fusion
    # (faster for one text; see service.engines.ort_engine), so batch 1 is measured with it.
    fused = SessionConfig(skip_layer_norm_fusion=True)
    single_configs = {"spinning_off": fused, "spinning_on": replace(fused, allow_spinning=True),
                      "single_thread": replace(fused, intra_op_threads=1)}
    if device == "cuda":  # the CPU's thread settings do not change a GPU pass
        single_configs = {"cuda": SessionConfig()}
    # It also runs the variant's padded graph where the bundle has one (int8 with packed tokens), as that session does.
    lone_file = lone_model_file(bundle, load_manifest(bundle), variant)
    single_models = {label: BundleModel(bundle, variant=variant, device=device, session_config=config,
                                        model_file=lone_file)
                     for label, config in single_configs.items()}
    tokenizer = next(iter(single_models.values())).tokenizer
    singles = [tokenizer.pad(tokenizer.encode([short_text(index)])) for index in range(CEILING_BATCHES * 8)]
    if configurations is None:
        configurations = throughput_configurations(bundle, variant, device, "embed")
    for _ in range(rounds):
        for label, model in single_models.items():
            for single in singles[:10]:
                model.forward_pooled(single)
            samples: list[float] = []
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                single = singles[len(samples) % len(singles)]
                start = time.perf_counter()
                model.forward_pooled(single)
                samples.append(time.perf_counter() - start)
            key = f"batch1_p50_ms_{label}"
            result[key] = min(result.get(key, float("inf")), statistics.median(samples) * 1000)
        for configuration in configurations:
            result[configuration.key] = max(result.get(configuration.key, 0.0), configuration.measure(seconds))
    result["batch1_p50_ms"] = min(result[f"batch1_p50_ms_{label}"] for label in single_configs)
    best = best_of_each_kind(configurations, result)
    for kind in ("batch32", "long"):
        result[f"{kind}_items_per_s"] = result[best[kind].key]
    result["long_tokens_per_text"] = float(next(configuration.tokens_per_item for configuration in configurations
                                                if configuration.kind == "long"))
    return result


RERANK_DOCUMENTS = 20
RERANK_CLIENTS = 8
# The rerank load runs this many times longer than the other scenarios. Eight clients keep 160 pairs
# (about 1.1 s of work) in flight, and wrk counts only the requests that finish inside its window, so
# the work spent on requests still in flight when it stops is lost: 2-3% of a 10 s window, about 1% of
# a 30 s one. (The ceiling has no such loss: it counts every pass it ran, over the time they took.)
RERANK_WINDOW_FACTOR = 3


def rerank_documents(seed: int) -> list[str]:
    """Twenty documents of about 100 tokens each."""
    return [long_text(75, seed=seed * RERANK_DOCUMENTS + index) for index in range(RERANK_DOCUMENTS)]


def rerank_ceiling(bundle: Path, variant: str, seconds: float, device: Device = "cpu",
                   rounds: int = CEILING_ROUNDS,
                   configurations: list[ThroughputConfiguration] | None = None) -> dict[str, float]:
    """Pairs per second ONNX Runtime scores in this process, batches of half a request's pairs (what a
    1024-token pass holds), one request's 20 or 32, in each layout of `_layouts`, each in `rounds`
    rounds: the best is the ceiling. `configurations`: as for `ceiling`."""
    if configurations is None:
        configurations = throughput_configurations(bundle, variant, device, "rerank")
    result: dict[str, float] = {}
    for _ in range(rounds):
        for configuration in configurations:
            result[configuration.key] = max(result.get(configuration.key, 0.0), configuration.measure(seconds))
    result["pairs_per_s"] = result[best_of_each_kind(configurations, result)["rerank"].key]
    result["tokens_per_pair"] = configurations[0].tokens_per_item
    return result


def rerank_bodies(scratch: Path) -> Path:
    """The rerank scenario's request bodies: a short query and RERANK_DOCUMENTS documents each."""
    bodies = scratch / "rerank.jsonl"
    with bodies.open("w") as handle:
        for index in range(200):
            handle.write(json.dumps({"query": SHORT_TEXTS[index % len(SHORT_TEXTS)],
                                     "texts": rerank_documents(index)}) + "\n")
    return bodies


@dataclass(frozen=True)
class Load:
    """How wrk drives one scenario: its bodies, connections, route and items per request; `ceiling` is the
    scenario's ceiling kind ("batch1", "batch32", "long", "mixed" or "rerank") and `window_factor` how many
    times `--seconds` it runs (the rerank scenario: `RERANK_WINDOW_FACTOR`)."""

    ceiling: str
    bodies: Path
    connections: int
    route: str
    items_per_request: int
    window_factor: int


def scenario_load(name: str, scratch: Path) -> Load:
    """The load of a scenario named as in `SCENARIOS`, or of `rerank`; bodies are written to `scratch`."""
    if name == "rerank":
        return Load("rerank", rerank_bodies(scratch), RERANK_CLIENTS, "/rerank", RERANK_DOCUMENTS,
                    RERANK_WINDOW_FACTOR)
    chosen = next((scenario for scenario in SCENARIOS if scenario.name == name), None)
    if chosen is None:
        names = ", ".join(repr(scenario.name) for scenario in SCENARIOS)
        raise SystemExit(f"unknown scenario {name!r}: one of {names} or 'rerank'")
    return Load(chosen.ceiling, _bodies(scratch, chosen.texts_per_request, chosen.kind), chosen.connections,
                "/embed", chosen.texts_per_request, 1)


def run_rerank(bundle: Path, dtypes: list[str], seconds: float, report: dict[str, Any], scratch: Path,
               server_args: tuple[str, ...] = (), device: Device = "cpu", rounds: int = CEILING_ROUNDS,
               same_minutes: bool = False, round_number: int = 1) -> None:
    bodies = rerank_bodies(scratch)
    for index, dtype in enumerate(dtypes):
        configurations = throughput_configurations(bundle, dtype, device, "rerank")
        base = rerank_ceiling(bundle, dtype, max(2.0, seconds / 3), device, rounds, configurations)
        held = best_of_each_kind(configurations, base)["rerank"] if same_minutes else None
        del configurations  # the others' sessions: only the one measured again stays loaded
        window = seconds * RERANK_WINDOW_FACTOR
        first = _ceiling_first(round_number, index)
        with serving(bundle, "--dtype", dtype, *server_args) as (url, server):
            measured, alongside = beside_ceiling(
                partial(run_wrk, url, bodies, RERANK_CLIENTS, window, server.pid, path="/rerank"), held, window, first)
        pairs_per_second = measured["requests"] * RERANK_DOCUMENTS / measured["seconds"]
        entry = {"dtype": dtype, "scenario": "rerank 8 clients x (1 query + 20 docs of ~100 tokens)",
                 "texts_per_s": pairs_per_second, **measured, "ceiling": base, "rerank": True,
                 "ratio_to_ceiling": pairs_per_second / base["pairs_per_s"],
                 **_same_minutes(pairs_per_second, held, alongside, first)}
        report["results"].append(entry)
        print(_row(entry), flush=True)


def _ceiling_first(round_number: int, index: int) -> bool:
    """Whether a scenario's same-minutes ceiling window runs before the server's (else right after it): the
    order alternates from one scenario to the next and from one round to the next."""
    return (round_number + index) % 2 == 0


def beside_ceiling(drive: Callable[[], dict[str, Any]], held: ThroughputConfiguration | None, seconds: float,
                   ceiling_first: bool) -> tuple[dict[str, Any], float | None]:
    """`drive()`'s figures (a wrk window against the server) and, where `held` is a ceiling configuration,
    what it measures in this process in a window of `seconds` right before or right after that one, while
    the server idles: the ceiling of the same minutes of the machine (None without `held`)."""
    alongside = held.measure(seconds) if held is not None and ceiling_first else None
    measured = drive()
    if held is not None and not ceiling_first:
        alongside = held.measure(seconds)
    return measured, alongside


def _same_minutes(items_per_second: float, held: ThroughputConfiguration | None, alongside: float | None,
                  ceiling_first: bool) -> dict[str, Any]:
    """A scenario's figures against the ceiling window of its own minutes (nothing without one)."""
    if held is None or alongside is None:
        return {}
    return {"same_minutes": {"configuration": held.key, "items_per_s": alongside, "ceiling_first": ceiling_first},
            "ratio_same_minutes": items_per_second / alongside}


@contextlib.contextmanager
def serving(bundle: Path, *arguments: str,
            checkout: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `embedrank serve` on 127.0.0.1 for the duration of the block: (base URL, process).
    The seconds from launch to the first 200 on /health are kept in `STARTUPS[pid]`. `checkout`: serve
    the code of another checkout of this repository (its `service` package), with this interpreter."""
    port = _free_port()
    launched = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model-id", str(bundle.resolve()),
                               "--port", str(port), "--log-level", "warning", *arguments], cwd=checkout)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        STARTUPS[server.pid] = time.perf_counter() - launched
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=60)


# RSS is read again this long after the last scenario (the server hands unused memory back after 2 s).
QUIET_SECONDS = 3.0
# Seconds from launch to ready, per server process id (see `serving`).
STARTUPS: dict[int, float] = {}


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": values.get("VmRSS", 0.0), "peak_rss_mb": values.get("VmHWM", 0.0)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time of a process, or of one of its threads (the server's main thread runs the event loop)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bodies(directory: Path, texts_per_request: int, kind: str = "short") -> Path:
    path = directory / f"bodies-{kind}-{texts_per_request}.jsonl"
    randomness = random.Random(texts_per_request)
    with path.open("w") as handle:
        for index in range(2000):
            if kind == "long":
                texts = [long_text(LONG_WORDS, seed=index * texts_per_request + offset)
                         for offset in range(texts_per_request)]
            elif kind == "mixed":
                texts = [long_text(randomness.randint(5, 250), seed=index * texts_per_request + offset)
                         for offset in range(texts_per_request)]
            else:
                texts = [short_text(index, offset) for offset in range(texts_per_request)]
            handle.write(json.dumps({"inputs": texts[0] if texts_per_request == 1 else texts}) + "\n")
    return path


def metric_totals(url: str, *names: str) -> tuple[float, ...]:
    """Each named series of the server's /metrics summed over its labels, in the order given."""
    totals = dict.fromkeys(names, 0.0)
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return tuple(totals[name] for name in names)


def _token_counters(url: str) -> tuple[float, ...]:
    """(real tokens, padding tokens) computed so far."""
    return metric_totals(url, "embedrank_tokens_total", "embedrank_padding_tokens_total")


def padding_share(real: float, padding: float) -> float:
    """The share of the tokens computed that were padding (0 when none were computed)."""
    return padding / (real + padding) if real + padding else 0.0


def run_wrk(url: str, bodies: Path, connections: int, seconds: float, server_pid: int,
            path: str = "/embed") -> dict[str, Any]:
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = _cpu_seconds(server_pid)
    loop_before = _cpu_seconds(server_pid, server_pid)
    output = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "30s", "-s", str(LUA), url],
        capture_output=True, text=True, env={**os.environ, "BODIES_FILE": str(bodies), "TARGET_PATH": path},
        check=True,
        timeout=seconds + 60,
    ).stdout
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(line for line in output.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    result["wrk_cpu_cores"] = ((after_children.ru_utime - before_children.ru_utime)
                               + (after_children.ru_stime - before_children.ru_stime)) / result["seconds"]
    server_seconds = _cpu_seconds(server_pid) - server_before
    loop_seconds = _cpu_seconds(server_pid, server_pid) - loop_before
    result["server_cpu_cores"] = server_seconds / result["seconds"]
    # Where the server's CPU goes: its event loop (HTTP, validation, tokenization, JSON, metrics), per
    # request, and every other thread (the engine workers), per request.
    result["loop_cpu_cores"] = loop_seconds / result["seconds"]
    requests = max(1, result["requests"])
    result["loop_cpu_us_per_request"] = loop_seconds / requests * 1e6
    result["engine_cpu_ms_per_request"] = (server_seconds - loop_seconds) / requests * 1e3
    return result


def run_wrk_at_once(url: str, server_pid: int,
                    loads: dict[str, tuple[Path, int, float, str]]) -> dict[str, dict[str, Any]]:
    """wrk on every load at once against one server: {name: run_wrk's figures}, for loads given as
    {name: (bodies, connections, seconds, path)}. A wrk that fails fails the whole call."""
    with ThreadPoolExecutor(len(loads)) as pool:
        running = {name: pool.submit(run_wrk, url, bodies, connections, seconds, server_pid, path=path)
                   for name, (bodies, connections, seconds, path) in loads.items()}
        return {name: future.result() for name, future in running.items()}


def run(bundle: Path | None, dtypes: list[str], seconds: float, output: Path,
        reranker: Path | None = None, server_args: tuple[str, ...] = (), only: str | None = None,
        rounds: int = 1, device: Device = "cpu", ceiling_rounds: int = CEILING_ROUNDS,
        same_minutes: bool = False) -> dict[str, Any]:
    """Every scenario against its ceiling; with `rounds` > 1 the whole sequence (ceilings, servers,
    scenarios) runs that many times and the report adds each figure's median and range. `device`:
    the execution provider of both the ceiling and the servers. `same_minutes`: each scenario with a
    throughput ceiling is also held to the best ceiling configuration measured again in a window as long
    as the server's, right before or right after it (see `beside_ceiling`)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "gpu": _gpu_name() if device == "cuda" else None},
        "device": device, "bundle": str(bundle), "reranker": str(reranker), "seconds_per_scenario": seconds,
        "server_args": list(server_args), "results": [], "servers": [], "rounds": rounds,
        "ceiling_rounds": ceiling_rounds, "same_minutes": same_minutes,
    }
    server_args = ("--device", device, *server_args)
    with tempfile.TemporaryDirectory() as scratch:
        bodies = {(scenario.kind, scenario.texts_per_request):
                  _bodies(Path(scratch), scenario.texts_per_request, scenario.kind) for scenario in SCENARIOS}
        scenarios = [scenario for scenario in SCENARIOS if only is None or only in scenario.name]
        for round_number in range(1, rounds + 1):
            first = len(report["results"]), len(report["servers"])
            if reranker is not None and (only is None or "rerank" in only):
                run_rerank(reranker, dtypes, seconds, report, Path(scratch), server_args, device, ceiling_rounds,
                           same_minutes, round_number)
            for dtype in dtypes if bundle is not None and scenarios else []:
                assert bundle is not None
                run_embed(bundle, dtype, scenarios, seconds, report, bodies, server_args, device, ceiling_rounds,
                          same_minutes, round_number)
                if reranker is not None and only is None:
                    run_mixed(bundle, reranker, dtype, seconds, report, bodies[("short", 1)], Path(scratch),
                              server_args)
            for entry in report["results"][first[0]:] + report["servers"][first[1]:]:
                entry["round"] = round_number
    output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (output / f"load-{stamp}.json").write_text(json.dumps(report, indent=2))
    (output / f"load-{stamp}.md").write_text(markdown(report))
    if any(entry.get("sweep") for entry in report["results"]):
        plot(report, output / f"load-{stamp}.png")
        print(f"plot: {output / f'load-{stamp}.png'}")
    print(markdown(report))
    return report


def run_embed(bundle: Path, dtype: str, scenarios: list[Scenario], seconds: float, report: dict[str, Any],
              bodies: dict[tuple[str, int], Path], server_args: tuple[str, ...] = (), device: Device = "cpu",
              rounds: int = CEILING_ROUNDS, same_minutes: bool = False, round_number: int = 1) -> None:
    """The ceiling, then one server for every embed scenario, then its start-up and memory figures."""
    configurations = throughput_configurations(bundle, dtype, device, "embed")
    base = ceiling(bundle, dtype, max(2.0, seconds / 2), device, rounds, configurations)
    held = best_of_each_kind(configurations, base) if same_minutes else {}
    del configurations  # the others' sessions: only those measured again stay loaded
    with serving(bundle, "--dtype", dtype, *server_args) as (url, server):
        footprint = {"dtype": dtype, "ready_seconds": STARTUPS[server.pid],
                     "idle_rss_mb": memory_mb(server.pid)["rss_mb"]}
        for index, scenario in enumerate(scenarios):
            tokens_before = _token_counters(url)
            first = _ceiling_first(round_number, index)
            measured, alongside = beside_ceiling(
                partial(run_wrk, url, bodies[(scenario.kind, scenario.texts_per_request)], scenario.connections,
                        seconds, server.pid),
                held.get(scenario.ceiling), seconds, first)
            real, padding = (after - before for after, before in zip(_token_counters(url), tokens_before,
                                                                        strict=True))
            texts_per_second = measured["requests"] * scenario.texts_per_request / measured["seconds"]
            entry = {"dtype": dtype, "scenario": scenario.name, "connections": scenario.connections,
                     "sweep": scenario.sweep, "texts_per_s": texts_per_second, **measured, "ceiling": base,
                     "padding_waste": padding_share(real, padding),
                     "tokens_per_text": real / max(1, measured["requests"] * scenario.texts_per_request)}
            if scenario.ceiling == "batch1":
                entry["target"] = "p50 <= ceiling batch-1 + 1.5 ms"
                entry["p50_minus_ceiling_ms"] = measured["p50_ms"] - base["batch1_p50_ms"]
            elif scenario.ceiling == "batch32":
                entry["ratio_to_ceiling"] = texts_per_second / base["batch32_items_per_s"]
            elif scenario.ceiling == "long":
                entry["ratio_to_ceiling"] = texts_per_second / base["long_items_per_s"]
                entry["long"] = True
            entry.update(_same_minutes(texts_per_second, held.get(scenario.ceiling), alongside, first))
            report["results"].append(entry)
            print(_row(entry), flush=True)
        after = memory_mb(server.pid)
        time.sleep(QUIET_SECONDS)
        footprint.update(after_load_rss_mb=after["rss_mb"], peak_rss_mb=after["peak_rss_mb"],
                         quiet_rss_mb=memory_mb(server.pid)["rss_mb"])
        report["servers"].append(footprint)


MIXED_EMBED_CLIENTS, MIXED_RERANK_CLIENTS = 16, 4  # the mixed scenario: single-text embed and rerank clients


def mixed_part(kind: str, clients: int) -> str:
    """The name of one part of the mixed scenario."""
    return f"mixed: {kind} part ({clients} clients, while the other part runs)"


def run_mixed(bundle: Path, reranker: Path, dtype: str, seconds: float, report: dict[str, Any], embed_bodies: Path,
              scratch: Path, server_args: tuple[str, ...] = ()) -> None:
    """Embed and rerank at once on one server holding both models: 16 embed clients x 1 text and 4
    rerank clients x 20 documents, each reported against its own ceiling."""
    rerank_bodies = scratch / "rerank.jsonl"
    with serving(bundle, "--model-id", str(reranker), "--dtype", dtype, *server_args) as (url, server):
        results = run_wrk_at_once(url, server.pid, {
            "embed": (embed_bodies, MIXED_EMBED_CLIENTS, seconds, "/embed"),
            "rerank": (rerank_bodies, MIXED_RERANK_CLIENTS, seconds, "/rerank")})
    for kind, per_request, clients in (("embed", 1, MIXED_EMBED_CLIENTS),
                                       ("rerank", RERANK_DOCUMENTS, MIXED_RERANK_CLIENTS)):
        measured = results[kind]
        entry = {"dtype": dtype, "scenario": mixed_part(kind, clients),
                 "texts_per_s": measured["requests"] * per_request / measured["seconds"], **measured,
                 "ceiling": {}, "mixed": True}
        report["results"].append(entry)
        print(_row(entry), flush=True)


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and p99 latency against concurrent single-text clients, one line per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for dtype in sorted({entry["dtype"] for entry in report["results"] if entry.get("sweep")}):
        sweep = [entry for entry in report["results"] if entry.get("sweep") and entry["dtype"] == dtype]
        clients = sorted({entry["connections"] for entry in sweep})  # with several rounds: their medians
        left.plot(clients, [statistics.median(e["texts_per_s"] for e in sweep if e["connections"] == count)
                            for count in clients], marker="o", label=dtype)
        right.plot(clients, [statistics.median(e["p99_ms"] for e in sweep if e["connections"] == count)
                             for count in clients], marker="o", label=dtype)
        ceiling_median = statistics.median(entry["ceiling"]["batch32_items_per_s"] for entry in sweep)
        left.axhline(ceiling_median, linestyle="--", linewidth=0.8, color=left.lines[-1].get_color(),
                     label=f"{dtype} in-process ceiling (batch 32)")
    for axis, title, unit in ((left, "Throughput", "texts/s"), (right, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients, 1 short text each")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"embedrank, {Path(str(report['bundle'])).name}, {_machine_line(report)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"server did not become ready in {timeout:g} s")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _gpu_name() -> str | None:
    """The GPU's name as nvidia-smi gives it (None without nvidia-smi)."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return names[0] if names else None


def _machine_line(report: dict[str, Any]) -> str:
    machine = report["machine"]
    text = f"{machine['cpu']}, {machine['cores']} cores"
    if report.get("device") == "cuda":
        text += f"; CUDA provider on {machine.get('gpu') or 'an unnamed GPU'}"
    return text


def _row(entry: dict[str, Any]) -> str:
    if "ratio_to_ceiling" in entry:
        ceiling_info = f"{entry['ratio_to_ceiling']:.2f}x ceiling"
    elif "p50_minus_ceiling_ms" in entry:
        ceiling_info = f"p50 {entry['p50_minus_ceiling_ms']:+.2f} ms vs ceiling batch 1"
    else:
        ceiling_info = "no ceiling"
    if "ratio_same_minutes" in entry:
        ceiling_info += f" ({entry['ratio_same_minutes']:.2f}x in the same minutes)"
    if "padding_waste" in entry:
        ceiling_info += f"  padding {entry['padding_waste']:.0%}"
    return (f"{entry['dtype']:<8} {entry['scenario']:<22} {entry['texts_per_s']:8.1f} texts/s  "
            f"p50 {entry['p50_ms']:7.2f}  p99 {entry['p99_ms']:7.2f} ms  {ceiling_info}  "
            f"errors {entry['socket_errors'] + entry['non_2xx']}  wrk {entry['wrk_cpu_cores']:.2f} cores")


def _server_cpu(entry: dict[str, Any]) -> str:
    if "loop_cpu_us_per_request" not in entry or entry.get("mixed"):
        return "-"  # (the mixed parts share one server: its CPU cannot be split between them)
    return f"{entry['loop_cpu_us_per_request']:.0f} us, {entry['engine_cpu_ms_per_request']:.2f} ms"


def _median_loop_cpu(entries: list[dict[str, Any]]) -> str:
    values = [entry["loop_cpu_us_per_request"] for entry in entries
              if "loop_cpu_us_per_request" in entry and not entry.get("mixed")]
    return f"{statistics.median(values):.0f} us" if values else "-"


def _versus(entry: dict[str, Any]) -> float | None:
    """The figure a target is set on: ms over the batch-1 ceiling, or the ratio to a throughput ceiling."""
    if "p50_minus_ceiling_ms" in entry:
        return float(entry["p50_minus_ceiling_ms"])
    return float(entry["ratio_to_ceiling"]) if "ratio_to_ceiling" in entry else None


def _round_of(entry: dict[str, Any], report: dict[str, Any]) -> str:
    return f" (round {entry.get('round')})" if report.get("rounds", 1) > 1 else ""


def summary(report: dict[str, Any]) -> list[str]:
    """Median and range over the rounds, per dtype and scenario (in the order first run)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in report["results"]:
        groups.setdefault((entry["dtype"], entry["scenario"]), []).append(entry)
    paired = bool(report.get("same_minutes"))
    lines = [
        f"Machine: {_machine_line(report)}; "
        f"{report['seconds_per_scenario']:.0f} s per scenario; {report['rounds']} rounds (ceilings measured "
        f"again in each); median [lowest, highest] over the rounds.",
        "",
        "| dtype | scenario | texts (pairs)/s | p50 ms | p99 ms | vs ceiling |"
        + (" vs ceiling, same minutes |" if paired else "") + " event loop CPU per request |",
        "|---|---|---:|---:|---:|---|" + ("---|" if paired else "") + "---:|",
    ]

    def spread(values: list[float], form: str) -> str:
        return f"{statistics.median(values):{form}} [{min(values):{form}}, {max(values):{form}}]"

    for (dtype, scenario), entries in groups.items():
        versus = [value for value in map(_versus, entries) if value is not None]
        versus_text = "-"
        if versus:
            unit = " ms" if "p50_minus_ceiling_ms" in entries[0] else "x"
            versus_text = spread(versus, "+.2f" if unit == " ms" else ".2f").replace(" [", f"{unit} [", 1)
        same = [entry["ratio_same_minutes"] for entry in entries if "ratio_same_minutes" in entry]
        same_text = (spread(same, ".2f").replace(" [", "x [", 1) if same else "-") + " | " if paired else ""
        lines.append(f"| {dtype} | {scenario} | {spread([e['texts_per_s'] for e in entries], '.0f')} | "
                     f"{spread([e['p50_ms'] for e in entries], '.2f')} | "
                     f"{spread([e['p99_ms'] for e in entries], '.1f')} | {versus_text} | {same_text}"
                     f"{_median_loop_cpu(entries)} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    paired = bool(report.get("same_minutes"))
    lines = [
        f"Machine: {_machine_line(report)}; "
        f"{report['seconds_per_scenario']:.0f} s per scenario; bundles {Path(str(report['bundle'])).name}, "
        f"{Path(str(report['reranker'])).name}.",
        "",
        "| dtype | scenario | texts (pairs)/s | p50 ms | p90 ms | p99 ms | errors | ceiling | vs ceiling | "
        + ("ceiling in the same minutes | " if paired else "")
        + "padding | wrk CPU | server CPU per request: event loop, other threads |",
        "|---|---|---:|---:|---:|---:|---:|---|---|" + ("---|" if paired else "") + "---:|---:|---:|",
    ]
    for entry in report["results"]:
        base = entry["ceiling"]
        if entry.get("rerank"):
            ceiling_text = f"{base['pairs_per_s']:.0f} pairs/s"
            versus = f"{entry['ratio_to_ceiling']:.2f}x"
        elif entry.get("mixed") or ("ratio_to_ceiling" not in entry and "p50_minus_ceiling_ms" not in entry):
            ceiling_text, versus = "-", "-"
        elif entry.get("long"):
            ceiling_text = (f"{base['long_items_per_s']:.0f} texts/s "
                            f"(batch 4 or 8, {base['long_tokens_per_text']:.0f} tokens)")
            versus = f"{entry['ratio_to_ceiling']:.2f}x"
        elif "ratio_to_ceiling" in entry:
            ceiling_text = f"{base['batch32_items_per_s']:.0f} texts/s (batch 32)"
            versus = f"{entry['ratio_to_ceiling']:.2f}x"
        else:
            ceiling_text = f"{base['batch1_p50_ms']:.2f} ms (batch 1)"
            versus = f"{entry['p50_minus_ceiling_ms']:+.2f} ms"
        padding = f"{entry['padding_waste']:.0%}" if "padding_waste" in entry else "-"
        scenario = entry["scenario"] + (f" (round {entry['round']})" if report.get("rounds", 1) > 1 else "")
        same = ""
        if paired:
            alongside = entry.get("same_minutes")
            same = "- | " if alongside is None else (
                f"{alongside['items_per_s']:.0f}/s {'before' if alongside['ceiling_first'] else 'after'}: "
                f"{entry['ratio_same_minutes']:.2f}x | ")
        lines.append(
            f"| {entry['dtype']} | {scenario} | {entry['texts_per_s']:.0f} | {entry['p50_ms']:.2f} | "
            f"{entry['p90_ms']:.2f} | {entry['p99_ms']:.2f} | {entry['socket_errors'] + entry['non_2xx']} | "
            f"{ceiling_text} | {versus} | {same}{padding} | {entry['wrk_cpu_cores']:.2f} cores | "
            f"{_server_cpu(entry)} |")
    if report.get("rounds", 1) > 1:
        lines = [*summary(report), "", "Every round:", "", *lines[2:]]
    if report.get("servers"):
        lines += ["", f"| dtype | launch to ready | RSS when ready | RSS right after the scenarios | RSS "
                  f"{QUIET_SECONDS:.0f} s later | peak RSS |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {server['dtype']}{_round_of(server, report)} | "
                  f"{server['ready_seconds']:.2f} s | {server['idle_rss_mb']:.0f} MB | "
                  f"{server['after_load_rss_mb']:.0f} MB | {server['quiet_rss_mb']:.0f} MB | "
                  f"{server['peak_rss_mb']:.0f} MB |" for server in report["servers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="embedding bundle for the embed scenarios ('none' to skip them)")
    parser.add_argument("--reranker", type=Path, default=None,
                        help="cross-encoder bundle for the rerank scenario (see loadtests/make_reranker.py)")
    parser.add_argument("--dtype", action="append", choices=["float32", "int8", "float16"], default=None,
                        help="repeat for several; default: float32 and int8 on the CPU, float32 and float16 on CUDA")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="execution provider for the ceiling and the servers (cuda: onnxruntime-gpu)")
    parser.add_argument("--ceiling-rounds", type=int, default=CEILING_ROUNDS,
                        help="times each ceiling configuration is measured (the best counts)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for every server started, e.g. --server-arg=--engine-workers=1")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the scenarios whose name contains TEXT ('rerank' for the rerank one)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run everything this many times (ceilings included) and report medians and ranges")
    parser.add_argument("--same-minutes", action="store_true",
                        help="also hold each throughput scenario to its best ceiling configuration measured again "
                             "right before or after the server's window, for as long")
    args = parser.parse_args()
    bundle = None if str(args.bundle) == "none" else args.bundle
    run(bundle, args.dtype or list(DEVICE_VARIANTS[args.device]), args.seconds, args.output, args.reranker,
        tuple(args.server_arg), args.only, max(1, args.rounds), args.device, max(1, args.ceiling_rounds),
        args.same_minutes)


if __name__ == "__main__":
    main()
