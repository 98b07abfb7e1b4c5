"""The checks an executor makes before it runs a graph, made on the ONNX alone (lint category ``qdq_spec``).

``onnx.checker`` (even with ``full_check``) accepts Q/DQ parameters that ONNX Runtime and
TensorRT refuse, such as a (1, 1, 1, 1) weight scale without ``axis``, which is how a one-class
head first shipped. These rules restate what the executors check, and what TensorRT needs for
INT8: per-channel weights on axis 0, per-tensor activations, symmetric int8 zero points; plus
declared shapes that agree with the constants and with ONNX shape inference.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from utils.deployment.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, node_label
from utils.deployment.qdq_normalize import WEIGHT_AXIS, get_axis, quantized_source

Shape = tuple  # dims as ints, None where unknown (symbolic)
Problem = tuple[str, str, str]  # (node or tensor, op type, message)


def spec_problems(model: onnx.ModelProto) -> list[Problem]:
    """Shape disagreements first, then one problem line per Q/DQ node that breaks a rule."""
    problems, shapes = shape_problems(model)
    g = GraphIndex(model.graph)
    for node in model.graph.node:
        if node.op_type in (QUANTIZE, DEQUANTIZE):
            broken = qdq_node_problems(g, node, shapes)
            if broken:
                problems.append((node_label(node), node.op_type, "; ".join(broken)))
    return problems


def qdq_node_problems(g: GraphIndex, node: onnx.NodeProto, shapes: dict[str, Shape]) -> list[str]:
    """What is wrong with one QuantizeLinear / DequantizeLinear node's parameters (empty: nothing)."""
    scale = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if scale is None:
        return ["scale is not a constant (TensorRT needs build-time scales)"]
    has_zero = len(node.input) > 2 and bool(node.input[2])
    zero = g.const(node.input[2]) if has_zero else None
    source = quantized_source(g, node)
    weight = g.const(source)
    shape = tuple(weight.shape) if weight is not None else shapes.get(source)
    axis = get_axis(node)
    axis = 1 if axis is None else axis  # ONNX's default
    out = []
    if scale.ndim > 1:
        out.append(f"scale has shape {tuple(scale.shape)}: ONNX takes a scalar (per tensor) or a 1-D scale (per axis)")
    elif scale.ndim == 1 and shape is not None:
        if not -len(shape) <= axis < len(shape):
            out.append(f"axis {axis} is outside the quantized tensor's {len(shape)} dims")
        elif shape[axis] is not None and shape[axis] != scale.size:
            out.append(f"scale has {scale.size} value(s) for axis {axis} of size {shape[axis]}")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        out.append("scale has zero, negative or non-finite values")
    if not has_zero:
        out.append("no zero point: ONNX then quantizes to uint8 (asymmetric), TensorRT needs int8")
    elif zero is None:
        out.append("zero point is not a constant")
    else:
        if zero.shape != scale.shape:
            out.append(f"zero point shape {tuple(zero.shape)} differs from scale shape {tuple(scale.shape)}")
        if zero.dtype != np.int8:
            out.append(f"zero point is {zero.dtype}, not int8")
        if np.any(zero != 0):
            out.append("zero point is not 0 (TensorRT quantizes symmetrically)")
    if scale.ndim > 1:
        return out  # per tensor or per channel is unreadable until the scale has a legal shape
    if weight is not None:
        on_axis0 = shape is not None and len(shape) > 0 and axis % len(shape) == WEIGHT_AXIS
        if scale.ndim != 1 or not on_axis0:
            out.append(f"weight is not quantized per channel on axis {WEIGHT_AXIS} (a 1-D scale, axis={WEIGHT_AXIS})")
    elif scale.ndim != 0:
        out.append("activation is not quantized per tensor (a scalar scale)")
    return out


def _dims(value_info: onnx.ValueInfoProto) -> Shape | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _agree(declared: Shape, actual: tuple[int, ...]) -> bool:
    return len(declared) == len(actual) and all(d is None or d == a for d, a in zip(declared, actual))


def shape_problems(model: onnx.ModelProto) -> tuple[list[Problem], dict[str, Shape]]:
    """Initializers and Constant outputs whose declared shape (graph input, value_info, output)
    differs from their value; else anything strict shape inference rejects. Also returns the
    inferred shape of every tensor it could infer."""
    graph = model.graph
    declared = {v.name: _dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    values = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                values[node.output[0]] = tuple(numpy_helper.to_array(value).shape)
    problems = [(name, "initializer" if name in {t.name for t in graph.initializer} else "Constant",
                 f"declared shape {declared[name]} differs from its value's shape {shape}")
                for name, shape in values.items() if declared.get(name) is not None and not _agree(declared[name], shape)]
    try:
        inferred = shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        if not problems:  # a disagreement above also fails inference: say it once
            first = str(exc).strip().splitlines()[0]
            problems.append(("graph", "shape_inference", f"strict shape inference fails: {first}"))
        inferred = _lenient_inference(model)
    g = inferred.graph
    shapes = {v.name: _dims(v) for v in [*g.input, *g.value_info, *g.output]}
    shapes.update(values)
    return problems, {k: v for k, v in shapes.items() if v is not None}


def _lenient_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes for the per-node rules when strict inference failed: without the declarations that
    may be the conflict, and with whatever the lenient pass manages."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    try:
        return shape_inference.infer_shapes(bare)
    except (shape_inference.InferenceError, onnx.checker.ValidationError):
        return bare
