"""Load scenarios against a real `embedrank serve`, each reported against the in-process ceiling
measured in the same run on the same machine.

    python -m loadtests.run --bundle models/all-MiniLM-L6-v2 --dtype float32 --dtype int8

For each dtype: the ceiling is measured first (ONNX Runtime called directly, nothing else running),
then a server is started on 127.0.0.1 and wrk drives each scenario. wrk's own CPU use is measured
and reported, since on a small machine the load generator competes with the server.
Results go to loadtests/results/ as JSON and a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from service.bench import SHORT_TEXTS, long_text
from service.engines.bundle import BundleModel
from service.engines.ort_engine import SessionConfig

HERE = Path(__file__).resolve().parent
LUA = HERE / "post.lua"


@dataclass
class Scenario:
    name: str
    connections: int
    texts_per_request: int
    ceiling_batch: int


SCENARIOS = [
    Scenario("1 client x 1 text", 1, 1, 1),
    Scenario("32 clients x 1 text", 32, 1, 32),
    Scenario("8 clients x 32 texts", 8, 32, 32),
]


def throughput(forward: Callable[[Any], Any], batch: Any, size: int, workers: int, seconds: float) -> float:
    """Items per second when `workers` threads run `forward(batch)` back to back for `seconds`."""
    done = [0]
    stop = time.perf_counter() + seconds

    def work() -> None:
        while time.perf_counter() < stop:
            forward(batch)
            done[0] += size

    started = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0] / (time.perf_counter() - started)


def ceiling(bundle: Path, variant: str, seconds: float) -> dict[str, float]:
    """Batch-1 latency and batch-32 throughput ONNX Runtime reaches in this process, each the best of
    the configurations tried (thread spinning on or off; one pass at a time on all cores, or two
    passes at once), so the server is held to the best the machine does, not to its own settings."""
    texts = [f"{SHORT_TEXTS[index % len(SHORT_TEXTS)]} {index}" for index in range(32)]
    result: dict[str, float] = {}
    for spinning in (False, True):
        model = BundleModel(bundle, variant=variant, session_config=SessionConfig(allow_spinning=spinning))
        single = model.tokenizer.pad(model.tokenizer.encode(texts[:1]))
        for _ in range(10):
            model.forward_pooled(single)
        samples = []
        deadline = time.perf_counter() + seconds / 2
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            model.forward_pooled(single)
            samples.append(time.perf_counter() - start)
        result[f"batch1_p50_ms_spinning_{'on' if spinning else 'off'}"] = statistics.median(samples) * 1000
    result["batch1_p50_ms"] = min(result["batch1_p50_ms_spinning_on"], result["batch1_p50_ms_spinning_off"])
    model = BundleModel(bundle, variant=variant, session_config=SessionConfig())
    full = model.tokenizer.pad(model.tokenizer.encode(texts))
    model.forward_pooled(full)
    for workers in (1, 2):
        result[f"batch32_items_per_s_{workers}_pass"] = throughput(model.forward_pooled, full, 32, workers, seconds)
    result["batch32_items_per_s"] = max(result["batch32_items_per_s_1_pass"], result["batch32_items_per_s_2_pass"])
    return result


RERANK_DOCUMENTS = 20


def rerank_documents(seed: int) -> list[str]:
    """Twenty documents of about 100 tokens each."""
    return [long_text(75, seed=seed * RERANK_DOCUMENTS + index) for index in range(RERANK_DOCUMENTS)]


def rerank_ceiling(bundle: Path, variant: str, seconds: float) -> dict[str, float]:
    """Pairs per second ONNX Runtime scores in this process, batches of one request's 20 pairs or of
    32, one pass at a time or two at once: the best is the ceiling."""
    model = BundleModel(bundle, variant=variant, session_config=SessionConfig())
    pairs = [(SHORT_TEXTS[0], document) for document in rerank_documents(0) + rerank_documents(1)]
    result: dict[str, float] = {}
    for size in (RERANK_DOCUMENTS, 32):
        batch = model.tokenizer.pad(model.tokenizer.encode(pairs[:size]))
        model.forward_logits(batch)
        for workers in (1, 2):
            result[f"batch{size}_pairs_per_s_{workers}_pass"] = throughput(model.forward_logits, batch, size,
                                                                            workers, seconds)
    result["pairs_per_s"] = max(result.values())
    result["tokens_per_pair"] = statistics.mean(len(item) for item in model.tokenizer.encode(pairs))
    return result


def run_rerank(bundle: Path, dtypes: list[str], seconds: float, report: dict[str, Any], scratch: Path) -> None:
    bodies = scratch / "rerank.jsonl"
    with bodies.open("w") as handle:
        for index in range(200):
            handle.write(json.dumps({"query": SHORT_TEXTS[index % len(SHORT_TEXTS)],
                                     "texts": rerank_documents(index)}) + "\n")
    for dtype in dtypes:
        base = rerank_ceiling(bundle, dtype, max(2.0, seconds / 3))
        with serving(bundle, "--dtype", dtype) as (url, server):
            measured = run_wrk(url, bodies, 8, seconds, server.pid, path="/rerank")
        pairs_per_second = measured["requests"] * RERANK_DOCUMENTS / measured["seconds"]
        entry = {"dtype": dtype, "scenario": "rerank 8 clients x (1 query + 20 docs of ~100 tokens)",
                 "texts_per_s": pairs_per_second, **measured, "ceiling": base, "rerank": True,
                 "ratio_to_ceiling": pairs_per_second / base["pairs_per_s"]}
        report["results"].append(entry)
        print(_row(entry), flush=True)


@contextlib.contextmanager
def serving(bundle: Path, *arguments: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `embedrank serve` on 127.0.0.1 for the duration of the block: (base URL, process)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--model-id", str(bundle),
                               "--port", str(port), "--log-level", "warning", *arguments])
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bodies(directory: Path, texts_per_request: int) -> Path:
    path = directory / f"bodies-{texts_per_request}.jsonl"
    with path.open("w") as handle:
        for index in range(2000):
            texts = [f"{SHORT_TEXTS[(index + offset) % len(SHORT_TEXTS)]} {index}-{offset}"
                     for offset in range(texts_per_request)]
            handle.write(json.dumps({"inputs": texts[0] if texts_per_request == 1 else texts}) + "\n")
    return path


def run_wrk(url: str, bodies: Path, connections: int, seconds: float, server_pid: int,
            path: str = "/embed") -> dict[str, Any]:
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = _cpu_seconds(server_pid)
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
    result["server_cpu_cores"] = (_cpu_seconds(server_pid) - server_before) / result["seconds"]
    return result


def run(bundle: Path | None, dtypes: list[str], seconds: float, output: Path,
        reranker: Path | None = None) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    report: dict[str, Any] = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "bundle": str(bundle), "reranker": str(reranker), "seconds_per_scenario": seconds, "results": [],
    }
    with tempfile.TemporaryDirectory() as scratch:
        bodies = {count: _bodies(Path(scratch), count) for count in {s.texts_per_request for s in SCENARIOS}}
        if reranker is not None:
            run_rerank(reranker, dtypes, seconds, report, Path(scratch))
        for dtype in dtypes if bundle is not None else []:
            base = ceiling(bundle, dtype, max(2.0, seconds / 2))
            with serving(bundle, "--dtype", dtype) as (url, server):
                for scenario in SCENARIOS:
                    measured = run_wrk(url, bodies[scenario.texts_per_request], scenario.connections, seconds,
                                       server.pid)
                    texts_per_second = measured["requests"] * scenario.texts_per_request / measured["seconds"]
                    entry = {"dtype": dtype, "scenario": scenario.name, "texts_per_s": texts_per_second,
                             **measured, "ceiling": base}
                    if scenario.ceiling_batch == 1:
                        entry["target"] = "p50 <= ceiling batch-1 + 1.5 ms"
                        entry["p50_minus_ceiling_ms"] = measured["p50_ms"] - base["batch1_p50_ms"]
                    else:
                        entry["ratio_to_ceiling"] = texts_per_second / base["batch32_items_per_s"]
                    report["results"].append(entry)
                    print(_row(entry), flush=True)
    output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (output / f"load-{stamp}.json").write_text(json.dumps(report, indent=2))
    (output / f"load-{stamp}.md").write_text(markdown(report))
    print(markdown(report))
    return report


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become ready")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _row(entry: dict[str, Any]) -> str:
    ceiling_info = (f"{entry['ratio_to_ceiling']:.2f}x ceiling" if "ratio_to_ceiling" in entry
                    else f"p50 {entry['p50_minus_ceiling_ms']:+.2f} ms vs ceiling batch 1")
    return (f"{entry['dtype']:<8} {entry['scenario']:<22} {entry['texts_per_s']:8.1f} texts/s  "
            f"p50 {entry['p50_ms']:7.2f}  p99 {entry['p99_ms']:7.2f} ms  {ceiling_info}  "
            f"errors {entry['socket_errors'] + entry['non_2xx']}  wrk {entry['wrk_cpu_cores']:.2f} cores")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; "
        f"{report['seconds_per_scenario']:.0f} s per scenario; bundles {Path(str(report['bundle'])).name}, "
        f"{Path(str(report['reranker'])).name}.",
        "",
        "| dtype | scenario | texts (pairs)/s | p50 ms | p90 ms | p99 ms | errors | ceiling | vs ceiling | wrk CPU |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for entry in report["results"]:
        base = entry["ceiling"]
        if entry.get("rerank"):
            ceiling_text = f"{base['pairs_per_s']:.0f} pairs/s"
            versus = f"{entry['ratio_to_ceiling']:.2f}x"
        elif "ratio_to_ceiling" in entry:
            ceiling_text = f"{base['batch32_items_per_s']:.0f} texts/s (batch 32)"
            versus = f"{entry['ratio_to_ceiling']:.2f}x"
        else:
            ceiling_text = f"{base['batch1_p50_ms']:.2f} ms (batch 1)"
            versus = f"{entry['p50_minus_ceiling_ms']:+.2f} ms"
        lines.append(
            f"| {entry['dtype']} | {entry['scenario']} | {entry['texts_per_s']:.0f} | {entry['p50_ms']:.2f} | "
            f"{entry['p90_ms']:.2f} | {entry['p99_ms']:.2f} | {entry['socket_errors'] + entry['non_2xx']} | "
            f"{ceiling_text} | {versus} | {entry['wrk_cpu_cores']:.2f} cores |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="embedding bundle for the embed scenarios ('none' to skip them)")
    parser.add_argument("--reranker", type=Path, default=None,
                        help="cross-encoder bundle for the rerank scenario (see loadtests/make_reranker.py)")
    parser.add_argument("--dtype", action="append", choices=["float32", "int8"], default=None)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    bundle = None if str(args.bundle) == "none" else args.bundle
    run(bundle, args.dtype or ["float32", "int8"], args.seconds, args.output, args.reranker)


if __name__ == "__main__":
    main()
