"""Shape arithmetic taken out of an exported graph, so the int8 graph runs fewer operators a pass.

The export computes every attention reshape's target at run time: Shape -> Gather -> Unsqueeze ->
Concat for each of the 24 reshapes of a 6-layer model, and the attention scale from the head size the
same way. ONNX Runtime fuses all of that away in the float32 graph (its Attention fusion), but the
int8 graph is quantized from the unfused export, so every such operator runs on every pass, about
a hundred of them for MiniLM. Two rewrites, both exact:

- a Reshape target element read from dimension i of a tensor whose dimension i is, by symbolic shape
  inference, the same as dimension i of the tensor being reshaped becomes 0 ("keep this dimension");
- a dimension read from a tensor where shape inference finds it static becomes that constant, so the
  arithmetic on it (the attention scale's Cast, Sqrt and Div) folds when ONNX Runtime loads the graph.

The operators left without consumers are removed. The caller checks the rewritten graph's outputs
against the original's before using it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from exporters.errors import MissingExtraError


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingExtraError("onnx") from None
    return onnx


def _dims(model: Any) -> dict[str, list[int | str | None]]:
    """Every tensor's dimensions after symbolic shape inference: ints, symbol names, or None."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes: dict[str, list[int | str | None]] = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        shapes[info.name] = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                             for dim in tensor.shape.dim]
    return shapes


_SMALL = 64  # elements: shape arguments are a few integers


def _int64_type() -> int:
    return int(_onnx().TensorProto.INT64)


def _small_integers(tensor: Any) -> bool:
    return bool(tensor.data_type == _int64_type() and int(np.prod(tensor.dims)) <= _SMALL)


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.producer = {output: node for node in model.graph.node for output in node.output}
        # Only small integer tensors can be shape arguments; weights (maybe in side files) are not read.
        self.constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in model.graph.initializer if _small_integers(init)}
        for node in model.graph.node:
            if (node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value"
                    and _small_integers(node.attribute[0].t)):
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def dimension_read(self, tensor: str) -> tuple[str, int] | None:
        """(source tensor, index) when `tensor` is Gather(Shape(source), index) with a constant index,
        possibly through an Unsqueeze, as a scalar or one-element tensor."""
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Unsqueeze":
            node = self.producer.get(node.input[0])
        if node is None or node.op_type != "Gather" or not _axis_zero(node):
            return None
        shape = self.producer.get(node.input[0])
        index = self.constants.get(node.input[1])
        if shape is None or shape.op_type != "Shape" or shape.attribute or index is None or index.size != 1:
            return None
        return shape.input[0], int(index.reshape(-1)[0])

    def static_read(self, node: Any, dims: dict[str, list[int | str | None]]) -> np.ndarray | None:
        """The value of a Gather or Slice of Shape(x) when every dimension it reads is static in x."""
        if node.op_type not in ("Gather", "Slice") or not _axis_zero(node):
            return None
        shape = self.producer.get(node.input[0])
        if shape is None or shape.op_type != "Shape" or shape.attribute or shape.input[0] not in dims:
            return None
        known = dims[shape.input[0]]
        arguments = [self.constants.get(name) for name in node.input[1:]]
        if not arguments or any(argument is None for argument in arguments):
            return None
        if node.op_type == "Gather":
            index = arguments[0]
            assert index is not None
            if any(not -len(known) <= int(position) < len(known) for position in index.reshape(-1)):
                return None
            picked = [known[int(position)] for position in index.reshape(-1)]
            result_shape: tuple[int, ...] = index.shape
        else:
            if len(arguments) < 2 or any(argument.size != 1 for argument in arguments if argument is not None):
                return None
            values = [int(argument.reshape(-1)[0]) for argument in arguments if argument is not None]
            axes = values[2] if len(values) > 2 else 0
            steps = values[3] if len(values) > 3 else 1
            if axes not in (0, -1) or steps != 1:
                return None
            picked = known[values[0]:values[1]]
            result_shape = (len(picked),)
        if not picked or not all(isinstance(value, int) and value > 0 for value in picked):
            return None
        return np.array(picked, dtype=np.int64).reshape(result_shape)


def _axis_zero(node: Any) -> bool:
    return all(attribute.name != "axis" or attribute.i == 0 for attribute in node.attribute)


def simplify(model: Any) -> int:
    """Rewrite `model` in place as the module describes; returns how many values were replaced."""
    onnx = _onnx()
    from onnx import numpy_helper

    dims = _dims(model)
    graph = _Graph(model)
    replaced = 0
    new_constants = []

    def dimension(source: str, index: int) -> int | str | None:
        shape = dims.get(source)
        if shape is None or not -len(shape) <= index < len(shape):
            return None
        return shape[index]

    # Reshape targets built by Concat: keep-dimension zeros where the dimension is the input's own.
    for node in model.graph.node:
        if node.op_type != "Reshape" or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        concat = graph.producer.get(node.input[1])
        data = dims.get(node.input[0])
        if concat is None or concat.op_type != "Concat" or data is None:
            continue
        parts: list[np.ndarray] = []
        for part in concat.input:
            position = sum(len(done) for done in parts)  # the element of the target this part gives
            value = graph.constants.get(part)
            if value is not None and value.ndim == 1 and value.dtype == np.int64:
                parts.append(value)
                continue
            read = graph.dimension_read(part)
            if read is None or position >= len(data):
                break
            wanted = dimension(*read)
            if isinstance(wanted, int) and wanted > 0:
                parts.append(np.array([wanted], dtype=np.int64))  # static: the value itself
            elif isinstance(wanted, str) and wanted == data[position]:
                parts.append(np.array([0], dtype=np.int64))  # the reshaped tensor's own dimension
            else:
                break
        else:
            target = numpy_helper.from_array(np.concatenate(parts).astype(np.int64),
                                             f"{node.name or node.output[0]}/static_shape")
            new_constants.append(target)
            node.input[1] = target.name
            replaced += 1

    # Static dimensions read at run time become constants (ONNX Runtime then folds what follows).
    for node in model.graph.node:
        values = graph.static_read(node, dims)
        if values is None:
            continue
        constant = numpy_helper.from_array(values, f"{node.output[0]}/static")
        new_constants.append(constant)
        for consumer in model.graph.node:
            for slot, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[slot] = constant.name
        replaced += 1

    model.graph.initializer.extend(new_constants)
    _prune(model)
    onnx.checker.check_model(model)
    return replaced


def _prune(model: Any) -> None:
    """Drop nodes none of whose outputs is used, repeatedly, and initializers nothing reads."""
    outputs = {output.name for output in model.graph.output}
    while True:
        used = set(outputs) | {name for node in model.graph.node for name in node.input}
        dead = [node for node in model.graph.node if not any(output in used for output in node.output)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input} | outputs
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def simplify_file(source: Path, output: Path) -> int:
    """Write `source` simplified to `output`, in the same directory when the weights live in side files
    (they are referred to by relative paths and are not read); returns how many values were replaced."""
    onnx = _onnx()
    model = onnx.load(str(source), load_external_data=False)
    replaced = simplify(model)
    onnx.save(model, str(output))
    return replaced
