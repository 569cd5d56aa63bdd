"""The export pipeline: resolve -> export -> optimize -> quantize -> validate -> manifest."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import exporters
from exporters import onnx_export, packing, probes, shapes, validate
from exporters.atomic import staged_directory
from exporters.errors import ExportFailure, ExportInputError
from exporters.int8_search import Int8Search
from exporters.resolve import SourceModel, resolve
from service.core.manifest import (
    DenseLayer,
    Manifest,
    Variant,
    sha256_file,
)
from service.engines.bundle import BundleModel
from service.engines.ort_engine import SessionConfig
from service.engines.tokenizer import TextOrPair

OPTIMIZE_CHOICES = ("auto", "none", "O1", "O2")
_LIBRARIES = ("torch", "transformers", "optimum-onnx", "optimum", "onnx", "onnxruntime",
              "sentence-transformers", "tokenizers", "numpy")


@dataclass
class ExportOptions:
    source: str
    name: str
    output: Path = Path("models")
    task: str = "auto"
    int8: bool = False
    fp16: bool = False
    optimize: str = "auto"
    max_length: int | None = None
    pooling: str | None = None
    revision: str | None = None
    force: bool = False
    packed_tokens: bool = True  # int8: token-wise operators on real tokens only (exporters.packing)
    packed_float32: bool = True  # the same for fp32 (see the README, "Packed tokens in fp32")
    bar_overrides: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest


class Progress:
    """One line per stage on stderr, so stdout holds only the summary table."""

    def __init__(self, stages: int, stream: Any = None) -> None:
        self.stages = stages
        self.current = 0
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    def stage(self, name: str, detail: str = "") -> None:
        self.current += 1
        elapsed = time.perf_counter() - self.started
        print(f"[{self.current}/{self.stages}] {name:<9} {detail} ({elapsed:.1f}s)", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"          {text}", file=self.stream, flush=True)


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _onnx_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)


class _Exporter:
    def __init__(self, options: ExportOptions, progress: Progress) -> None:
        self.options = options
        self.progress = progress
        self.refused: dict[str, dict[str, Any]] = {}

    def manifest_for(self, source: SourceModel, bundle: Path, variants: dict[str, Variant],
                     tokenizer_file: Path, dense: list[DenseLayer]) -> Manifest:
        input_names = ["input_ids", "attention_mask"]
        if source.model_type == "bert":
            input_names.append("token_type_ids")
        return Manifest(
            name=self.options.name,
            task=source.task,
            source={"id": source.source_id, "revision": source.revision},
            architecture=source.architecture,
            model_type=source.model_type,
            input_names=input_names,
            output_name=onnx_export.OUTPUT_NAME[source.task],
            hidden_size=source.hidden_size,
            dimensions=source.dimensions,
            max_length=source.max_length,
            pooling=source.pooling,
            normalize=source.normalize,
            lowercase_input=source.lowercase_input,
            dense_layers=dense,
            prompts=source.prompts,
            default_prompt_name=source.default_prompt_name,
            labels=source.labels,
            tokenizer={"file": tokenizer_file.name, "sha256": sha256_file(tokenizer_file)},
            variants=variants,
            refused_variants=self.refused,
            exporter={"name": "embedrank", "version": exporters.__version__, "libraries": _library_versions()},
            created_at=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        )

    def variant_record(self, path: Path, precision: str, optimization: str, metrics: dict[str, float],
                       bars: dict[str, float], passed: bool) -> Variant:
        external = {name: sha256_file(path.parent / name) for name in onnx_export.external_data_files(path)}
        return Variant(
            file=path.name, sha256=sha256_file(path), size_bytes=path.stat().st_size, precision=precision,
            opset=_onnx_opset(path), graph_optimization=optimization,
            parity={key: round(value, 7) for key, value in metrics.items()},
            bars=bars, passed=passed, forced=not passed, external_data=external,
        )

    def load(self, manifest: Manifest, bundle: Path, variant: str, model_file: Path | None = None) -> BundleModel:
        return BundleModel(bundle, variant=variant, manifest=manifest, session_config=SessionConfig(),
                           model_file=model_file)

    def run(self) -> ExportResult:
        options = self.options
        self.progress.stage("load", f"resolving {options.source}")
        source = resolve(options.source, task=options.task, revision=options.revision,
                         max_length=options.max_length, pooling=options.pooling)
        self.progress.note(
            f"task={source.task} architecture={source.model_type} pooling={source.pooling} "
            f"normalize={source.normalize} max_length={source.max_length} dims={source.dimensions}"
        )
        inputs: list[TextOrPair] = list(probes.probe_pairs() if source.task == "rerank" else probes.probe_texts())
        reference = validate.torch_reference(source, inputs)
        with staged_directory(options.output, options.name) as bundle, \
                tempfile.TemporaryDirectory(prefix="embedrank-export-") as scratch_name:
            scratch = Path(scratch_name)
            manifest = self._build(source, bundle, scratch, inputs, reference)
            (bundle / "manifest.json").write_text(manifest.to_json(), encoding="utf-8")
        return ExportResult(options.output / options.name, manifest)

    def _build(self, source: SourceModel, bundle: Path, scratch: Path, inputs: list[TextOrPair],
               reference: np.ndarray) -> Manifest:
        options = self.options
        self.progress.stage("export", f"torch -> ONNX (opset {onnx_export.OPSET})")
        raw = onnx_export.export_onnx(source, scratch)
        tokenizer_file = onnx_export.write_tokenizer(source, bundle)
        dense = self._write_dense(source, bundle)
        variants: dict[str, Variant] = {}

        def check(path: Path, variant: str, optimization: str) -> tuple[Variant, BundleModel]:
            bars = validate.bars_for(variant, source.task, options.bar_overrides)
            record = Variant(file=path.name, sha256="", size_bytes=path.stat().st_size, precision=variant,
                             opset=0, graph_optimization=optimization, parity={}, bars=bars, passed=False)
            model = self.load(self.manifest_for(source, bundle, {variant: record}, tokenizer_file, dense),
                              bundle, variant, model_file=path)
            candidate = validate.model_outputs(model, inputs)
            metrics = (validate.embedding_parity(candidate, reference) if source.task == "embed"
                       else validate.score_parity(candidate, reference))
            ok = validate.passes(metrics, bars)
            return self.variant_record(path, variant, optimization, metrics, bars, ok), model

        # fp32: the raw export must match torch before anything is derived from it.
        raw_record, raw_model = check(raw, "float32", "none")
        if not raw_record.passed and not options.force:
            raise ExportFailure(f"fp32 export does not match the source model: {raw_record.parity} "
                                f"(bar {raw_record.bars}); nothing was written")
        self.progress.note(f"fp32 export parity {raw_record.parity}")

        self.progress.stage("optimize", f"graph optimization {options.optimize}")
        fp32_path, fp32_record = self._optimize(source, raw, raw_record, scratch, check)
        final_fp32 = bundle / "model.onnx"
        shutil.copyfile(fp32_path, final_fp32)
        for data_file in fp32_record.external_data:  # weight files keep the names the model refers to
            shutil.copyfile(fp32_path.parent / data_file, bundle / data_file)
        fp32_record.file = final_fp32.name
        variants["float32"] = fp32_record
        fp32_model = self.load(self.manifest_for(source, bundle, dict(variants), tokenizer_file, dense),
                               bundle, "float32")

        if options.int8:
            self.progress.stage("quantize", "int8 configuration search")
            int8_source, static_shapes = self._int8_source(raw, raw_model, inputs, check)
            self._int8(source, int8_source, bundle, scratch, fp32_model, tokenizer_file, dense, variants,
                       static_shapes)
        else:
            self.progress.stage("quantize", "skipped (no --int8)")

        # fp32 with packed tokens replaces the padded graph once the int8 search is done: that search holds
        # its padded candidates to the padded fp32 graph's speed. Every session runs it (unlike int8's packed
        # graph, it costs a lone text nothing: see exporters.packing); fp16 is converted from the padded one.
        packed = self._pack_float32(fp32_path, fp32_record, check) if options.packed_float32 else None
        if packed is not None:
            shutil.copyfile(packed[0], final_fp32)
            packed[1].file = final_fp32.name
            variants["float32"] = packed[1]

        if options.fp16:
            self.progress.stage("fp16", "converting for the CUDA provider")
            fp16_path = onnx_export.convert_fp16(self._fp16_source(raw, fp32_path, fp32_record, scratch),
                                                 bundle / "model_fp16.onnx")
            record, _ = check(fp16_path, "float16", fp32_record.graph_optimization)
            record.verified_on = ["cpu"]
            self._admit("float16", record, fp16_path, variants)
        else:
            self.progress.stage("fp16", "skipped (no --fp16)")

        self.progress.stage("verify", "timing variants and writing the manifest")
        timing_texts: list[TextOrPair] = list(inputs[:16])
        for name, record in variants.items():
            if name == "float16":
                continue
            model = self.load(self.manifest_for(source, bundle, dict(variants), tokenizer_file, dense), bundle, name)
            record.ms_per_batch = validate.time_batches(model, timing_texts)
        return self.manifest_for(source, bundle, variants, tokenizer_file, dense)

    def _admit(self, name: str, record: Variant, path: Path, variants: dict[str, Variant]) -> None:
        if record.passed or self.options.force:
            record.forced = not record.passed
            variants[name] = record
            if not record.passed:
                self.progress.note(f"WARNING: {name} misses its bar {record.bars}: {record.parity}; written (--force)")
            return
        self.refused[name] = {"parity": record.parity, "bars": record.bars,
                              "quantization": record.quantization}
        path.unlink(missing_ok=True)
        self.progress.note(f"WARNING: {name} refused, below its bar {record.bars}: {record.parity}")

    def _optimize(self, source: SourceModel, raw: Path, raw_record: Variant, scratch: Path,
                  check: Callable[[Path, str, str], tuple[Variant, BundleModel]]) -> tuple[Path, Variant]:
        levels = {"auto": ["O2", "O1"], "none": [], "O1": ["O1"], "O2": ["O2"]}[self.options.optimize]
        for level in levels:
            target = scratch / f"model_{level}.onnx"
            try:
                onnx_export.optimize_graph(raw, level, target, num_heads=0, hidden_size=0, skip_layer_norm=False)
                record, _ = check(target, "float32", level)
            except Exception as error:  # a fusion the optimizer cannot apply is a fallback, not a failure
                self.progress.note(f"{level} optimization failed ({type(error).__name__}); trying the next level")
                continue
            if record.passed:
                self.progress.note(f"{level} parity {record.parity}")
                return target, record
            self.progress.note(f"{level} misses the fp32 bar ({record.parity}); not used")
            if self.options.optimize != "auto":
                raise ExportFailure(f"graph optimization {level} breaks parity: {record.parity}")
        return raw, raw_record

    def _pack_float32(self, path: Path, record: Variant,
                      check: Callable[[Path, str, str], tuple[Variant, BundleModel]]) -> tuple[Path, Variant] | None:
        """The fp32 graph with packed tokens (exporters.packing) and its record, where the rewrite applies
        and the packed graph passes the fp32 bar again; else None (the padded graph stays the only file).
        A model whose weights live in external files (over protobuf's 2 GB) is left padded."""
        if record.external_data:
            self.progress.note("fp32 packed tokens: weights in external files; kept padded")
            return None
        tried = packing.try_pack(path, "fp32", self.progress.note,
                                 lambda packed: check(packed, "float32", record.graph_optimization)[0])
        if tried is None:
            return None
        packed, layers, packed_record = tried
        if not packed_record.passed:
            self.progress.note(f"fp32 packed tokens: misses the fp32 bar ({packed_record.parity}); kept padded")
            return None
        self.progress.note(f"fp32 packed tokens: {layers} layers, parity {packed_record.parity}")
        packed_record.packed_tokens = layers
        return packed, packed_record

    def _fp16_source(self, raw: Path, fp32_path: Path, fp32_record: Variant, scratch: Path) -> Path:
        """The graph the fp16 variant is converted from: fp32's, with its residual Adds and LayerNormalizations
        fused as SkipLayerNormalization when fp32's is O2 (the fp32 file leaves them apart for the CPU; the
        fp16 variant runs on CUDA, where the fused form is what was measured)."""
        if fp32_record.graph_optimization != "O2":
            return fp32_path
        target = scratch / "model_O2_fused.onnx"
        try:
            return onnx_export.optimize_graph(raw, "O2", target, num_heads=0, hidden_size=0)
        except Exception as error:  # same fusions as fp32's O2 plus one: fall back to fp32's graph
            self.progress.note(f"fp16: fused O2 graph failed ({type(error).__name__}); converting fp32's")
            return fp32_path

    def _int8_source(self, raw: Path, raw_model: BundleModel, inputs: list[TextOrPair],
                     check: Callable[[Path, str, str], tuple[Variant, BundleModel]]) -> tuple[Path, int]:
        """The graph the int8 search quantizes and how many shape values were made static in it: the raw
        export with its run-time shape arithmetic taken out (exporters.shapes) when its outputs are the raw
        export's on the probe inputs, else the raw export itself (0)."""
        target = raw.with_name(f"{raw.stem}_static_shapes.onnx")  # beside any weight files it refers to
        try:
            replaced = shapes.simplify_file(raw, target)
            _, model = check(target, "float32", "none")
            ours, theirs = validate.model_outputs(model, inputs), validate.model_outputs(raw_model, inputs)
        except Exception as error:  # shape inference can fail on unusual graphs: quantize the raw export
            self.progress.note(f"int8 source: shapes left as exported ({type(error).__name__}: {error})"[:300])
            return raw, 0
        if ours.shape != theirs.shape or not np.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
            self.progress.note("int8 source: shapes left as exported (the static-shape graph's outputs differ)")
            return raw, 0
        self.progress.note(f"int8 source: {replaced} shape values made static")
        return target, replaced

    def _int8(self, source: SourceModel, raw: Path, bundle: Path, scratch: Path, fp32_model: BundleModel,
              tokenizer_file: Path, dense: list[DenseLayer], variants: dict[str, Variant],
              static_shapes: int = 0) -> None:
        bars = validate.bars_for("int8", source.task, self.options.bar_overrides)

        def load_int8(path: Path) -> BundleModel:
            record = Variant(file=path.name, sha256="", size_bytes=path.stat().st_size, precision="int8",
                             opset=0, graph_optimization="none", parity={}, bars=bars, passed=False)
            return self.load(self.manifest_for(source, bundle, {"int8": record}, tokenizer_file, dense),
                             bundle, "int8", model_file=path)

        search = Int8Search(source, raw, scratch, fp32_model, load_int8, bars, self.progress.note)
        path, metrics = search.run()
        packed = search.pack(path, metrics) if self.options.packed_tokens else None
        final = bundle / "model_int8.onnx"
        padded: Path | None = None
        layers = 0
        if packed is not None:
            # Workers run the packed graph; lone passes (mostly one text, nothing to save) the padded one.
            padded = bundle / "model_int8_padded.onnx"
            shutil.copyfile(path, padded)
            path, metrics, layers = packed
        shutil.copyfile(path, final)
        record = self.variant_record(final, "int8", "none", metrics, bars, validate.passes(metrics, bars))
        if padded is not None:
            record.padded_file, record.padded_sha256 = padded.name, sha256_file(padded)
            record.padded_size_bytes = padded.stat().st_size
            record.packed_tokens = layers
        record.quantization = {**search.record(metrics), "static_shape_values": static_shapes}
        self._admit("int8", record, final, variants)

    @staticmethod
    def _write_dense(source: SourceModel, bundle: Path) -> list[DenseLayer]:
        layers = []
        for index, dense in enumerate(source.dense):
            weight_file = f"dense_{index}.weight.npy"
            np.save(bundle / weight_file, dense.weight.astype(np.float32), allow_pickle=False)
            bias_file = None
            if dense.bias is not None:
                bias_file = f"dense_{index}.bias.npy"
                np.save(bundle / bias_file, dense.bias.astype(np.float32), allow_pickle=False)
            layers.append(DenseLayer(in_features=int(dense.weight.shape[1]), out_features=int(dense.weight.shape[0]),
                                     activation=dense.activation, weight_file=weight_file, bias_file=bias_file))
        return layers


def export_bundle(options: ExportOptions, progress: Progress | None = None) -> ExportResult:
    """Export, verify and write a bundle; raises ExportInputError / ExportFailure."""
    if options.optimize not in OPTIMIZE_CHOICES:
        raise ExportInputError(f"--optimize must be one of {', '.join(OPTIMIZE_CHOICES)}")
    if not options.name or "/" in options.name or options.name.startswith("."):
        raise ExportInputError("--name must be a plain directory name (no '/', not starting with '.')")
    return _Exporter(options, progress or Progress(6)).run()
