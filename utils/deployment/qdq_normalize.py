"""Rewrite Q/DQ scale and zero point tensors into the one shape every executor accepts.

ONNX allows two forms for QuantizeLinear / DequantizeLinear: a scalar scale (per tensor) or a
1-D scale whose length is the size of the ``axis`` dimension (per axis), with a zero point of the
same shape. A quantizer backend may still hand the exporter a range tensor of another shape.
Model Optimizer 0.47 does for a per-channel weight of ONE output channel (the class convolution
of a one-class head): it sees a one-element amax, takes it for per tensor, and exports the
(1, 1, 1, 1) range unsqueezed with no ``axis``. onnx.checker accepts that; ONNX Runtime refuses it
(a non-scalar scale means per axis, default axis 1) and so would TensorRT's parser.

This is done on the graph, after tracing, rather than inside our quantizer adapter, because the
graph is what ships: the pass holds for whichever fake-quant implementation produced the Q/DQ
nodes (Model Optimizer's symbolic, PyTorch's fused fake-quant ops, a simplifier's rewrite), and
it is a no-op on a graph that is already in canonical form.

It changes only how the parameters are written, never what they compute: a one-element scale on
a weight of one output channel is per channel on axis 0, a one-element scale on anything else is
per tensor, and a rank-N scale with one non-unit dimension is the 1-D scale on that axis. Anything
that would change values (a missing or non-int8 zero point, per-tensor weights, per-channel
activations) is left as it is for the lint (``qdq_spec``) to report.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from utils.deployment.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex

WEIGHT_AXIS = 0  # TensorRT quantizes convolution weights per output channel


def quantized_source(g: GraphIndex, node: onnx.NodeProto) -> str:
    """The float (or stored int8) tensor a Q/DQ node's pair quantizes: a DQ reads it through its Q."""
    if node.op_type == DEQUANTIZE and g.op_of(node.input[0]) == QUANTIZE:
        return g.producer[node.input[0]].input[0]
    return node.input[0]


def get_axis(node: onnx.NodeProto) -> int | None:
    """The ``axis`` attribute as written (None when absent: ONNX then means axis 1)."""
    return next((a.i for a in node.attribute if a.name == "axis"), None)


def canonical_layout(scale_shape: tuple[int, ...], axis: int | None,
                     source_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int | None] | None:
    """(scale shape, axis or None for per tensor) that writes the same quantization canonically,
    or None when the written form is ambiguous (then it stays for the lint to judge).

    ``source_shape``: the quantized tensor's shape when known (a weight's), else None.
    """
    size = int(np.prod(scale_shape, dtype=np.int64))
    if size == 1:
        per_channel = source_shape is not None and len(source_shape) > 1 and source_shape[WEIGHT_AXIS] == 1
        return ((1,), WEIGHT_AXIS) if per_channel else ((), None)
    if len(scale_shape) == 1:
        return scale_shape, axis
    wide = [d for d, n in enumerate(scale_shape) if n != 1]
    if len(wide) != 1 or source_shape is None or len(scale_shape) != len(source_shape):
        return None  # several varying dims, or a broadcast whose alignment with the input is unknown
    d = wide[0]
    if axis is not None and axis % len(source_shape) != d:
        return None  # the attribute contradicts the shape
    return (scale_shape[d],), d


class _Rewriter:
    """Adds the canonical copies of scale / zero-point tensors once each (Q and DQ of a pair share them)."""

    def __init__(self, model: onnx.ModelProto, g: GraphIndex):
        self.model, self.g = model, g
        self.made: dict[tuple[str, tuple[int, ...]], str] = {}
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        self.taken = taken | {i.name for i in model.graph.input}

    def reshaped(self, name: str, value: np.ndarray, shape: tuple[int, ...]) -> str:
        key = (name, shape)
        if key not in self.made:
            flat = value.reshape(-1)
            new_value = np.full(shape, flat[0], value.dtype) if flat.size == 1 else flat.reshape(shape)
            new_name = f"{name}_{'x'.join(map(str, shape)) or 'scalar'}"
            while new_name in self.taken:
                new_name += "_"
            self.taken.add(new_name)
            self.model.graph.initializer.append(numpy_helper.from_array(new_value.copy(), new_name))
            self.made[key] = new_name
        return self.made[key]


def normalize_qdq(model: onnx.ModelProto) -> int:
    """Rewrite every Q/DQ node's scale / zero point into canonical form in place; returns how many
    nodes changed (0 on a canonical graph, which is then left byte for byte as it was)."""
    g = GraphIndex(model.graph)
    rewriter = _Rewriter(model, g)
    changed, replaced = 0, set()
    for node in model.graph.node:
        if node.op_type not in (QUANTIZE, DEQUANTIZE) or len(node.input) < 2:
            continue
        scale = g.const(node.input[1])
        zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (zero is not None and zero.size not in (1, scale.size)):
            continue
        source = g.const(quantized_source(g, node))
        axis = get_axis(node)
        layout = canonical_layout(scale.shape, axis, None if source is None else source.shape)
        if layout is None:
            continue
        shape, new_axis = layout
        same_zero = zero is None or zero.shape == shape
        if scale.shape == shape and same_zero and (new_axis is None or new_axis == axis):
            continue
        replaced.update(node.input[1:3])
        node.input[1] = rewriter.reshaped(node.input[1], scale, shape)
        if zero is not None:
            node.input[2] = rewriter.reshaped(node.input[2], zero, shape)
        kept = [a for a in node.attribute if a.name != "axis"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if new_axis is not None:
            node.attribute.append(onnx.helper.make_attribute("axis", new_axis))
        changed += 1
    _drop_unread(model, replaced)
    return changed


def _drop_unread(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the replaced originals among ``names`` that nothing reads any more (initializers,
    Constant nodes, and their value_info entries)."""
    graph = model.graph
    read = _read_names(graph) | {o.name for o in graph.output}
    gone = names - read
    if not gone:
        return
    keep_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    keep_inits = [t for t in graph.initializer if t.name not in gone]
    keep_infos = [v for v in graph.value_info if v.name not in gone]
    for field, kept in ((graph.node, keep_nodes), (graph.initializer, keep_inits), (graph.value_info, keep_infos)):
        if len(kept) != len(field):
            del field[:]
            field.extend(kept)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name some node reads, in subgraphs (If / Loop bodies) too."""
    read = set()
    for node in graph.node:
        read.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                read |= _read_names(sub)
    return read
