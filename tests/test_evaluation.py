"""The evaluation loop and val.run with a stand-in model and loader (no checkpoint needed)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import val
from utils.evaluation.evaluator import EvalResult, evaluate

NAMES = ["cat", "dog", "bird"]
# two originals letterboxed into 128 x 128: (h, w) = (100, 200) -> gain 0.64, pad (0, 32); (128, 64) -> gain 1, pad (32, 0)
ORIGINAL_GT = [np.array([[0, 10, 20, 60, 80], [2, 100, 10, 190, 90]], float), np.array([[1, 4, 8, 60, 120]], float)]
SHAPES = [((100, 200), ((0.64, 0.64), (0.0, 32.0))), ((128, 64), ((1.0, 1.0), (32.0, 0.0)))]


def _letterboxed(boxes: np.ndarray, shape) -> np.ndarray:
    (gain, _), (padw, padh) = shape[1]
    return boxes * gain + np.array([padw, padh, padw, padh])


class OracleModel(nn.Module):
    """Returns a fixed eval-mode head output: the ground truth (as a trained model would) plus junk anchors."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.names = NAMES
        n = 20
        y = torch.zeros(2, 4 + len(NAMES), n)
        y[:, :4] = torch.tensor([64.0, 64.0, 4.0, 4.0])[:, None]
        y[:, 4:] = 0.002  # below every real score, above conf 0.001
        for b, (gt, shape) in enumerate(zip(ORIGINAL_GT, SHAPES)):
            xyxy = torch.tensor(_letterboxed(gt[:, 1:], shape), dtype=torch.float)
            y[b, :4, :len(gt)] = torch.cat(((xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]), 1).T
            y[b, 4 + torch.tensor(gt[:, 0], dtype=torch.long), torch.arange(len(gt))] = 0.9
        self.register_buffer("y", y)

    def forward(self, x):
        maps = [torch.zeros(x.shape[0], 64 + len(NAMES), 16, 16)]
        return self.y[: x.shape[0]] + 0 * self.weight, maps


def fake_loader():
    """One upstream-format batch: uint8 images, normalised letterbox targets, paths, shapes."""
    targets = []
    for i, (gt, shape) in enumerate(zip(ORIGINAL_GT, SHAPES)):
        x1, y1, x2, y2 = _letterboxed(gt[:, 1:], shape).T / 128
        targets.append(np.stack((np.full(len(gt), i), gt[:, 0], (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), 1))
    batch = (torch.zeros(2, 3, 128, 128, dtype=torch.uint8), torch.tensor(np.concatenate(targets), dtype=torch.float),
             ("images/000000000001.jpg", "images/000000000002.jpg"), SHAPES)
    return [batch]


@pytest.mark.parametrize("kind", ["nms", "none"])
def test_perfect_detections_score_one_and_map_back_to_original_pixels(kind):
    result, artifacts = evaluate(OracleModel().eval(), fake_loader(), NAMES, postprocess=kind, keep_boxes=True)
    assert isinstance(result, EvalResult)
    assert result.map50_95 == pytest.approx(1.0) and result.map50 == pytest.approx(1.0)
    assert result.images == 2 and result.instances == 3
    assert [c["name"] for c in result.per_class] == NAMES
    assert set(result.speed_ms) == {"pre", "inference", "nms"}
    for det, gt in zip(artifacts.detections, ORIGINAL_GT):
        top = det[det[:, 4] > 0.5]
        np.testing.assert_allclose(top[np.argsort(top[:, 0])][:, :4], gt[np.argsort(gt[:, 1])][:, 1:], atol=1e-3)
    np.testing.assert_allclose(artifacts.labels[0][:, 1:], ORIGINAL_GT[0][:, 1:], atol=1e-3)


def test_result_serialises_and_formats():
    result, _ = evaluate(OracleModel().eval(), fake_loader(), NAMES)
    d = result.to_dict()
    assert json.loads(json.dumps(d))["fitness"] == pytest.approx(0.1 * result.map50 + 0.9 * result.map50_95)
    table = result.table()
    assert table.splitlines()[0].split() == ["Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95"]
    assert table.splitlines()[1].split()[:3] == ["all", "2", "3"] and len(table.splitlines()) == 2 + len(NAMES)
    assert "| all | 2 | 3 |" in result.markdown()


def test_run_with_model_restores_mode_scores_json_and_plots(tmp_path):
    model = OracleModel().train()
    losses = []

    def compute_loss(train_out, targets):
        losses.append(len(train_out))
        return torch.ones(1), torch.tensor([1.0, 2.0, 3.0])

    result = val.run({"names": NAMES, "nc": 3}, model=model, dataloader=fake_loader(), save_dir=tmp_path,
                     save_json=True, compute_loss=compute_loss)
    assert model.training, "val.run must hand the model back in train mode"
    assert losses == [1] and result.loss == pytest.approx((1.0, 2.0, 3.0))
    assert result.coco["map50_95"] == pytest.approx(result.map50_95, abs=1e-3)
    assert (tmp_path / "PR_curve.png").stat().st_size > 0
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert json.loads((tmp_path / "ground_truth.json").read_text())["categories"][0] == {"id": 0, "name": "cat"}


def test_single_class_and_empty_predictions():
    model = OracleModel().eval()
    result, _ = evaluate(model, fake_loader(), NAMES, single_cls=True)
    assert [c["class"] for c in result.per_class] == [0] and result.map50 == pytest.approx(1.0)
    result, _ = evaluate(model, fake_loader(), NAMES, conf_thres=0.95)  # nothing survives
    assert result.map50_95 == 0.0 and result.instances == 3
