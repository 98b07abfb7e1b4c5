"""Bootstrap intervals over images for mAP and for the difference of two models' mAP.

On a few dozen test images one mAP50-95 moves by about 0.02 from the choice of images alone, so
a delta of 0.005 says nothing without an interval. A resample draws as many images as there are,
with replacement, and mAP is recomputed from the per-image matches the evaluation already made
(``PerImageStats``): seconds for a thousand resamples, no model run. For a difference the two
models are scored on the *same* resampled images (a paired bootstrap), which cancels the part of
the variation that both share. The interval is the 2.5th-97.5th percentile of the resampled
figures (the percentile method); ``value`` is the figure on all images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils.evaluation.metrics import PerImageStats, class_ap, mean_ap

RESAMPLES = 1000
SEED = 0
PERCENTILES = (2.5, 97.5)  # a central 95% interval
METRIC_NAMES = ("map50_95", "map50")  # the order of mean_ap's figures


@dataclass(frozen=True)
class Interval:
    """A figure on all images and the central 95% interval of its bootstrap distribution."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict:
        return {"value": self.value, "ci95_low": self.low, "ci95_high": self.high}

    def __str__(self) -> str:
        return f"{self.value:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def method(resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """How the intervals were made, for reports and records."""
    return {"resamples": resamples, "seed": seed, "level": 0.95, "unit": "image", "interval": "percentile"}


def resample_indices(n_images: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_images) image indices drawn with replacement; each row sorted, so a resample
    lists its images in evaluation order (equal scores then rank as they do on all images)."""
    if n_images < 1:
        raise ValueError("a bootstrap needs at least one image")
    rng = np.random.default_rng(seed)
    return np.sort(rng.integers(0, n_images, size=(resamples, n_images)), axis=1)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    segment_starts = np.cumsum(lengths) - lengths
    return np.arange(total) + np.repeat(starts - segment_starts, lengths)


def _ties_reorder_matches(image: np.ndarray, cls: np.ndarray, conf: np.ndarray, tp: np.ndarray) -> bool:
    """Whether two detections of one image, class and score differ in their matches.

    Only then does it matter that a resample that draws an image twice lists its detections
    twice in a row (a, b, a, b) where ranking copies side by side gives (a, a, b, b).
    """
    order = np.lexsort((conf, cls, image))
    same = ((image[order][1:] == image[order][:-1]) & (cls[order][1:] == cls[order][:-1])
            & (conf[order][1:] == conf[order][:-1]))
    return bool((tp[order][1:][same] != tp[order][:-1][same]).any())


class _Scorer:
    """mAP50-95 and mAP50 of any resample of one evaluation's images, without sorting again.

    The detections are ranked once, by class and descending score as ``ap_per_class`` ranks them.
    A resample only weights each image by how often it was drawn, so a match's rank among the
    resample's detections of its class is a weighted count of the detections ranked before it,
    and only the matches (a few percent of the detections at conf 0.001) are touched per resample.
    """

    def __init__(self, stats: PerImageStats):
        self.stats = stats
        tp, conf, cls, target_cls = stats.concatenated()
        image = np.repeat(np.arange(len(stats)), [len(c) for c in stats.conf])
        self.exact = not _ties_reorder_matches(image, cls, conf, tp)
        order = np.lexsort((-conf, cls))  # ties keep image order, as the concatenation does
        self.image, sorted_cls = image[order], cls[order]
        self.class_start = np.searchsorted(sorted_cls, sorted_cls, side="left")
        self.hit_at = np.flatnonzero(tp[order].any(1))
        self.hits, self.hit_cls = tp[order][self.hit_at], sorted_cls[self.hit_at]
        self.classes = np.unique(target_cls.astype(int))
        self.targets = np.zeros((len(stats), len(self.classes)), dtype=np.int64)  # per image and class
        for i, t in enumerate(stats.target_cls):
            np.add.at(self.targets[i], np.searchsorted(self.classes, t.astype(int)), 1)

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if not self.exact:
            return np.array(mean_ap(*self.stats.concatenated(indices)))
        drawn = np.bincount(indices, minlength=len(self.stats))
        weight = drawn[self.image]
        before = np.cumsum(weight) - weight  # detections of the resample ranked before each one
        copies = weight[self.hit_at]
        first = before[self.hit_at] - before[self.class_start[self.hit_at]]
        ranks = np.repeat(first, copies) + _ranges(np.zeros_like(copies), copies)
        hits, hit_cls = np.repeat(self.hits, copies, axis=0), np.repeat(self.hit_cls, copies)
        n_targets = drawn @ self.targets
        present = np.flatnonzero(n_targets)
        if not len(present):
            return np.zeros(2)
        ap = np.zeros((len(present), hits.shape[1]))
        for row, ci in enumerate(present):
            lo, hi = np.searchsorted(hit_cls, self.classes[ci], "left"), np.searchsorted(hit_cls, self.classes[ci], "right")
            ap[row] = class_ap(ranks[lo:hi], hits[lo:hi], n_targets[ci])[0]
        return np.array([ap.mean(), ap[:, 0].mean()])


def _aligned(stats: PerImageStats, images: list[str]) -> PerImageStats:
    """``stats`` reordered to ``images``; two evaluations of different images cannot be paired."""
    if stats.images == images:
        return stats
    position = {key: i for i, key in enumerate(stats.images)}
    if len(position) != len(images) or set(position) != set(images):
        raise ValueError(f"paired bootstrap: the two evaluations scored different images "
                         f"({len(stats.images)} vs {len(images)})")
    order = [position[key] for key in images]
    return PerImageStats(list(images), *([parts[i] for i in order] for parts in
                                         (stats.correct, stats.conf, stats.cls, stats.target_cls)),
                         stats.n_thresholds)


def _bootstrap(evaluations: list[PerImageStats], figure: Callable[..., np.ndarray], resamples: int,
               seed: int) -> dict[str, Interval]:
    scorers = [_Scorer(e) for e in evaluations]
    n = len(evaluations[0])
    everything = figure(*(s(np.arange(n)) for s in scorers))
    draws = np.stack([figure(*(s(row) for s in scorers)) for row in resample_indices(n, resamples, seed)])
    low, high = np.percentile(draws, PERCENTILES, axis=0)
    return {name: Interval(float(everything[i]), float(low[i]), float(high[i])) for i, name in enumerate(METRIC_NAMES)}


def interval(stats: PerImageStats, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Interval]:
    """mAP50-95 and mAP50 of one evaluation with their bootstrap intervals."""
    return _bootstrap([stats], lambda a: a, resamples, seed)


def paired_delta(model: PerImageStats, reference: PerImageStats, resamples: int = RESAMPLES,
                 seed: int = SEED) -> dict[str, Interval]:
    """``model`` minus ``reference`` in mAP50-95 and mAP50, both scored on the same resampled images."""
    return _bootstrap([model, _aligned(reference, model.images)], lambda a, b: a - b, resamples, seed)
