"""int8 quantization: a search over configurations against an accuracy budget.

Plain dynamic int8 quantizes each MatMul's activations with one scale for the whole tensor (every
token of every text in the batch). Two kinds of outliers break that:

- LayerNorm outputs (the inputs of the attention projections and the FFN input projection) carry a
  few channels that are much larger than the rest, because of LayerNorm's learned gain. Smoothing
  (SmoothQuant) divides each such channel by a factor and multiplies the matching weight rows by it:
  exact in fp32, and it moves the spread from the activations, quantized per tensor, into the
  weights, quantized per output channel. The factors come from activation ranges measured on
  calibration texts that the accuracy check never sees.
- GELU outputs (the inputs of the FFN output projection) carry outlier tokens. There the MatMul's
  activations are quantized per row, so one token's outlier no longer flattens every other token:
  first rowwise (each token one scale, uint8 from the input's floor, on ONNX Runtime's int8 MatMul
  kernel, the weights rounded against calibration inputs; see _rowwise), then blockwise (ONNX
  Runtime's MatMulNBits with 8-bit weights and int8 compute: per row and per block of input channels,
  256 first, which runs faster, then 128).

The candidates go from fastest to most exact; attention-score MatMuls (activation x activation)
always stay fp32 (MatMulConstBOnly).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from exporters.errors import MissingExtraError
from service.engines.tokenizer import EncodedBatch

BLOCK_SIZE = 128
# The first blockwise candidate quantizes the FFN output projections in blocks of this many input channels:
# ONNX Runtime's MatMulNBits runs wider blocks faster. Measured for all-MiniLM-L6-v2 on the 2-core Zen 4
# EPYC (AVX-512 VNNI), against blocks of 128: the FFN output MatMul alone (104 x 1,536 by 1,536 x 384)
# 569 against 631 us; the whole int8 model, two single-threaded passes at once in alternated windows,
# 1.044x at batch 1, 1.059x at batch 8, 1.050x at batch 32 and 1.036x for 4 texts of 256 tokens; its
# accuracy 0.9987 mean cosine / 0.954 top-10 overlap against 0.9988 / 0.952. Where wider blocks miss the
# target, the search goes on to blocks of 128.
WIDE_BLOCK_SIZE = 256
# Smoothing strengths tried for each smoothed candidate; the one whose outputs on the calibration
# texts agree best with fp32 is used (SmoothQuant's migration strength).
SMOOTH_ALPHAS = (0.5, 0.6, 0.7)
_PROTOBUF_LIMIT = 2_000_000_000


@dataclass
class QuantCandidate:
    name: str
    per_channel: bool = True
    smooth_alpha: float | None = None  # smoothing strength for LayerNorm-fed MatMuls; None: no smoothing
    alpha_choices: tuple[float, ...] = ()  # strengths to choose smooth_alpha from on calibration texts
    blockwise_nodes: list[str] = field(default_factory=list)
    block_size: int = BLOCK_SIZE
    rowwise_nodes: list[str] = field(default_factory=list)
    compensated_nodes: int = 0  # per-channel MatMuls whose weights were rounded against calibration inputs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "per_channel": self.per_channel, "smooth_alpha": self.smooth_alpha,
                "blockwise_nodes": len(self.blockwise_nodes), "rowwise_nodes": len(self.rowwise_nodes),
                "compensated_nodes": self.compensated_nodes}


@dataclass
class Projections:
    """The weight MatMuls of the graph by role, in graph (layer) order."""

    ffn_in: list[str]
    ffn_out: list[str]
    all: list[str]


def cpu_features() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
    }


def reduce_range_for(features: dict[str, bool]) -> bool:
    """Without VNNI, u8 x s8 products can saturate 16-bit accumulators: use 7-bit weights there."""
    return not (features.get("avx512_vnni") or features.get("avx_vnni"))


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx") from None
    return onnx


def _weight_matmuls(model: Any) -> Iterator[tuple[Any, tuple[int, ...]]]:
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2:
            shape = shapes.get(node.input[1])
            if shape is not None and len(shape) == 2:
                yield node, shape


def projections(model_path: Path, hidden_size: int) -> Projections:
    """FFN input projections have weights [hidden, intermediate], FFN outputs [intermediate, hidden]."""
    model = _onnx().load(str(model_path), load_external_data=False)
    ffn_in, ffn_out, everything = [], [], []
    for node, (rows, columns) in _weight_matmuls(model):
        everything.append(node.name)
        if rows == hidden_size and columns > hidden_size:
            ffn_in.append(node.name)
        elif columns == hidden_size and rows > hidden_size:
            ffn_out.append(node.name)
    return Projections(ffn_in, ffn_out, everything)


def candidates(found: Projections) -> list[QuantCandidate]:
    plan = [QuantCandidate("per-channel")]
    if found.ffn_out:
        plan.append(QuantCandidate("smoothed, FFN output rowwise", smooth_alpha=SMOOTH_ALPHAS[0],
                                   alpha_choices=SMOOTH_ALPHAS, rowwise_nodes=list(found.ffn_out)))
        plan.append(QuantCandidate(f"smoothed, FFN output blockwise in blocks of {WIDE_BLOCK_SIZE}",
                                   smooth_alpha=SMOOTH_ALPHAS[0], alpha_choices=SMOOTH_ALPHAS,
                                   blockwise_nodes=list(found.ffn_out), block_size=WIDE_BLOCK_SIZE))
        plan.append(QuantCandidate("smoothed, FFN output blockwise", smooth_alpha=SMOOTH_ALPHAS[0],
                                   alpha_choices=SMOOTH_ALPHAS, blockwise_nodes=list(found.ffn_out)))
    if found.ffn_in:
        plan.append(QuantCandidate("smoothed, FFN input and output blockwise", smooth_alpha=SMOOTH_ALPHAS[0],
                                   alpha_choices=SMOOTH_ALPHAS, blockwise_nodes=[*found.ffn_in, *found.ffn_out]))
    plan.append(QuantCandidate("all MatMuls blockwise", blockwise_nodes=list(found.all)))
    return plan


def layernorm_fed_inputs(model: Any) -> dict[str, list[str]]:
    """Activation tensor -> the weight MatMuls it feeds, for tensors a LayerNormalization produces."""
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    groups: dict[str, list[str]] = {}
    for node, _ in _weight_matmuls(model):
        if producers.get(node.input[0]) == "LayerNormalization":
            groups.setdefault(node.input[0], []).append(node.name)
    return groups


def _probe(source: Path, names: list[str], batches: Sequence[EncodedBatch]) -> Iterator[tuple[str, NDArray[Any]]]:
    """Each named tensor's values at real (unpadded) tokens, batch by batch: [tokens, channels].

    The probing copy of the graph is written beside `source`, so large models keep reading their
    weights from the side file they already have instead of being copied.
    """
    import onnxruntime as ort

    onnx = _onnx()
    model = onnx.load(str(source), load_external_data=False)
    existing = {output.name for output in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = source.parent / f"{source.stem}.calibration.onnx"
    onnx.save(model, str(probe))
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        inputs = {node.name for node in session.get_inputs()}
        for batch in batches:
            arrays = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                      "token_type_ids": batch.token_type_ids}
            outputs = session.run(names, {key: value for key, value in arrays.items() if key in inputs})
            real = batch.attention_mask.astype(bool)
            for name, values in zip(names, outputs, strict=True):
                yield name, np.asarray(values)[real]
    finally:
        probe.unlink(missing_ok=True)


def activation_ranges(source: Path, batches: Sequence[EncodedBatch]) -> dict[str, NDArray[np.float32]]:
    """Per-channel max |x| of every LayerNorm output that feeds weight MatMuls, over real tokens."""
    names = list(layernorm_fed_inputs(_onnx().load(str(source), load_external_data=False)))
    ranges: dict[str, NDArray[np.float32]] = {}
    if names:
        for name, values in _probe(source, names, batches):
            channel_max = np.abs(values).max(axis=0).astype(np.float32)
            ranges[name] = channel_max if name not in ranges else np.maximum(ranges[name], channel_max)
    return ranges


@dataclass
class RowwiseInput:
    """What a rowwise MatMul needs from the calibration texts: its input's lowest value over real tokens
    and the Gram matrix X^T X of those inputs (float64, input channels squared), for the weights'
    error-compensated rounding."""
    floor: float
    gram: NDArray[np.float64]
    rounded: dict[tuple[str, float, str, str], tuple[NDArray[np.int8], NDArray[np.float32]]] = field(
        default_factory=dict)

    def rounding(self, weight: NDArray[np.float32], levels: float, scales: NDArray[np.float32] | None = None,
                 inverse: NDArray[np.float64] | None = None) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
        """compensated_rounding of `weight` (on the grid of `scales` when given), computed once per weight
        content, level count, scales and smoothing: candidates that smooth with the same strength share their
        attention and FFN input projections. With `inverse` (a smoothing's 1/s) the MatMul reads x / s, whose
        Gram matrix is this one scaled by 1/s on both sides."""
        key = (_digest(weight), levels, _digest(scales), _digest(inverse))
        if key not in self.rounded:
            gram = self.gram if inverse is None else self.gram * inverse[:, None] * inverse[None, :]
            self.rounded[key] = compensated_rounding(weight, gram, levels, scales=scales)
        return self.rounded[key]


def _digest(values: NDArray[Any] | None) -> str:
    if values is None:
        return ""
    return hashlib.blake2b(np.ascontiguousarray(values).tobytes(), digest_size=16).hexdigest()


def rowwise_inputs(source: Path, nodes: Sequence[str], batches: Sequence[EncodedBatch],
                   budget_bytes: int = 1 << 29) -> dict[str, RowwiseInput]:
    """The RowwiseInput of each named MatMul. The Gram matrices of large models (bge-m3: 4,096 x 4,096 in
    each of 24 layers) are gathered a few MatMuls at a time, so at most `budget_bytes` of them are held
    at once besides the ones finished."""
    model = _onnx().load(str(source), load_external_data=False)
    initializers = {init.name: init for init in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.name in set(nodes) and node.input[1] in initializers]
    inputs = {node.name: node.input[0] for node in matmuls}
    width = {node.input[0]: int(initializers[node.input[1]].dims[0]) for node in matmuls}
    tensors = sorted(width)
    found: dict[str, RowwiseInput] = {}
    group: list[str] = []
    for index, tensor in enumerate(tensors):
        group.append(tensor)
        held = sum(width[name] ** 2 * 8 for name in group)
        if index + 1 < len(tensors) and held + width[tensors[index + 1]] ** 2 * 8 <= budget_bytes:
            continue
        lowest = {name: np.inf for name in group}
        grams = {name: np.zeros((width[name], width[name])) for name in group}
        for name, values in _probe(source, group, batches):
            lowest[name] = min(lowest[name], float(values.min()))
            rows = values.astype(np.float64)
            grams[name] += rows.T @ rows
        found.update({name: RowwiseInput(lowest[name], grams[name]) for name in group})
        group = []
    return {node: found[tensor] for node, tensor in inputs.items()}


def compensated_rounding(weight: NDArray[np.float32], gram: NDArray[np.float64], levels: float,
                         block: int = 128, scales: NDArray[np.float32] | None = None
                         ) -> tuple[NDArray[np.int8], NDArray[np.float32]]:
    """int8 weights per output column (scale max|w| / levels) rounded so that the product with the
    calibration inputs stays close, not each weight alone (GPTQ, Frantar et al. 2022): input channels
    are rounded one at a time, the most active first, and each one's rounding error is carried into the
    channels not yet rounded, weighted by the inverse of the inputs' Gram matrix (damped by 1% of its
    mean diagonal). On all-MiniLM-L6-v2's FFN output projections it halves the weights' share of the
    error on held-out calibration rows (0.29-1.22% relative to 0.13-0.61%). Returns the int8 weights
    ([inputs, outputs]) and the scales.

    The channels go in blocks of `block` (GPTQ's lazy batch updates): within a block row by row, then
    the block's errors reach the later channels in one product, the same arithmetic in far fewer passes
    over the weights (a 4,096 x 1,024 projection, bge-m3's size: 19 s row by row here). Results are
    kept on `RowwiseInput` by weight content, so the smoothing strengths tried, which leave rowwise
    MatMuls alone, round each projection once. Given `scales` (one per output column, or one for all), the
    weights are rounded on that grid instead, as for the MatMuls ONNX Runtime's quantizer has scaled."""
    work = weight.astype(np.float64).copy()
    if scales is None:
        scales = (np.maximum(np.abs(weight).max(axis=0), 1e-12) / levels).astype(np.float32)
    scales = np.broadcast_to(np.asarray(scales, np.float32), (weight.shape[1],)).copy()
    hessian = gram.copy()
    idle = np.diag(hessian) == 0
    hessian[idle, idle] = 1.0
    hessian[np.diag_indices_from(hessian)] += 0.01 * float(np.mean(np.diag(hessian)))
    order = np.argsort(-np.diag(hessian), kind="stable")
    work, hessian = work[order], hessian[np.ix_(order, order)]
    # Upper Cholesky factor of the inverse: row i gives how channel i's error spreads to the later ones.
    spread = np.linalg.cholesky(np.linalg.inv(hessian)).T
    step = np.where(scales > 0, scales, 1.0).astype(np.float64)  # a column of zeros stays zeros on any grid
    quantized = np.empty(work.shape, np.int8)
    for start in range(0, work.shape[0], block):
        end = min(start + block, work.shape[0])
        errors = np.empty((end - start, work.shape[1]))
        for row in range(start, end):
            rounded = np.clip(np.round(work[row] / step), -levels, levels)
            quantized[row] = rounded
            errors[row - start] = (work[row] - rounded * step) / spread[row, row]
            work[row + 1:end] -= np.outer(spread[row, row + 1:end], errors[row - start])
        work[end:] -= spread[start:end, end:].T @ errors
    restored = np.empty_like(quantized)
    restored[order] = quantized
    return restored, scales


def smooth(model: Any, ranges: dict[str, NDArray[np.float32]], alpha: float, skip: set[str]) -> int:
    """Fold per-channel smoothing factors into `model` in place; returns how many inputs were smoothed.

    For input x feeding MatMuls with weights W: s_j = max|x_j|^alpha / max|W_j,:|^(1 - alpha), then
    x is multiplied by 1/s (a new Mul before its MatMuls) and row j of each W by s_j.
    """
    onnx = _onnx()
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    nodes = {node.name: node for node in model.graph.node}
    insertions: list[tuple[Any, Any]] = []
    for tensor, matmuls in layernorm_fed_inputs(model).items():
        matmuls = [name for name in matmuls if name not in skip]
        if tensor not in ranges or not matmuls:
            continue
        weights = [numpy_helper.to_array(initializers[nodes[name].input[1]]) for name in matmuls]
        weight_max = np.max([np.abs(weight).max(axis=1) for weight in weights], axis=0)
        factors = np.maximum(ranges[tensor], 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
        factors = factors.astype(np.float32)
        inverse = numpy_helper.from_array((1.0 / factors).astype(np.float32), f"{tensor}/smooth_inverse")
        model.graph.initializer.append(inverse)
        smoothed = f"{tensor}/smoothed"
        multiply = onnx.helper.make_node("Mul", [tensor, inverse.name], [smoothed], name=f"{tensor}/Smooth")
        for name, weight in zip(matmuls, weights, strict=True):
            node = nodes[name]
            initializers[node.input[1]].CopyFrom(
                numpy_helper.from_array((weight * factors[:, None]).astype(np.float32), node.input[1]))
            node.input[0] = smoothed
        insertions.append((nodes[matmuls[0]], multiply))
    # Each Mul goes right before the first MatMul it feeds, which keeps the graph topologically sorted.
    ordered = list(model.graph.node)
    for consumer, multiply in insertions:
        ordered.insert(ordered.index(consumer), multiply)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return len(insertions)


@contextmanager
def _quiet_quantization() -> Iterator[None]:
    # The quantization tools log a pre-processing hint and every node through the root logger.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _blockwise(model: Any, nodes: list[str], block_size: int) -> Any:
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )
    except ImportError:
        raise MissingExtraError("onnx-ir") from None
    chosen = set(nodes)
    others = [node.name for node, _ in _weight_matmuls(model) if node.name not in chosen]
    # accuracy_level 4: int8 compute, activations quantized per row and block at run time.
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _node(op: str, inputs: list[str], output: str, domain: str = "", **attributes: Any) -> Any:
    """One ONNX node, named after its output."""
    from onnx import helper

    return helper.make_node(op, inputs, [output], name=f"{output}/{op}", domain=domain, **attributes)


def _rowwise(model: Any, inputs: dict[str, RowwiseInput], reduce_range: bool) -> int:
    """Replace each weight MatMul named in `inputs` by an int8 MatMul whose activations are quantized per
    row (token), unsigned from the node's floor f (its lowest input value on the calibration texts, e.g.
    about -0.17 after GELU): with r = max(x - f) over the row, q = round(255 (x - f) / r), clipped to
    0-255, and y = r / 255 * (q @ Wq) * w_scale + f * colsum(Wq * w_scale), so that every row spends all
    256 levels on the range it uses. The weights are int8 per output column, as elsewhere, rounded against
    the calibration inputs (compensated_rounding). Where the MatMul's only consumer adds a constant bias,
    the f term goes into that bias. Returns how many MatMuls were replaced.

    ONNX Runtime runs the product as `MatMulIntegerToFloat`, its int8 kernel for every other MatMul of
    the graph: for all-MiniLM-L6-v2's FFN output projection (104 x 1,536 by 1,536 x 384, one thread) 320
    against 560 us for `MatMulNBits` in blocks of 256 (the Zen 4 EPYC); the row ranges cost four more
    operators (shift, row maximum, divide, quantize) and one after (the row scale). A row with nothing
    above f (r = 0) gives q undefined and y = 0 * (q @ Wq) + f * colsum: exact.
    """
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in model.graph.output}
    opset = max((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), default=0)
    levels = 63.0 if reduce_range else 127.0  # weights; activations use 0-255 (see reduce_range_for)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), "rowwise/last_axis"),
        numpy_helper.from_array(np.array(1.0 / 255.0, np.float32), "rowwise/level"),
        numpy_helper.from_array(np.array(0, np.uint8), "rowwise/zero"),
        numpy_helper.from_array(np.array(0, np.int8), "rowwise/weight_zero"),
    ])
    ordered: list[Any] = []
    replaced: set[str] = set()
    for node in model.graph.node:
        if node.name not in inputs:
            ordered.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        quantized, scales = inputs[node.name].rounding(weight, levels)
        shift = max(0.0, -inputs[node.name].floor)
        correction = -shift * quantized.astype(np.float64).sum(axis=0) * scales
        name = f"{node.name}/rowwise"
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}/weight"),
            numpy_helper.from_array(scales, f"{name}/weight_scale"),
            numpy_helper.from_array(np.array(shift, np.float32), f"{name}/shift"),
        ])
        ordered.extend([
            _node("Add", [node.input[0], f"{name}/shift"], f"{name}/shifted"),
            # ReduceMax reads its axes from an input since opset 18, from an attribute before.
            _node("ReduceMax", [f"{name}/shifted", "rowwise/last_axis"], f"{name}/row_range", keepdims=1)
            if opset >= 18 else _node("ReduceMax", [f"{name}/shifted"], f"{name}/row_range", keepdims=1, axes=[-1]),
            _node("Div", [f"{name}/shifted", f"{name}/row_range"], f"{name}/scaled"),
            _node("QuantizeLinear", [f"{name}/scaled", "rowwise/level", "rowwise/zero"], f"{name}/quantized"),
            _node("MatMulIntegerToFloat", [f"{name}/quantized", f"{name}/weight", "rowwise/level",
                                           f"{name}/weight_scale", "rowwise/zero", "rowwise/weight_zero"],
                  f"{name}/product", domain="com.microsoft"),
        ])
        bias = _constant_bias(node.output[0], consumers, initializers, graph_outputs, correction.shape)
        if bias is not None:
            folded = numpy_helper.to_array(bias).astype(np.float64) + correction
            bias.CopyFrom(numpy_helper.from_array(folded.astype(np.float32), bias.name))
            ordered.append(_node("Mul", [f"{name}/product", f"{name}/row_range"], node.output[0]))
        else:
            model.graph.initializer.append(numpy_helper.from_array(correction.astype(np.float32),
                                                                   f"{name}/correction"))
            ordered.extend([
                _node("Mul", [f"{name}/product", f"{name}/row_range"], f"{name}/scaled_product"),
                _node("Add", [f"{name}/scaled_product", f"{name}/correction"], node.output[0]),
            ])
        replaced.add(node.input[1])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    still_used = {name for node in ordered for name in node.input}
    unused = [init for init in model.graph.initializer if init.name in replaced and init.name not in still_used]
    for init in unused:
        model.graph.initializer.remove(init)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return sum(1 for node in ordered if node.op_type == "MatMulIntegerToFloat")


def _constant_bias(tensor: str, consumers: dict[str, list[Any]], initializers: dict[str, Any],
                   graph_outputs: set[str], shape: tuple[int, ...]) -> Any | None:
    """The bias initializer that `tensor`'s only consumer, an Add, adds to it, if it is used nowhere else and
    has `shape`; else None."""
    from onnx import numpy_helper

    users = consumers.get(tensor, [])
    if tensor in graph_outputs or len(users) != 1 or users[0].op_type != "Add":
        return None
    others = [name for name in users[0].input if name != tensor]
    if len(others) != 1 or others[0] not in initializers or len(consumers.get(others[0], [])) != 1:
        return None
    bias = initializers[others[0]]
    return bias if numpy_helper.to_array(bias).shape == shape else None


def _compensate(quantized: Any, staged: Any, inputs: dict[str, RowwiseInput]) -> int:
    """Round again, against the calibration inputs (compensated_rounding), the weights of the MatMuls that
    ONNX Runtime's dynamic quantizer wrote as int8 per output column, on the grid it chose (its scales,
    zero points 0): the same graph and kernels, weights that keep each product closer to fp32. The Gram
    matrices in `inputs` are of the unsmoothed inputs; a smoothed MatMul reads x / s, so its Gram matrix is
    scaled by 1/s on both sides (its weights, read from `staged`, already carry s; RowwiseInput.rounding). A
    weight that several nodes share, or with non-zero zero points, keeps the quantizer's rounding. Returns how
    many MatMuls were rounded again."""
    from onnx import numpy_helper

    weights = {init.name: init for init in staged.graph.initializer}
    inverses = {init.name.removesuffix("/smooth_inverse") + "/smoothed": numpy_helper.to_array(init).astype(np.float64)
                for init in staged.graph.initializer if init.name.endswith("/smooth_inverse")}
    written = {init.name: init for init in quantized.graph.initializer}
    staged_uses: dict[str, int] = {}
    for node in staged.graph.node:
        for name in node.input:
            staged_uses[name] = staged_uses.get(name, 0) + 1
    uses: dict[str, int] = {}
    for node in quantized.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rounded = 0
    for node in staged.graph.node:
        if node.op_type != "MatMul" or node.name not in inputs or node.input[1] not in weights:
            continue
        integers = written.get(f"{node.input[1]}_quantized")
        scale = written.get(f"{node.input[1]}_scale")
        zero = written.get(f"{node.input[1]}_zero_point")
        if integers is None or scale is None or uses.get(integers.name) != 1 or staged_uses[node.input[1]] != 1:
            continue
        plain = numpy_helper.to_array(integers)
        if plain.dtype != np.int8 or plain.ndim != 2 or (zero is not None and numpy_helper.to_array(zero).any()):
            continue
        weight = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        levels = float(np.abs(plain).max())  # the quantizer's largest level: 127, or 64 with reduce_range
        better, _ = inputs[node.name].rounding(weight, levels, numpy_helper.to_array(scale),
                                               inverses.get(node.input[0]))
        integers.CopyFrom(numpy_helper.from_array(better, integers.name))
        rounded += 1
    return rounded


def _save(model: Any, path: Path) -> None:
    """Save, with the weights in a side file when they would pass protobuf's 2 GB limit."""
    onnx = _onnx()
    weights = sum(len(init.raw_data) for init in model.graph.initializer)
    if weights > _PROTOBUF_LIMIT:
        onnx.save(model, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(model, str(path))


def quantize(source: Path, output: Path, candidate: QuantCandidate, reduce_range: bool,
             ranges: dict[str, NDArray[np.float32]] | None = None,
             inputs: dict[str, RowwiseInput] | None = None) -> Path:
    """Write the int8 model for `candidate`; `ranges` (from activation_ranges) are needed to smooth,
    `inputs` (from rowwise_inputs) for rowwise MatMuls. Every other MatMul named in `inputs` that ONNX
    Runtime's quantizer makes per-channel int8 gets its weights rounded against them (_compensate);
    `candidate.compensated_nodes` records how many."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx = _onnx()
    compensated = {node: found for node, found in (inputs or {}).items() if node not in set(candidate.rowwise_nodes)}
    with _quiet_quantization():
        dynamic_source = source
        model = None
        if candidate.smooth_alpha is not None or candidate.blockwise_nodes or candidate.rowwise_nodes:
            model = onnx.load(str(source))
            if candidate.smooth_alpha is not None:
                if ranges is None:
                    raise ValueError(f"candidate {candidate.name!r} needs activation ranges to smooth")
                # Blockwise and rowwise MatMuls quantize activations per row (block): smoothing them gains nothing.
                smooth(model, ranges, candidate.smooth_alpha,
                       skip=set(candidate.blockwise_nodes) | set(candidate.rowwise_nodes))
            if candidate.blockwise_nodes:
                model = _blockwise(model, candidate.blockwise_nodes, candidate.block_size)
            if candidate.rowwise_nodes:
                if inputs is None or not set(candidate.rowwise_nodes) <= set(inputs):
                    raise ValueError(f"candidate {candidate.name!r} needs the calibration inputs of its rowwise "
                                     "MatMuls (rowwise_inputs)")
                _rowwise(model, {node: inputs[node] for node in candidate.rowwise_nodes}, reduce_range)
            dynamic_source = output.parent / f"{output.stem}.stage.onnx"
            _save(model, dynamic_source)
        try:
            quantize_dynamic(
                str(dynamic_source),
                str(output),
                weight_type=QuantType.QInt8,
                per_channel=candidate.per_channel,
                reduce_range=reduce_range,
                op_types_to_quantize=["MatMul", "Attention"],
                extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
                # int8 weights of even the largest supported models fit in one protobuf, so no side files.
                use_external_data_format=False,
            )
        finally:
            if dynamic_source != source:
                dynamic_source.unlink(missing_ok=True)
                Path(f"{dynamic_source}.data").unlink(missing_ok=True)
    candidate.compensated_nodes = 0
    if compensated:
        quantized = onnx.load(str(output))
        candidate.compensated_nodes = _compensate(quantized, model if model is not None else onnx.load(str(source)),
                                                  compensated)
        onnx.save(quantized, str(output))  # one file, as the quantizer wrote it
    return output
