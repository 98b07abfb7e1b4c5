"""One export-conformance case: an exported ONNX variant of a quantized model, checked the way an
executor would take it and against the PyTorch fake-quant model it came from.

A case is (config, nc, variant, batch mode, input shape). Its checks: ``onnx.checker`` with
``full_check``, zero Q/DQ lint findings, ONNX Runtime runs it (batch 1, and 3 where the batch is
dynamic), and what it computes matches PyTorch:

- ``raw``: the prediction (B, 4 + nc, anchors), within ``BOX_TOL_PX`` / ``SCORE_TOL``;
- ``topk`` (NMS-free End2End): the same detections as the PyTorch ``TopKTail``, as sets, where
  rows within ``SCORE_TOL`` of the cut (the k-th score or the threshold) may swap and a class may
  differ only where PyTorch scores both classes within ``SCORE_TOL`` of each other;
- ``nms`` (End2End with ``EfficientNMS_TRT``, which ONNX Runtime cannot run): the plugin node
  against TensorRT's documented contract (``tests/data/efficient_nms_trt.json``), and the graph up
  to the plugin's inputs in ONNX Runtime against the boxes and scores PyTorch feeds the plugin.

Tolerances. ONNX Runtime and PyTorch compute the same quantized function; only the summation
order inside convolutions differs (~1e-6 relative). A value that lands that close to a rounding
boundary of a QuantizeLinear is rounded to the neighbouring INT8 step in one runtime and not the
other, and that step travels on to the outputs. At the head's last convolutions one step of the
input (scale s) moves a logit by at most s * max|w|, about 7e-4 in these calibrated models (gelan-t:
s ~ 3e-5, |w| <= 21): a score (sigmoid slope <= 1/4) by <= 2e-4, and a box side, a DFL expectation
over 16 bins times a stride of up to 32 px, by <= 7e-4 * 15 * 32 ~ 0.34 px. ``BOX_TOL_PX`` allows
about three such flips, ``SCORE_TOL`` far more, and both sit far below what a wrong scale, axis or
zero point does (whole steps on every value: tenths of a score). The measured spread over the
matrix is in bench/results/conformance/conformance_table.json (``error_distribution``) and
BENCHMARKS.md.

``bench/bench_conformance.py`` runs every case; ``tests/test_conformance.py`` a slice, with
these same functions.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import helper, shape_inference

from models.experimental_trt import Prediction, decode_end2end
from models.quantize import calibrate, float_conv_names, prepare
from models.yolo import DetectionModel
from tests.export_helpers import lively_head
from utils.boxes import xywh2xyxy
from utils.deployment.onnx_export import PredictionGraph, export_onnx, tail_for, trace_prediction
from utils.paths import ROOT

CONFIGS = tuple(sorted(p.stem for p in (ROOT / "models" / "detect").glob("*.yaml")))
NCS = (1, 2, 80)
VARIANTS = ("raw", "nms", "topk")
BATCH_MODES = ("static", "dynamic")
SHAPES = {"square": (64, 64), "non-square": (64, 96)}  # (h, w)
CALIB_SIZE = 64
DYNAMIC_BATCHES = (1, 3)
MAX_DET, IOU_THRES, CONF_THRES = 30, 0.45, 0.25
BOX_TOL_PX = 1.0  # see the module docstring
SCORE_TOL = 0.02
CONTRACT_FILE = ROOT / "tests" / "data" / "efficient_nms_trt.json"


@dataclass(frozen=True)
class Case:
    cfg: str
    nc: int
    variant: str
    batch_mode: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.cfg}-nc{self.nc}-{self.variant}-{self.batch_mode}-{self.shape}"


@dataclass
class CaseResult:
    case: Case
    problems: list[str] = field(default_factory=list)
    box_err: float | None = None  # max |ORT - PyTorch| over boxes (px), raw and nms variants
    score_err: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"case": self.case.name, "passed": self.passed, "problems": self.problems,
                "box_err": self.box_err, "score_err": self.score_err, "seconds": round(self.seconds, 2)}


def quantized_model(cfg: str, nc: int, seed: int = 0) -> nn.Module:
    """A config at random init, with a head whose boxes and scores are spread like a detector's
    (``lively_head``), QAT-prepared and calibrated on random images; eval mode."""
    torch.manual_seed(seed)
    model = lively_head(DetectionModel(f"{cfg}.yaml", nc=nc), seed)
    prepare(model)
    calibrate(model, [torch.rand(2, 3, CALIB_SIZE, CALIB_SIZE, generator=torch.Generator().manual_seed(seed))])
    return model.eval()


def trace(model: nn.Module, batch_mode: str, shape: str) -> PredictionGraph:
    """The one trace every variant of (batch mode, shape) extends."""
    return trace_prediction(model, SHAPES[shape], dynamic=batch_mode == "dynamic")


def images(batch: int, shape: str, seed: int = 1) -> torch.Tensor:
    h, w = SHAPES[shape]
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def load_contract() -> dict:
    return json.loads(CONTRACT_FILE.read_text())


def run_case(model: nn.Module, pred: PredictionGraph, case: Case, out_dir: Path,
             contract: dict | None = None) -> CaseResult:
    """Export ``case``'s variant from ``pred`` and run every check; never raises for a failed check."""
    start = time.time()
    result = CaseResult(case)
    file = Path(out_dir) / f"{case.name}.onnx"
    try:
        exported = export_onnx(model, file, postprocess=case.variant, max_det=MAX_DET, iou_thres=IOU_THRES,
                               conf_thres=CONF_THRES, float_convs=float_conv_names(model), prediction=pred)
    except Exception as exc:  # a failed export is this case's finding, not the end of the matrix
        result.problems.append(f"export failed: {_first_line(exc)}")
        return result
    try:
        onnx.checker.check_model(str(file), full_check=True)
    except Exception as exc:
        result.problems.append(f"onnx.checker full_check: {_first_line(exc)}")
    if exported.findings:
        f = exported.findings[0]
        result.problems.append(f"lint: {len(exported.findings)} finding(s), first {f.category} at {f.node}: {f.message}")
    graph = onnx.load(str(file))
    try:
        if case.variant == "nms":
            contract = contract or load_contract()
            result.problems += plugin_problems(graph, contract, case.nc)
            cut = _plugin_inputs_model(graph, contract)
            _check_runs(result, cut.SerializeToString(), model, case, _compare_plugin_inputs)
        else:
            compare = _compare_raw if case.variant == "raw" else _compare_topk
            _check_runs(result, str(file), model, case, compare)
    except Exception as exc:
        result.problems.append(f"ONNX Runtime: {_first_line(exc)}")
    result.seconds = time.time() - start
    return result


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _check_runs(result: CaseResult, source, model: nn.Module, case: Case, compare) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as PyTorch: both sides sized alike
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    batches = DYNAMIC_BATCHES if case.batch_mode == "dynamic" else (1,)
    for b in batches:
        x = images(b, case.shape, seed=b)
        with torch.no_grad():
            ref = Prediction(model)(x)
        outs = [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
        result.problems += [f"batch {b}: {p}" for p in compare(result, outs, ref)]


def _errors(result: CaseResult, boxes: torch.Tensor, ref_boxes: torch.Tensor, scores: torch.Tensor,
            ref_scores: torch.Tensor) -> list[str]:
    if boxes.shape != ref_boxes.shape or scores.shape != ref_scores.shape:
        return [f"shapes {tuple(boxes.shape)}, {tuple(scores.shape)}; PyTorch gives "
                f"{tuple(ref_boxes.shape)}, {tuple(ref_scores.shape)}"]
    box_err, score_err = float((boxes - ref_boxes).abs().max()), float((scores - ref_scores).abs().max())
    result.box_err = max(result.box_err or 0.0, box_err)
    result.score_err = max(result.score_err or 0.0, score_err)
    out = []
    if not box_err <= BOX_TOL_PX:
        out.append(f"boxes differ from PyTorch by {box_err:.4g} px (bound {BOX_TOL_PX})")
    if not score_err <= SCORE_TOL:
        out.append(f"scores differ from PyTorch by {score_err:.4g} (bound {SCORE_TOL})")
    return out


def _compare_raw(result: CaseResult, outs: list[torch.Tensor], ref: torch.Tensor) -> list[str]:
    (got,) = outs
    if got.shape != ref.shape:
        return [f"output {tuple(got.shape)}, PyTorch {tuple(ref.shape)}"]
    return _errors(result, got[:, :4], ref[:, :4], got[:, 4:], ref[:, 4:])


def _compare_plugin_inputs(result: CaseResult, outs: list[torch.Tensor], ref: torch.Tensor) -> list[str]:
    boxes, scores = outs
    ref = ref.transpose(1, 2)  # what NMSTail hands the plugin: (B, anchors, 4) and (B, anchors, nc)
    return _errors(result, boxes, ref[..., :4], scores, ref[..., 4:])


def _compare_topk(result: CaseResult, outs: list[torch.Tensor], ref: torch.Tensor) -> list[str]:
    tail = tail_for("topk", ref.shape[-1], MAX_DET, IOU_THRES, CONF_THRES)
    b, k = ref.shape[0], tail.max_det
    shapes = [tuple(o.shape) for o in outs]
    if shapes != [(b, 1), (b, k, 4), (b, k), (b, k)] or outs[0].dtype != torch.int32 or outs[3].dtype != torch.int32:
        return [f"End2End outputs {shapes} {[str(o.dtype) for o in outs]}, expected int32 (B,1), (B,{k},4), "
                f"(B,{k}), int32 (B,{k})"]
    with torch.no_grad():
        expected = decode_end2end(*tail(ref))
    got = decode_end2end(*outs)
    problems = []
    for i, (g, e) in enumerate(zip(got, expected)):
        problems += [f"image {i}: {p}" for p in topk_set_problems(g, e, ref[i], k)]
    return problems


def topk_set_problems(got: torch.Tensor, expected: torch.Tensor, pred: torch.Tensor, k: int) -> list[str]:
    """Differences between two (n, 6) top-k detection sets that near-ties do not explain.

    ``pred``: PyTorch's (4 + nc, anchors) prediction of the image, to tell a class near-tie from a
    wrong class. Rows pair up by box and score (within the bounds); a row one set lacks must sit
    within ``SCORE_TOL`` of where that set was cut, and every row's class must be, within
    ``SCORE_TOL``, the best class of an anchor with that box.
    """
    ref_boxes, ref_scores = xywh2xyxy(pred[:4].T), pred[4:].T  # (anchors, 4), (anchors, nc)
    problems = []
    for row in got:
        near = ((ref_boxes - row[:4]).abs().amax(1) <= BOX_TOL_PX).nonzero().flatten()
        cls = int(row[5])
        ok = [a for a in near.tolist() if abs(float(ref_scores[a, cls] - row[4])) <= SCORE_TOL
              and float(ref_scores[a].max() - ref_scores[a, cls]) <= SCORE_TOL]
        if not ok:
            problems.append(f"detection {row.tolist()} is no anchor's best class in PyTorch's prediction")
    unpaired_got, unpaired_exp = _unpaired(got, expected)
    # a row one set lacks must have been cut from it: near that set's k-th score or the threshold
    for label, rows, cut in (("only in ONNX Runtime", unpaired_got, _cut(expected, k)),
                             ("only in PyTorch", unpaired_exp, _cut(got, k))):
        far = [r for r in rows if float(r[4]) > cut + SCORE_TOL]
        if far:
            problems.append(f"{len(far)} detection(s) {label} score above the cut {cut:.3f} + {SCORE_TOL}, "
                            f"e.g. {far[0].tolist()}")
    return problems


def _cut(dets: torch.Tensor, k: int) -> float:
    """The score at which a set is cut: its k-th score when full, else the confidence threshold."""
    return float(dets[:, 4].min()) if len(dets) >= k else CONF_THRES


def _unpaired(a: torch.Tensor, b: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rows of ``a`` and ``b`` left after pairing each row of ``a`` with a free row of ``b`` whose
    box and score are within the bounds (rows come sorted by score, so greedy pairing suffices)."""
    free = list(range(len(b)))
    left_a = []
    for row in a:
        match = next((j for j in free if float((b[j, :4] - row[:4]).abs().max()) <= BOX_TOL_PX
                      and abs(float(b[j, 4] - row[4])) <= SCORE_TOL), None)
        if match is None:
            left_a.append(row)
        else:
            free.remove(match)
    return left_a, [b[j] for j in free]


# ----------------------------------------------------------------------------------------------
# EfficientNMS_TRT: the plugin node against TensorRT's documented contract
# ----------------------------------------------------------------------------------------------


def _plugin_node(model: onnx.ModelProto, contract: dict) -> onnx.NodeProto | None:
    nodes = [n for n in model.graph.node if n.op_type == contract["op_type"]]
    return nodes[0] if len(nodes) == 1 else None


def _plugin_inputs_model(model: onnx.ModelProto, contract: dict) -> onnx.ModelProto:
    """The graph up to the plugin: the plugin removed, its inputs made the graph outputs."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    plugin = _plugin_node(cut, contract)
    cut.graph.node.remove(plugin)
    del cut.graph.output[:]
    cut.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in plugin.input)
    return cut


def _dtype_name(elem_type: int) -> str:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name if elem_type else "undefined"


def _attribute_problems(node: onnx.NodeProto, contract: dict) -> list[str]:
    attrs = {a.name: a for a in node.attribute}
    problems = []
    known = set(contract["attributes"]) | set(contract["onnx_parser_attributes"])
    problems += [f"attribute {name!r} is not one of the plugin's fields" for name in sorted(set(attrs) - known)]
    for name, spec in contract["attributes"].items():
        if name not in attrs:
            if spec["required"]:
                problems.append(f"required attribute {name!r} missing")
            continue
        onnx_type = getattr(onnx.AttributeProto, contract["onnx_attribute_type"][spec["type"]])
        if attrs[name].type != onnx_type:
            problems.append(f"attribute {name!r} is {onnx.AttributeProto.AttributeType.Name(attrs[name].type)}, "
                            f"the plugin reads {spec['type']}")
            continue
        value = helper.get_attribute_value(attrs[name])
        if "choices" in spec and value not in spec["choices"]:
            problems.append(f"attribute {name}={value} not in {spec['choices']}")
        if "min" in spec and not (value >= spec["min"] if spec["min_inclusive"] else value > spec["min"]):
            problems.append(f"attribute {name}={value} below its minimum {spec['min']}")
    for name, kind in contract["onnx_parser_attributes"].items():
        if name in attrs and attrs[name].type != getattr(onnx.AttributeProto, contract["onnx_attribute_type"][kind]):
            problems.append(f"attribute {name!r} must be a {kind}")
    version = helper.get_attribute_value(attrs["plugin_version"]).decode() if "plugin_version" in attrs else "1"
    if version != contract["plugin_version"]:
        problems.append(f"plugin_version {version!r}, the documented plugin is version {contract['plugin_version']!r}")
    return problems


def plugin_problems(model: onnx.ModelProto, contract: dict, nc: int) -> list[str]:
    """Where the End2End NMS graph's plugin node breaks TensorRT's EfficientNMS_TRT contract:
    attributes and their types, input / output count, dtypes and shapes."""
    node = _plugin_node(model, contract)
    if node is None:
        return [f"expected exactly one {contract['op_type']} node"]
    problems = _attribute_problems(node, contract)
    inferred = shape_inference.infer_shapes(model).graph
    infos = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.output, *inferred.input]}

    def dims(name: str) -> list:
        """Known sizes as ints, a symbolic or unknown one (the dynamic batch) as '?'."""
        t = infos.get(name)
        if t is None or not t.HasField("shape"):
            return []
        return [d.dim_value if d.HasField("dim_value") else "?" for d in t.shape.dim]

    if len(node.input) != 2:
        problems.append(f"{len(node.input)} inputs; standard NMS mode takes boxes and scores (anchors unused)")
        return problems
    boxes, scores = node.input
    (b, n, four), (b2, n2, c) = (dims(boxes) + [None] * 3)[:3], (dims(scores) + [None] * 3)[:3]
    for name, spec_name in ((boxes, "boxes"), (scores, "scores")):
        dtype = _dtype_name(infos[name].elem_type) if name in infos else "unknown"
        if dtype not in contract["inputs"][spec_name]["dtypes"]:
            problems.append(f"input {spec_name} is {dtype}, the plugin takes {contract['inputs'][spec_name]['dtypes']}")
    if len(dims(boxes)) != 3 or four != 4:
        problems.append(f"boxes shape {dims(boxes)}, expected [batch, number_boxes, 4]")
    if len(dims(scores)) != 3 or c != nc:
        problems.append(f"scores shape {dims(scores)}, expected [batch, number_boxes, {nc}]")
    if (b, n) != (b2, n2):
        problems.append(f"boxes and scores disagree on batch / number_boxes: {dims(boxes)} vs {dims(scores)}")
    k = next((a.i for a in node.attribute if a.name == "max_output_boxes"), None)
    sizes = {"batch": b, "max_output_boxes": k}
    if len(node.output) != len(contract["outputs"]):
        problems.append(f"{len(node.output)} outputs, the plugin has {len(contract['outputs'])}")
        return problems
    for out, spec in zip(node.output, contract["outputs"]):
        dtype = _dtype_name(infos[out].elem_type) if out in infos else "unknown"
        want = [sizes.get(d, d) for d in spec["shape"]]
        if dtype not in spec["dtypes"]:
            problems.append(f"output {out} ({spec['name']}) is {dtype}, the plugin writes {spec['dtypes']}")
        if dims(out) != want:
            problems.append(f"output {out} ({spec['name']}) declared {dims(out)}, the plugin writes {want}")
    return problems
