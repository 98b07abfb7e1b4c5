"""Mask mAP: agreement with pycocotools' segm evaluation, val.py's files for a segmentation model, bad input."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.bench_seg_eval import compare
from tests.cli_helpers import run_script
from utils.data.synthetic import make_shapes_dataset
from utils.evaluation.masks import BoxMask, mask_iou, masks_in_original

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=4, n_val=4, imgsz=64, seed=7, masks=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A random-weight segmentation and detection checkpoint for the 3 shape classes."""
    from models.yolo import Model
    from utils.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    out = {}
    for kind, cfg in (("seg", "gelan-tiny-seg.yaml"), ("det", "gelan-tiny.yaml")):
        model = Model(ASSETS / cfg, nc=3)
        model.names = ["square", "disc", "triangle"]
        out[kind] = save_checkpoint({"epoch": -1, "model": model.half(), "ema": None}, folder / f"{kind}.pt")
    return out


def test_mask_map_matches_pycocotools_on_coco128_seg(datasets_dir):
    """Synthetic flawed predictions through the whole evaluator path, six real images, RLE vs polygons."""
    figures = compare(datasets_dir / "coco128-seg", "train2017", imgsz=320, batch_size=3, seed=1, limit=6)
    ours, theirs = figures["ours"], figures["pycocotools"]
    assert 0.1 < ours["mask_map50_95"] < ours["mask_map50"] < 1
    for key in ("box_map50_95", "box_map50", "mask_map50_95", "mask_map50"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-3), key


def test_masks_are_cut_to_the_box_and_scored_by_pixels():
    """A uniform map over a letterboxed 8x8 input of a 4x8 image: the mask is exactly the box's pixels."""
    probabilities = torch.ones(1, 2, 2)  # prototype resolution, stride 4
    masks = masks_in_original(probabilities, (8, 8), (4, 8), ((1.0, 1.0), (0, 2)), torch.tensor([[1.0, 1.0, 5.0, 3.0]]))
    full = masks[0].full(4, 8)
    assert full.sum() == 8 and full[1:3, 1:5].all()
    truth = np.zeros((2, 4, 8), bool)
    truth[0, 1:3, 1:3] = True  # half of it, same class
    truth[1, 1:3, 1:5] = True  # all of it, another class
    iou = mask_iou(masks, np.array([0]), truth, np.array([0, 1]))
    np.testing.assert_allclose(iou, [[0.5, 0.0]])
    empty = BoxMask(0, 0, np.zeros((0, 0), bool))
    assert empty.full(4, 8).sum() == 0


def test_val_reports_box_and_mask_metrics_and_draws_masks(shapes, checkpoints, tmp_path):
    from utils.evaluation.validate import run

    result = run(str(shapes), weights=str(checkpoints["seg"]), batch_size=4, imgsz=64, device="cpu", workers=0,
                 project=str(tmp_path), name="val", save_json=True, conf_thres=0.001)
    assert set(result.mask) == {"precision", "recall", "map50", "map50_95"}
    assert all("mask_map50_95" in row for row in result.per_class)
    run_dir = tmp_path / "val"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["mask"] == result.mask and saved["fitness"] == pytest.approx(result.fitness)
    assert "Mask mAP50-95" in (run_dir / "results.md").read_text()
    for name in ("val_masks_labels.png", "val_masks_pred.png", "MaskPR_curve.png", "PR_curve.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    assert result.coco["mask_map50_95"] == pytest.approx(result.mask["map50_95"], abs=1e-3)


@pytest.fixture(scope="module")
def box_shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("boxes"), n_train=2, n_val=2, imgsz=64, seed=7)


@pytest.mark.parametrize("kind, message", [
    ("det", r"det\.pt is a detection model but .*images/val holds segmentation labels"),
    ("seg", r"seg\.pt is a segmentation model but .*images/val holds box labels"),
])
def test_val_refuses_a_model_that_does_not_fit_the_labels(shapes, box_shapes, checkpoints, tmp_path, kind, message,
                                                          capsys, monkeypatch):
    data = shapes if kind == "det" else box_shapes
    code, err = run_script("val.py", ["--data", str(data), "--weights", str(checkpoints[kind]), "--imgsz", "64",
                                      "--device", "cpu", "--workers", "0", "--project", str(tmp_path)],
                           capsys, monkeypatch)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert re.search(message, lines[-1]) and not any("Traceback" in line for line in lines)
    assert not any(tmp_path.iterdir())  # nothing written for a failed start
