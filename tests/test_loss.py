"""Task-aligned assigner on hand-made boxes, and the single / dual YOLOv9 losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.loss_tal import AUX_BRANCH_WEIGHT, ComputeLoss, DualComputeLoss, build_loss
from utils.tal.anchor_generator import make_anchors
from utils.tal.assigner import TaskAlignedAssigner

ASSETS = Path(__file__).parent / "assets"


def grid_points(size: int = 64, strides=(8, 16, 32)) -> torch.Tensor:
    """Anchor centres in pixels of a ``size`` x ``size`` image."""
    feats = [torch.zeros(1, 1, size // s, size // s) for s in strides]
    points, stride = make_anchors(feats, strides, 0.5)
    return points * stride


def assign(gt_boxes, labels, points, pred_boxes=None, scores=None, nc=3, topk=10, valid=None):
    a = len(points)
    gt = torch.tensor(gt_boxes, dtype=torch.float32)[None]
    lab = torch.tensor(labels, dtype=torch.float32)[None, :, None]
    mask = torch.ones_like(lab) if valid is None else torch.tensor(valid, dtype=torch.float32)[None, :, None]
    scores = torch.full((1, a, nc), 0.5) if scores is None else scores
    pred = gt[:, :1].expand(1, a, 4).clone() if pred_boxes is None else pred_boxes
    return TaskAlignedAssigner(topk=topk, num_classes=nc)(scores, pred, points, lab, gt, mask)


def inside(points, box):
    x1, y1, x2, y2 = box
    return (points[:, 0] > x1) & (points[:, 0] < x2) & (points[:, 1] > y1) & (points[:, 1] < y2)


def test_positives_lie_inside_their_box_and_respect_topk():
    points = grid_points()
    box = [4.0, 4.0, 36.0, 28.0]
    for topk in (3, 10):
        t = assign([box], [2], points, topk=topk)
        fg = t.fg_mask[0]
        assert int(fg.sum()) == topk
        assert inside(points, box)[fg].all()
        assert (t.labels[0][fg] == 2).all()
        assert torch.equal(t.bboxes[0][fg], torch.tensor(box).expand(topk, 4))
        assert (t.scores[0][~fg] == 0).all() and (t.scores[0][fg][:, :2] == 0).all()


def test_small_box_gets_only_the_anchors_inside_it():
    points = grid_points()
    box = [10.0, 10.0, 30.0, 22.0]  # holds six P3 centres (x 12, 20, 28; y 12, 20) and no coarser ones
    t = assign([box], [0], points, topk=10)
    assert int(t.fg_mask.sum()) == int(inside(points, box).sum()) < 10


def test_best_aligned_anchor_gets_the_box_iou_as_soft_target():
    points = grid_points()
    box = torch.tensor([0.0, 0.0, 32.0, 32.0])
    pred = box.expand(1, len(points), 4).clone()
    best = 9  # P3 centre (12, 12) predicts the box exactly; all other anchors are shifted
    pred[0, torch.arange(len(points)) != best] += torch.tensor([4.0, 4.0, 4.0, 4.0])
    t = assign([box.tolist()], [1], points, pred_boxes=pred)
    assert t.fg_mask[0, best]
    assert t.scores[0, best, 1] == pytest.approx(1.0, abs=1e-4)
    assert (t.scores[0, :, 1] <= t.scores[0, best, 1] + 1e-6).all()


def test_anchor_in_two_boxes_goes_to_the_one_it_overlaps_most():
    points = grid_points()
    box_a, box_b = [0.0, 0.0, 40.0, 40.0], [16.0, 16.0, 56.0, 56.0]
    pred = torch.tensor(box_b).expand(1, len(points), 4).clone()  # every prediction matches box B
    t = assign([box_a, box_b], [0, 1], points, pred_boxes=pred, topk=50)
    both = inside(points, box_a) & inside(points, box_b)
    assert both.any()
    assert (t.labels[0][both] == 1).all() and t.fg_mask[0][both].all()


def test_no_boxes_and_padding_rows_give_no_positives():
    points = grid_points()
    t = assign([[4.0, 4.0, 36.0, 28.0]], [0], points, valid=[0])
    assert not t.fg_mask.any() and (t.scores == 0).all()
    a = len(points)
    empty = TaskAlignedAssigner(num_classes=3)(torch.rand(2, a, 3), torch.rand(2, a, 4), points,
                                               torch.zeros(2, 0, 1), torch.zeros(2, 0, 4), torch.zeros(2, 0, 1))
    assert not empty.fg_mask.any() and (empty.labels == 3).all()


@pytest.fixture(scope="module")
def tiny_models():
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    return {name: DetectionModel(ASSETS / f"{name}.yaml", nc=4) for name in ("gelan-tiny", "yolov9-tiny")}


TARGETS = torch.tensor([[0, 1, 0.30, 0.30, 0.20, 0.20], [0, 3, 0.70, 0.60, 0.30, 0.40], [1, 0, 0.5, 0.5, 0.6, 0.5]])


def test_build_loss_picks_by_head(tiny_models):
    assert type(build_loss(tiny_models["gelan-tiny"])) is ComputeLoss
    assert type(build_loss(tiny_models["yolov9-tiny"])) is DualComputeLoss


def test_loss_is_finite_and_has_gradients(tiny_models):
    model = tiny_models["gelan-tiny"].train()
    model.zero_grad()
    loss, items = build_loss(model)(model(torch.rand(2, 3, 64, 64)), TARGETS)
    assert torch.isfinite(loss) and loss.ndim == 0 and items.shape == (3,)
    assert (items > 0).all() and not items.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_images_without_boxes_only_have_class_loss(tiny_models):
    model = tiny_models["gelan-tiny"].train()
    _, items = build_loss(model)(model(torch.rand(2, 3, 64, 64)), torch.zeros(0, 6))
    assert items[0] == 0 and items[2] == 0 and items[1] > 0


def test_loss_scales_with_hyp_gains(tiny_models):
    model = tiny_models["gelan-tiny"].train()
    preds = model(torch.rand(2, 3, 64, 64))
    base = ComputeLoss(model, hyp={"box": 1.0, "cls": 1.0, "dfl": 1.0})(preds, TARGETS)[1]
    gained = ComputeLoss(model, hyp={"box": 7.5, "cls": 0.5, "dfl": 1.5})(preds, TARGETS)[1]
    assert torch.allclose(gained, base * torch.tensor([7.5, 0.5, 1.5]), rtol=1e-5)


def test_dual_loss_adds_the_aux_branch_at_a_quarter(tiny_models):
    dual = tiny_models["yolov9-tiny"].train()
    aux, main = dual(torch.rand(2, 3, 64, 64))
    single = ComputeLoss(dual)
    total, items = DualComputeLoss(dual)([aux, main], TARGETS)
    expected = AUX_BRANCH_WEIGHT * single(aux, TARGETS)[1] + single(main, TARGETS)[1]
    assert torch.allclose(items, expected, rtol=1e-5)
    assert total.item() == pytest.approx(expected.sum().item() * 2, rel=1e-5)


def test_loss_accepts_eval_mode_output(tiny_models):
    """val.run passes the (decoded, raw) pair of eval mode; the loss must read the raw maps."""
    for model in tiny_models.values():
        x = torch.rand(1, 3, 64, 64)
        loss_fn = build_loss(model)
        train_items = loss_fn(model.train()(x), TARGETS[:2])[1]
        with torch.no_grad():
            eval_out = model.eval()(x)
        assert isinstance(eval_out, tuple)
        assert torch.isfinite(loss_fn(eval_out, TARGETS[:2])[1]).all()
        assert train_items.shape == (3,)
        model.train()
