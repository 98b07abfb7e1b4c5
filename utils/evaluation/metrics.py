"""Detection metrics computed the way COCOeval computes them, so our mAP and pycocotools' agree.

COCOeval's rules, reproduced here on purpose: detections are matched greedily in descending
score order, each to the still-unmatched ground truth of its class with the highest IoU at or
above the threshold; AP samples the precision envelope at 101 recall points; classes without
ground truth are left out of the mean; at most 100 detections per image and class count.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from utils.boxes import box_iou
from utils.evaluation.coco import image_ids

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETS = 100  # COCOeval's maxDets for the headline AP, counted per image and class
CONF_GRID = np.linspace(0.0, 1.0, 1000)  # confidences at which P, R and F1 are tabulated
_EPS = np.spacing(1)


def process_batch(detections: torch.Tensor, labels: torch.Tensor,
                  iouv: torch.Tensor | np.ndarray = IOU_THRESHOLDS) -> torch.Tensor:
    """Which detections are true positives at each IoU threshold, for one image.

    detections (n, 6) [x1, y1, x2, y2, conf, cls]; labels (m, 5) [cls, x1, y1, x2, y2], same
    coordinates. Returns a bool (n, len(iouv)) tensor on the detections' device.
    """
    thresholds = np.asarray(iouv.cpu() if isinstance(iouv, torch.Tensor) else iouv, dtype=np.float64)
    correct = match_detections(_as_float64(detections), _as_float64(labels), thresholds)
    return torch.from_numpy(correct).to(detections.device)


def match_detections(detections: np.ndarray, labels: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS,
                     iou: np.ndarray | None = None) -> np.ndarray:
    """``process_batch`` on numpy arrays: COCOeval's greedy matching, all thresholds at once.

    ``iou`` (n, m) replaces the box IoU, e.g. with the IoU of the detections' and labels' masks.
    """
    n, m = len(detections), len(labels)
    correct = np.zeros((n, len(thresholds)), dtype=bool)
    if not (n and m):
        return correct
    if iou is None:  # no epsilon: an IoU exactly at a threshold must pass, as in COCOeval; 0/0 of empty boxes -> 0
        iou = box_iou(torch.from_numpy(detections[:, :4]), torch.from_numpy(labels[:, 1:]), eps=0).numpy()
        iou = np.nan_to_num(iou)
    iou = iou * (detections[:, 5:6] == labels[None, :, 0])
    order = np.argsort(-detections[:, 4], kind="stable")
    order = order[iou[order].max(1) >= thresholds.min()]  # the rest cannot match at any threshold
    taken = np.zeros((len(thresholds), m), dtype=bool)
    rows = np.arange(len(thresholds))
    for i in order:
        free = (iou[i] >= thresholds[:, None]) & ~taken
        best = np.where(free, iou[i], -1.0).argmax(1)
        hit = free[rows, best]
        taken[rows[hit], best[hit]] = True
        correct[i] = hit
    return correct


def within_per_class_limit(conf: np.ndarray, cls: np.ndarray, limit: int = COCO_MAX_DETS) -> np.ndarray:
    """Mask of one image's detections that rank within the top ``limit`` of their class.

    COCOeval drops the rest before matching (they count neither as true nor false positives).
    """
    n = len(conf)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    by_score = np.argsort(-np.asarray(conf), kind="stable")
    by_class = by_score[np.argsort(np.asarray(cls)[by_score], kind="stable")]
    sorted_cls = np.asarray(cls)[by_class]
    starts = np.r_[0, np.flatnonzero(sorted_cls[1:] != sorted_cls[:-1]) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    keep[by_class[rank < limit]] = True
    return keep


@dataclass
class APResult:
    """Per-class metrics for the classes that have ground truth (COCOeval's category set)."""

    classes: np.ndarray    # (k,) class indices
    n_targets: np.ndarray  # (k,) ground-truth boxes per class
    ap: np.ndarray         # (k, T) AP at each IoU threshold
    precision: np.ndarray  # (k,) at the confidence that maximises mean F1
    recall: np.ndarray     # (k,)
    f1: np.ndarray         # (k,)
    pr_curve: np.ndarray   # (k, 101) precision envelope at RECALL_POINTS, IoU 0.5

    @property
    def map50(self) -> float:
        return float(self.ap[:, 0].mean()) if len(self.classes) else 0.0

    @property
    def map50_95(self) -> float:
        return float(self.ap.mean()) if len(self.classes) else 0.0

    @property
    def mp(self) -> float:
        return float(self.precision.mean()) if len(self.classes) else 0.0

    @property
    def mr(self) -> float:
        return float(self.recall.mean()) if len(self.classes) else 0.0


def _box_smooth(y: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Moving average over ``fraction`` of the curve on each side, edges padded with edge values."""
    width = round(len(y) * fraction * 2) // 2 + 1
    padded = np.concatenate((np.full(width // 2, y[0]), y, np.full(width // 2, y[-1])))
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def recall_steps(n_targets: int) -> np.ndarray:
    """For each recall point, how many matches a class of ``n_targets`` boxes needs to reach it:
    the count of k in 0..n whose recall k / n (computed as the recall itself is) lies below the
    point, so that comparing match counts is exactly COCOeval's comparison of recalls."""
    return np.searchsorted(np.arange(n_targets + 1) / n_targets, RECALL_POINTS, side="left")


def envelope_ap(ranks: np.ndarray, hits: np.ndarray, n_targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One class's AP at each IoU threshold, and its sampled precision envelope at the first (the PR
    curve), for R rankings of its detections at once (a bootstrap's resamples).

    ``ranks`` (R, L): the places (0-based, ascending, in descending score among the class's
    detections) of the detections that match at some threshold, ``np.inf`` past a ranking's last
    match; ``hits`` (R, L, T) says at which thresholds each matches (False past the end);
    ``n_targets`` (R,) its ground-truth boxes, all > 0. Recall changes and precision rises only at a
    match, so COCOeval's envelope at each recall point is read off the matches alone: the far more
    numerous misses count only through the ranks. Returns (R, T) and (R, 101).
    """
    n_rows, length, n_thr = hits.shape
    if not length:
        return np.zeros((n_rows, n_thr)), np.zeros((n_rows, len(RECALL_POINTS)))
    found = hits.cumsum(1)
    envelope = np.maximum.accumulate((found / (ranks + 1 + _EPS)[..., None])[:, ::-1], 1)[:, ::-1]
    # Match counts rise by at most one a place, so the first place where recall reaches a point that
    # needs s matches is where the s-th match is (the first place when s is 0), if there are s.
    steps = np.zeros((n_rows, 1, len(RECALL_POINTS)), dtype=np.int64)
    for n in np.unique(n_targets):
        steps[n_targets == n] = recall_steps(int(n))
    total = found[:, -1, :, None]  # (R, T, 1): matches at each threshold
    match_at = np.flatnonzero(hits.transpose(0, 2, 1)) % length  # places of the matches, row by row
    first = (np.cumsum(total) - total.ravel()).reshape(total.shape)
    reached = (steps <= total) & ~np.isinf(ranks[:, :1, None])  # an empty ranking reaches no point
    nth = np.where(reached & (steps > 0), first + steps - 1, 0)
    place = np.where(steps > 0, match_at[nth] if len(match_at) else 0, 0)
    cell = (np.arange(n_rows)[:, None, None] * length + place) * n_thr + np.arange(n_thr)[:, None]
    sampled = np.where(reached, envelope.ravel()[cell], 0.0)
    return sampled.mean(2), sampled[:, 0]


def class_ap(ranks: np.ndarray, hits: np.ndarray, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """``envelope_ap`` of one ranking: ``ranks`` (k,), ``hits`` (k, T)."""
    ap, curve = envelope_ap(np.asarray(ranks, dtype=np.float64)[None], np.asarray(hits)[None], np.array([n_targets]))
    return ap[0], curve[0]


def ap_per_class(tp: np.ndarray, conf: np.ndarray, pred_cls: np.ndarray, target_cls: np.ndarray) -> APResult:
    """AP per class and IoU threshold, plus P/R/F1 at the single confidence that maximises mean F1.

    tp (n, T) bool, conf (n,), pred_cls (n,) for all detections of a dataset (concatenated in image
    order); target_cls (m,) for all its ground-truth boxes.
    """
    tp = np.asarray(tp, dtype=bool)
    tp = tp[:, None] if tp.ndim == 1 else tp
    order = np.argsort(-np.asarray(conf), kind="stable")
    tp, conf, pred_cls = tp[order], np.asarray(conf)[order], np.asarray(pred_cls)[order]
    classes, n_targets = np.unique(np.asarray(target_cls).astype(int), return_counts=True)
    k = len(classes)
    ap = np.zeros((k, tp.shape[1]))
    pr_curve = np.zeros((k, len(RECALL_POINTS)))
    p_at, r_at = np.zeros((k, len(CONF_GRID))), np.zeros((k, len(CONF_GRID)))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        if not sel.any():
            continue
        matches = tp[sel]
        ranks = np.flatnonzero(matches.any(1))
        ap[ci], pr_curve[ci] = class_ap(ranks, matches[ranks], n_targets[ci])
        tpc = matches[:, 0].cumsum()
        r_at[ci] = np.interp(-CONF_GRID, -conf[sel], tpc / n_targets[ci], left=0)
        p_at[ci] = np.interp(-CONF_GRID, -conf[sel], tpc / (np.arange(1, len(tpc) + 1) + _EPS), left=1)
    f1_at = 2 * p_at * r_at / (p_at + r_at + 1e-16)
    best = int(_box_smooth(f1_at.mean(0)).argmax()) if k else 0
    return APResult(classes, n_targets, ap, p_at[:, best], r_at[:, best], f1_at[:, best], pr_curve)


@dataclass
class PerImageStats:
    """An evaluation's matches kept image by image, so that any resample of its images can be
    scored again without running the model (``utils.evaluation.bootstrap``)."""

    images: list[str]             # one key per image (its path), in ranking order
    correct: list[np.ndarray]     # (n_i, T) bool: each detection a true positive at each IoU threshold
    conf: list[np.ndarray]        # (n_i,) detection scores
    cls: list[np.ndarray]         # (n_i,) detection classes
    target_cls: list[np.ndarray]  # (m_i,) ground-truth classes
    n_thresholds: int = len(IOU_THRESHOLDS)

    def __len__(self) -> int:
        return len(self.images)

    def concatenated(self, indices: Sequence[int] | np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tp, conf, pred_cls, target_cls) of the images at ``indices`` (all by default), in that
        order and with repeats: the arguments of ``ap_per_class``."""
        idx = range(len(self)) if indices is None else indices
        parts = [[stats[i] for i in idx] for stats in (self.correct, self.conf, self.cls, self.target_cls)]
        if not parts[0]:
            return np.zeros((0, self.n_thresholds), bool), np.zeros(0), np.zeros(0), np.zeros(0)
        return tuple(np.concatenate(p) for p in parts)


class DetectionStats:
    """Collects per-image matches over a dataset; ``compute`` turns them into an ``APResult``.

    ``max_dets_per_class`` reproduces COCOeval's maxDets=100 (None counts every detection,
    as upstream YOLO does). Images given by file are ranked in COCO image-id order, so equal
    scores (common in FP16) break ties as COCOeval breaks them, whatever order the loader used.
    """

    def __init__(self, thresholds: np.ndarray = IOU_THRESHOLDS, max_dets_per_class: int | None = COCO_MAX_DETS):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.max_dets_per_class = max_dets_per_class
        self._images, self._correct, self._conf, self._cls, self._target_cls = [], [], [], [], []

    def add(self, detections: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
            image: str | Path | None = None, iou: np.ndarray | None = None) -> None:
        """One image: detections (n, 6) [x1, y1, x2, y2, conf, cls], labels (m, 5) [cls, x1, y1, x2, y2].

        ``iou`` (n, m) scores the matches by another overlap than the boxes' (masks).
        """
        det, lab = _as_float64(detections).reshape(-1, 6), _as_float64(labels).reshape(-1, 5)
        if self.max_dets_per_class is not None:
            kept = within_per_class_limit(det[:, 4], det[:, 5], self.max_dets_per_class)
            det, iou = det[kept], None if iou is None else iou[kept]
        self._images.append(image)
        self._correct.append(match_detections(det, lab, self.thresholds, iou))
        self._conf.append(det[:, 4])
        self._cls.append(det[:, 5])
        self._target_cls.append(lab[:, 0])

    def compute(self) -> APResult:
        return ap_per_class(*self.per_image().concatenated())

    def per_image(self) -> PerImageStats:
        """The matches so far, image by image, in the order ``compute`` ranks them."""
        order = list(range(len(self._images)))
        if self._images and all(image is not None for image in self._images):
            order = list(np.argsort(image_ids(self._images), kind="stable"))
        keys = [str(image) if image is not None else f"#{i}" for i, image in enumerate(self._images)]
        return PerImageStats([keys[i] for i in order], [self._correct[i] for i in order],
                             [self._conf[i] for i in order], [self._cls[i] for i in order],
                             [self._target_cls[i] for i in order], len(self.thresholds))


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def fitness(metrics: np.ndarray) -> np.ndarray:
    """Model-selection score from rows of [P, R, mAP50, mAP50-95]: 0.1 * mAP50 + 0.9 * mAP50-95."""
    return np.asarray(metrics, dtype=np.float64)[..., 2:4] @ np.array([0.1, 0.9])


class ConfusionMatrix:
    """Counts of (predicted class, true class) pairs; index ``nc`` stands for background.

    Uses a deployment-like operating point (conf 0.25, IoU 0.45) rather than mAP's 0.001,
    because a matrix of every low-score box says nothing about real confusions.
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45):
        self.nc, self.conf, self.iou_thres = nc, conf, iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image: detections (n, 6) [x1, y1, x2, y2, conf, cls] or None, labels (m, 5)."""
        gt_cls = labels[:, 0].long().cpu().numpy()
        if detections is None or detections.shape[0] == 0:
            np.add.at(self.matrix, (self.nc, gt_cls), 1)
            return
        detections = detections[detections[:, 4] > self.conf]
        det_cls = detections[:, 5].long().cpu().numpy()
        pairs = np.zeros((0, 3))
        if len(gt_cls) and len(det_cls):
            iou = box_iou(labels[:, 1:].float(), detections[:, :4].float()).cpu().numpy()
            g, d = np.nonzero(iou > self.iou_thres)
            pairs = np.stack((g, d, iou[g, d]), 1)[np.argsort(-iou[g, d], kind="stable")]
            pairs = pairs[np.unique(pairs[:, 1], return_index=True)[1]]  # each detection once, best IoU
            pairs = pairs[np.argsort(-pairs[:, 2], kind="stable")]
            pairs = pairs[np.unique(pairs[:, 0], return_index=True)[1]]  # each label once, best IoU
        g, d = pairs[:, 0].astype(int), pairs[:, 1].astype(int)
        np.add.at(self.matrix, (det_cls[d], gt_cls[g]), 1)
        np.add.at(self.matrix, (self.nc, np.delete(gt_cls, g)), 1)
        np.add.at(self.matrix, (np.delete(det_cls, d), self.nc), 1)
