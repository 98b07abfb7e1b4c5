"""Segmentation export: QAT gelan-tiny-seg (Segment + Proto) and the dual yolov9-tiny-dseg (DualDSegment)
exported raw, End2End NMS-free and End2End EfficientNMS at 64x96 (and raw at 64x64): the Q/DQ lint,
the outputs, ONNX Runtime against PyTorch fake quantization, and the ONNX mask assembly against an
independent per-detection reference (the plugin is emulated with its documented algorithm)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from models.experimental_trt import (
    SEGMENT_END2END_OUTPUTS,
    End2End,
    Prediction,
    decode_end2end,
    decode_end2end_masks,
    efficient_nms_reference,
)
from models.quantize import calibrate, float_conv_names, prepare
from models.yolo import Model
from tests.export_helpers import cpu_session, lively_head, lively_masks, run_ort
from tests.qat_helpers import one_thread
from utils.deployment.backends import DetectionBackend
from utils.deployment.onnx_export import export_onnx, tail_for, trace_prediction
from utils.deployment.ort_runtime import OrtRunner
from utils.deployment.qdq_lint import lint
from utils.deployment.signature import onnx_signature
from utils.evaluation.postprocess import no_max_suppression, non_max_suppression
from utils.paths import ROOT

ASSETS = ROOT / "tests" / "assets"
HW = (64, 96)  # non-square on purpose
ANCHORS = 8 * 12 + 4 * 6 + 2 * 3
NC, NM, K, CONF, IOU = 2, 32, 30, 0.3, 0.5
CONFIGS = ("gelan-tiny-seg", "yolov9-tiny-dseg")
# ONNX Runtime's integer kernels and PyTorch's fake quantization round the same values to the same
# INT8 grid; they differ where a value sits on a rounding tie, which moves one input of a mask conv
# by one quantization step. The mask probabilities measured here differ by at most ~1e-3 (a sigmoid
# passes at most a quarter of a logit change); 0.01 is ten times that, still far from moving a
# clearly-on or clearly-off pixel across 0.5. Pixels within 0.01 of 0.5 may flip, hence IoU >= 0.98.
MASK_ATOL, MASK_IOU = 0.01, 0.98


def images(n: int, hw=HW, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def seg_exports(tmp_path_factory):
    """Calibrated QAT-prepared tiny segmentation models and their exports (dynamic batch)."""
    out = tmp_path_factory.mktemp("seg_export")
    models, files = {}, {}
    with one_thread():
        for cfg in CONFIGS:
            torch.manual_seed(0)
            model = lively_masks(lively_head(Model(ASSETS / f"{cfg}.yaml", nc=NC)), images(2, seed=0))
            prepare(model)
            calibrate(model, [images(2, seed=0)])
            model.eval()
            floats = float_conv_names(model)
            pred = trace_prediction(model, HW, dynamic=True)
            for kind in ("raw", "topk", "nms"):
                files[cfg, kind] = export_onnx(model, out / f"{cfg}-{kind}.onnx", postprocess=kind, max_det=K,
                                               iou_thres=IOU, conf_thres=CONF, float_convs=floats,
                                               prediction=pred).path
            models[cfg] = model
        files["gelan-tiny-seg", "square"] = export_onnx(models["gelan-tiny-seg"], out / "square.onnx", 64, dynamic=True,
                                                        float_convs=float_conv_names(models["gelan-tiny-seg"])).path
    return models, files


def reference_masks(coefficients: torch.Tensor, prototypes: torch.Tensor, boxes: torch.Tensor,
                    input_hw=HW) -> torch.Tensor:
    """Per detection, upstream's ``process_mask`` written out: sigmoid(c . P), then zero every mask
    pixel (row r, column c) outside x1 <= c < x2, y1 <= r < y2 of the box scaled to the mask."""
    nm, h, w = prototypes.shape
    out = torch.zeros(len(boxes), h, w)
    for i, (c, box) in enumerate(zip(coefficients, boxes)):
        mask = torch.sigmoid(c @ prototypes.reshape(nm, -1)).reshape(h, w)
        x1, x2 = (float(v) * w / input_hw[1] for v in box[[0, 2]])
        y1, y2 = (float(v) * h / input_hw[0] for v in box[[1, 3]])
        for r in range(h):
            for col in range(w):
                if x1 <= col < x2 and y1 <= r < y2:
                    out[i, r, col] = mask[r, col]
    return out


def anchor_of(boxes: torch.Tensor, pred: torch.Tensor) -> list[int]:
    """The anchor whose decoded box is each kept box (exactly, in float32)."""
    from utils.boxes import xywh2xyxy

    candidates = xywh2xyxy(pred[:4].T)
    return [int((candidates - b).abs().sum(1).argmin()) for b in boxes]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_outputs_metadata_and_zero_lint_findings(seg_exports, cfg):
    _, files = seg_exports
    for kind in ("raw", "topk", "nms"):
        model = onnx.load(str(files[cfg, kind]))
        onnx.checker.check_model(model)
        assert lint(model) == [], f"{cfg} {kind}"
        dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
        if kind == "raw":
            assert dims == {"output0": ["batch", 4 + NC + NM, ANCHORS], "output1": ["batch", NM, 16, 24]}
        else:
            assert list(dims) == list(SEGMENT_END2END_OUTPUTS) and dims["det_masks"] == ["batch", K, 16, 24]
        meta = {p.key: p.value for p in model.metadata_props}
        assert (meta["task"], meta["nm"], meta["nc"], meta["postprocess"]) == ("segment", "32", "2", kind)
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        assert ("EfficientNMS_TRT" in ops) == (kind == "nms") and ("MatMul" in ops) == (kind != "raw")
        signature = onnx_signature(files[cfg, kind]).check(files[cfg, kind])
        assert signature.segment and (signature.nm, signature.nc) == (NM, NC) and signature.end2end == (kind != "raw")
    # every mask-coefficient and prototype convolution runs in INT8 (fed by DequantizeLinear)
    raw = onnx.load(str(files[cfg, "raw"]))
    producer = {o: n for n in raw.graph.node for o in n.output}
    mask_convs = [n for n in raw.graph.node
                  if n.op_type == "Conv" and any(part in n.name for part in ("/proto", "/cv4.", "/cv6.", "/cv7."))]
    assert mask_convs and all(producer[i].op_type == "DequantizeLinear" for n in mask_convs for i in n.input[:2])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_raw_outputs_on_onnxruntime_match_pytorch(seg_exports, cfg):
    models, files = seg_exports
    x = images(3)
    with torch.no_grad():
        ref_pred, ref_proto = Prediction(models[cfg])(x)
    pred, proto = run_ort(files[cfg, "raw"], x)
    assert pred.shape == ref_pred.shape == (3, 4 + NC + NM, ANCHORS) and proto.shape == ref_proto.shape
    # boxes within 1% of their range, scores within 0.01: as for detection (tests/test_export.py);
    # coefficients and prototypes are conv outputs compared relative to their own magnitude
    assert (pred[:, :4] - ref_pred[:, :4]).abs().max() <= 0.01 * ref_pred[:, :4].abs().max()
    assert (pred[:, 4:4 + NC] - ref_pred[:, 4:4 + NC]).abs().max() <= 0.01
    for got, ref in ((pred[:, 4 + NC:], ref_pred[:, 4 + NC:]), (proto, ref_proto)):
        assert ref.abs().max() > 0.5 and (got - ref).abs().max() <= 0.01 * ref.abs().max()


def test_square_export_runs_too(seg_exports):
    models, files = seg_exports
    x = images(2, hw=(64, 64))
    with torch.no_grad():
        ref_pred, ref_proto = Prediction(models["gelan-tiny-seg"])(x)
    pred, proto = run_ort(files["gelan-tiny-seg", "square"], x)
    assert pred.shape == (2, 4 + NC + NM, 84) and proto.shape == (2, NM, 16, 16)
    assert (proto - ref_proto).abs().max() <= 0.01 * ref_proto.abs().max()


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum()
    return 1.0 if union == 0 else float((a & b).sum() / union)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_topk_masks_on_onnxruntime_match_pytorch_fake_quant(seg_exports, cfg):
    models, files = seg_exports
    x = images(3)
    got = run_ort(files[cfg, "topk"], x)
    tail = tail_for("topk", ANCHORS, K, IOU, CONF, (NM, HW))
    with torch.no_grad():
        expected = End2End(models[cfg], tail)(x)
    dets, ref_dets = decode_end2end(*got[:4]), decode_end2end(*expected[:4])
    masks, ref_masks = decode_end2end_masks(got[0], got[4]), decode_end2end_masks(expected[0], expected[4])
    assert sum(len(d) for d in dets) >= 20
    compared = 0
    for d, e, m, r in zip(dets, ref_dets, masks, ref_masks):
        # rows pair up by box: a rounding tie may swap two rows of near-equal score
        for i, row in enumerate(d):
            j = int((e[:, :4] - row[:4]).abs().sum(1).argmin())
            if (e[j, :4] - row[:4]).abs().max() > 0.5 or abs(float(e[j, 4] - row[4])) > 1e-3:
                continue  # a detection at the threshold or the K-th place on one side only
            assert (m[i] - r[j]).abs().max() <= MASK_ATOL and mask_iou(m[i], r[j]) >= MASK_IOU
            compared += 1
    assert compared >= 0.9 * sum(len(d) for d in dets)
    inside = torch.cat([m[m > 0] for m in masks])  # sigmoids are > 0: every pixel within its box
    assert 0.05 < float((inside > 0.5).float().mean()) < 0.95  # masks are neither empty nor whole boxes


@pytest.mark.parametrize("cfg", CONFIGS)
def test_topk_mask_assembly_equals_per_detection_reference(seg_exports, cfg):
    """The ONNX graph's Gather -> MatMul -> Sigmoid -> crop, against upstream's per-detection formula
    on the raw outputs of the same file (same numbers in, so agreement is to float rounding)."""
    _, files = seg_exports
    x = images(2, seed=3)
    num, boxes, scores, classes, masks = run_ort(files[cfg, "topk"], x)
    pred, proto = run_ort(files[cfg, "raw"], x)
    from_raw = no_max_suppression(pred[:, :4 + NC], conf_thres=CONF, max_det=K)
    decoded = zip(decode_end2end(num, boxes, scores, classes), decode_end2end_masks(num, masks))
    for i, (dets, mask) in enumerate(decoded):
        torch.testing.assert_close(dets, from_raw[i], atol=1e-4, rtol=1e-5)
        anchors = anchor_of(dets[:, :4], pred[i])
        expected = reference_masks(pred[i, 4 + NC:, anchors].T, proto[i], dets[:, :4])
        torch.testing.assert_close(mask, expected, atol=1e-5, rtol=1e-4)
        assert torch.all(masks[i, len(dets):] == 0)  # padding rows carry no mask


def _split_at_plugin(path):
    """The NMS export cut at EfficientNMS_TRT: the graph up to the plugin's inputs, and the graph
    from the plugin's outputs (and the image) to the End2End outputs."""
    model = onnx.load(str(path))
    plugin = next(n for n in model.graph.node if n.op_type == "EfficientNMS_TRT")
    downstream, reached = [], set(plugin.output)
    for node in model.graph.node:  # topological order: a node after the plugin reads what it reached
        if any(i in reached for i in node.input):
            downstream.append(node.name)
            reached.update(node.output)
    before, after = onnx.ModelProto(), onnx.ModelProto()
    before.CopyFrom(model)
    after.CopyFrom(model)
    keep = [n for n in before.graph.node if n.name not in downstream and n.op_type != "EfficientNMS_TRT"]
    del before.graph.node[:]
    before.graph.node.extend(keep)
    del before.graph.output[:]
    before.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in plugin.input)
    after.graph.node.remove(next(n for n in after.graph.node if n.op_type == "EfficientNMS_TRT"))
    types = (TensorProto.INT32, TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32)
    after.graph.input.extend(helper.make_tensor_value_info(n, t, None) for n, t in zip(plugin.output, types))
    attrs = {a.name: helper.get_attribute_value(a) for a in plugin.attribute}
    return before, after, list(plugin.output), attrs


@pytest.mark.parametrize("cfg", CONFIGS)
def test_nms_masks_with_the_plugin_emulated(seg_exports, cfg):
    """EfficientNMS_TRT replaced by its documented algorithm: the graph after it finds each kept
    box's anchor and assembles the same masks as NMS + upstream's formula on the raw outputs."""
    _, files = seg_exports
    before, after, plugin_outputs, attrs = _split_at_plugin(files[cfg, "nms"])
    assert attrs["box_coding"] == 1 and attrs["max_output_boxes"] == K and not any(
        n.op_type == "EfficientNMS_TRT" for n in after.graph.node)
    x = images(2, seed=4)
    boxes, scores = (torch.from_numpy(a) for a in cpu_session(before.SerializeToString()).run(
        None, {"images": x.numpy()}))
    plugin = efficient_nms_reference(boxes, scores, IOU, CONF, K)
    feed = {"images": x.numpy(), **{n: t.numpy() for n, t in zip(plugin_outputs, plugin)}}
    num, det_boxes, det_scores, det_classes, masks = (torch.from_numpy(a) for a in cpu_session(
        after.SerializeToString()).run(None, feed))
    pred, proto = run_ort(files[cfg, "raw"], x)
    expected = non_max_suppression(pred[:, :4 + NC], conf_thres=CONF, iou_thres=IOU, multi_label=True, max_det=K)
    dets = decode_end2end(num, det_boxes, det_scores, det_classes)
    assert sum(len(d) for d in dets) >= 10
    for i, (d, e, m) in enumerate(zip(dets, expected, decode_end2end_masks(num, masks))):
        torch.testing.assert_close(d, e, atol=1e-4, rtol=1e-5)
        anchors = anchor_of(d[:, :4], pred[i])
        torch.testing.assert_close(m, reference_masks(pred[i, 4 + NC:, anchors].T, proto[i], d[:, :4]),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["raw", "topk"])
def test_dynamic_batch_of_4_equals_4_single_images(seg_exports, kind):
    _, files = seg_exports
    path = files["yolov9-tiny-dseg", kind]
    x = images(4, seed=6)
    batch = run_ort(path, x)
    for i in range(4):
        for whole, single in zip(batch, run_ort(path, x[i:i + 1])):
            torch.testing.assert_close(whole[i:i + 1], single, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", ["raw", "topk"])
def test_backend_gives_the_model_like_pair(seg_exports, kind):
    """Raw: the prediction with coefficients and the prototypes, as the head's export mode. End2End:
    unit coefficients and logit prototypes, so the shared decoding gives each row its own mask back."""
    _, files = seg_exports
    runner = OrtRunner(files["gelan-tiny-seg", kind])
    x = images(2, seed=7)
    pred, proto = DetectionBackend(runner, nc=NC)(x)
    outputs = runner(x)
    if kind == "raw":
        torch.testing.assert_close(pred, outputs["output0"]) and torch.testing.assert_close(proto, outputs["output1"])
        return
    assert pred.shape == (2, 4 + NC + K, K) and proto.shape == (2, K, 16, 24)
    rebuilt = torch.sigmoid(torch.einsum("bck,bchw->bkhw", pred[:, 4 + NC:], proto))
    valid = torch.arange(K)[None] < outputs["num_dets"]
    torch.testing.assert_close(rebuilt[valid], outputs["det_masks"][valid], atol=2e-6, rtol=0)
    with pytest.raises(Exception, match="mask coefficients"):
        DetectionBackend(OrtRunner(files["gelan-tiny-seg", "raw"]), nc=NC + 1)(x)


def test_metadata_survives_in_json(seg_exports):
    _, files = seg_exports
    meta = onnx_signature(files["yolov9-tiny-dseg", "nms"]).metadata
    assert json.loads(meta["imgsz"]) == list(HW) and json.loads(meta["max_det"]) == K


def _self_labelled_dataset(root, model, n: int = 6, conf: float = 0.5):
    """Images at exactly the export's input size, labelled with the PyTorch model's own confident
    detections' masks (as polygons), so that a random model scores a mAP above zero on them."""
    import cv2
    import yaml

    from utils.evaluation.masks import mask_probabilities, masks_in_original
    from utils.evaluation.postprocess import postprocess

    for split in ("images", "labels"):
        (root / split).mkdir(parents=True)
    x = (images(n, seed=11) * 255).round() / 255  # what the loader reads back from the saved 8-bit images
    with torch.no_grad():
        pred, proto = Prediction(model)(x)
    dets = postprocess(pred, "nms", conf, IOU, K, nm=NM)
    labelled = 0
    for i, det in enumerate(dets):
        cv2.imwrite(str(root / "images" / f"{i}.png"), (x[i].permute(1, 2, 0).numpy()[..., ::-1] * 255).round()
                    .astype(np.uint8))
        masks = masks_in_original(mask_probabilities(det[:, 6:], proto[i]), HW, HW, ((1.0, 1.0), (0, 0)), det[:, :4])
        rows = []
        for d, m in zip(det, masks):
            contours, _ = cv2.findContours(m.full(*HW).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            if not contours or len(max(contours, key=len)) < 3:
                continue
            points = max(contours, key=len).reshape(-1, 2) / np.array([HW[1], HW[0]])
            rows.append(f"{int(d[5])} " + " ".join(f"{v:.5f}" for v in points.flatten()))
        labelled += len(rows)
        (root / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    assert labelled >= 2 * n
    data = {"path": str(root), "train": "images", "val": "images", "nc": NC, "names": ["a", "b"]}
    (root / "data.yaml").write_text(yaml.safe_dump(data))
    return root / "data.yaml"


@pytest.mark.parametrize("kind", ["raw", "topk"])
def test_val_trt_box_and_mask_map_on_onnxruntime_equal_pytorch_on_the_same_input(seg_exports, kind, tmp_path):
    from utils.data.config import load_data_config
    from utils.deployment.validate import evaluate_exported
    from utils.deployment.validate import run as val_trt

    models, files = seg_exports
    model = models["gelan-tiny-seg"]
    data = _self_labelled_dataset(tmp_path / "data", model)
    end2end = kind == "topk"
    with one_thread():
        ours, _ = evaluate_exported(model, load_data_config(data), HW, 4, "val", "none" if end2end else "nms",
                                    conf_thres=CONF if end2end else 0.001, iou_thres=0.7, max_det=K if end2end else 300,
                                    workers=0, device=torch.device("cpu"))
        ort_result = val_trt(onnx=files["gelan-tiny-seg", kind], data=data, batch_size=4, workers=0,
                             project=tmp_path, name="v")["eval"]
    # a random model's masks are ragged, so even its own masks as polygons score low; the figures
    # only need to be non-zero, and the two runtimes' equal to within a near-tie's swap
    assert ours.mask is not None and ours.mask["map50"] > 0.02 and ours.map50 > 0.1
    assert ort_result.mask is not None
    assert abs(ort_result.map50_95 - ours.map50_95) <= 0.005 and abs(ort_result.map50 - ours.map50) <= 0.005
    assert abs(ort_result.mask["map50_95"] - ours.mask["map50_95"]) <= 0.005
    assert abs(ort_result.mask["map50"] - ours.mask["map50"]) <= 0.005
    assert json.loads((tmp_path / "v" / "results.json").read_text())["mask"]["map50_95"] == ort_result.mask["map50_95"]


def test_val_trt_refuses_box_labels_for_a_segmentation_export(seg_exports, tmp_path):
    from utils.deployment.validate import run as val_trt
    from utils.errors import UserError

    _, files = seg_exports
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    import cv2
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((*HW, 3), np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "d.yaml").write_text(f"path: {tmp_path}\ntrain: images\nval: images\nnc: {NC}\nnames: [a, b]\n")
    with pytest.raises(UserError, match="segmentation model.*box labels"):
        val_trt(onnx=files["gelan-tiny-seg", "raw"], data=tmp_path / "d.yaml", workers=0, project=tmp_path / "runs")
