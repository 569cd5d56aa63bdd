"""int8 dynamic quantization: a search over configurations against an accuracy budget.

Dynamic int8 quantizes activations per tensor at run time. The error concentrates in the FFN
output projections, whose inputs (GELU outputs) carry outliers, and most in the first layers. The
candidates therefore keep more and more of those projections in fp32, from fastest to most exact.
Activation x activation MatMuls (attention scores) always stay fp32 (MatMulConstBOnly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporters.errors import MissingExtraError


@dataclass
class QuantCandidate:
    name: str
    per_channel: bool
    keep_fp32_nodes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "per_channel": self.per_channel, "fp32_nodes": len(self.keep_fp32_nodes)}


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


def ffn_output_matmuls(model_path: Path, hidden_size: int) -> list[str]:
    """Names of the FFN down-projection MatMuls, in layer order: weight [intermediate, hidden]."""
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx") from None
    model = onnx.load(str(model_path), load_external_data=False)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        shape = shapes.get(node.input[1])
        if shape and len(shape) == 2 and shape[1] == hidden_size and shape[0] > hidden_size:
            names.append(node.name)
    return names


def candidates(ffn_outputs: list[str]) -> list[QuantCandidate]:
    layers = len(ffn_outputs)
    plan = [QuantCandidate("per-channel", True)]
    for keep in sorted({1, 2, max(1, layers // 2)}):
        if keep < layers:
            plan.append(QuantCandidate(f"per-channel, FFN output fp32 in first {keep} layer(s)", True,
                                       ffn_outputs[:keep]))
    plan.append(QuantCandidate("per-channel, all FFN outputs fp32", True, list(ffn_outputs)))
    return plan


def quantize(source: Path, output: Path, candidate: QuantCandidate, reduce_range: bool) -> Path:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a pre-processing hint through the root logger on every call.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        _quantize(quantize_dynamic, QuantType, onnx, source, output, candidate, reduce_range)
    finally:
        logging.disable(previous)
    return output


def _quantize(quantize_dynamic: Any, quant_type: Any, onnx: Any, source: Path, output: Path,
              candidate: QuantCandidate, reduce_range: bool) -> None:
    quantize_dynamic(
        str(source),
        str(output),
        weight_type=quant_type.QInt8,
        per_channel=candidate.per_channel,
        reduce_range=reduce_range,
        op_types_to_quantize=["MatMul", "Attention"],
        nodes_to_exclude=candidate.keep_fp32_nodes,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        # int8 weights of even the largest supported models fit in one protobuf, so no side files.
        use_external_data_format=False,
    )
