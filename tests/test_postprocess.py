"""NMS and NMS-free postprocessing against brute-force references."""
from __future__ import annotations

import pytest
import torch

from utils.errors import UserError
from utils.evaluation.postprocess import no_max_suppression, non_max_suppression, postprocess, select_prediction


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_nms(pred: torch.Tensor, conf_thres, iou_thres, agnostic=False, multi_label=False,
                  classes=None, max_det=300) -> list[list[float]]:
    """Textbook NMS in plain Python for one image's (4+nc, N) prediction."""
    rows = []
    for x, y, w, h, *scores in pred.T.tolist():
        box = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
        if multi_label:
            rows += [[*box, s, c] for c, s in enumerate(scores) if s > conf_thres]
        else:
            c = max(range(len(scores)), key=lambda k: scores[k])
            if scores[c] > conf_thres:
                rows.append([*box, scores[c], c])
    if classes is not None:
        rows = [r for r in rows if r[5] in classes]
    rows.sort(key=lambda r: -r[4])
    kept = []
    for r in rows:
        if all(_iou(r, k) <= iou_thres for k in kept if agnostic or k[5] == r[5]):
            kept.append(r)
    return kept[:max_det]


def random_prediction(batch=3, nc=4, n=120, seed=0) -> torch.Tensor:
    """Clustered boxes (so NMS has work) with distinct scores (so the order is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 2, 6, generator=g) * 100 + 20
    pick = torch.randint(0, 6, (batch, n), generator=g)
    xy = torch.gather(centres, 2, torch.stack((pick, pick), 1)) + torch.randn(batch, 2, n, generator=g) * 4
    wh = 20 + torch.rand(batch, 2, n, generator=g) * 10
    scores = torch.rand(batch, nc, n, generator=g)
    return torch.cat((xy, wh, scores), 1)


def _assert_same(ours: torch.Tensor, ref: list[list[float]]):
    assert ours.shape == (len(ref), 6)
    if ref:
        torch.testing.assert_close(ours, torch.tensor(ref, dtype=ours.dtype), atol=1e-4, rtol=0)


@pytest.mark.parametrize("agnostic,multi_label,classes,max_det", [
    (False, False, None, 300), (True, False, None, 300), (False, True, None, 300),
    (True, True, None, 300), (False, True, [1, 3], 300), (False, False, None, 5), (False, True, None, 7),
])
def test_nms_matches_brute_force(agnostic, multi_label, classes, max_det):
    pred = random_prediction()
    out = non_max_suppression(pred, conf_thres=0.3, iou_thres=0.45, classes=classes, agnostic=agnostic,
                              multi_label=multi_label, max_det=max_det)
    assert len(out) == pred.shape[0]
    for b, det in enumerate(out):
        ref = reference_nms(pred[b], 0.3, 0.45, agnostic, multi_label, classes, max_det)
        _assert_same(det, ref)
    kept = sum(len(d) for d in out)
    candidates = sum(len(reference_nms(p, 0.3, 1.0, agnostic, multi_label, classes, 10**6)) for p in pred)
    assert 0 < kept < candidates  # NMS had boxes to remove


def test_nms_suppresses_and_keeps_classes_apart():
    # two heavily overlapping boxes of class 0, one of class 1 on top of them
    pred = torch.zeros(1, 6, 3)
    pred[0, :4] = torch.tensor([[50, 51, 50], [50, 50, 50], [20, 20, 20], [20, 20, 20]], dtype=torch.float)
    pred[0, 4:, 0] = torch.tensor([0.9, 0.0])
    pred[0, 4:, 1] = torch.tensor([0.8, 0.0])
    pred[0, 4:, 2] = torch.tensor([0.0, 0.7])
    aware = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5)[0]
    assert aware[:, 4].tolist() == pytest.approx([0.9, 0.7]) and aware[:, 5].tolist() == [0.0, 1.0]
    agnostic = non_max_suppression(pred, conf_thres=0.25, iou_thres=0.5, agnostic=True)[0]
    assert agnostic[:, 4].tolist() == pytest.approx([0.9])


def test_empty_inputs():
    nothing_above = torch.cat((torch.rand(2, 4, 50) * 100, torch.full((2, 3, 50), 0.1)), 1)
    no_anchors = torch.zeros(2, 7, 0)
    for pred in (nothing_above, no_anchors):
        for out in (non_max_suppression(pred, 0.25, 0.5, multi_label=True), non_max_suppression(pred, 0.25, 0.5),
                    no_max_suppression(pred, 0.25)):
            assert len(out) == 2 and all(o.shape == (0, 6) for o in out)


def test_batch_results_equal_single_image_results():
    pred = random_prediction(batch=4, seed=3)
    batched = non_max_suppression(pred, 0.2, 0.6, multi_label=True)
    for b in range(4):
        torch.testing.assert_close(batched[b], non_max_suppression(pred[b:b + 1], 0.2, 0.6, multi_label=True)[0])
    free = no_max_suppression(pred, 0.2, max_det=10)
    for b in range(4):
        torch.testing.assert_close(free[b], no_max_suppression(pred[b:b + 1], 0.2, max_det=10)[0])


def test_no_max_suppression_best_class_and_cutoff():
    pred = random_prediction(batch=2, nc=5, n=60, seed=1)
    out = no_max_suppression(pred, conf_thres=0.5, max_det=8)
    for b, det in enumerate(out):
        scores, cls = pred[b, 4:].max(0)
        order = sorted((i for i in range(60) if scores[i] > 0.5), key=lambda i: -scores[i].item())[:8]
        assert det.shape == (8, 6)
        assert det[:, 4].tolist() == pytest.approx(scores[order].tolist())
        assert det[:, 5].tolist() == cls[order].float().tolist()
        x, y, w, h = pred[b, :4, order]
        torch.testing.assert_close(det[:, :4], torch.stack((x - w / 2, y - h / 2, x + w / 2, y + h / 2), 1))
    # no suppression at all: identical boxes all survive
    same = torch.zeros(1, 5, 4)
    same[0, :4] = torch.tensor([50.0, 50, 10, 10])[:, None]
    same[0, 4] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assert no_max_suppression(same, 0.25)[0].shape == (4, 6)


def test_no_max_suppression_ties_keep_anchor_order():
    n = 50
    pred = torch.zeros(1, 6, n)
    pred[0, 0] = torch.arange(n, dtype=torch.float) * 10  # x identifies the anchor
    pred[0, 2:4] = 5
    pred[0, 4] = 0.5  # every anchor ties
    pred[0, 4, 40] = 0.9
    out = no_max_suppression(pred, conf_thres=0.25, max_det=6)[0]
    anchors = ((out[:, 0] + 2.5) / 10).round().long().tolist()
    assert anchors == [40, 0, 1, 2, 3, 4]
    assert torch.equal(out, no_max_suppression(pred, conf_thres=0.25, max_det=6)[0])


def test_select_prediction_unwraps_every_head_output():
    y1, y2 = torch.rand(2, 6, 10), torch.rand(2, 6, 10)
    maps = [torch.rand(2, 66, 4, 4)]
    assert select_prediction(y2) is y2
    assert select_prediction((y2, maps)) is y2          # DDetect eval
    assert select_prediction([y1, y2]) is y2            # DualDDetect export
    assert select_prediction(([y1, y2], [maps, maps])) is y2  # DualDDetect eval
    with pytest.raises(TypeError):
        select_prediction(torch.rand(2, 6))


def test_postprocess_dispatch():
    pred = random_prediction(batch=1, seed=2)
    torch.testing.assert_close(postprocess((pred, None), "nms", conf_thres=0.3, iou_thres=0.5)[0],
                               non_max_suppression(pred, 0.3, 0.5)[0])
    torch.testing.assert_close(postprocess([pred * 0, pred], "none", conf_thres=0.3, iou_thres=0.5, max_det=4)[0],
                               no_max_suppression(pred, 0.3, max_det=4)[0])
    with pytest.raises(UserError):
        postprocess(pred, "soft-nms")
    with pytest.raises(UserError):
        non_max_suppression(pred, conf_thres=1.5)


def test_half_precision_input_gives_float_boxes():
    pred = random_prediction(batch=2).half()
    out = non_max_suppression(pred, 0.3, 0.5)
    assert all(o.dtype == torch.float32 for o in out)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    pred = random_prediction(batch=4, seed=5)
    for fn in (lambda p: non_max_suppression(p, 0.2, 0.5, multi_label=True), lambda p: no_max_suppression(p, 0.2, 20)):
        for cpu, gpu in zip(fn(pred), fn(pred.cuda())):
            assert gpu.is_cuda
            torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
