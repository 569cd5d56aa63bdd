"""Packed tokens: the rewritten graph computes what the padded one does at every real token, for each
supported architecture, and leaves graphs it does not recognise alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters import onnx_export, packing, shapes
from exporters.resolve import resolve
from service.engines.tokenizer import EncodedBatch, TextTokenizer
from tests.helpers import tiny_models

# Lengths from a single word to past the tokenizer's limit, so that most positions of the batch are padding.
TEXTS = ["a", "the quick brown fox", "one two three four five six seven eight nine ten " * 8, "北京", "x y z"]


def _static_export(source: Path, directory: Path) -> Path:
    """The graph the int8 search quantizes: the raw export with its shape arithmetic made static."""
    raw = onnx_export.export_onnx(resolve(str(source)), directory)
    target = raw.with_name("static.onnx")
    shapes.simplify_file(raw, target)
    return target


def _batch(model: Path) -> EncodedBatch:
    tokenizer = TextTokenizer(model.parent / "tokenizer.json", max_length=64)
    return tokenizer.pad(tokenizer.encode(TEXTS))


def _run(model: Path | bytes, batch: EncodedBatch) -> np.ndarray:
    session = ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                   providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "token_type_ids": batch.token_type_ids}
    return np.asarray(session.run(None, {key: value for key, value in feeds.items() if key in names})[0])


def _check_exact(static: Path, gathers_per_layer: int = 4) -> onnx.ModelProto:
    batch = _batch(static)
    assert batch.attention_mask.mean() < 0.6  # mostly padding: the rewrite is exercised
    model = onnx.load(str(static))
    assert packing.pack(model) == 2  # two layers
    ops = [node.op_type for node in model.graph.node]
    # One gather into packed rows, per layer three back for attention (one for fused attention) and one
    # after it, one for the output.
    assert ops.count("NonZero") == 1 and sum(node.op_type == "Gather" and node.name.startswith("packed/")
                                             for node in model.graph.node) == 1 + 2 * gathers_per_layer + 1
    onnx.checker.check_model(model)
    before, after = _run(static, batch), _run(model.SerializeToString(), batch)
    assert before.shape == after.shape
    real = batch.attention_mask.astype(bool)
    assert np.abs(before[real] - after[real]).max() < 1e-5
    assert np.isfinite(after).all()  # padding positions hold a copy of a real token's row, never read
    return model


def test_packed_bert_graph_computes_the_same_real_tokens(work_dir: Path, bge_style_source: Path) -> None:
    _check_exact(_static_export(bge_style_source, work_dir / "packing-bert"))


@pytest.mark.parametrize("model_type", ["roberta", "mpnet", "distilbert"])
def test_packed_graphs_of_other_architectures(work_dir: Path, model_type: str) -> None:
    source = tiny_models.other_encoder(work_dir / f"packing-src-{model_type}", model_type)
    _check_exact(_static_export(source, work_dir / f"packing-{model_type}"))


def test_packed_cross_encoder_scores_the_same(work_dir: Path, cross_encoder_source: Path) -> None:
    """A classifier head reads the first token of the padded output, as before."""
    static = _static_export(cross_encoder_source, work_dir / "packing-cross")
    tokenizer = TextTokenizer(static.parent / "tokenizer.json", max_length=64)
    batch = tokenizer.pad(tokenizer.encode([("query", text) for text in TEXTS]))
    model = onnx.load(str(static))
    assert packing.pack(model) == 2
    assert np.allclose(_run(static, batch), _run(model.SerializeToString(), batch), atol=1e-5)


def test_packed_fused_float32_graph_computes_the_same_real_tokens(work_dir: Path, bge_style_source: Path) -> None:
    """The float32 variant's graph: ONNX Runtime's fused Attention and EmbedLayerNormalization, each residual
    Add and LayerNormalization apart. Attention reads and writes padded [batch, length, hidden] tensors."""
    raw = onnx_export.export_onnx(resolve(str(bge_style_source)), work_dir / "packing-fused")
    fused = onnx_export.optimize_graph(raw, "O2", raw.with_name("fused.onnx"), num_heads=0, hidden_size=0,
                                       skip_layer_norm=False)
    ops = {node.op_type for node in onnx.load(str(fused)).graph.node}
    assert {"Attention", "EmbedLayerNormalization"} <= ops and "SkipLayerNormalization" not in ops
    model = _check_exact(fused, gathers_per_layer=2)
    assert [node.op_type for node in model.graph.node].count("Attention") == 2


def test_graphs_of_another_shape_are_left_alone(work_dir: Path, bge_style_source: Path) -> None:
    """A fused graph with SkipLayerNormalization (which takes padded input itself) and a graph whose reshapes
    are computed at run time are not rewritten."""
    raw = onnx_export.export_onnx(resolve(str(bge_style_source)), work_dir / "packing-raw")
    fused = onnx_export.optimize_graph(raw, "O2", work_dir / "packing-raw" / "fused.onnx", num_heads=0,
                                       hidden_size=0)
    for path in (raw, fused):
        model = onnx.load(str(path))
        before = model.SerializeToString()
        assert packing.pack(model) == 0
        assert model.SerializeToString() == before
    assert packing.pack_file(raw, work_dir / "packing-raw" / "never.onnx") == 0
    assert not (work_dir / "packing-raw" / "never.onnx").exists()
