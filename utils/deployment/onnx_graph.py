"""A read-mostly index over an ONNX graph: who produces and who consumes each tensor.

The Q/DQ lint and the exporter's Q/DQ clean-up both walk the graph by tensor name; building
the two maps once keeps those walks short and the same in both places.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from utils.errors import UserError

QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"


def load_onnx(model_or_path: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """The model itself, or the model read from a path (``UserError`` naming a bad file)."""
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    path = Path(model_or_path)
    if not path.is_file():
        raise UserError(f"{path}: ONNX file not found")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError, ValueError... for a file that is not a model
        raise UserError(f"{path}: not a readable ONNX model ({exc})") from exc


class GraphIndex:
    """Producer/consumer maps and constant values of one ``onnx.GraphProto``."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output; None for a computed tensor."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def op_of(self, name: str) -> str | None:
        """Op type of the node producing ``name`` (None for graph inputs and initializers)."""
        node = self.producer.get(name)
        return node.op_type if node is not None else None

    def qparams(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
        """(scale, zero point) of a QuantizeLinear / DequantizeLinear node."""
        scale = self.const(node.input[1])
        zero = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None:
            raise UserError(f"node {node.name or node.output[0]}: {node.op_type} scale is not a constant")
        return scale, zero


def node_label(node: onnx.NodeProto) -> str:
    """A name to show a person: the node's name, else its first output tensor."""
    return node.name or (node.output[0] if node.output else node.op_type)


def same_qparams(a: tuple[np.ndarray, np.ndarray | None], b: tuple[np.ndarray, np.ndarray | None],
                 rtol: float = 1e-6) -> bool:
    """Whether two (scale, zero point) pairs quantize identically."""
    (sa, za), (sb, zb) = a, b
    if sa.shape != sb.shape or not np.allclose(sa, sb, rtol=rtol, atol=0.0):
        return False
    za = np.zeros_like(sa, dtype=np.int64) if za is None else za.astype(np.int64)
    zb = np.zeros_like(sb, dtype=np.int64) if zb is None else zb.astype(np.int64)
    return za.shape == zb.shape and bool(np.all(za == zb))
