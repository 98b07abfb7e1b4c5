"""QAT on segmentation models: distillation reaches the mask coefficients and prototypes."""
from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from models.quantize import calibrate, prepare, set_trainable
from models.yolo import Model
from tests.qat_helpers import one_thread
from utils.paths import ROOT
from utils.quantization.distill import FeatureDistillation, mask_outputs, supervised_layers

ASSETS = ROOT / "tests" / "assets"
IMGSZ = 64


@pytest.mark.parametrize("cfg,sites", [
    ("gelan-tiny-seg", ["model.22.cv4.0", "model.22.cv4.1", "model.22.cv4.2", "model.22.proto"]),
    ("yolov9-tiny-dseg", ["model.35.cv6.0", "model.35.cv6.1", "model.35.cv6.2", "model.35.proto",
                          "model.35.cv7.0", "model.35.cv7.1", "model.35.cv7.2", "model.35.proto2"]),
])
def test_distillation_supervises_mask_coefficients_and_prototypes(cfg, sites):
    """Every branch's coefficient towers and prototype layer are distilled, and their error's gradient
    reaches the quantized prototype convolutions; a detector gets no mask sites."""
    with one_thread():
        torch.manual_seed(0)
        fp = Model(ASSETS / f"{cfg}.yaml", nc=2).fuse().eval()
        q = set_trainable(prepare(deepcopy(fp)))
        x = torch.rand(2, 3, IMGSZ, IMGSZ)
        calibrate(q, [x])
        assert mask_outputs(q) == sites
        distill = FeatureDistillation(q, fp, supervised_layers(len(q.model), 1))
        assert distill.sites[-len(sites):] == sites and len(distill.teacher.model) == len(fp.model)
        q.train()
        preds = q(x)
        term = distill(x, preds, None)
        proto = q.get_submodule(sites[3])
        conv = (proto.cv3 if hasattr(proto, "cv3") else proto).conv
        term.backward()
        distill.remove()
    assert 0 < float(term.detach()) < 1e-1
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert mask_outputs(Model(ASSETS / "gelan-tiny.yaml", nc=2)) == []


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """A random tiny segmentation checkpoint quantized (PTQ + one short QAT epoch) on drawn shapes."""
    from tests.qat_helpers import save_float_checkpoint
    from utils.data.synthetic import make_shapes_dataset
    from utils.quantization.options import quantize_options
    from utils.quantization.pipeline import run_quantize

    root = tmp_path_factory.mktemp("seg_qat")
    data = make_shapes_dataset(root / "data", n_train=4, n_val=4, imgsz=IMGSZ, seed=3, max_objects=3, masks=True)
    torch.manual_seed(0)
    model = Model(ASSETS / "gelan-tiny-seg.yaml", nc=3)
    model.names = ["square", "disc", "triangle"]
    weights = save_float_checkpoint(model, root / "seg.pt")
    with one_thread():
        run = run_quantize(quantize_options(["--weights", str(weights), "--data", str(data), "--imgsz", str(IMGSZ),
                                             "--batch-size", "4", "--epochs", "1", "--iters", "1", "--calib-batches",
                                             "1", "--workers", "0", "--device", "cpu", "--project", str(root),
                                             "--name", "qat"]))
    return root, data, weights, run


def test_quantize_reports_box_and_mask_rows(seg_run):
    import json

    _, _, _, run = seg_run
    report = json.loads((run / "report.json").read_text())
    for row in ("origin", "ptq", "qat_best"):
        assert {"map50_95", "mask_map50_95", "mask_map50", "mask_precision", "mask_recall"} <= set(report[row]), row
    assert "mask_map50_95" in report["reported"]["qat_best"]
    mask_iv = report["intervals"]["qat_minus_origin"]["mask_map50_95"]  # resampled by mask matches, not boxes
    assert mask_iv["ci95_low"] <= mask_iv["value"] <= mask_iv["ci95_high"]
    delta = report["reported"]["qat_best"]["mask_map50_95"] - report["reported"]["origin"]["mask_map50_95"]
    assert mask_iv["value"] == pytest.approx(delta, abs=1e-6)
    assert set(report["epochs"][0]) >= {"box", "seg", "cls", "dfl"}
    md = (run / "report.md").read_text()
    for row in ("| Origin, boxes |", "| Origin, masks |", "| PTQ (max), masks |", "Masks (deltas against Origin"):
        assert row in md, row
    assert "| mask AP50-95 | mask AP50 | seg |" in md


def test_eval_and_sensitive_on_a_segmentation_checkpoint(seg_run, tmp_path):
    import qat

    root, data, weights, run = seg_run
    common = ["--data", str(data), "--imgsz", str(IMGSZ), "--batch-size", "4", "--workers", "0", "--device", "cpu",
              "--project", str(tmp_path)]
    with one_thread():
        result = qat.main(["eval", "--weights", str(run / "weights" / "qat_best.pt"), *common, "--name", "e"])
        assert result.mask is not None and 0.0 <= result.mask["map50_95"] <= 1.0
        assert "Mask" in (tmp_path / "e" / "results.md").read_text()
        sens = qat.main(["sensitive", "--weights", str(weights), "--calib-batches", "1", "--layers", "-1", *common,
                         "--name", "s"])  # the head: the mask branch's convolutions and the boxes'
    assert "box + mask mAP50-95" in (sens / "sensitivity.md").read_text()


def test_a_detection_checkpoint_on_polygon_labels_is_refused_naming_both(seg_run, tmp_path):
    from tests.qat_helpers import save_float_checkpoint, tiny_model
    from utils.errors import UserError
    from utils.quantization.options import quantize_options
    from utils.quantization.pipeline import run_quantize

    _, data, _, _ = seg_run
    det = save_float_checkpoint(tiny_model(nc=3), tmp_path / "det.pt")
    with pytest.raises(UserError, match=r"det\.pt is a detection model but .*polygons"):
        run_quantize(quantize_options(["--weights", str(det), "--data", str(data), "--imgsz", str(IMGSZ),
                                       "--workers", "0", "--device", "cpu", "--project", str(tmp_path)]))
