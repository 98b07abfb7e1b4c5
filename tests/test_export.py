"""ONNX export: every config (FP, QAT, End2End NMS, End2End NMS-free), numerics through ONNX Runtime,
End2End decoding against val.py's postprocessing, dynamic batch, and the Q/DQ clean-up."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from models.experimental_trt import End2End, NMSTail, Prediction, decode_end2end, efficient_nms_reference
from models.quantize import calibrate, float_conv_names, prepare
from models.yolo import DetectionModel
from tests.export_helpers import (
    CONFORMANCE_SLICE,
    assert_same_detections,
    cpu_session,
    hand_built_model,
    lively_head,
    run_ort,
)
from tests.qat_helpers import BLOCK_CONFIGS, shrunk_config, slow_matrix_case
from utils.deployment.onnx_export import export_onnx, merge_redundant_qdq, trace_prediction
from utils.deployment.qdq_lint import SKIP_METADATA_KEY, lint
from utils.evaluation.postprocess import no_max_suppression, non_max_suppression
from utils.paths import ROOT

CONFIGS = sorted(p.stem for p in (ROOT / "models" / "detect").glob("*.yaml"))
ASSETS = ROOT / "tests" / "assets"
IMGSZ = 64
NC = 3


def build(cfg: str | os.PathLike | dict, quantized: bool, lively: bool = False, seed: int = 0) -> DetectionModel:
    """A fused (and, if asked, calibrated QAT-prepared) model; ``lively``: with distinct boxes and
    scores (see ``lively_head``), for tests that compare detections."""
    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=NC)
    if lively:
        lively_head(model, seed)
    if quantized:
        prepare(model)
        gen = torch.Generator().manual_seed(seed)
        calibrate(model, [torch.rand(2, 3, IMGSZ, IMGSZ, generator=gen)])
    else:
        model.fuse()
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(seed))


def check_end2end_outputs(model: onnx.ModelProto, k: int) -> None:
    outs = {o.name: o.type.tensor_type for o in model.graph.output}
    assert list(outs) == ["num_dets", "det_boxes", "det_scores", "det_classes"]
    assert outs["num_dets"].elem_type == outs["det_classes"].elem_type == TensorProto.INT32
    dims = {n: [d.dim_param or d.dim_value for d in t.shape.dim] for n, t in outs.items()}
    assert dims == {"num_dets": ["batch", 1], "det_boxes": ["batch", k, 4], "det_scores": ["batch", k],
                    "det_classes": ["batch", k]}


def export_all_kinds(model, cfg: str, out, quantized: bool, pred=None) -> None:
    """Raw and both End2End exports of one model pass onnx.checker and the lint, with Q/DQ iff quantized.
    ``pred``: the model's dynamic-batch ``trace_prediction``, if already made."""
    floats = float_conv_names(model) if quantized else []
    pred = pred or trace_prediction(model, IMGSZ, dynamic=True)
    for kind in ("raw", "nms", "topk"):
        file = out / f"{cfg}-{'qat' if quantized else 'fp'}-{kind}.onnx"
        result = export_onnx(model, file, postprocess=kind, max_det=20, float_convs=floats, prediction=pred)
        exported = onnx.load(str(file))
        onnx.checker.check_model(exported)
        ops = {n.op_type for n in exported.graph.node}
        assert ("QuantizeLinear" in ops) == quantized and ("DequantizeLinear" in ops) == quantized
        assert result.findings == [] and lint(file) == [], f"{cfg} {kind}: {result.findings[:5]}"
        assert ("EfficientNMS_TRT" in ops) == (kind == "nms") and ("TopK" in ops) == (kind == "topk")
        if kind != "raw":
            check_end2end_outputs(exported, 20)
    if quantized:  # DFL stays float on purpose, and the metadata says so
        meta = {p.key: p.value for p in exported.metadata_props}
        assert json.loads(meta[SKIP_METADATA_KEY]) == result.float_convs and len(result.float_convs) >= 1


# One config per distinct export path (tests.qat_helpers.BLOCK_CONFIGS), each config's layer graph at
# 1/16 of its width (tests/qat_helpers.shrunk_config; export, the lint and the End2End tails follow the
# graph, not the channel counts). Every config at full width is exported (QAT, all three kinds) and
# checked in bench/bench_conformance.py (468 cases), and tests/test_models.py checks each one's sizes.
@pytest.mark.parametrize("cfg", BLOCK_CONFIGS)
def test_fp_exports_raw_and_end2end(cfg, tmp_path):
    export_all_kinds(build(shrunk_config(cfg, nc=NC), quantized=False), cfg, tmp_path, quantized=False)


def test_fp_export_configs_cover_every_block_and_head():
    """The FP export slice above still meets every layer type of every bundled config."""
    from models.config import load_config, resolve_config

    def layer_types(cfg: str) -> set[str]:
        d = load_config(resolve_config(cfg))
        return {row[2] for row in d["backbone"] + d["head"]}

    assert set().union(*map(layer_types, BLOCK_CONFIGS)) == set().union(*map(layer_types, CONFIGS))


# Preparing and tracing a QAT model takes minutes per config on 2 CPU cores. The t configs of both
# families run always (s has t's graph at a larger width); all ten run in bench/bench_qdq_lint.py
# (bench/results/qdq_lint_findings_total.json) and here with YOLOV9_SLOW_TESTS=1.
SLOW = slow_matrix_case("bench/bench_qdq_lint.py")


@pytest.mark.parametrize("cfg", [c if c.endswith("-t") else pytest.param(c, marks=SLOW) for c in CONFIGS])
def test_qat_exports_have_zero_lint_findings(cfg, tmp_path, conformance_model):
    """The acceptance judge of the QAT placement rules: every Q/DQ export lints clean. The t configs
    take the conformance slice's models and dynamic-batch traces (built once per session)."""
    shared = [(nc, *geometry) for (c, nc), geometry in CONFORMANCE_SLICE.items() if c == cfg]
    if shared:
        model, pred = conformance_model(cfg, *shared[0])
        export_all_kinds(model, cfg, tmp_path, quantized=True, pred=pred)
    else:
        export_all_kinds(build(f"{cfg}.yaml", quantized=True), cfg, tmp_path, quantized=True)


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """FP and QAT gelan-tiny, dual-head yolov9-tiny QAT: dynamic-batch raw and End2End ONNX files, and
    the prediction trace each came from (tests that export again reuse it: tracing is the slow part)."""
    out = tmp_path_factory.mktemp("export")
    models, files, preds = {}, {}, {}
    for name, cfg, quantized in (("fp", "gelan-tiny", False), ("qat", "gelan-tiny", True),
                                 ("dual-qat", "yolov9-tiny", True)):
        model = build(ASSETS / f"{cfg}.yaml", quantized, lively=True)
        pred = preds[name] = trace_prediction(model, IMGSZ, dynamic=True)
        floats = float_conv_names(model) if quantized else []
        for kind in ("raw", "nms", "topk"):
            files[name, kind] = export_onnx(model, out / f"{name}-{kind}.onnx", postprocess=kind, max_det=30,
                                            iou_thres=0.5, conf_thres=0.3, float_convs=floats, prediction=pred).path
        models[name] = model
    return models, files, preds


@pytest.mark.parametrize("name", ["fp", "qat", "dual-qat"])
def test_onnxruntime_matches_pytorch(tiny_exports, name):
    models, files, _ = tiny_exports
    x = images(4)
    with torch.no_grad():
        ref = Prediction(models[name])(x)
    got = run_ort(files[name, "raw"], x)[0]
    assert got.shape == ref.shape == (4, 4 + NC, 84)
    err = (got - ref).abs()
    # FP: float rounding only. QAT: ORT and PyTorch round the same values to the same INT8 grid;
    # a rare tie flips one step, which stays far below a pixel / a score point.
    tol = 1e-4 if name == "fp" else 1e-2
    assert err[:, :4].max() <= tol * ref[:, :4].abs().max(), err.max()
    assert err[:, 4:].max() <= tol, err[:, 4:].max()


@pytest.mark.parametrize("name", ["fp", "qat", "dual-qat"])
def test_end2end_topk_equals_nms_free_postprocessing(tiny_exports, name):
    models, files, _ = tiny_exports
    """The TopK tail decodes exactly like ``no_max_suppression`` on the raw output of the same graph
    (and, for FP, like it on PyTorch's output; QAT numerics are compared raw in the test above)."""
    x = images(3)
    got = decode_end2end(*run_ort(files[name, "topk"], x))
    from_raw = no_max_suppression(run_ort(files[name, "raw"], x)[0], conf_thres=0.3, max_det=30)
    assert sum(len(d) for d in got) > 10
    for g, r in zip(got, from_raw):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)
    if name == "fp":
        with torch.no_grad():
            expected = no_max_suppression(Prediction(models[name])(x), conf_thres=0.3, max_det=30)
        for g, e in zip(got, expected):
            assert_same_detections(g, e)


def _plugin_inputs_model(path) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """The End2End NMS graph with the plugin removed and its two inputs made graph outputs."""
    model = onnx.load(str(path))
    plugin = next(n for n in model.graph.node if n.op_type == "EfficientNMS_TRT")
    model.graph.node.remove(plugin)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in plugin.input)
    return model, plugin


@pytest.mark.parametrize("name", ["fp", "qat"])
def test_end2end_nms_plugin_node_and_reference_decode(tiny_exports, name):
    models, files, _ = tiny_exports
    truncated, plugin = _plugin_inputs_model(files[name, "nms"])
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin.attribute}
    assert plugin.domain == "TRT" and attrs["background_class"] == -1 and attrs["box_coding"] == 1
    assert attrs["score_activation"] == 0 and attrs["max_output_boxes"] == 30
    assert attrs["iou_threshold"] == pytest.approx(0.5) and attrs["score_threshold"] == pytest.approx(0.3)
    x = images(3)
    session = cpu_session(truncated.SerializeToString())
    boxes, scores = (torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()}))
    assert boxes.shape == (3, 84, 4) and scores.shape == (3, 84, NC)
    got = decode_end2end(*efficient_nms_reference(boxes, scores, 0.5, 0.3, 30))
    with torch.no_grad():
        pred = Prediction(models[name])(x)
        torch_e2e = decode_end2end(*End2End(models[name], NMSTail(30, 0.5, 0.3))(x))
    expected = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.5, multi_label=True, max_det=30)
    from_graph = non_max_suppression(torch.cat((boxes, scores), 2).transpose(1, 2), conf_thres=0.3, iou_thres=0.5,
                                     multi_label=True, max_det=30)
    assert sum(len(d) for d in expected) > 5
    for g, f, t, e in zip(got, from_graph, torch_e2e, expected):
        torch.testing.assert_close(t, e)  # PyTorch End2End module == val.py's NMS on the same prediction
        torch.testing.assert_close(g, f)  # plugin inputs of the ONNX, decoded the plugin's way == val.py's NMS
        if name == "fp":
            assert_same_detections(g, e)


@pytest.mark.parametrize("kind", ["raw", "topk"])
def test_dynamic_batch_of_8_equals_8_single_images(tiny_exports, kind):
    _, files, _ = tiny_exports
    x = images(8, seed=5)
    batch = run_ort(files["qat", kind], x)
    singles = [run_ort(files["qat", kind], x[i:i + 1]) for i in range(8)]
    if kind == "raw":
        whole = no_max_suppression(batch[0], 0.3, 30)
        one_by_one = [no_max_suppression(s[0], 0.3, 30)[0] for s in singles]
    else:
        whole = decode_end2end(*batch)
        one_by_one = [decode_end2end(*s)[0] for s in singles]
    assert sum(len(d) for d in whole) > 10
    for w, s in zip(whole, one_by_one):
        torch.testing.assert_close(w, s, atol=1e-4, rtol=1e-5)


def _qdq(nodes, inits, x, scale, tag):
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s{tag}"),
              numpy_helper.from_array(np.array(0, np.int8), f"z{tag}")]
    nodes += [helper.make_node("QuantizeLinear", [x, f"s{tag}", f"z{tag}"], [f"q{tag}"], name=f"Q{tag}"),
              helper.make_node("DequantizeLinear", [f"q{tag}", f"s{tag}", f"z{tag}"], [f"dq{tag}"], name=f"DQ{tag}")]
    return f"dq{tag}"


def test_merge_redundant_qdq_keeps_values_and_removes_duplicates():
    nodes, inits = [], []
    a = _qdq(nodes, inits, "x", 0.1, "a")
    b = _qdq(nodes, inits, "x", 0.1, "b")  # same tensor, same scale: a duplicate pair
    c = _qdq(nodes, inits, "x", 0.2, "c")  # another scale: must stay
    d = _qdq(nodes, inits, a, 0.1, "d")  # DQ -> Q with equal parameters: the identity
    e = _qdq(nodes, inits, "x", 0.1, "e")  # a second duplicate of the same tensor
    nodes += [helper.make_node("Add", [b, c], ["s1"]), helper.make_node("Add", ["s1", d], ["s2"]),
              helper.make_node("Add", ["s2", e], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], inits)
    model = hand_built_model(graph, 13)
    x = np.array([0.04, -1.3, 2.26, 0.5], np.float32)
    before = cpu_session(model.SerializeToString()).run(None, {"x": x})[0]
    assert merge_redundant_qdq(model) == 3
    onnx.checker.check_model(model)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) == 2
    after = cpu_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("tool", ["onnxsim", "onnxslim"])
def test_simplifiers_keep_qdq_and_pass_lint(tiny_exports, tool, tmp_path):
    models, files, preds = tiny_exports
    floats = float_conv_names(models["qat"])
    result = export_onnx(models["qat"], tmp_path / f"{tool}.onnx", simplify=tool, float_convs=floats,
                         prediction=preds["qat"])
    assert result.findings == [] and result.qdq_pairs > 50
    x = images(2)
    torch.testing.assert_close(run_ort(result.path, x)[0], run_ort(files["qat", "raw"], x)[0], atol=1e-3, rtol=1e-4)


def test_torch_ir_lint_passes_and_skipping_it_changes_no_export(tiny_exports, torchscript_graph_lint, monkeypatch):
    """The suite skips PyTorch's IR self-check (tests/conftest.py); here it runs on the gelan-tiny QAT
    trace, and the ONNX is byte for byte the one the other tests export without it."""
    models, _, preds = tiny_exports
    monkeypatch.setattr(torch._C, "_jit_pass_lint", torchscript_graph_lint)
    linted = trace_prediction(models["qat"], IMGSZ, dynamic=True)
    assert linted.model.SerializeToString() == preds["qat"].model.SerializeToString()


def test_opset_below_13_is_refused(tiny_exports, tmp_path):
    from utils.errors import UserError

    with pytest.raises(UserError, match="opset"):
        export_onnx(tiny_exports[0]["qat"], tmp_path / "m.onnx", IMGSZ, opset=12)
