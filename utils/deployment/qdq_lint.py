"""Q/DQ lint rules: check an ONNX graph for placements that keep TensorRT from running it fully in INT8.

TensorRT accepts almost any Q/DQ placement, but a badly placed pair costs speed silently: it
inserts reformat layers, runs a layer in FP16, or stops fusing a convolution with its
activation or residual add. That is how the anchor's INT8 t/s/m engines came out slower than
FP16. This lint reads only the ONNX, so it runs where TensorRT does not, and it is the judge of
the QAT placement rules. Each finding names a category and the node to look at:

- ``qdq_spec``: the graph breaks a rule an executor checks before running it, which
  ``onnx.checker`` does not (``utils.deployment.qdq_spec``): a Q/DQ scale that is neither a
  scalar nor 1-D with one value per element of its axis, a zero point that is missing, of another
  shape, not int8 or not 0, a weight not quantized per channel on axis 0, an activation not
  quantized per tensor; an initializer or Constant whose declared shape differs from its value,
  or anything else strict shape inference rejects. ONNX Runtime or TensorRT would refuse the file.
- ``conv_without_qdq``: a Conv whose input or weight is not fed by DequantizeLinear, so it runs in
  floating point (unless the exporter listed it as skipped on purpose in the metadata entry
  ``qdq_lint.skip_convs``, a JSON list of node names).
- ``concat_scale_mismatch``: a Concat whose inputs (or inputs and output) carry different
  scales; TensorRT then cannot write the inputs straight into the concatenated INT8 buffer.
- ``multi_scale_tensor``: a tensor quantized with different scales for different consumers
  (directly, or through scale-preserving ops such as MaxPool, Resize, Slice, Split, Concat);
  the producer can fuse only one output quantization.
- ``qdq_splits_conv_activation``: a Q on a Conv's pre-activation output, so Conv and its
  activation (SiLU = Sigmoid + Mul, ReLU...) can no longer run as one fused kernel.
- ``unfused_residual_add``: a residual Add next to a Conv whose inputs are not both dequantized;
  TensorRT fuses such an Add into the Conv epilogue only when both sides are INT8.
- ``qdq_on_non_int8_op``: a DequantizeLinear feeding an op that TensorRT does not run in INT8
  (Sigmoid, Softmax, Mul, Div, ...), which only adds a dequantize there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from utils.deployment.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, load_onnx, node_label, same_qparams
from utils.deployment.qdq_spec import spec_problems

SKIP_METADATA_KEY = "qdq_lint.skip_convs"

CATEGORIES = (
    "qdq_spec",
    "conv_without_qdq",
    "concat_scale_mismatch",
    "multi_scale_tensor",
    "qdq_splits_conv_activation",
    "unfused_residual_add",
    "qdq_on_non_int8_op",
)

# Ops through which TensorRT moves Q backward / DQ forward without changing the scale.
SCALE_PRESERVING = {"MaxPool", "Resize", "Upsample", "Slice", "Split", "Reshape", "Transpose", "Flatten",
                    "Squeeze", "Unsqueeze", "Identity", "Pad", "Concat"}
ACTIVATIONS = {"Sigmoid", "Relu", "LeakyRelu", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
               "Mish", "Softplus", "PRelu", "Mul"}
# Ops TensorRT runs in INT8 when their inputs are dequantized (weighted ops, pooling, data movement,
# residual Add fused into a Conv, and activations it folds into the previous layer).
INT8_CONSUMERS = SCALE_PRESERVING | {"Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "AveragePool",
                                     "GlobalAveragePool", "GlobalMaxPool", "Relu", "LeakyRelu", "Clip",
                                     QUANTIZE}


@dataclass(frozen=True)
class Finding:
    """One placement problem: which kind, at which node, and why it matters there."""

    category: str
    node: str
    op_type: str
    message: str


def lint(model_or_path: onnx.ModelProto | str | Path, skip_convs: set[str] | None = None) -> list[Finding]:
    """All findings for an ONNX model. An FP graph (no Q/DQ) is checked for shape agreement only;
    the placement checks need constant scales, so a graph with a computed scale gets only ``qdq_spec``."""
    model = load_onnx(model_or_path)
    g = GraphIndex(model.graph)
    spec = [Finding("qdq_spec", *problem) for problem in spec_problems(model)]
    qdq = [n for n in model.graph.node if n.op_type in (QUANTIZE, DEQUANTIZE)]
    if not qdq or any(len(n.input) < 2 or g.const(n.input[1]) is None for n in qdq):
        return spec
    skipped = set(skip_convs or ()) | _skipped_in_metadata(model)
    checker = _Checker(g)
    findings = (spec + checker.convs(skipped) + checker.concats() + checker.multi_scale() + checker.conv_act_splits()
                + checker.residual_adds() + checker.non_int8_consumers())
    order = {id(n): i for i, n in enumerate(model.graph.node)}
    by_name = {node_label(n): order[id(n)] for n in model.graph.node}
    return sorted(findings, key=lambda f: (CATEGORIES.index(f.category), by_name.get(f.node, -1)))


def _skipped_in_metadata(model: onnx.ModelProto) -> set[str]:
    for prop in model.metadata_props:
        if prop.key == SKIP_METADATA_KEY:
            return set(json.loads(prop.value))
    return set()


class _Checker:
    """The six placement checks over one indexed graph; each returns its findings."""

    def __init__(self, g: GraphIndex):
        self.g = g
        self._attached: dict[str, list] = {}

    # --- helpers -------------------------------------------------------------------------------
    def _finding(self, category: str, node: onnx.NodeProto, message: str) -> Finding:
        return Finding(category, node_label(node), node.op_type, message)

    def _from_dq(self, tensor: str) -> bool:
        return self.g.op_of(tensor) == DEQUANTIZE

    def _data_inputs(self, node: onnx.NodeProto) -> list[str]:
        return [i for i in node.input if i] if node.op_type == "Concat" else node.input[:1]

    def attached(self, tensor: str) -> list:
        """Distinct (scale, zero point) pairs that Q nodes apply to ``tensor``, also through
        scale-preserving consumers (TensorRT propagates those Q nodes back onto ``tensor``)."""
        if tensor in self._attached:
            return self._attached[tensor]
        self._attached[tensor] = []  # guards against cycles in malformed graphs
        found: list = []
        for consumer in self.g.consumers.get(tensor, []):
            if consumer.op_type == QUANTIZE and consumer.input[0] == tensor:
                found.append(self.g.qparams(consumer))
            elif consumer.op_type in SCALE_PRESERVING and tensor in self._data_inputs(consumer):
                for out in consumer.output:
                    found.extend(self.attached(out))
        self._attached[tensor] = _distinct(found)
        return self._attached[tensor]

    def _conv_source(self, tensor: str) -> onnx.NodeProto | None:
        """The Conv that computes ``tensor`` (directly or through an unfused BatchNormalization)."""
        node = self.g.producer.get(tensor)
        if node is not None and node.op_type == "BatchNormalization":
            node = self.g.producer.get(node.input[0])
        return node if node is not None and node.op_type == "Conv" else None

    def _behind_qdq(self, tensor: str) -> str:
        """The tensor before any DQ <- Q pairs that lead to ``tensor``."""
        while self.g.op_of(tensor) == DEQUANTIZE:
            q = self.g.producer[tensor]
            if self.g.op_of(q.input[0]) != QUANTIZE:
                return q.input[0]
            tensor = self.g.producer[q.input[0]].input[0]
        return tensor

    # --- checks --------------------------------------------------------------------------------
    def convs(self, skipped: set[str]) -> list[Finding]:
        out = []
        for node in self.g.graph.node:
            if node.op_type != "Conv" or node_label(node) in skipped:
                continue
            missing = [what for what, t in (("input", node.input[0]), ("weight", node.input[1]))
                       if not self._from_dq(t)]
            if missing:
                out.append(self._finding("conv_without_qdq", node,
                                         f"{' and '.join(missing)} not dequantized: this Conv runs in floating point"))
        return out

    def concats(self) -> list[Finding]:
        out = []
        for node in self.g.graph.node:
            if node.op_type != "Concat":
                continue
            per_input = []
            for t in node.input:
                if self._from_dq(t):
                    per_input.append([self.g.qparams(self.g.producer[t])])
                else:
                    per_input.append(self.attached(t))
            scales = _distinct([qp for qps in per_input for qp in qps] + self.attached(node.output[0]))
            unquantized = [i for i, qps in enumerate(per_input) if not qps]
            if len(scales) > 1:
                values = ", ".join(f"{float(s.ravel()[0]):.6g}" for s, _ in scales)
                out.append(self._finding("concat_scale_mismatch", node, f"inputs/output carry {len(scales)} "
                                         f"different scales ({values}); they need one shared scale"))
            elif scales and unquantized:
                out.append(self._finding("concat_scale_mismatch", node, f"inputs {unquantized} are not quantized "
                                         "while the others are: the Concat cannot stay in INT8"))
        return out

    def multi_scale(self) -> list[Finding]:
        out = []
        tensors = [i.name for i in self.g.graph.input] + [o for n in self.g.graph.node for o in n.output]
        for t in tensors:
            if self._from_dq(t) or len(self.attached(t)) < 2:
                continue
            producer = self.g.producer.get(t)
            upstream_conflict = producer is not None and producer.op_type in SCALE_PRESERVING and any(
                not self._from_dq(i) and len(self.attached(i)) > 1 for i in self._data_inputs(producer))
            if upstream_conflict:
                continue  # reported once, at the tensor where the conflict starts
            message = f"tensor {t!r} is quantized with {len(self.attached(t))} different scales by its consumers"
            if producer is None:  # a graph input
                out.append(Finding("multi_scale_tensor", t, "input", message))
            else:
                out.append(self._finding("multi_scale_tensor", producer, message))
        return out

    def _activations_behind(self, q: onnx.NodeProto) -> list[str]:
        """Activation ops reading a Conv's output that ``q`` quantizes (empty if none)."""
        if q.op_type != QUANTIZE or self._conv_source(q.input[0]) is None:
            return []
        readers = list(self.g.consumers.get(q.input[0], []))
        for dq in self.g.consumers.get(q.output[0], []):
            if dq.op_type == DEQUANTIZE:
                readers += self.g.consumers.get(dq.output[0], [])
        return sorted({r.op_type for r in readers if r.op_type in ACTIVATIONS})

    def conv_act_splits(self) -> list[Finding]:
        out = []
        for node in self.g.graph.node:
            acts = self._activations_behind(node)
            if acts:
                conv = self._conv_source(node.input[0])
                out.append(self._finding("qdq_splits_conv_activation", node,
                                         f"quantizes the pre-activation output of {node_label(conv)}, which "
                                         f"feeds {'/'.join(acts)}: Conv and activation cannot fuse"))
        return out

    def residual_adds(self) -> list[Finding]:
        out = []
        for node in self.g.graph.node:
            if node.op_type != "Add" or len(node.input) != 2 or any(self.g.const(i) is not None for i in node.input):
                continue
            sources = [self.g.producer.get(self._behind_qdq(i)) for i in node.input]
            if not any(s is not None and (s.op_type == "Conv" or s.op_type in ACTIVATIONS) for s in sources):
                continue  # not a feature-map residual (e.g. box arithmetic in the head)
            plain = [i for i, t in enumerate(node.input) if not self._from_dq(t)]
            if plain:
                out.append(self._finding("unfused_residual_add", node, f"input(s) {plain} not dequantized: "
                                         "TensorRT cannot fuse this Add into the Conv epilogue"))
        return out

    def non_int8_consumers(self) -> list[Finding]:
        out = []
        for node in self.g.graph.node:
            if node.op_type != DEQUANTIZE or self.g.const(node.input[0]) is not None:
                continue  # weights are dequantized for the Conv that reads them
            q = self.g.producer.get(node.input[0])
            if q is not None and self._activations_behind(q):
                continue  # reported once, as qdq_splits_conv_activation
            bad = sorted({c.op_type for c in self.g.consumers.get(node.output[0], [])
                          if c.op_type not in INT8_CONSUMERS})
            if bad:
                out.append(self._finding("qdq_on_non_int8_op", node, f"dequantizes into {'/'.join(bad)}, "
                                         "which TensorRT does not run in INT8"))
        return out


def _distinct(qparams: list) -> list:
    kept: list = []
    for qp in qparams:
        if not any(same_qparams(qp, k) for k in kept):
            kept.append(qp)
    return kept


def counts(findings: list[Finding]) -> dict[str, int]:
    """Number of findings per category (every category listed, zeros included)."""
    return {c: sum(f.category == c for f in findings) for c in CATEGORIES}


def to_json(findings: list[Finding], model_name: str = "") -> dict:
    return {"model": model_name, "total": len(findings), "counts": counts(findings),
            "findings": [asdict(f) for f in findings]}


def to_markdown(findings: list[Finding], model_name: str = "") -> str:
    lines = [f"# Q/DQ lint: {model_name}".rstrip(), "", f"{len(findings)} finding(s).", "",
             "| category | count |", "| --- | ---: |"]
    lines += [f"| {c} | {n} |" for c, n in counts(findings).items()]
    for category in CATEGORIES:
        these = [f for f in findings if f.category == category]
        if these:
            lines += ["", f"## {category}", ""]
            lines += [f"- `{f.node}` ({f.op_type}): {f.message}" for f in these]
    return "\n".join(lines) + "\n"
