"""Segmentation training: the mask loss on the detection loss's assignment, a tiny model overfitting drawn
shapes (mask mAP rises), and train.py's files and refusals for segmentation."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.yolo import Model
from utils.data.dataset import create_dataloader
from utils.data.synthetic import make_shapes_dataset
from utils.errors import UserError
from utils.evaluation.evaluator import evaluate
from utils.training.engine import train_one_epoch
from utils.training.assigner import Assignment
from utils.training.loss import ComputeLoss, SegmentationLoss, build_loss, mask_loss
from utils.training.optim import build_optimizer
from utils.training.trainer import SEGMENT_RESULTS_COLUMNS, train

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
CPU = torch.device("cpu")
NAMES = ["square", "disc", "triangle"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=4, n_val=4, imgsz=64, seed=3,
                               max_objects=3, masks=True)


@pytest.fixture(scope="module")
def loader(shapes):
    return create_dataloader(str(shapes.parent / "images" / "train"), 64, 4, 32, workers=0, task="segment", nc=3)[0]


def test_box_terms_are_the_detection_loss_and_the_mask_term_needs_the_right_mask(loader):
    torch.manual_seed(0)
    model = Model(ASSETS / "gelan-tiny-seg.yaml", nc=3)
    loss_fn = build_loss(model)
    assert type(loss_fn) is SegmentationLoss
    imgs, targets, _, _, masks, _ = next(iter(loader))
    preds = model(imgs.float() / 255)
    total, items = loss_fn(preds, targets, masks)
    _, detection_items = ComputeLoss(model)(preds[0], targets)  # the same level maps, as a detector's
    torch.testing.assert_close(items[[0, 2, 3]], detection_items)
    assert items[1] > 0 and total.item() == pytest.approx(items.sum().item() * len(imgs), rel=1e-5)
    total.backward()
    proto = model.model[-1].proto
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proto.parameters())


def test_mask_term_scores_only_inside_the_box_per_unit_area():
    """One anchor given box (4, 4, 12, 12) of a 16x16 input, masks at 1/4: BCE inside the 2x2 box cells."""
    truth = torch.zeros(1, 4, 4)
    truth[0, 1:3, 1:2] = 1.0
    assigned = Assignment(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[[4.0, 4.0, 12.0, 12.0]]]),
                          torch.zeros(1, 1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long))
    rows, hw, one = torch.zeros(1, 1, dtype=torch.long), torch.tensor([16.0, 16.0]), torch.ones(1, 1, 1)
    right = (truth * 2 - 1)[None] * 20  # logits that agree with the truth everywhere
    assert mask_loss(one, right, truth, assigned, rows, hw) < 1e-6
    outside = right.clone()
    outside[..., 0, :] = -outside[..., 0, :]  # wrong, but only outside the box
    assert mask_loss(one, outside, truth, assigned, rows, hw) < 1e-6
    wrong = -right
    # every cell of the box wrong by 20 logits: the mean BCE over the box, not over the image
    assert mask_loss(one, wrong, truth, assigned, rows, hw).item() == pytest.approx(20.0, abs=1e-3)


def test_dual_head_weights_its_auxiliary_branch_at_a_quarter(loader):
    torch.manual_seed(0)
    model = Model(ASSETS / "yolov9-tiny-dseg.yaml", nc=3)
    loss_fn = build_loss(model)
    imgs, targets, _, _, masks, _ = next(iter(loader))
    (feats_aux, feats_main), (c_aux, c_main), (p_aux, p_main) = model(imgs.float() / 255)
    _, both = loss_fn(([feats_aux, feats_main], [c_aux, c_main], [p_aux, p_main]), targets, masks)
    _, aux = SegmentationLoss(model)((feats_aux, c_aux, p_aux), targets, masks)
    _, main = SegmentationLoss(model)((feats_main, c_main, p_main), targets, masks)
    torch.testing.assert_close(both, 0.25 * aux + main)


def _fit_batch_norm(model: nn.Module, loader) -> None:
    """Batch-norm statistics measured on ``loader`` itself: four images and a few dozen steps leave the
    running averages (momentum 0.03) far behind weights that move this fast."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the passes below
    with torch.no_grad():
        for imgs, *_ in loader:
            model(imgs.float() / 255)
    model.eval()


def test_tiny_segmentation_model_overfits_drawn_shapes(loader):
    torch.manual_seed(0)
    model = Model(ASSETS / "gelan-tiny-seg.yaml", nc=3)
    head = model.model[-1]
    for conv, stride in zip(head.cv3, head.stride):  # the class prior for 64-pixel images, not 640-pixel ones
        conv[-1].bias.data[:head.nc] = math.log(5 / head.nc / (64 / float(stride)) ** 2)
    loss_fn = build_loss(model)
    opt = build_optimizer(model, "Adam", lr=0.004, momentum=0.9, weight_decay=0.0)

    def mask_map50() -> float:
        _fit_batch_norm(model, loader)
        result, _ = evaluate(model, loader, NAMES, device=CPU)
        model.train()
        return result.mask["map50"]

    before = mask_map50()
    losses = [train_one_epoch(model, loader, loss_fn, opt, device=CPU, epoch=e, progress=False).loss
              for e in range(45)]
    after = mask_map50()
    assert len(losses[-1]) == 4 and losses[-1][1] < 0.2 * losses[0][1], losses  # the mask term fell
    assert before < 0.05 and after > 0.4, (before, after)


def test_train_writes_segmentation_results_and_refuses_box_labels(shapes, tmp_path):
    from utils.checkpoint import load_checkpoint

    run = train(cfg=str(ASSETS / "gelan-tiny-seg.yaml"), data=str(shapes), epochs=1, batch_size=4, imgsz=64,
                device="cpu", workers=0, project=str(tmp_path), name="seg")
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == SEGMENT_RESULTS_COLUMNS and float(rows[0]["train/seg_loss"]) > 0
    ckpt = load_checkpoint(run / "weights" / "last.pt")
    assert type(ckpt["model"]).__name__ == "SegmentationModel"
    boxes = make_shapes_dataset(tmp_path / "boxes", n_train=2, n_val=2, imgsz=64, seed=3)
    with pytest.raises(UserError, match=r"gelan-tiny-seg\.yaml is a segmentation model but .* holds box labels"):
        train(cfg=str(ASSETS / "gelan-tiny-seg.yaml"), data=str(boxes), epochs=1, batch_size=2, imgsz=64,
              device="cpu", workers=0, project=str(tmp_path), name="boxes")
    with pytest.raises(UserError, match=r"gelan-tiny\.yaml is a detection model but .* holds segmentation labels"):
        train(cfg=str(ASSETS / "gelan-tiny.yaml"), data=str(shapes), epochs=1, batch_size=2, imgsz=64,
              device="cpu", workers=0, project=str(tmp_path), name="det")
