"""The int8 configuration search: build each candidate, measure it against fp32, keep the first that
meets the target (else the best that passes the bar), and describe the choice for the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exporters import packing, probes, quantize, validate
from exporters.errors import ExportFailure
from exporters.resolve import SourceModel
from service.engines.bundle import BundleModel
from service.engines.tokenizer import TextOrPair

CALIBRATION_BATCH = 16


def preference(metrics: dict[str, float], bars: dict[str, float]) -> tuple[bool, bool, bool, float]:
    """How a candidate that missed the target ranks: passing the bar first, then reaching the target's
    speed-up, then being faster than fp32 at all; among candidates faster than fp32 the more accurate
    wins, among the rest the faster, so a CPU where int8 barely pays never gets the slowest variant."""
    speedup = metrics.get("speedup", 0.0)
    accuracy = metrics.get("top10_overlap", metrics.get("spearman", 0.0)) + metrics.get("mean_cosine", 0.0)
    faster = speedup > 1.0
    return (validate.passes(metrics, bars), speedup >= validate.INT8_TARGET["speedup"], faster,
            accuracy if faster else speedup)


class Int8Search:
    def __init__(self, source: SourceModel, raw: Path, scratch: Path, fp32_model: BundleModel,
                 load_int8: Callable[[Path], BundleModel], bars: dict[str, float],
                 note: Callable[[str], None]) -> None:
        self.source, self.raw, self.scratch = source, raw, scratch
        self.fp32_model, self.load_int8, self.bars, self.note = fp32_model, load_int8, bars, note
        self.features = quantize.cpu_features()
        self.reduce_range = quantize.reduce_range_for(self.features)
        self.corpus = probes.retrieval_corpus()
        if source.task == "rerank":
            passages, queries = self.corpus.passages[:30], self.corpus.queries[:10]
            self.eval_inputs: list[TextOrPair] = [(query, passage) for query in queries for passage in passages]
        else:
            self.eval_inputs = [*self.corpus.passages, *self.corpus.queries]
        self.calibration: list[TextOrPair] = (list(probes.calibration_texts()) if source.task == "embed"
                                              else list(probes.calibration_pairs()))
        self.target = {key: value for key, value in validate.INT8_TARGET.items()
                       if source.task == "embed" or key == "speedup"}
        self.tried: list[dict[str, Any]] = []
        self.chosen: quantize.QuantCandidate | None = None
        self._ranges: dict[str, Any] | None = None
        self._rowwise_inputs: dict[str, quantize.RowwiseInput] = {}
        self.found: quantize.Projections | None = None
        self._fp32_outputs: np.ndarray | None = None
        self.packed: dict[str, Any] | None = None  # what pack() measured, for the manifest
        self._calibration_reference: np.ndarray | None = None

    def run(self) -> tuple[Path, dict[str, float]]:
        """Path and metrics of the chosen int8 model."""
        baseline = self._baseline()
        best: tuple[Path, dict[str, float], quantize.QuantCandidate] | None = None
        self.found = quantize.projections(self.raw, self.source.hidden_size)
        plan = quantize.candidates(self.found)
        for index, candidate in enumerate(plan):
            try:
                model, path, choices = self._build(candidate, self.scratch / f"int8_{index}")
            except Exception as error:  # one configuration the tools cannot build is skipped, not fatal
                self.note(f"int8 {candidate.name}: cannot be built ({type(error).__name__}: {error})")
                self.tried.append({**candidate.describe(), "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            metrics = self._measure(model, baseline)
            self.tried.append({**candidate.describe(), **{k: round(v, 5) for k, v in metrics.items()},
                               **({"calibration_agreement_by_alpha": choices} if choices else {})})
            self.note(f"int8 {candidate.name}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            if validate.passes(metrics, self.bars) and validate.passes(metrics, self.target):
                best = (path, metrics, candidate)
                break
            if best is None or self._better(metrics, best[1]):
                best = (path, metrics, candidate)
        if best is None:
            raise ExportFailure("no int8 configuration could be built: " + "; ".join(
                str(entry.get("error")) for entry in self.tried))
        path, metrics, self.chosen = best
        if not validate.passes(metrics, self.target):
            self.note(f"int8: no candidate met the target {self.target}; kept {self.chosen.name} "
                      f"(speedup={metrics.get('speedup', 0.0):.4f})")
        return path, metrics

    def _build(self, candidate: quantize.QuantCandidate,
               stem: Path) -> tuple[BundleModel, Path, dict[str, float]]:
        """The candidate's model and file; a smoothing strength is chosen on the calibration texts, never
        on the corpus the accuracy is measured on."""
        if len(candidate.alpha_choices) < 2:
            path = stem.with_name(f"{stem.name}.onnx")
            return self._write(candidate, path, candidate.smooth_alpha), path, {}
        reference = self._calibration_outputs()
        built: dict[str, tuple[BundleModel, Path]] = {}
        choices: dict[str, float] = {}
        for alpha in candidate.alpha_choices:
            path = stem.with_name(f"{stem.name}_alpha{alpha}.onnx")
            built[str(alpha)] = (self._write(candidate, path, alpha), path)
            choices[str(alpha)] = validate.agreement(validate.model_outputs(built[str(alpha)][0], self.calibration),
                                                     reference, self.source.task)
        best = max(choices, key=lambda key: choices[key])
        candidate.smooth_alpha = float(best)
        return *built[best], choices

    def _write(self, candidate: quantize.QuantCandidate, path: Path, alpha: float | None) -> BundleModel:
        candidate.smooth_alpha = alpha
        ranges = self._activation_ranges() if alpha is not None else None
        # Calibration inputs of every weight MatMul: rowwise ones need them, per-channel ones are rounded against them.
        inputs = self._inputs(self.found.all if self.found is not None else candidate.rowwise_nodes)
        quantize.quantize(self.raw, path, candidate, self.reduce_range, ranges, inputs)
        return self.load_int8(path)

    def _baseline(self) -> np.ndarray:
        if self._fp32_outputs is None:
            self._fp32_outputs = validate.model_outputs(self.fp32_model, self.eval_inputs)
        return self._fp32_outputs

    def pack(self, path: Path, metrics: dict[str, float]) -> tuple[Path, dict[str, float], int] | None:
        """The chosen model with packed tokens (exporters.packing), its metrics and layer count, where the
        rewrite applies and the packed model, measured again, passes the bars and meets the target if the
        padded one did; else None (the padded model stays the variant's only file)."""
        tried = packing.try_pack(path, "int8", self.note,
                                 lambda packed: self._measure(self.load_int8(packed), self._baseline()))
        if tried is None:
            return None
        packed, layers, packed_metrics = tried
        self.note("int8 packed tokens: " + ", ".join(f"{k}={v:.4f}" for k, v in packed_metrics.items()))
        kept = validate.passes(packed_metrics, self.bars) and (
            validate.passes(packed_metrics, self.target) or not validate.passes(metrics, self.target))
        self.packed = {"layers": layers, "kept": kept,
                       **{key: round(value, 5) for key, value in packed_metrics.items()}}
        if not kept:
            self.note("int8 packed tokens: below the padded model's standing; kept padded")
            return None
        return packed, packed_metrics, layers

    def _calibration_batches(self) -> list[Any]:
        tokenizer = self.fp32_model.tokenizer
        return [tokenizer.pad(tokenizer.encode(self.calibration[start:start + CALIBRATION_BATCH]))
                for start in range(0, len(self.calibration), CALIBRATION_BATCH)]

    def _activation_ranges(self) -> dict[str, Any]:
        if self._ranges is None:
            self._ranges = quantize.activation_ranges(self.raw, self._calibration_batches())
        return self._ranges

    def _inputs(self, nodes: list[str]) -> dict[str, quantize.RowwiseInput]:
        missing = [node for node in nodes if node not in self._rowwise_inputs]
        if missing:
            self._rowwise_inputs.update(quantize.rowwise_inputs(self.raw, missing, self._calibration_batches()))
        return {node: self._rowwise_inputs[node] for node in nodes if node in self._rowwise_inputs}

    def _calibration_outputs(self) -> np.ndarray:
        if self._calibration_reference is None:
            self._calibration_reference = validate.model_outputs(self.fp32_model, self.calibration)
        return self._calibration_reference

    def _measure(self, model: BundleModel, baseline: np.ndarray) -> dict[str, float]:
        outputs = validate.model_outputs(model, self.eval_inputs)
        if self.source.task == "embed":
            metrics = validate.embedding_parity(outputs, baseline)
            metrics["top10_overlap"] = validate.top_k_overlap(outputs, baseline, len(self.corpus.passages))
        else:
            metrics = {"spearman": validate.spearman(outputs.ravel(), baseline.ravel())}
        metrics["speedup"] = validate.throughput_ratio(model, self.fp32_model, self.eval_inputs[:32])
        return metrics

    def _better(self, metrics: dict[str, float], other: dict[str, float]) -> bool:
        return preference(metrics, self.bars) > preference(other, self.bars)

    def record(self, metrics: dict[str, float]) -> dict[str, Any]:
        """The manifest's description of the chosen configuration and of everything tried."""
        candidate = self.chosen
        assert candidate is not None, "run() first"
        weights = "int8 per-channel" if candidate.per_channel else "int8 per-tensor"
        if candidate.compensated_nodes:
            weights += f", rounded against calibration inputs (GPTQ) in {candidate.compensated_nodes} MatMuls"
        activations = "uint8 per-tensor (dynamic)"
        if candidate.blockwise_nodes:
            weights += f"; blockwise MatMuls: int8 per block of {candidate.block_size} input channels"
            activations += f"; blockwise MatMuls: int8 per row and block of {candidate.block_size} (dynamic)"
        if candidate.rowwise_nodes:
            weights += "; rowwise MatMuls: int8 per output channel, rounded against calibration inputs (GPTQ)"
            activations += "; rowwise MatMuls: uint8 per row, from the input's floor (dynamic)"
        smoothing = None
        if candidate.smooth_alpha is not None:
            smoothing = {"method": "SmoothQuant on LayerNorm-fed MatMuls", "alpha": candidate.smooth_alpha,
                         "calibration_inputs": len(self.calibration),
                         "calibration_origin": "probe set + held-out Python standard library docstrings"}
        return {
            "method": "dynamic", "weights": weights, "activations": activations, "reduce_range": self.reduce_range,
            "cpu_features": self.features, "chosen": candidate.name, "smoothing": smoothing,
            "blockwise_nodes": candidate.blockwise_nodes,
            "rowwise_nodes": candidate.rowwise_nodes,
            "compensated_nodes": candidate.compensated_nodes,
            "packed_tokens": self.packed,
            "rowwise_floors": {node: round(self._rowwise_inputs[node].floor, 6) for node in candidate.rowwise_nodes},
            "target": validate.INT8_TARGET, "target_met": validate.passes(metrics, self.target),
            "corpus": {"passages": len(self.corpus.passages), "queries": len(self.corpus.queries),
                       "fingerprint": self.corpus.fingerprint, "origin": "Python standard library docstrings"},
            "candidates": self.tried,
        }
