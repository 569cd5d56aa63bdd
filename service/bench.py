"""`embedrank bench BUNDLE`: the in-process ceiling every HTTP figure is compared with.

ONNX Runtime is called directly (through the same BundleModel the server uses) at batch 1, 8 and 32
on short and long inputs, for every variant of the bundle that runs on the chosen device (the CPU:
float32 and int8; CUDA: float32 and float16). Inputs are tokenized once beforehand, so the figures
are the model's own speed on this machine: what a perfect server could reach. Batch 1 runs the
variant's padded graph where the bundle has one (an int8 graph with packed tokens keeps its padded
original for lone passes, as the server's lone-pass session runs it); each row names the file it timed.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from service.core.manifest import load_manifest
from service.engines.bundle import BundleModel, lone_model_file
from service.engines.ort_engine import Device, SessionConfig
from service.engines.tokenizer import TextOrPair

SHORT_TEXTS = [
    "The weather is lovely today.", "How do I reset my password?", "Paris is the capital of France.",
    "A quick brown fox jumps over the lazy dog.", "Interest rates rose again this quarter.",
    "She plays violin in an orchestra.", "What is the best way to learn Python?", "Solar panels convert light.",
]


def long_text(words: int = 240, seed: int = 0) -> str:
    vocabulary = ("model server request batch token latency memory cache queue worker thread network river "
                  "mountain city history music science garden market energy language").split(" ")
    return " ".join(vocabulary[(seed * 7 + index * 3) % len(vocabulary)] for index in range(words))


@dataclass
class Measurement:
    variant: str
    inputs: str
    batch_size: int
    ms_per_batch: float
    items_per_second: float
    tokens_per_item: float
    file: str  # the ONNX file timed (Variant.padded_file at batch 1 where the bundle has one)


def measure(model: BundleModel, texts: Sequence[TextOrPair], batch_size: int, seconds: float) -> tuple[float, float]:
    chosen = [texts[index % len(texts)] for index in range(batch_size)]
    items = model.tokenizer.encode(chosen)
    batch = model.tokenizer.pad(items)
    forward = model.forward_pooled if model.task == "embed" else model.forward_logits
    forward(batch)
    samples: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        start = time.perf_counter()
        forward(batch)
        samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    return median * 1000, batch_size / median


# The variants each device is measured with (and the load tests' default dtypes): fp16 is for the CUDA
# provider (on a CPU it is emulated and says nothing); int8 is the CPU's variant.
DEVICE_VARIANTS: dict[str, tuple[str, ...]] = {"cpu": ("float32", "int8"), "cuda": ("float32", "float16")}


def bench_variants(available: Sequence[str], device: Device) -> list[str]:
    """The bundle's variants worth measuring on `device`, in the bundle's order."""
    return [variant for variant in available if variant in DEVICE_VARIANTS[device]]


def run_bench(bundle_dir: Path, variants: list[str] | None = None, batch_sizes: tuple[int, ...] = (1, 8, 32),
              seconds: float = 2.0, intra_op_threads: int = 0, device: Device = "cpu") -> list[Measurement]:
    manifest = load_manifest(bundle_dir)
    results = []
    inputs: dict[str, list[TextOrPair]] = {"short": list(SHORT_TEXTS),
                                           "long": [long_text(seed=index) for index in range(8)]}
    if manifest.task == "rerank":
        inputs = {"pairs": [(query, long_text(100, seed)) for seed, query in enumerate(SHORT_TEXTS)]}
    for variant in variants or bench_variants(list(manifest.variants), device):
        config = SessionConfig(intra_op_threads=intra_op_threads)
        batched, lone = bundle_dir / manifest.variants[variant].file, lone_model_file(bundle_dir, manifest, variant)
        models = {file: BundleModel(bundle_dir, variant=variant, device=device, session_config=config,
                                    manifest=manifest, model_file=file) for file in {batched, lone}}
        for kind, texts in inputs.items():
            for size in batch_sizes:
                file = lone if size == 1 else batched
                ms, rate = measure(models[file], texts, size, seconds)
                lengths = [len(item) for item in models[file].tokenizer.encode(texts)]
                results.append(Measurement(variant, kind, size, round(ms, 3), round(rate, 1),
                                           round(statistics.mean(lengths), 1), file.name))
    return results


def main(bundle: str, output: str | None, seconds: float, device: Device = "cpu") -> int:
    results = run_bench(Path(bundle), seconds=seconds, device=device)
    print(f"device: {device}")
    print(f"{'variant':<8} {'inputs':<6} {'batch':>5} {'ms/batch':>9} {'items/s':>9} {'tokens/item':>11}  file")
    for row in results:
        print(f"{row.variant:<8} {row.inputs:<6} {row.batch_size:>5} {row.ms_per_batch:>9.2f} "
              f"{row.items_per_second:>9.1f} {row.tokens_per_item:>11.1f}  {row.file}")
    if output:
        Path(output).write_text(json.dumps([asdict(row) for row in results], indent=2))
    return 0
