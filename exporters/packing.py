"""Packed tokens: the fp32 and int8 graphs compute their token-wise work on real tokens only, not on padding.

A batch of texts of different lengths is padded to its longest, and every padding position costs as
much as a real token in each projection, LayerNorm and FFN (for 8-32 short texts a pass, 5-25% of the
tokens; for texts of 5-250 words, over a third). Those operators treat tokens independently, so the
exporter rewrites the fp32 and int8 graphs to run them on a [real tokens, hidden] matrix:

- after the embeddings' LayerNormalization, the padded [batch, length, hidden] output is flattened and
  the real tokens gathered (their positions from `NonZero` of the attention mask);
- attention, which mixes the tokens of a text, still runs padded: before each reshape that splits the
  queries, keys or values into heads, the packed rows are gathered back in [batch x length] order (every
  padding position reads one extra packed row, a copy of the first token, which attention masks), and
  the reshape that merges the heads again gives [batch x length, hidden] rows whose real ones are
  gathered; in a graph whose attention ONNX Runtime fused (the float32 variant's `Attention`, which also
  projects the queries, keys and values), the rows are gathered back into [batch, length, hidden] before
  each `Attention` and its output's real rows gathered after it, and the embeddings' fused
  `EmbedLayerNormalization` takes the first LayerNormalization's place;
- after the last LayerNormalization the output is padded again (padding positions hold that copy of
  the first token; pooling and the classifier heads never read them), so the graph's inputs and outputs
  are what they were and nothing else changes. Operators that read only a padded tensor's shape (`Shape`:
  MPNet's relative position bias takes the batch and length from the embeddings' output) keep reading
  the padded tensor.

Exact in fp32 (padding rows never reach a real token: attention masks them). In int8 it is also more
exact than the padded graph: the dynamic per-tensor activation scales are taken over real tokens only,
no longer over padding rows whose values are whatever the model makes of them. The rewrite applies to the
unfused graphs this exporter quantizes (a head-splitting reshape with a constant [0, -1, heads, head
size] target, three per layer, and a head-merging one with [0, 0 or -1, hidden], one per layer) and to
the fused float32 graph above; any other graph is left as it is (`pack` returns 0): one with
`SkipLayerNormalization`, `MultiHeadAttention` or `QAttention`, or with both fused and unfused attention.
The exporter uses a packed graph only if it passes its variant's checks again.

A lone pass is mostly one text, with no padding to save. There the added operators (about 40 for
MiniLM's six layers) cost an int8 pass of ~1.3 ms about 5% on two threads, so int8 bundles keep their
padded graph for lone passes; an fp32 pass of ~3 ms measured level, so fp32 keeps one packed file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

Checked = TypeVar("Checked")

# Fused operators that take [batch, length, hidden] inputs themselves and are not handled: a graph with any
# of them is not rewritten. (`Attention` and `EmbedLayerNormalization` are; see `pack`.)
_FUSED = {"MultiHeadAttention", "QAttention", "SkipLayerNormalization"}
PREFIX = "packed"


def _targets(model: Any) -> dict[str, list[int]]:
    """Constant Reshape targets by tensor name (initializers and Constant nodes)."""
    from onnx import numpy_helper

    found = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {name: [int(value) for value in array.ravel()] for name, array in found.items()
            if array.dtype == np.int64 and array.ndim == 1}


def pack(model: Any) -> int:
    """Rewrite `model` in place to run its token-wise operators on real tokens only; returns how many
    attention layers were rewritten (0: the graph does not have the expected shape, and is unchanged)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inputs = {value.name for value in graph.input}
    if not {"input_ids", "attention_mask"} <= inputs or any(node.op_type in _FUSED for node in graph.node):
        return 0
    norms = [node for node in graph.node if node.op_type == "LayerNormalization"]
    embedding = [node for node in graph.node if node.op_type == "EmbedLayerNormalization"]
    fused = [node for node in graph.node if node.op_type == "Attention"]
    initializers = {init.name: init for init in graph.initializer}
    if not norms or len(embedding) > 1:
        return 0
    # The embeddings' (Embed)LayerNormalization, whose scale gives the width, and the last one, the output's.
    first = embedding[0] if embedding else norms[0]
    scale_input = 5 if embedding else 1
    if first is norms[-1] or len(first.input) <= scale_input or first.input[scale_input] not in initializers:
        return 0
    scale = first.input[scale_input]
    hidden = int(np.prod(initializers[scale].dims))
    targets = _targets(model)
    splits, merges = [], []
    for node in graph.node:
        target = targets.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if target is None:
            continue
        if len(target) == 4 and target[:2] == [0, -1] and min(target[2:]) > 0 and target[2] * target[3] == hidden:
            splits.append(node)
        elif len(target) == 3 and target[0] == 0 and target[1] in (0, -1) and target[2] == hidden:
            merges.append(node)
    if fused and (splits or merges):
        return 0
    layers = len(fused) or len(merges)
    if layers == 0 or len(splits) != (0 if fused else 3 * layers):
        return 0
    last = norms[-1]
    node_order = {id(node): index for index, node in enumerate(graph.node)}
    if not all(node_order[id(first)] < node_order[id(node)] < node_order[id(last)]
               for node in [*splits, *merges, *fused]):
        return 0

    def name(suffix: str) -> str:
        return f"{PREFIX}/{suffix}"

    mask_type = next(value.type.tensor_type.elem_type for value in graph.input if value.name == "attention_mask")
    shapes = sorted({(targets[node.input[1]][2], targets[node.input[1]][3]) for node in splits})
    graph.initializer.extend([
        numpy_helper.from_array(np.array([-1], np.int64), name("flat")),
        numpy_helper.from_array(np.array([-1, hidden], np.int64), name("rows_shape")),
        numpy_helper.from_array(np.array([hidden], np.int64), name("hidden")),
        numpy_helper.from_array(np.array([0], np.int64), name("first")),
        numpy_helper.from_array(np.array(1, np.int64), name("one")),
        numpy_helper.from_array(np.array(0, np.int64), name("axis")),
        *(numpy_helper.from_array(np.array([heads, size], np.int64), name(f"heads_{heads}x{size}"))
          for heads, size in shapes),
    ])
    make = helper.make_node
    mask = "attention_mask"
    head = []
    if mask_type != TensorProto.INT64:
        head.append(make("Cast", [mask], [name("mask_2d")], to=TensorProto.INT64, name=name("mask_2d")))
        mask = name("mask_2d")
    # The packed rows: the real tokens, then one more (a copy of the first token) that every padding position
    # reads when the rows are scattered back for attention, which masks it; any finite row would do.
    head += [
        make("Reshape", [mask, name("flat")], [name("mask")], name=name("mask")),
        make("NonZero", [name("mask")], [name("nonzero")], name=name("nonzero")),
        make("Reshape", [name("nonzero"), name("flat")], [name("real")], name=name("real")),
        make("Concat", [name("real"), name("first")], [name("taken")], axis=0, name=name("taken")),
        make("ReduceSum", [name("mask")], [name("count")], keepdims=0, name=name("count")),
        make("CumSum", [name("mask"), name("axis")], [name("running")], name=name("running")),
        make("Sub", [name("running"), name("one")], [name("row")], name=name("row")),
        make("Cast", [name("mask")], [name("is_real")], to=TensorProto.BOOL, name=name("is_real")),
        make("Where", [name("is_real"), name("row"), name("count")], [name("rows")], name=name("rows")),
        make("Shape", ["input_ids"], [name("batch_length")], name=name("batch_length")),
        make("Concat", [name("batch_length"), name("hidden")], [name("padded_shape")], axis=0,
             name=name("padded_shape")),
        *(make("Concat", [name("batch_length"), name(f"heads_{heads}x{size}")], [name(f"split_{heads}x{size}")],
               axis=0, name=name(f"split_{heads}x{size}")) for heads, size in shapes),
    ]

    def gather(tensor: str, indices: str, out: str) -> Any:
        return make("Gather", [tensor, name(indices)], [out], axis=0, name=out)

    renamed: dict[str, str] = {}  # a padded tensor's consumers read its packed replacement
    ordered: list[Any] = []
    split_ids, merge_ids = {id(node) for node in splits}, {id(node) for node in merges}
    fused_ids = {id(node) for node in fused}
    for index, node in enumerate(graph.node):
        if head and node.op_type != "Constant":
            ordered.extend(head)
            head = []
        for position, tensor in enumerate(node.input):
            # What reads only a padded tensor's shape (MPNet's position bias reads the embeddings' output for
            # the batch and length) keeps reading the padded tensor.
            if tensor in renamed and node.op_type not in ("Shape", "Size"):
                node.input[position] = renamed[tensor]
        if id(node) in split_ids:
            # The packed rows back in [batch x length] order, straight into the heads' [batch, length, heads,
            # head size] (the reshape's own target, with the batch and length given).
            target = targets[node.input[1]]
            scattered = name(f"split{index}")
            ordered.append(gather(node.input[0], "rows", scattered))
            node.input[0] = scattered
            node.input[1] = name(f"split_{target[2]}x{target[3]}")
        elif id(node) in merge_ids:
            node.input[1] = name("rows_shape")  # the merged heads as [batch x length, hidden] rows
        elif id(node) in fused_ids:
            # Fused attention reads [batch, length, hidden]: the packed rows back in that order and shape.
            rows, scattered = name(f"attention{index}/rows"), name(f"attention{index}")
            ordered.append(gather(node.input[0], "rows", rows))
            ordered.append(make("Reshape", [rows, name("padded_shape")], [scattered], name=scattered))
            node.input[0] = scattered
        ordered.append(node)
        if node is first or id(node) in merge_ids or id(node) in fused_ids:
            out = name(f"tokens{index}")
            if node is first or id(node) in fused_ids:
                flat = name(f"tokens{index}/flat")
                ordered.append(make("Reshape", [node.output[0], name("rows_shape")], [flat], name=flat))
                ordered.append(gather(flat, "taken", out))
            else:
                ordered.append(gather(node.output[0], "taken", out))
            renamed[node.output[0]] = out
        elif node is last:
            original, scattered = node.output[0], name("output/rows")
            node.output[0] = name("output/packed")
            ordered.append(gather(name("output/packed"), "rows", scattered))
            ordered.append(make("Reshape", [scattered, name("padded_shape")], [original], name=name("output")))
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]  # shapes inferred for the padded graph no longer hold
    return layers


def pack_file(source: Path, output: Path) -> int:
    """`pack` a model file into `output` (written only when the rewrite applies); returns its layer count."""
    import onnx

    model = onnx.load(str(source))
    layers = pack(model)
    if layers:
        onnx.save(model, str(output))
    return layers


def try_pack(path: Path, label: str, note: Callable[[str], None],
             check: Callable[[Path], Checked]) -> tuple[Path, int, Checked] | None:
    """`pack_file` of `path` into `<stem>_packed.onnx` beside it, then `check` of the packed file: the packed
    file, its layer count and what `check` returned; None, with a note saying why, where the rewrite does not
    apply or the packed graph fails to load or run (the caller keeps the padded graph)."""
    packed = path.with_name(f"{path.stem}_packed.onnx")
    try:
        layers = pack_file(path, packed)
        if not layers:
            note(f"{label} packed tokens: the graph does not have the expected shape; kept padded")
            return None
        return packed, layers, check(packed)
    except Exception as error:  # a graph the rewrite gets wrong fails to load or run: keep the padded one
        note(f"{label} packed tokens: failed ({type(error).__name__}: {error})"[:300])
        return None
