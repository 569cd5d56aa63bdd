"""`embedrank bench` and the load tests' ceilings: which variants and layouts each device measures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_each_device_measures_its_own_variants() -> None:
    from service.bench import bench_variants

    every = ["float32", "int8", "float16"]
    assert bench_variants(every, "cpu") == ["float32", "int8"]
    assert bench_variants(every, "cuda") == ["float32", "float16"]
    assert bench_variants(["float32"], "cuda") == ["float32"]


def test_bench_runs_a_real_bundle_on_the_cpu(cross_encoder_bundle: Path, tmp_path: Path) -> None:
    import json

    from service.cli import main

    output = tmp_path / "bench.json"
    assert main(["bench", str(cross_encoder_bundle), "--seconds", "0.05", "--json", str(output)]) == 0
    from service.core.manifest import load_manifest

    rows = json.loads(output.read_text())
    variants = [variant for variant in load_manifest(cross_encoder_bundle).variants if variant != "float16"]
    assert "float32" in variants
    assert {(row["variant"], row["batch_size"]) for row in rows} == {
        (variant, size) for variant in variants for size in (1, 8, 32)}
    assert all(row["items_per_second"] > 0 and row["inputs"] == "pairs" for row in rows)


def test_bench_times_lone_passes_on_the_padded_graph(minilm_bundle: Path) -> None:
    """An int8 bundle with packed tokens: batch 1 runs its padded graph (as the server's lone passes do),
    wider batches the packed one; float32 has one file for all."""
    from service.bench import run_bench
    from service.core.manifest import load_manifest

    int8 = load_manifest(minilm_bundle).variants["int8"]
    assert int8.padded_file is not None
    rows = run_bench(minilm_bundle, ["float32", "int8"], batch_sizes=(1, 8), seconds=0.02)
    files = {(row.variant, row.inputs, row.batch_size): row.file for row in rows}
    assert len(files) == 8
    for inputs in ("short", "long"):
        assert files[("int8", inputs, 1)] == int8.padded_file
        assert files[("int8", inputs, 8)] == int8.file == "model_int8.onnx"
        assert files[("float32", inputs, 1)] == files[("float32", inputs, 8)] == "model.onnx"
    assert all(row.items_per_second > 0 for row in rows)


def test_bench_on_cuda_without_a_gpu_says_so(bge_style_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main
    from service.engines.ort_engine import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    assert main(["bench", str(bge_style_bundle), "--device", "cuda", "--seconds", "0.05"]) == 2
    assert "error: CUDA was requested but onnxruntime has no CUDAExecutionProvider" in capsys.readouterr().err


def test_load_test_ceilings_try_the_layouts_of_their_device() -> None:
    from loadtests.run import _layouts, _machine_line

    cores = len(os.sched_getaffinity(0))
    assert set(_layouts("cpu")) == {"1_pass", "2_pass", f"{cores}_single_thread_passes",
                                    f"{cores}_single_thread_passes_no_arena", f"{cores}_single_thread_sessions"}
    assert not _layouts("cpu")[f"{cores}_single_thread_passes_no_arena"][0].cpu_arena
    assert set(_layouts("cuda")) == {"1_pass", "2_pass"}
    machine = {"cpu": "Some CPU", "cores": 16, "gpu": "NVIDIA H200"}
    assert _machine_line({"machine": machine, "device": "cuda"}) == "Some CPU, 16 cores; CUDA provider on NVIDIA H200"
    assert _machine_line({"machine": machine, "device": "cpu"}) == "Some CPU, 16 cores"
