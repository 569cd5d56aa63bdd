"""The int8 building blocks on a tiny BERT export: smoothing is exact, blockwise MatMuls are written
as MatMulNBits, rowwise ones compute what their arithmetic says, and each candidate stays close to fp32."""

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
    # The FFN output projections rowwise (the fastest), then blockwise: wider blocks (faster) first, then
    # the narrower, more exact ones.
    assert plan[1].rowwise_nodes == found.ffn_out and not plan[1].blockwise_nodes
    assert [(candidate.blockwise_nodes, candidate.block_size) for candidate in plan[2:4]] == [
        (found.ffn_out, quantize.WIDE_BLOCK_SIZE), (found.ffn_out, quantize.BLOCK_SIZE)]
    assert not any(candidate.rowwise_nodes for candidate in plan[2:])
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
    inputs = quantize.rowwise_inputs(raw_export, found.ffn_out, batches)
    for index, candidate in enumerate(quantize.candidates(found)):
        output = quantize.quantize(raw_export, tmp_path / f"int8_{index}.onnx", candidate, False, ranges, inputs)
        nodes = onnx.load(str(output)).graph.node
        ops = [node.op_type for node in nodes]
        assert ops.count("MatMulNBits") == len(candidate.blockwise_nodes), candidate.name
        assert ops.count("MatMulIntegerToFloat") == len(candidate.rowwise_nodes), candidate.name
        blocks = [onnx.helper.get_attribute_value(attribute) for node in nodes if node.op_type == "MatMulNBits"
                  for attribute in node.attribute if attribute.name == "block_size"]
        assert blocks == [candidate.block_size] * len(candidate.blockwise_nodes), candidate.name
        # Everything that is neither blockwise nor rowwise is dynamic int8; attention-score MatMuls stay fp32.
        assert ops.count("MatMulNBits") + ops.count("MatMulIntegerToFloat") + ops.count("MatMulInteger") == 12, \
            candidate.name
        assert not list(tmp_path.glob("*.stage.onnx*"))
        for before, after in zip(reference, _run(output, batches), strict=True):
            assert _cosine(before, after) >= 0.98, candidate.name


def test_smoothing_needs_ranges(raw_export: Path, tmp_path: Path) -> None:
    candidate = quantize.QuantCandidate("smoothed", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="activation ranges"):
        quantize.quantize(raw_export, tmp_path / "int8.onnx", candidate, False, None)


def test_rowwise_needs_its_calibration_inputs(raw_export: Path, tmp_path: Path) -> None:
    found = quantize.projections(raw_export, hidden_size=32)
    candidate = quantize.QuantCandidate("rowwise", rowwise_nodes=found.ffn_out)
    only_one = {found.ffn_out[0]: quantize.RowwiseInput(-0.1, np.eye(64))}
    with pytest.raises(ValueError, match="calibration inputs"):
        quantize.quantize(raw_export, tmp_path / "int8.onnx", candidate, False, None, only_one)


@pytest.mark.parametrize("budget_bytes", [1 << 29, 1])
def test_rowwise_inputs_are_floors_and_gram_matrices_of_real_tokens(raw_export: Path, budget_bytes: int) -> None:
    """budget_bytes=1 gathers one MatMul at a time (as for bge-m3's Gram matrices): the same result."""
    batches = _batches(raw_export)
    found = quantize.projections(raw_export, hidden_size=32)
    inputs = quantize.rowwise_inputs(raw_export, found.ffn_out, batches, budget_bytes=budget_bytes)
    assert sorted(inputs) == sorted(found.ffn_out)
    # The FFN output projections read GELU outputs, whose lowest value is -0.16997 (at x = -0.75).
    assert all(-0.17 <= found_input.floor < -0.05 for found_input in inputs.values()), inputs
    assert not list(raw_export.parent.glob("*.calibration.onnx"))
    # Only real tokens count: the floor and X^T X of the batches are those of their unpadded rows.
    model = onnx.load(str(raw_export))
    tensor = next(node.input[0] for node in model.graph.node if node.name == found.ffn_out[0])
    model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}
    rows = []
    for batch in batches:
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "token_type_ids": batch.token_type_ids}
        values = session.run([tensor], {k: v for k, v in feeds.items() if k in names})[0]
        rows.append(values[batch.attention_mask.astype(bool)].astype(np.float64))
    real = np.concatenate(rows)
    first = inputs[found.ffn_out[0]]
    assert first.floor == pytest.approx(float(real.min()), abs=1e-7)
    assert first.gram.shape == (real.shape[1], real.shape[1])
    assert np.allclose(first.gram, real.T @ real, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("levels", [127.0, 63.0])
def test_compensated_rounding_keeps_the_product_closer_than_plain_rounding(levels: float) -> None:
    """Fitted on some rows of correlated inputs, checked on others: the product with the inputs moves
    less than with each weight rounded alone, on the same grid (per-column scales, integers in range)."""
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((48, 48)) * (rng.random(48) < 0.2)[None, :] + np.eye(48)
    inputs = np.maximum(rng.standard_normal((4000, 48)) @ mixing, -0.17)
    weight = (rng.standard_normal((48, 16)) * 0.2).astype(np.float32)
    fit, held = inputs[:2000], inputs[2000:]
    quantized, scales = quantize.compensated_rounding(weight, fit.T @ fit, levels)
    assert quantized.dtype == np.int8 and np.abs(quantized).max() <= levels
    assert np.allclose(scales, np.abs(weight).max(axis=0) / levels)
    plain = np.clip(np.round(weight / scales), -levels, levels)

    def error(integers: np.ndarray) -> float:
        return float(np.linalg.norm(held @ (integers * scales) - held @ weight) / np.linalg.norm(held @ weight))

    assert error(quantized) < 0.8 * error(plain), (error(quantized), error(plain))
    # A weight grid that represents the weights exactly is kept as it is.
    exact = np.round(weight / scales) * scales
    kept, _ = quantize.compensated_rounding(exact.astype(np.float32), fit.T @ fit, levels)
    assert np.array_equal(kept, plain.astype(np.int8))


def test_compensated_rounding_in_blocks_is_row_by_row_rounding() -> None:
    """Blocks of channels (the lazy batch updates) give what one channel at a time gives, including a last
    block shorter than the rest."""
    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((900, 300)) @ (np.eye(300) + 0.3 * rng.standard_normal((300, 300)))
    weight = (rng.standard_normal((300, 20)) * 0.1).astype(np.float32)
    blocked, scales = quantize.compensated_rounding(weight, inputs.T @ inputs, 127.0, block=128)
    whole, _ = quantize.compensated_rounding(weight, inputs.T @ inputs, 127.0, block=300)
    assert np.array_equal(blocked, whole)
    plain = np.round(weight / scales).astype(np.int8)
    assert (blocked != plain).mean() > 0.05  # the comparison means something: compensation moved weights


def test_compensated_rounding_on_a_given_grid() -> None:
    """On scales chosen elsewhere (the quantizer's), the integers stay on that grid and within range, the
    product still moves less than with plain rounding on the same grid, and a column of zeros stays zeros."""
    rng = np.random.default_rng(8)
    inputs = rng.standard_normal((3000, 40)) @ (np.eye(40) + 0.4 * rng.standard_normal((40, 40)))
    weight = (rng.standard_normal((40, 12)) * 0.1).astype(np.float32)
    weight[:, 3] = 0.0
    given = (np.abs(weight).max(axis=0) / 64.0 * 1.05).astype(np.float32)
    given[3] = 0.0  # what a quantizer may write for an all-zero column
    fit, held = inputs[:1500], inputs[1500:]
    quantized, scales = quantize.compensated_rounding(weight, fit.T @ fit, 64.0, scales=given)
    assert np.array_equal(scales, given)
    assert np.abs(quantized).max() <= 64 and not quantized[:, 3].any()
    plain = np.clip(np.round(weight / np.where(given > 0, given, 1)), -64, 64)

    def error(integers: np.ndarray) -> float:
        return float(np.linalg.norm(held @ (integers * given) - held @ weight) / np.linalg.norm(held @ weight))

    assert error(quantized) < 0.8 * error(plain), (error(quantized), error(plain))
    one_scale, _ = quantize.compensated_rounding(weight, fit.T @ fit, 64.0, scales=np.float32(given.max()))
    assert np.abs(one_scale).max() <= 64  # one scale for every column (per-tensor weights) is accepted too


def _matmul_integers(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per MatMulInteger with constant weights: its int8 weights and their scales."""
    stored = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    return {node.name: (stored[node.input[1]], stored[node.input[1].removesuffix("_quantized") + "_scale"])
            for node in model.graph.node if node.op_type == "MatMulInteger" and node.input[1] in stored}


def test_per_channel_weights_are_rounded_against_calibration_inputs(raw_export: Path, tmp_path: Path) -> None:
    """With calibration inputs for every MatMul, the ones the dynamic quantizer makes per-channel int8 keep its
    scales but get compensated integers; for a smoothed MatMul they are those of the Gram matrix of its
    smoothed inputs, gathered directly from the smoothed graph. The model lands closer to fp32 on the texts."""
    batches = _batches(raw_export)
    ranges = quantize.activation_ranges(raw_export, batches)
    found = quantize.projections(raw_export, hidden_size=32)
    reference = _run(raw_export, batches)
    every = quantize.rowwise_inputs(raw_export, found.all, batches)
    plain_candidate, candidate = quantize.candidates(found)[1], quantize.candidates(found)[1]
    plain = quantize.quantize(raw_export, tmp_path / "plain.onnx", plain_candidate, False, ranges,
                              {node: every[node] for node in found.ffn_out})
    assert plain_candidate.compensated_nodes == 0
    better = quantize.quantize(raw_export, tmp_path / "compensated.onnx", candidate, False, ranges, every)
    assert candidate.compensated_nodes == 10  # 12 weight MatMuls, the 2 FFN output projections rowwise
    assert candidate.describe()["compensated_nodes"] == 10
    before, after = _matmul_integers(onnx.load(str(plain))), _matmul_integers(onnx.load(str(better)))
    assert before.keys() == after.keys() and len(after) == 10
    moved = 0
    for name, (integers, scales) in after.items():
        assert np.array_equal(scales, before[name][1]) and np.abs(integers).max() <= 127
        moved += int((integers != before[name][0]).sum())
    assert moved > 0

    # The smoothed graph's own inputs give the same integers as the scaled Gram matrices.
    smoothed = onnx.load(str(raw_export))
    quantize.smooth(smoothed, ranges, candidate.smooth_alpha or 0.0, skip=set(found.ffn_out))
    smoothed_path = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(smoothed_path))
    direct = quantize.rowwise_inputs(smoothed_path, found.ffn_in, batches)
    weights = {init.name: onnx.numpy_helper.to_array(init) for init in smoothed.graph.initializer}
    nodes = {node.name: node for node in smoothed.graph.node}
    for name in found.ffn_in:
        assert nodes[name].input[0].endswith("/smoothed")
        integers, scales = after[f"{name}_quant"]
        expected, _ = quantize.compensated_rounding(weights[nodes[name].input[1]], direct[name].gram,
                                                    127.0, scales=scales)
        assert (expected == integers).mean() > 0.99

    def error(path: Path) -> float:
        return float(np.mean([np.abs(out - ref).mean() for out, ref in zip(_run(path, batches), reference,
                                                                         strict=True)]))

    assert error(better) < error(plain), (error(better), error(plain))


def test_rowwise_input_rounds_each_weight_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = quantize.compensated_rounding

    def counted(weight: np.ndarray, gram: np.ndarray, levels: float, block: int = 128,
                scales: np.ndarray | None = None) -> object:
        calls.append(1)
        return original(weight, gram, levels, block, scales)

    monkeypatch.setattr(quantize, "compensated_rounding", counted)
    rng = np.random.default_rng(6)
    found = quantize.RowwiseInput(-0.17, np.eye(16) * 4.0)
    weight = rng.standard_normal((16, 8)).astype(np.float32)
    first = found.rounding(weight, 127.0)
    assert found.rounding(weight.copy(), 127.0) is first and len(calls) == 1
    found.rounding(weight, 63.0)
    found.rounding(weight * 2, 127.0)
    assert len(calls) == 3
    # On a given grid, and for a smoothed input (x / s: the Gram matrix scaled by 1/s on both sides).
    scales = (np.abs(weight).max(axis=0) / 120.0).astype(np.float32)
    inverse = rng.uniform(0.5, 2.0, 16)
    smoothed = found.rounding(weight, 127.0, scales, inverse)
    assert found.rounding(weight, 127.0, scales.copy(), inverse.copy()) is smoothed and len(calls) == 4
    expected, _ = original(weight, found.gram * inverse[:, None] * inverse[None, :], 127.0, scales=scales)
    assert np.array_equal(smoothed[0], expected) and np.array_equal(smoothed[1], scales)
    found.rounding(weight, 127.0, scales)
    found.rounding(weight, 127.0, scales, inverse * 2)
    assert len(calls) == 6


def _one_matmul(weight: np.ndarray, bias: np.ndarray | None = None, opset: int = 18) -> onnx.ModelProto:
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["product" if bias is not None else "y"], name="projection")]
    initializers = [onnx.numpy_helper.from_array(weight, "w")]
    if bias is not None:
        nodes.append(onnx.helper.make_node("Add", ["b", "product"], ["y"], name="bias"))
        initializers.append(onnx.numpy_helper.from_array(bias, "b"))
    graph = onnx.helper.make_graph(
        nodes, "one",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "tokens", weight.shape[0]])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "tokens", weight.shape[1]])],
        initializers)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


@pytest.mark.parametrize(("reduce_range", "with_bias", "opset"),
                         [(False, False, 18), (True, False, 18), (False, True, 18), (False, True, 17)])
def test_rowwise_matmul_computes_its_arithmetic(reduce_range: bool, with_bias: bool, opset: int) -> None:
    """Per row: r = max(x - f), q = round(255 (x - f) / r); y = r / 255 * q @ Wq * w_scale + f * colsum(Wq
    * w_scale); the weights int8 per column (7-bit with reduce_range). Each row spends all 256 levels. A
    bias added right after takes the f term, which saves an operator. Before opset 18 the row maximum's
    axis is an attribute."""
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((64, 24)) * 0.1).astype(np.float32)
    bias = (rng.standard_normal(24) * 0.1).astype(np.float32) if with_bias else None
    floor = -0.17
    x = np.maximum(rng.standard_normal((2, 5, 64)).astype(np.float32), floor)
    x[0, 1] = np.maximum(x[0, 1] * 40, floor)  # an outlier token: one scale per tensor would flatten the rest
    x[1, 2] = floor  # a row at the floor everywhere: exact
    model = _one_matmul(weight, bias, opset)
    gram = x.reshape(-1, 64).astype(np.float64).T @ x.reshape(-1, 64)
    assert quantize._rowwise(model, {"projection": quantize.RowwiseInput(floor, gram)}, reduce_range) == 1
    initializer_names = {init.name for init in model.graph.initializer}
    assert "w" not in initializer_names  # the fp32 weights are gone
    assert ("projection/rowwise/correction" in initializer_names) is not with_bias
    assert [node.op_type for node in model.graph.node].count("Add") == 2  # the shift, then bias or correction
    model.graph.output.append(onnx.helper.make_tensor_value_info("projection/rowwise/quantized",
                                                                  onnx.TensorProto.UINT8, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, quantized = session.run(None, {"x": x})

    levels = 63.0 if reduce_range else 127.0
    w_q, w_scale = quantize.compensated_rounding(weight, gram, levels)
    w_q = w_q.astype(np.float64)
    stored = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    assert np.array_equal(stored["projection/rowwise/weight"], w_q.astype(np.int8))
    shifted = (x - floor).astype(np.float64)
    row_range = shifted.max(axis=-1, keepdims=True)
    real = row_range[..., 0] > 0
    q = np.clip(np.round(255 * shifted / np.where(row_range > 0, row_range, 1)), 0, 255)
    expected = row_range / 255 * (q @ (w_q * w_scale)) + floor * (w_q * w_scale).sum(axis=0)
    if bias is not None:
        expected += bias
    # Rounding at exact halves may differ by one level between float32 and float64.
    assert np.abs(quantized[real].astype(int) - q[real]).max() <= 1
    assert (quantized[real] != q[real]).mean() < 0.01
    assert np.allclose(y, expected, rtol=1e-3, atol=1e-4)
    assert (quantized[real].max(axis=-1) == 255).all() and real.sum() == 9
    assert np.allclose(y[1, 2], x[1, 2] @ (w_q * w_scale) + (0 if bias is None else bias), atol=1e-5)
    # Close to fp32 on every row, the ordinary ones included, despite the outlier token.
    reference = x @ weight + (0 if bias is None else bias)
    error = np.abs(y - reference).max(axis=-1) / np.abs(reference).max(axis=-1)
    assert error.max() < (0.03 if reduce_range else 0.015), error


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
    inputs = quantize.rowwise_inputs(raw_export, found.ffn_out, batches)
    candidate = quantize.candidates(found)[1]  # smoothed, rowwise
    output = quantize.quantize(raw_export, tmp_path / "int8.onnx", candidate, False, ranges, inputs)
    assert {path.name for path in saved} == {"int8.stage.onnx", "int8.stage.onnx.data"}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["int8.onnx"]
    for before, after in zip(_run(raw_export, batches), _run(output, batches), strict=True):
        assert _cosine(before, after) >= 0.98
