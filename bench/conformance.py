"""One export-conformance case: an exported ONNX variant of a quantized detection or segmentation
model, checked the way an executor would take it and against the PyTorch fake-quant model it came from.

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

A segmentation model's cases check its masks as well. Every variant: each anchor's mask
probability sigmoid(coefficients . prototypes) at every prototype pixel, from the ONNX Runtime
tensors ``output0`` / ``output1`` (the raw outputs; inside an End2End graph, the tensors its tail
reads) against PyTorch's, within ``MASK_TOL`` (max) and ``MASK_MEAN_TOL`` (mean). End2End variants:
``det_masks`` against the same assembly done in PyTorch on ONNX Runtime's own ``output0`` /
``output1`` for the rows the graph kept (gather by the row's anchor, matmul, sigmoid, crop), within
``ASSEMBLY_TOL`` (float rounding), padding rows all 0; for ``nms`` the plugin is replaced by its
documented algorithm (``efficient_nms_reference``) run on ONNX Runtime's own plugin inputs.

Tolerances. ONNX Runtime and PyTorch compute the same quantized function; only the summation
order inside convolutions differs (~1e-6 relative). A value that lands that close to a rounding
boundary of a QuantizeLinear is rounded to the neighbouring INT8 step in one runtime and not the
other, and that step travels on to the outputs. At the head's last convolutions one step of the
input (scale s) moves a logit by at most s * max|w|, about 7e-4 in these calibrated models (gelan-t:
s ~ 3e-5, |w| <= 21): a score (sigmoid slope <= 1/4) by <= 2e-4, and a box side, a DFL expectation
over 16 bins times a stride of up to 32 px, by <= 7e-4 * 15 * 32 ~ 0.34 px. ``BOX_TOL_PX`` allows
about three such flips, ``SCORE_TOL`` far more, and both sit far below what a wrong scale, axis or
zero point does (whole steps on every value: tenths of a score). Masks are less forgiving of that
divergence, and it is larger than one step in the c-size models at random init: their features
fade with depth (gelan-c-seg: |P3| <= 8e-3 against 2.8 after the stem), so each layer's rounding
ties move the next layer's inputs by more steps, and the prototypes' input differs by up to ~4% of
its range between the runtimes (measured; the same divergence moves boxes by ~0.02 px). The
prototype convs carry it: prototypes differ by up to ~5% of their range, mask logits (std ~1.4) by
up to ~0.4, probabilities by <= 0.09 at the worst pixel and ~0.015 on average. ``MASK_TOL`` = 0.15
and ``MASK_MEAN_TOL`` = 0.03 allow that; a wrong prototype scale (x2) moves probabilities by 0.10 on
average, a wrong scale, axis or zero point on a mask conv by more. The tiny test models, whose
features do not fade, agree within 0.01 (tests/test_export_segment.py). The measured spread over the
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

from models.experimental_trt import (
    Prediction,
    assemble_masks,
    decode_end2end,
    efficient_nms_reference,
    source_anchors,
)
from models.quantize import calibrate, float_conv_names, prepare
from models.yolo import Model
from tests.export_helpers import lively_head, lively_masks
from utils.data.dataset import model_task
from utils.boxes import xywh2xyxy
from utils.deployment.onnx_export import PredictionGraph, export_onnx, tail_for, trace_prediction
from utils.deployment.ort_runtime import session_options
from utils.paths import ROOT

DETECT_CONFIGS = tuple(sorted(p.stem for p in (ROOT / "models" / "detect").glob("*.yaml")))
SEGMENT_CONFIGS = tuple(sorted(p.stem for p in (ROOT / "models" / "segment").glob("*.yaml")))
CONFIGS = DETECT_CONFIGS + SEGMENT_CONFIGS
NCS = (1, 2, 80)
VARIANTS = ("raw", "nms", "topk")
BATCH_MODES = ("static", "dynamic")
SHAPES = {"square": (64, 64), "non-square": (64, 96)}  # (h, w)
CALIB_SIZE = 64
DYNAMIC_BATCHES = (1, 3)
MAX_DET, IOU_THRES, CONF_THRES = 30, 0.45, 0.25
BOX_TOL_PX = 1.0  # see the module docstring
SCORE_TOL = 0.02
MASK_TOL, MASK_MEAN_TOL = 0.15, 0.03  # mask probability, max and mean: see the module docstring
ASSEMBLY_TOL = 1e-4  # det_masks against the same assembly in PyTorch on the same tensors
RAW_OUTPUTS = ("output0", "output1")
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
        return f"{Path(self.cfg).name}-nc{self.nc}-{self.variant}-{self.batch_mode}-{self.shape}"


@dataclass
class CaseResult:
    case: Case
    problems: list[str] = field(default_factory=list)
    box_err: float | None = None  # max |ORT - PyTorch| over boxes (px), raw and nms variants
    score_err: float | None = None
    mask_err: float | None = None  # max |ORT - PyTorch| mask probability, segmentation models
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"case": self.case.name, "passed": self.passed, "problems": self.problems,
                "box_err": self.box_err, "score_err": self.score_err, "mask_err": self.mask_err,
                "seconds": round(self.seconds, 2)}


def quantized_model(cfg: str, nc: int, seed: int = 0) -> nn.Module:
    """A config at random init, with a head whose boxes and scores are spread like a detector's
    (``lively_head``; a segmentation head's masks too: ``lively_masks``), QAT-prepared and calibrated
    on random images; eval mode."""
    torch.manual_seed(seed)
    calib = torch.rand(2, 3, CALIB_SIZE, CALIB_SIZE, generator=torch.Generator().manual_seed(seed))
    model = lively_head(Model(f"{cfg}.yaml", nc=nc), seed)
    if is_segment(model):
        lively_masks(model, calib)
    prepare(model)
    calibrate(model, [calib])
    return model.eval()


def is_segment(model: nn.Module) -> bool:
    return model_task(model) == "segment"


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
            if is_segment(model):
                _check_runs(result, _plugin_emulated_model(graph, contract), model, case, _compare_nms_masks)
        elif case.variant == "raw":
            _check_runs(result, str(file), model, case, _compare_raw)
        else:
            source = _with_raw_outputs(graph).SerializeToString() if is_segment(model) else str(file)
            _check_runs(result, source, model, case, _compare_topk)
    except Exception as exc:
        result.problems.append(f"ONNX Runtime: {_first_line(exc)}")
    result.seconds = time.time() - start
    return result


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _session(source) -> ort.InferenceSession:
    # errors only (the cut graphs leave the tail's unused constants: not a finding), sized like PyTorch
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])


@dataclass
class Reference:
    """PyTorch's prediction of a batch: (B, 4 + nc [+ nm], anchors), and a segmentation model's
    prototypes (B, nm, h, w)."""
    pred: torch.Tensor
    prototypes: torch.Tensor | None
    nc: int
    input_hw: tuple[int, int]

    @property
    def detection(self) -> torch.Tensor:
        return self.pred[:, :4 + self.nc]

    @property
    def coefficients(self) -> torch.Tensor:
        return self.pred[:, 4 + self.nc:]


def _check_runs(result: CaseResult, source, model: nn.Module, case: Case, compare) -> None:
    """``source`` (an ONNX file or bytes, or a callable that runs a batch) on the case's batches
    against PyTorch's prediction, through ``compare``."""
    if callable(source):
        run = source
    else:
        session = _session(source)
        run = lambda x: session.run(None, {"images": x.numpy()})  # noqa: E731
    batches = DYNAMIC_BATCHES if case.batch_mode == "dynamic" else (1,)
    for b in batches:
        x = images(b, case.shape, seed=b)
        with torch.no_grad():
            out = Prediction(model)(x)
        ref = Reference(*(out if isinstance(out, tuple) else (out, None)), case.nc, SHAPES[case.shape])
        outs = [torch.from_numpy(o) for o in run(x)]
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


def _compare_raw(result: CaseResult, outs: list[torch.Tensor], ref: Reference) -> list[str]:
    expected = [ref.pred] if ref.prototypes is None else [ref.pred, ref.prototypes]
    if [o.shape for o in outs] != [e.shape for e in expected]:
        return [f"outputs {[tuple(o.shape) for o in outs]}, PyTorch {[tuple(e.shape) for e in expected]}"]
    got = outs[0]
    problems = _errors(result, got[:, :4], ref.pred[:, :4], got[:, 4:4 + ref.nc], ref.detection[:, 4:])
    if ref.prototypes is not None:  # every anchor's mask, everywhere
        problems += _anchor_mask_problems(result, got, outs[1], ref)
    return problems


def _compare_plugin_inputs(result: CaseResult, outs: list[torch.Tensor], ref: Reference) -> list[str]:
    boxes, scores = outs
    expected = ref.detection.transpose(1, 2)  # what NMSTail hands the plugin: (B, anchors, 4) and (B, anchors, nc)
    return _errors(result, boxes, expected[..., :4], scores, expected[..., 4:])


def _compare_topk(result: CaseResult, outs: list[torch.Tensor], ref: Reference) -> list[str]:
    segment = ref.prototypes is not None
    masks = (ref.coefficients.shape[1], ref.input_hw) if segment else None
    tail = tail_for("topk", ref.pred.shape[-1], MAX_DET, IOU_THRES, CONF_THRES, masks)
    b, k = ref.pred.shape[0], tail.max_det
    shapes = [tuple(o.shape) for o in outs[:5 if segment else 4]]
    want = [(b, 1), (b, k, 4), (b, k), (b, k)] + ([(b, k, *ref.prototypes.shape[-2:])] if segment else [])
    if shapes != want or outs[0].dtype != torch.int32 or outs[3].dtype != torch.int32:
        return [f"End2End outputs {shapes} {[str(o.dtype) for o in outs]}, expected int32 (B,1), (B,{k},4), "
                f"(B,{k}), int32 (B,{k})" + (f", (B,{k},h,w)" if segment else "")]
    with torch.no_grad():
        expected_outs = tail(ref.pred, ref.prototypes) if segment else tail(ref.pred)
    expected, got = decode_end2end(*expected_outs[:4]), decode_end2end(*outs[:4])
    problems = []
    for i, (g, e) in enumerate(zip(got, expected)):
        problems += [f"image {i}: {p}" for p in topk_set_problems(g, e, ref.detection[i], k)]
    if segment:
        pred, prototypes = outs[5:7]
        problems += _assembly_problems(outs, pred, prototypes, ref)
        problems += _anchor_mask_problems(result, pred, prototypes, ref)
    return problems


def _anchor_mask_problems(result: CaseResult, pred: torch.Tensor, prototypes: torch.Tensor,
                          ref: Reference) -> list[str]:
    """Every anchor's mask probability at every prototype pixel against PyTorch's."""
    if prototypes.shape != ref.prototypes.shape:
        return [f"prototypes {tuple(prototypes.shape)}, PyTorch {tuple(ref.prototypes.shape)}"]
    masks = torch.einsum("bma,bmhw->bahw", pred[:, 4 + ref.nc:], prototypes).sigmoid()
    ref_masks = torch.einsum("bma,bmhw->bahw", ref.coefficients, ref.prototypes).sigmoid()
    diff = (masks - ref_masks).abs()
    worst, mean = float(diff.max()), float(diff.mean())
    result.mask_err = max(result.mask_err or 0.0, worst)
    if worst <= MASK_TOL and mean <= MASK_MEAN_TOL:
        return []
    return [f"anchor mask probabilities differ from PyTorch by {worst:.4g} max, {mean:.4g} mean "
            f"(bounds {MASK_TOL}, {MASK_MEAN_TOL})"]


def _assembly_problems(outs: list[torch.Tensor], pred: torch.Tensor, prototypes: torch.Tensor,
                       ref: Reference) -> list[str]:
    """``det_masks`` (outs[4]) against PyTorch's assembly on the graph's own raw tensors for the
    rows it kept: each row's anchor is the candidate whose box is the row's box."""
    num, boxes, masks = outs[0], outs[1], outs[4]
    with torch.no_grad():
        anchors = source_anchors(boxes, xywh2xyxy(pred[:, :4].transpose(1, 2)))
        expected = assemble_masks(pred[:, 4 + ref.nc:], prototypes, anchors, boxes, ref.input_hw)
    valid = torch.arange(masks.shape[1])[None] < num
    problems = [] if bool((masks[~valid] == 0).all()) else ["padding rows of det_masks are not 0"]
    err = float((masks[valid] - expected[valid]).abs().max()) if valid.any() else 0.0
    if err > ASSEMBLY_TOL:
        problems.append(f"det_masks differ from the assembly of the graph's own coefficients and prototypes "
                        f"by {err:.4g} (bound {ASSEMBLY_TOL})")
    return problems


def _with_raw_outputs(graph: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an End2End segmentation graph that also outputs the raw tensors its tail reads."""
    out = onnx.ModelProto()
    out.CopyFrom(graph)
    out.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in RAW_OUTPUTS)
    return out


def _plugin_emulated_model(graph: onnx.ModelProto, contract: dict):
    """The End2End NMS graph runnable without TensorRT: ONNX Runtime computes the plugin's inputs,
    the plugin's documented algorithm (``efficient_nms_reference``) its outputs, and ONNX Runtime
    the rest of the graph (anchor lookup, mask assembly) from them, with the raw tensors appended.
    Returns a function of the images."""
    plugin = _plugin_node(graph, contract)
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin.attribute}
    after = _with_raw_outputs(graph)
    after.graph.node.remove(_plugin_node(after, contract))
    types = (onnx.TensorProto.INT32, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.INT32)
    after.graph.input.extend(helper.make_tensor_value_info(n, t, None) for n, t in zip(plugin.output, types))
    before = _session(_plugin_inputs_model(graph, contract).SerializeToString())
    rest = _session(after.SerializeToString())

    def run(x: torch.Tensor) -> list:
        boxes, scores = (torch.from_numpy(a) for a in before.run(None, {"images": x.numpy()}))
        kept = efficient_nms_reference(boxes, scores, attrs["iou_threshold"], attrs["score_threshold"],
                                       attrs["max_output_boxes"])
        return rest.run(None, {"images": x.numpy(), **{n: t.numpy() for n, t in zip(plugin.output, kept)}})

    return run


def _compare_nms_masks(result: CaseResult, outs: list[torch.Tensor], ref: Reference) -> list[str]:
    pred, prototypes = outs[5:7]
    return _assembly_problems(outs, pred, prototypes, ref) + _anchor_mask_problems(result, pred, prototypes, ref)


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
    """The graph up to the plugin: the plugin and everything after it (a segmentation model's mask
    assembly) removed, the plugin's inputs made the graph outputs."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    plugin = _plugin_node(cut, contract)
    reached, keep = set(plugin.output), []
    for node in cut.graph.node:  # topological order: what reads the plugin's outputs comes after it
        if node is plugin or any(i in reached for i in node.input):
            reached.update(node.output)
        else:
            keep.append(node)
    del cut.graph.node[:]
    cut.graph.node.extend(keep)
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
