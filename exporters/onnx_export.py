"""torch -> ONNX with optimum, and the offline graph transformations (optimize, fp16)."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

from exporters.errors import ExportFailure, MissingExtraError
from exporters.resolve import SourceModel

OPSET = 18
_OPTIMUM_TASK = {"embed": "feature-extraction", "rerank": "text-classification", "classify": "text-classification"}
OUTPUT_NAME = {"embed": "last_hidden_state", "rerank": "logits", "classify": "logits"}


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """optimum and torch print tracer warnings by the page; keep the terminal to our progress lines."""
    buffer = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(buffer):
                yield buffer
        finally:
            logging.disable(previous)


def export_onnx(source: SourceModel, work_dir: Path) -> Path:
    """Export the transformer (no pooling) to `work_dir/raw/model.onnx` and return its path."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise MissingExtraError("optimum-onnx") from None
    target = work_dir / "raw"
    with _quiet() as log:
        try:
            main_export(
                str(source.directory),
                str(target),
                task=_OPTIMUM_TASK[source.task],
                opset=OPSET,
                device="cpu",
                do_validation=False,
                library_name="transformers",
                local_files_only=True,
            )
        except Exception as error:  # optimum raises bare Exceptions, ValueErrors and torch errors
            details = log.getvalue()[-2000:]
            raise ExportFailure(f"ONNX export failed: {type(error).__name__}: {error}\n{details}") from None
    model = target / "model.onnx"
    if not model.is_file():
        raise ExportFailure(f"ONNX export produced no model.onnx in {target}")
    return model


def external_data_files(model_path: Path) -> list[str]:
    """Side files holding the weights of a model over protobuf's 2 GB limit (e.g. BAAI/bge-m3 in fp32)."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx") from None
    model = onnx.load(str(model_path), load_external_data=False)
    files: set[str] = set()
    for initializer in model.graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL:
            files.update(entry.value for entry in initializer.external_data if entry.key == "location")
    return sorted(files)


def write_tokenizer(source: SourceModel, bundle_dir: Path) -> Path:
    """Copy tokenizer.json, converting a slow tokenizer when the checkpoint has none."""
    target = bundle_dir / "tokenizer.json"
    existing = source.directory / "tokenizer.json"
    if existing.is_file():
        shutil.copyfile(existing, target)
        return target
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MissingExtraError("transformers") from None
    with _quiet():
        tokenizer = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            str(source.directory), use_fast=True, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ExportFailure("could not convert the tokenizer to a fast tokenizer (tokenizer.json)")
    tokenizer.backend_tokenizer.save(str(target))
    return target


def optimize_graph(raw_model: Path, level: str, output: Path, num_heads: int, hidden_size: int,
                   skip_layer_norm: bool = True) -> Path:
    """Write a graph-optimized copy: O1 = ONNX Runtime basic rewrites (portable across providers),
    O2 = O1 plus transformer fusions (attention, layer norm, GELU) from onnxruntime.transformers.
    `skip_layer_norm=False` leaves each residual Add and its LayerNormalization apart (the CPU's
    choice: see service.engines.ort_engine.disabled_optimizers); the CUDA provider fuses them itself."""
    import onnxruntime as ort

    external = bool(external_data_files(raw_model))
    if level == "O1":
        if external:
            raise ExportFailure("O1 writes one protobuf, which cannot hold a model over 2 GB")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(output)
        ort.InferenceSession(str(raw_model), options, providers=["CPUExecutionProvider"])
        return output
    if level == "O2":
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        fusions = FusionOptions("bert")
        fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = skip_layer_norm
        with _quiet():
            optimized = optimize_model(
                str(raw_model), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                opt_level=1, use_gpu=False, optimization_options=fusions,
            )
            # Over 2 GB the weights go to `<output>.data` beside the model.
            optimized.save_model_to_file(str(output), use_external_data_format=external)
        return output
    raise ValueError(f"unknown optimization level {level}")


def convert_fp16(model_path: Path, output: Path) -> Path:
    """fp16 weights and compute with fp32 inputs/outputs, so the server feeds every variant alike."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx") from None
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = onnx.load(str(model_path))
        converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
        onnx.save(converted, str(output))
    return output
