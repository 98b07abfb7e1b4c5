"""Export a detection or segmentation model (FP, PTQ or QAT) to ONNX for TensorRT, then clean and lint the graph.

Fake quantization becomes QuantizeLinear/DequantizeLinear pairs through Model Optimizer's
TensorQuantizer symbolic, which only the TorchScript exporter calls (``dynamo=False``). Whatever
shape the backend gives their scales and zero points, ``normalize_qdq`` rewrites them into the
one form ONNX Runtime and TensorRT accept (a one-class head's weights came out unrunnable). A tensor
must reach TensorRT quantized once: the exporter's common-subexpression pass already merges the
identical pairs that tied quantizers emit, and ``merge_redundant_qdq`` removes whatever remains
(duplicate pairs on one tensor, DQ -> Q chains with equal parameters), e.g. after a simplifier.
The End2End graphs are the traced prediction with a separately traced tail joined on, so a QAT
model is traced once however many formats are exported.

A segmentation model's raw graph has upstream's two outputs, ``output0`` (B, 4 + nc + nm, anchors:
boxes, class scores, mask coefficients) and ``output1`` (B, nm, H/4, W/4: prototypes); its End2End
graphs add ``det_masks`` to the four detection outputs (``models.experimental_trt.MaskTail``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import onnx
import onnx.compose
import torch
import torch.nn as nn

from models.experimental_trt import END2END_OUTPUTS, SEGMENT_END2END_OUTPUTS, MaskTail, NMSTail, Prediction, TopKTail
from models.quantize import is_quantized
from utils.deployment.onnx_graph import DEQUANTIZE, QUANTIZE, GraphIndex, same_qparams
from utils.deployment.qdq_lint import SKIP_METADATA_KEY, Finding, lint, to_json, to_markdown
from utils.deployment.qdq_normalize import normalize_qdq
from utils.errors import UserError

POSTPROCESS_KINDS = ("raw", "nms", "topk")
RAW_OUTPUTS = ("output0", "output1")  # prediction, and a segmentation model's prototypes (upstream's names)
MIN_OPSET = 13  # per-channel (axis) QuantizeLinear


@dataclass
class ExportResult:
    path: Path
    quantized: bool
    qdq_pairs: int
    merged_qdq: int
    findings: list[Finding] = field(default_factory=list)
    float_convs: list[str] = field(default_factory=list)
    normalized_qdq: int = 0  # Q/DQ nodes whose parameters were rewritten into canonical form


@dataclass
class PredictionGraph:
    """The traced and cleaned raw-prediction ONNX of a model; End2End exports extend it."""

    model: onnx.ModelProto
    example: torch.Tensor  # the prediction on the zero image batch, for tracing a tail
    imgsz: tuple[int, int]
    dynamic: bool
    opset: int
    merged_qdq: int
    normalized_qdq: int = 0
    prototypes: torch.Tensor | None = None  # a segmentation model's, on the same batch

    @property
    def examples(self) -> tuple[torch.Tensor, ...]:
        """What the raw graph outputs, in order: the inputs of a tail."""
        return (self.example,) if self.prototypes is None else (self.example, self.prototypes)


def head_of(model: nn.Module) -> nn.Module:
    return model.model[-1]


@contextlib.contextmanager
def export_mode(model: nn.Module, example: torch.Tensor) -> Iterator[nn.Module]:
    """Eval mode, head returning only the prediction, anchors computed once for ``example``'s size
    (so they become constants and only the batch dimension stays dynamic); restored afterwards."""
    head = head_of(model)
    saved = (model.training, head.export, head.dynamic)
    model.eval()
    head.export, head.dynamic = True, False
    try:
        with torch.no_grad():
            model(example)
        yield model
    finally:
        model.train(saved[0])
        head.export, head.dynamic = saved[1], saved[2]


def _trace(module: nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str], output_names: list[str],
           dynamic: bool, opset: int) -> onnx.ModelProto:
    module.eval()  # the exporter restores the wrapper's mode afterwards, and with it the model's
    with torch.no_grad():
        outputs = module(*examples)
    shapes = [tuple(t.shape) for t in (outputs if isinstance(outputs, (tuple, list)) else [outputs])]
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic else None
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on constant shapes
        torch.onnx.export(module, examples, buffer, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
    model = onnx.load_from_string(buffer.getvalue())
    _declare_output_shapes(model, shapes, dynamic)
    return model


def trace_prediction(model: nn.Module, imgsz: int | tuple[int, int] = 640, batch_size: int = 1,
                     dynamic: bool = False, opset: int = 17) -> PredictionGraph:
    """Trace the model's main prediction to ONNX ('images' -> 'output0', and 'output1' for a
    segmentation model's prototypes), drop Identity nodes, put Q/DQ parameters in canonical form
    and merge redundant Q/DQ pairs. Quantizers become Q/DQ through Model Optimizer's symbolic, which
    only the TorchScript exporter (``dynamo=False``) calls."""
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset}: Q/DQ with per-channel weights needs opset >= {MIN_OPSET}")
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    example = torch.zeros(batch_size, 3, h, w, device=next(model.parameters()).device)
    with export_mode(model, example):
        wrapper = Prediction(model)
        outputs = list(RAW_OUTPUTS[:2 if wrapper.masks else 1])
        graph = _trace(wrapper, (example,), ["images"], outputs, dynamic, opset)
        with torch.no_grad():
            prediction = wrapper(example)
    drop_identities(graph)
    normalized = normalize_qdq(graph)  # before merging, so equal parameters compare equal
    merged = merge_redundant_qdq(graph)
    if wrapper.masks:
        return PredictionGraph(graph, prediction[0], (h, w), dynamic, opset, merged, normalized, prediction[1])
    return PredictionGraph(graph, prediction, (h, w), dynamic, opset, merged, normalized)


def tail_for(postprocess: str, anchors: int, max_det: int, iou_thres: float, conf_thres: float,
             masks: tuple[int, tuple[int, int]] | None = None) -> nn.Module | None:
    """The End2End tail of a postprocess kind ('raw' has none); ``masks`` (nm, input (h, w)) for a
    segmentation model wraps it in a ``MaskTail``."""
    if postprocess == "raw":
        return None
    if postprocess == "nms":
        tail = NMSTail(max_det, iou_thres, conf_thres)
    elif postprocess == "topk":
        tail = TopKTail(min(max_det, anchors), conf_thres)
    else:
        raise UserError(f"postprocess={postprocess!r}: expected one of {POSTPROCESS_KINDS}")
    return MaskTail(tail, *masks) if masks else tail


def append_tail(pred: PredictionGraph, tail: nn.Module) -> onnx.ModelProto:
    """The prediction graph with ``tail`` traced on its output(s) and joined onto it."""
    inputs = ["prediction", "prototypes"][:len(pred.examples)]
    outputs = SEGMENT_END2END_OUTPUTS if isinstance(tail, MaskTail) else END2END_OUTPUTS
    tail_graph = _trace(tail, pred.examples, inputs, list(outputs), pred.dynamic, pred.opset)
    tail_graph.ir_version = pred.model.ir_version
    # the tail's internal names would collide with the model's ('/Constant_output_0'...); its outputs keep theirs
    tail_graph = onnx.compose.add_prefix(tail_graph, "end2end/", rename_inputs=False, rename_outputs=False)
    return onnx.compose.merge_models(pred.model, tail_graph, io_map=list(zip(RAW_OUTPUTS, inputs)))


def export_onnx(model: nn.Module, file: str | Path, imgsz: int | tuple[int, int] = 640, batch_size: int = 1,
                dynamic: bool = False, opset: int = 17, postprocess: str = "raw", max_det: int = 100,
                iou_thres: float = 0.45, conf_thres: float = 0.25, simplify: str | None = None,
                float_convs: list[str] | None = None, metadata: dict | None = None,
                prediction: PredictionGraph | None = None) -> ExportResult:
    """Write the ONNX of ``model`` (raw, or End2End with an NMS / TopK tail) to ``file``, lint it,
    and write the lint report beside it.

    ``prediction``: a ``trace_prediction`` result to reuse (tracing a QAT model is the slow part).
    ``float_convs``: module names of convolutions kept in floating point on purpose; they are
    recorded in the ONNX metadata so the lint does not report them.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    pred = prediction or trace_prediction(model, imgsz, batch_size, dynamic, opset)
    head = head_of(model)
    nm = int(head.nm) if pred.prototypes is not None else 0
    tail = tail_for(postprocess, pred.example.shape[-1], max_det, iou_thres, conf_thres,
                    (nm, pred.imgsz) if nm else None)
    onnx_model = append_tail(pred, tail) if tail is not None else copy.deepcopy(pred.model)
    if simplify:
        onnx_model = simplify_onnx(onnx_model, simplify)
    # again on the final graph: a simplifier may rewrite constants, and ``prediction`` may come from elsewhere
    normalized = pred.normalized_qdq + normalize_qdq(onnx_model)
    quantized = is_quantized(model)
    skipped = conv_nodes_for(onnx_model, float_convs or [])
    names = getattr(model, "names", [])
    meta = {"stride": [int(s) for s in head.stride], "nc": int(head.nc), "task": "segment" if nm else "detect",
            **({"nm": nm} if nm else {}), "names": list(names.values()) if isinstance(names, dict) else list(names),
            "imgsz": list(pred.imgsz), "batch": "dynamic" if pred.dynamic else int(pred.example.shape[0]),
            "postprocess": postprocess, "quantized": quantized, **(metadata or {})}
    if tail is not None:
        meta.update(max_det=tail.max_det, iou_thres=iou_thres, conf_thres=conf_thres)
    _set_metadata(onnx_model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    _set_metadata(onnx_model, {SKIP_METADATA_KEY: json.dumps(skipped)})
    onnx.checker.check_model(onnx_model)
    pairs = sum(n.op_type == QUANTIZE for n in onnx_model.graph.node)
    if quantized and pairs == 0:
        raise RuntimeError(f"{file}: the model is quantized but the ONNX has no QuantizeLinear nodes")
    onnx.save(onnx_model, str(file))
    findings = lint(onnx_model)
    file.with_suffix(".qdq_lint.md").write_text(to_markdown(findings, file.name))
    file.with_suffix(".qdq_lint.json").write_text(json.dumps(to_json(findings, str(file)), indent=2) + "\n")
    return ExportResult(file, quantized, pairs, pred.merged_qdq, findings, skipped, normalized)


def _declare_output_shapes(model: onnx.ModelProto, shapes: list[tuple[int, ...]], dynamic: bool) -> None:
    """Write the traced output shapes into the graph outputs; the exporter leaves plugin outputs
    (and dims it could not infer) symbolic, and TensorRT / Triton users read these shapes."""
    for out, shape in zip(model.graph.output, shapes):
        dims = out.type.tensor_type.shape.dim
        del dims[:]
        for i, size in enumerate(shape):
            dim = dims.add()
            if i == 0 and dynamic:
                dim.dim_param = "batch"
            else:
                dim.dim_value = size


def drop_identities(model: onnx.ModelProto) -> int:
    """Remove Identity nodes (left where BatchNorm was fused) whose output is not a graph output."""
    outputs = {o.name for o in model.graph.output}
    ids = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] not in outputs]
    source = {n.output[0]: n.input[0] for n in ids}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            while name in source:  # chains of Identity collapse to their first input
                name = source[name]
            node.input[i] = name
    _drop(model, ids)
    return len(ids)


def _set_metadata(model: onnx.ModelProto, items: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in items]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in items.items():
        model.metadata_props.add(key=k, value=v)


def merge_redundant_qdq(model: onnx.ModelProto) -> int:
    """Fold Q/DQ pairs that quantize the same tensor with the same parameters into one; drop a
    DQ -> Q chain with equal parameters (exactly the identity). Returns the pairs removed.

    Each pass indexes the graph once and makes every change whose tensors no earlier change of the
    pass touched; the next pass sees the result. (Indexing again after each single change made this
    quadratic: seconds per full-width QAT export.)"""
    removed = 0
    while True:
        g = GraphIndex(model.graph)
        touched: set[str] = set()
        dropped: list[onnx.NodeProto] = []
        before = removed
        for tensor, readers in list(g.consumers.items()):
            if tensor in touched:
                continue
            qs = [n for n in readers if n.op_type == QUANTIZE and n.input[0] == tensor]
            change = next(((q, qs[0]) for q in qs[1:]
                           if same_qparams(g.qparams(q), g.qparams(qs[0])) and _axis(q) == _axis(qs[0])), None)
            if change is not None:
                removed += _redirect_pair(model, g, *change, touched, dropped)
            elif g.op_of(tensor) == DEQUANTIZE:
                dq = g.producer[tensor]
                q = next((q for q in qs if same_qparams(g.qparams(q), g.qparams(dq)) and _axis(q) == _axis(dq)), None)
                if q is not None:
                    removed += _bypass_requantize(model, g, q, tensor, touched, dropped)
        _drop(model, dropped)
        if removed == before:
            return removed


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _rename_input(model: onnx.ModelProto, g: GraphIndex, old: str, new: str) -> None:
    """Readers of ``old`` read ``new``. The readers come from the pass's index, which is kept up to
    date, so renaming does not walk the whole graph: 80 walks were 0.7 s of a full-width gelan-t trace."""
    readers = g.consumers.pop(old, [])
    for node in readers:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    g.consumers[new].extend(readers)
    if old in g.graph_outputs:  # keep graph output names: route through an Identity
        model.graph.node.append(onnx.helper.make_node("Identity", [new], [old]))


def _drop(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> None:
    ids = {id(n) for n in nodes}
    keep = [n for n in model.graph.node if id(n) not in ids]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _reroute(model: onnx.ModelProto, g: GraphIndex, q: onnx.NodeProto, dqs: list[onnx.NodeProto], target: str,
             touched: set[str], dropped: list[onnx.NodeProto]) -> int:
    """Readers of each DQ after ``q`` read ``target`` instead; ``q`` and those DQs are dropped at the
    end of the pass. The tensors whose readers changed are marked for this pass."""
    touched.update([q.input[0], q.output[0], target, *(dq.output[0] for dq in dqs)])
    for dq in dqs:
        _rename_input(model, g, dq.output[0], target)
    dropped.extend([q, *dqs])
    return 1


def _redirect_pair(model: onnx.ModelProto, g: GraphIndex, dup_q: onnx.NodeProto, kept_q: onnx.NodeProto,
                   touched: set[str], dropped: list[onnx.NodeProto]) -> int:
    """Readers of ``dup_q``'s DQ read ``kept_q``'s DQ instead."""
    kept_dq = next((d for d in g.consumers.get(kept_q.output[0], []) if d.op_type == DEQUANTIZE), None)
    dup_dqs = [d for d in g.consumers.get(dup_q.output[0], []) if d.op_type == DEQUANTIZE]
    if kept_dq is None or len(dup_dqs) != len(g.consumers.get(dup_q.output[0], [])):
        return 0
    return _reroute(model, g, dup_q, dup_dqs, kept_dq.output[0], touched, dropped)


def _bypass_requantize(model: onnx.ModelProto, g: GraphIndex, q: onnx.NodeProto, dequantized: str,
                       touched: set[str], dropped: list[onnx.NodeProto]) -> int:
    dqs = [d for d in g.consumers.get(q.output[0], []) if d.op_type == DEQUANTIZE]
    if len(dqs) != len(g.consumers.get(q.output[0], [])):
        return 0
    return _reroute(model, g, q, dqs, dequantized, touched, dropped)


def simplify_onnx(model: onnx.ModelProto, tool: str) -> onnx.ModelProto:
    """Run onnxsim ('onnxsim') or onnxslim ('onnxslim') and keep the metadata."""
    meta = {p.key: p.value for p in model.metadata_props}
    if tool == "onnxsim":
        import onnxsim

        simplified, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
    elif tool == "onnxslim":
        import onnxslim

        simplified = onnxslim.slim(model)
    else:
        raise UserError(f"simplify={tool!r}: expected 'onnxsim' or 'onnxslim'")
    _set_metadata(simplified, meta)
    return simplified


def conv_nodes_for(model: onnx.ModelProto, module_names: list[str]) -> list[str]:
    """ONNX Conv node names of the given conv modules, found through their weight initializers
    (the exporter names those ``<module>.weight``); modules pruned from the graph are absent."""
    wanted = {f"{name}.weight" for name in module_names}
    g = GraphIndex(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        while g.op_of(weight) in (QUANTIZE, DEQUANTIZE):
            weight = g.producer[weight].input[0]
        if weight in wanted or any(weight.endswith("." + w) for w in wanted):  # wrappers prefix "model."
            found.append(node.name)
    return found
