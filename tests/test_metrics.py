"""Our COCO-style metrics against pycocotools on real COCO128 labels, plus hand-worked cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.synthetic_detections import jittered_detections, load_yolo_split
from utils.errors import UserError
from utils.evaluation.coco import (
    COCO_CATEGORY_IDS,
    COCO_NAMES,
    category_ids,
    coco_evaluate,
    ground_truth_to_coco,
    image_ids,
    predictions_to_coco,
)
from utils.metrics import ConfusionMatrix, DetectionStats, ap_per_class, fitness, process_batch, within_per_class_limit


@pytest.fixture(scope="module")
def hard_case(coco128_dir):
    """COCO128 val with an unlabelled image, a labelled class never detected, detections of classes
    absent from the ground truth, and one image with more than COCOeval's 100 boxes of a class."""
    split = load_yolo_split(coco128_dir, "val2017")
    dets = jittered_detections(split, seed=7)
    split.labels[3] = split.labels[3][:0]  # image 3 keeps its detections but loses its labels
    gt_classes = set(np.concatenate(split.labels)[:, 0].astype(int))
    never_detected = sorted(gt_classes)[5]
    dets = [d[d[:, 5] != never_detected] for d in dets]
    rng = np.random.default_rng(1)
    crowded = next(i for i, lab in enumerate(split.labels) if (lab[:, 0] == 0).sum() >= 3)
    persons = split.labels[crowded][split.labels[crowded][:, 0] == 0, 1:]
    extra = persons[rng.integers(len(persons), size=160)] + rng.normal(0, 4, (160, 4))
    extra = np.concatenate((np.minimum(extra[:, :2], extra[:, 2:]), np.maximum(extra[:, :2], extra[:, 2:])), 1)
    extra = np.concatenate((np.round(extra, 3), np.round(rng.random((160, 1)), 5), np.zeros((160, 1))), 1)
    dets[crowded] = np.concatenate((dets[crowded], extra))
    assert (dets[crowded][:, 5] == 0).sum() > 100
    assert set(np.concatenate(dets)[:, 5].astype(int)) - gt_classes  # false positives of absent classes
    return split, dets, never_detected


def _ours(split, dets):
    stats = DetectionStats()
    for d, lab in zip(dets, split.labels):
        stats.add(d, lab)
    return stats.compute()


def _coco_json(split, dets):
    cat_ids, img_ids = category_ids({"names": list(COCO_NAMES)}), image_ids(split.files)
    gt = ground_truth_to_coco(split.labels, split.shapes, img_ids, cat_ids, COCO_NAMES, split.files)
    return gt, predictions_to_coco(dets, img_ids, cat_ids)


@pytest.mark.parametrize("backend", ["pycocotools", "faster-coco-eval"])
def test_map_agrees_with_coco_tools(hard_case, backend):
    split, dets, never_detected = hard_case
    ours = _ours(split, dets)
    ref = coco_evaluate(*_coco_json(split, dets), backend=backend)
    assert 0.2 < ours.map50_95 < ours.map50 < 0.9  # a realistic, non-trivial operating point
    assert abs(ours.map50_95 - ref["map50_95"]) < 1e-3
    assert abs(ours.map50 - ref["map50"]) < 1e-3
    row = list(ours.classes).index(never_detected)
    assert ours.ap[row].sum() == 0 and ours.recall[row] == 0


def test_per_class_ap_equals_cocoeval(hard_case):
    """Stronger than the headline check: the very same AP per class and threshold."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    split, dets, _ = hard_case
    ours = _ours(split, dets)
    gt_json, preds = _coco_json(split, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_json
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(preds), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # area 'all', maxDets 100
    coco_ap = precision.mean(1).T  # (categories, thresholds)
    has_gt = (precision > -1).all((0, 1))
    assert np.array_equal(np.flatnonzero(has_gt), ours.classes)  # categories without GT are left out (-1)
    np.testing.assert_allclose(ours.ap, coco_ap[has_gt], atol=1e-9)


def test_ap_hand_computed():
    # 2 ground-truth boxes; detections ranked TP, FP, TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    tp = np.array([[True], [False], [True]])
    result = ap_per_class(tp, np.array([0.9, 0.8, 0.7]), np.zeros(3), np.zeros(2))
    assert result.ap[0, 0] == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)
    assert result.map50 == result.ap[0, 0]


def test_ap_without_ground_truth_or_detections():
    empty = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    assert empty.map50_95 == 0.0 and empty.mp == 0.0 and len(empty.classes) == 0
    missed = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.array([2, 2, 5]))
    assert list(missed.classes) == [2, 5] and missed.map50 == 0.0
    assert DetectionStats().compute().map50 == 0.0


def test_matching_is_greedy_by_score_like_cocoeval():
    labels = torch.tensor([[0, 0, 0, 10, 10.0]])
    # the higher-scored detection overlaps less, yet claims the box first (upstream YOLO would give it
    # to the better-overlapping one)
    dets = torch.tensor([[0, 0, 10, 8.7, 0.9, 0], [0, 0, 10, 10, 0.5, 0], [0, 0, 10, 10, 0.95, 1]])
    correct = process_batch(dets, labels)
    assert correct.shape == (3, 10) and correct.dtype == torch.bool
    assert correct[0].tolist() == [True] * 8 + [False] * 2  # IoU 0.87 passes thresholds 0.50 .. 0.85
    assert correct[1].tolist() == [False] * 8 + [True] * 2  # takes the box only where the first could not
    assert not correct[2].any()  # wrong class


def test_per_class_limit_keeps_top_scores_per_class():
    conf = np.array([0.1, 0.9, 0.5, 0.8, 0.7, 0.6])
    cls = np.array([0, 0, 0, 1, 1, 0])
    assert within_per_class_limit(conf, cls, 2).tolist() == [False, True, False, True, True, True]
    assert within_per_class_limit(np.zeros(0), np.zeros(0), 2).shape == (0,)


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(nc=2)
    labels = torch.tensor([[0, 0, 0, 10, 10.0], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60]])
    dets = torch.tensor([[0, 0, 10, 10, 0.9, 0], [20, 20, 30, 30, 0.8, 0], [80, 80, 90, 90, 0.7, 1],
                         [50, 50, 60, 60, 0.1, 1]])  # the last is below the matrix's confidence
    cm.process_batch(dets, labels)
    cm.process_batch(None, labels[:1])
    expected = np.array([[1, 1, 0], [0, 0, 1], [1, 1, 0]])  # rows predicted, columns true, 2 = background
    assert np.array_equal(cm.matrix, expected)


def test_fitness_weights():
    assert fitness(np.array([[0.5, 0.5, 0.6, 0.4]])) == pytest.approx([0.1 * 0.6 + 0.9 * 0.4])


def test_category_ids():
    assert category_ids({"names": list(COCO_NAMES)})[:3] == [1, 2, 3]
    assert category_ids({"names": dict(enumerate(COCO_NAMES))})[-1] == 90 and len(COCO_CATEGORY_IDS) == 80
    assert category_ids({"names": ["RBC", "WBC", "Platelets"]}) == [0, 1, 2]
    assert category_ids({"names": ["person", "car"], "coco_ids": [1, 3]}) == [1, 3]
    with pytest.raises(UserError):
        category_ids({"names": ["person", "car"], "coco_ids": [1]})
    assert image_ids(["a/000000000139.jpg", "b/42.png"]) == [139, 42]
    assert image_ids(["a/cat.jpg", "b/42.png"]) == [0, 1]
    assert image_ids(["a/7.jpg", "b/7.jpg"]) == [0, 1]


def test_coco_evaluate_without_predictions(hard_case):
    split, dets, _ = hard_case
    gt, _ = _coco_json(split, dets)
    assert coco_evaluate(gt, [])["map50_95"] == 0.0
    with pytest.raises(UserError):
        coco_evaluate("missing_annotations.json", [])
