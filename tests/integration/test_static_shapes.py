"""Run-time shape arithmetic taken out of exported graphs (exporters.shapes): exact, and only where
symbolic shape inference proves the dimension is the one the graph would read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters import onnx_export, shapes
from exporters.resolve import resolve
from service.core.manifest import load_manifest
from service.engines.bundle import BundleModel
from tests.conftest import export_quietly


def _const(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _dimension(source: str, index: int, name: str) -> list[onnx.NodeProto]:
    """Unsqueeze(Gather(Shape(source), index)): how exported graphs read one dimension."""
    return [helper.make_node("Shape", [source], [f"{name}/shape"]),
            helper.make_node("Gather", [f"{name}/shape", f"{name}/index"], [f"{name}/scalar"], axis=0),
            helper.make_node("Unsqueeze", [f"{name}/scalar", "axes0"], [name])]


def _split_heads_model(shape_source_dims: list[int | str]) -> onnx.ModelProto:
    """y = Reshape(x, [x.dim0 or other.dim0, x.dim1, 2, 4]) * sqrt(last dim of x, read at run time)."""
    nodes = [*_dimension("shape_source", 0, "d0"), *_dimension("x", 1, "d1"),
             helper.make_node("Concat", ["d0", "d1", "two", "four"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["heads"]),
             helper.make_node("Shape", ["x"], ["x/shape"]),
             helper.make_node("Slice", ["x/shape", "minus_one", "big"], ["last"]),
             helper.make_node("Cast", ["last"], ["last/float"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["last/float"], ["scale"]),
             helper.make_node("Mul", ["heads", "scale"], ["y"])]
    initializers = [_const("axes0", [0]), _const("two", [2]), _const("four", [4]), _const("minus_one", [-1]),
                    _const("big", [2**62])]
    for name in ("d0", "d1"):
        initializers.append(numpy_helper.from_array(np.array(0 if name == "d0" else 1, dtype=np.int64),
                                                    f"{name}/index"))
    graph = helper.make_graph(
        nodes, "split_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8]),
         helper.make_tensor_value_info("shape_source", TensorProto.FLOAT, shape_source_dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 2, 4])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(["y"], feed)[0] for feed in feeds]


def _feeds(other_batch: int | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((batch, sequence, 8)).astype(np.float32),
             "shape_source": np.zeros((other_batch or batch, sequence, 8), np.float32)}
            for batch, sequence in ((1, 1), (3, 5), (2, 17))]


def test_reshape_targets_and_static_dimensions_are_rewritten_exactly() -> None:
    model = _split_heads_model(["batch", "sequence", 8])  # the same batch as x: dimension 0 may be kept
    before = _outputs(model, _feeds())
    replaced = shapes.simplify(model)
    ops = Counter(node.op_type for node in model.graph.node)
    assert replaced == 2  # the Reshape target and the Slice of the static last dimension
    assert ops["Shape"] == ops["Gather"] == ops["Concat"] == ops["Unsqueeze"] == ops["Slice"] == 0
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    target = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}[reshape.input[1]]
    assert target.tolist() == [0, 0, 2, 4]
    for ours, theirs in zip(_outputs(model, _feeds()), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_dimension_read_from_another_tensor_is_kept() -> None:
    # dimension 0 comes from a tensor whose batch is another symbol: keeping x's own would be wrong.
    model = _split_heads_model(["other_batch", "sequence", 8])
    before = _outputs(model, _feeds(other_batch=1))
    replaced = shapes.simplify(model)
    assert replaced == 1  # only the static last dimension
    reshape = next(node for node in model.graph.node if node.op_type == "Reshape")
    assert any(node.op_type == "Concat" and node.output[0] == reshape.input[1] for node in model.graph.node)
    for ours, theirs in zip(_outputs(model, _feeds(other_batch=1)), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_tiny_bert_export_loses_its_shape_arithmetic(work_dir: Path, bge_style_source: Path, tmp_path: Path) -> None:
    raw = onnx_export.export_onnx(resolve(str(bge_style_source)), work_dir / "static-shapes-raw")
    simplified = raw.with_name("simplified.onnx")
    replaced = shapes.simplify_file(raw, simplified)
    before = Counter(node.op_type for node in onnx.load(str(raw)).graph.node)
    after = Counter(node.op_type for node in onnx.load(str(simplified)).graph.node)
    assert replaced >= 8  # two layers: Q, K, V and the merge of the heads, plus the attention scale
    assert after["Shape"] <= 4 < before["Shape"] and after["Concat"] < before["Concat"]
    rng = np.random.default_rng(1)
    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (raw, simplified)]
    for batch, sequence in ((1, 1), (4, 9), (2, 40)):
        ids = rng.integers(5, 90, (batch, sequence)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, sequence // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        names = {node.name for node in sessions[0].get_inputs()}
        ours, theirs = (session.run(None, {k: v for k, v in feeds.items() if k in names})[0] for session in sessions)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_int8_export_records_the_static_shapes_and_falls_back(work_dir: Path, bge_style_source: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = export_quietly(bge_style_source, "tiny-static-shapes", work_dir / "models", int8=True,
                            force=True).bundle_dir
    int8 = load_manifest(bundle).variants["int8"]
    assert int8.quantization is not None and int8.quantization["static_shape_values"] >= 8
    graph = onnx.load(str(bundle / "model_int8.onnx"))
    assert sum(node.op_type == "Shape" and not node.name.startswith("packed/") for node in graph.graph.node) <= 4
    # Its static reshapes let the chosen graph be packed (both layers); the padded one stays beside it if kept.
    packed = int8.quantization["packed_tokens"]
    assert packed is not None and packed["layers"] == 2
    assert (int8.padded_file == "model_int8_padded.onnx") is packed["kept"]

    def broken(source: Path, output: Path) -> int:
        raise RuntimeError("shape inference failed")

    monkeypatch.setattr(shapes, "simplify_file", broken)  # a graph the rewrite cannot handle
    fallback = export_quietly(bge_style_source, "tiny-shapes-as-exported", work_dir / "models",
                             int8=True, force=True).bundle_dir
    manifest = load_manifest(fallback)
    assert manifest.variants["int8"].quantization["static_shape_values"] == 0  # type: ignore[index]
    assert sum(node.op_type == "Shape" for node in onnx.load(str(fallback / "model_int8.onnx")).graph.node) > 4
    # Reshapes computed at run time: packing does not recognise the graph and the variant keeps one padded file.
    assert manifest.variants["int8"].quantization["packed_tokens"] is None  # type: ignore[index]
    assert manifest.variants["int8"].padded_file is None and not (fallback / "model_int8_padded.onnx").exists()
    assert BundleModel(fallback, variant="int8").embed(["still served"]).shape[0] == 1


def test_a_rewritten_graph_whose_outputs_differ_is_not_quantized(work_dir: Path, bge_style_source: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    real = shapes.simplify_file
    perturbed: list[str] = []

    def drifting(source: Path, output: Path) -> int:
        replaced = real(source, output)
        model = onnx.load(str(output))
        weight = next(init for init in model.graph.initializer if init.name == "embeddings.LayerNorm.bias")
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) + 0.5, weight.name))
        onnx.save(model, str(output))
        perturbed.append(weight.name)
        return replaced

    monkeypatch.setattr(shapes, "simplify_file", drifting)
    bundle = export_quietly(bge_style_source, "tiny-shapes-drifting", work_dir / "models",
                            int8=True, force=True).bundle_dir
    assert perturbed  # the rewrite ran and its graph was checked, rather than failing outright
    assert load_manifest(bundle).variants["int8"].quantization["static_shape_values"] == 0  # type: ignore[index]
