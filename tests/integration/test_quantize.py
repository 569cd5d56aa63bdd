"""The int8 building blocks on a tiny BERT export: smoothing is exact, blockwise MatMuls are written
as MatMulNBits, and each candidate stays close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exporters import onnx_export, probes, quantize
from exporters.resolve import resolve
from service.engines.tokenizer import EncodedBatch, TextTokenizer

TEXTS = [*probes.ENGLISH, *probes.CHINESE, *probes.VERY_SHORT]


@pytest.fixture(scope="module")
def raw_export(work_dir: Path, bge_style_source: Path) -> Path:
    return onnx_export.export_onnx(resolve(str(bge_style_source)), work_dir / "quantize-raw")


def _batches(raw: Path) -> list[EncodedBatch]:
    tokenizer = TextTokenizer(raw.parent / "tokenizer.json", max_length=64)
    return [tokenizer.pad(tokenizer.encode(TEXTS[start:start + 6])) for start in range(0, len(TEXTS), 6)]


def _run(model_path: Path, batches: list[EncodedBatch]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}
    outputs = []
    for batch in batches:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "token_type_ids": batch.token_type_ids}
        outputs.append(session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in names})[0])
    return outputs


def _cosine(left: np.ndarray, right: np.ndarray) -> float:
    left, right = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
    return float(((left * right).sum(axis=1) / np.linalg.norm(left, axis=1) / np.linalg.norm(right, axis=1)).min())


def test_projections_are_found_by_weight_shape(raw_export: Path) -> None:
    found = quantize.projections(raw_export, hidden_size=32)
    assert len(found.ffn_in) == len(found.ffn_out) == 2  # two layers
    assert all("intermediate" in name for name in found.ffn_in)
    assert all("output/dense" in name and "attention" not in name for name in found.ffn_out)
    assert len(found.all) == 12  # Q, K, V, attention output, FFN in, FFN out per layer
    plan = quantize.candidates(found)
    names = [candidate.name for candidate in plan]
    assert names[0] == "per-channel" and names[-1] == "all MatMuls blockwise"
    # The FFN output projections blockwise: wider blocks (faster) first, then the narrower, more exact ones.
    assert [(candidate.blockwise_nodes, candidate.block_size) for candidate in plan[1:3]] == [
        (found.ffn_out, quantize.WIDE_BLOCK_SIZE), (found.ffn_out, quantize.BLOCK_SIZE)]
    assert quantize.WIDE_BLOCK_SIZE > quantize.BLOCK_SIZE


def test_smoothing_changes_nothing_in_fp32(raw_export: Path, tmp_path: Path) -> None:
    batches = _batches(raw_export)
    ranges = quantize.activation_ranges(raw_export, batches)
    # Per layer: the LayerNorm before it feeds Q/K/V, its attention LayerNorm feeds the FFN input.
    assert len(ranges) == 4
    assert all(values.shape == (32,) and (values > 0).all() for values in ranges.values())
    assert not list(raw_export.parent.glob("*.calibration.onnx"))  # the probing copy is removed

    model = onnx.load(str(raw_export))
    assert quantize.smooth(model, ranges, alpha=0.5, skip=set()) == 4
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(model, str(smoothed))
    assert sum(node.op_type == "Mul" and node.name.endswith("/Smooth") for node in model.graph.node) == 4
    for before, after in zip(_run(raw_export, batches), _run(smoothed, batches), strict=True):
        assert np.allclose(before, after, rtol=1e-4, atol=1e-4)


def test_each_candidate_writes_a_close_int8_model(raw_export: Path, tmp_path: Path) -> None:
    batches = _batches(raw_export)
    ranges = quantize.activation_ranges(raw_export, batches)
    reference = _run(raw_export, batches)
    found = quantize.projections(raw_export, hidden_size=32)
    for index, candidate in enumerate(quantize.candidates(found)):
        output = quantize.quantize(raw_export, tmp_path / f"int8_{index}.onnx", candidate, False, ranges)
        nodes = onnx.load(str(output)).graph.node
        ops = [node.op_type for node in nodes]
        assert ops.count("MatMulNBits") == len(candidate.blockwise_nodes), candidate.name
        blocks = [onnx.helper.get_attribute_value(attribute) for node in nodes if node.op_type == "MatMulNBits"
                  for attribute in node.attribute if attribute.name == "block_size"]
        assert blocks == [candidate.block_size] * len(candidate.blockwise_nodes), candidate.name
        # Everything that is not blockwise is dynamic int8; attention-score MatMuls stay fp32.
        assert ops.count("MatMulNBits") + ops.count("MatMulInteger") == 12, candidate.name
        assert not list(tmp_path.glob("*.stage.onnx*"))
        for before, after in zip(reference, _run(output, batches), strict=True):
            assert _cosine(before, after) >= 0.98, candidate.name


def test_smoothing_needs_ranges(raw_export: Path, tmp_path: Path) -> None:
    candidate = quantize.QuantCandidate("smoothed", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="activation ranges"):
        quantize.quantize(raw_export, tmp_path / "int8.onnx", candidate, False, None)


def test_models_past_the_protobuf_limit_are_staged_with_a_side_file(raw_export: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """bge-m3 sized models: the smoothed/blockwise stage keeps its weights beside it, then goes away."""
    batches = _batches(raw_export)
    ranges = quantize.activation_ranges(raw_export, batches)
    found = quantize.projections(raw_export, hidden_size=32)
    saved: list[Path] = []
    original = quantize._save

    def spy(model: object, path: Path) -> None:
        original(model, path)
        saved.extend(path.parent.glob(f"{path.name}*"))

    monkeypatch.setattr(quantize, "_PROTOBUF_LIMIT", 1000)
    monkeypatch.setattr(quantize, "_save", spy)
    candidate = quantize.candidates(found)[1]
    output = quantize.quantize(raw_export, tmp_path / "int8.onnx", candidate, False, ranges)
    assert {path.name for path in saved} == {"int8.stage.onnx", "int8.stage.onnx.data"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["int8.onnx"]
    for before, after in zip(_run(raw_export, batches), _run(output, batches), strict=True):
        assert _cosine(before, after) >= 0.98
