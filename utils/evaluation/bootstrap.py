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
from typing import Callable, Iterator

import numpy as np

from utils.evaluation.metrics import PerImageStats, envelope_ap

RESAMPLES = 1000
SEED = 0
BATCH_ELEMENTS = 2**24  # a batch of resamples is scored in arrays of about this many elements
PERCENTILES = (2.5, 97.5)  # a central 95% interval
METRIC_NAMES = ("map50_95", "map50")  # the order of a scorer's figures


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


def _counting(lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(n)`` for every n in ``lengths``, without a Python loop."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


class _Scorer:
    """mAP50-95 and mAP50 of many resamples of one evaluation's images at once, without sorting again.

    The detections are ranked once, by class and descending score as ``ap_per_class`` ranks them
    (equal scores in image order). A resample only weights each image by how often it was drawn,
    so a match's rank among the resample's detections of its class is a weighted count of the
    detections ranked before it. A *block*, one image's detections of one class and score, is
    listed once per draw of the image (a, b, a, b): copy c of its o-th detection is ranked
    c * size + o after the block's start. Only the matches (a few percent of the detections at
    conf 0.001) are touched, for every resample of a batch together.
    """

    def __init__(self, stats: PerImageStats):
        tp, conf, cls, target_cls = stats.concatenated()
        image = np.repeat(np.arange(len(stats)), [len(c) for c in stats.conf])
        order = np.lexsort((-conf, cls))  # ties keep image order, as the concatenation does
        tp, conf, cls, self.image = tp[order], conf[order], cls[order], image[order]
        new_block = np.ones(len(order), dtype=bool)
        new_block[1:] = (self.image[1:] != self.image[:-1]) | (cls[1:] != cls[:-1]) | (conf[1:] != conf[:-1])
        block_start = np.flatnonzero(new_block)
        block = np.cumsum(new_block) - 1
        block_size = np.diff(np.append(block_start, len(order)))

        hit_at = np.flatnonzero(tp.any(1))
        self.hits, self.hit_image = tp[hit_at], self.image[hit_at]
        self.hit_block_start = block_start[block[hit_at]]
        self.hit_class_start = np.searchsorted(cls, cls[hit_at], side="left")
        self.hit_size = block_size[block[hit_at]]
        self.hit_offset = hit_at - self.hit_block_start
        self.reorder = bool((np.bincount(block[hit_at]) > 1).any())  # a block with two matches interleaves

        classes = np.unique(target_cls.astype(int))
        self.targets = np.zeros((len(stats), len(classes)), dtype=np.int64)  # per image and class
        for i, t in enumerate(stats.target_cls):
            np.add.at(self.targets[i], np.searchsorted(classes, t.astype(int)), 1)
        hit_cls = cls[hit_at]
        self.class_hits = [(np.searchsorted(hit_cls, c, "left"), np.searchsorted(hit_cls, c, "right")) for c in classes]
        widest = max([hi - lo for lo, hi in self.class_hits], default=0)
        # resamples per batch: (R, detections) counts and (R, ~2 x a class's matches, T) curves within BATCH_ELEMENTS
        self.batch = max(1, BATCH_ELEMENTS // max(len(order), 2 * widest * tp.shape[1], 1))

    def __call__(self, drawn: np.ndarray) -> np.ndarray:
        """(R, 2) mAP50-95 and mAP50 of R resamples given as (R, n_images) draw counts."""
        n_targets = drawn @ self.targets  # (R, classes)
        weight = drawn[:, self.image]
        before = np.cumsum(weight, 1) - weight  # detections of each resample ranked before each one
        start = before[:, self.hit_block_start] - before[:, self.hit_class_start]  # (R, matches)
        copies = drawn[:, self.hit_image]
        ap_sum = np.zeros((len(drawn), self.hits.shape[1]))
        for ci, (lo, hi) in enumerate(self.class_hits):
            present = np.flatnonzero(n_targets[:, ci])
            if len(present):
                ranks, hits = self._ranking(start[present, lo:hi], copies[present, lo:hi], slice(lo, hi))
                ap_sum[present] += envelope_ap(ranks, hits, n_targets[present, ci])[0]
        n_present = (n_targets > 0).sum(1)
        scored = n_present > 0
        result = np.zeros((len(drawn), 2))
        result[scored, 0] = ap_sum[scored].sum(1) / (n_present[scored] * ap_sum.shape[1])
        result[scored, 1] = ap_sum[scored, 0] / n_present[scored]
        return result

    def _ranking(self, start: np.ndarray, copies: np.ndarray, span: slice) -> tuple[np.ndarray, np.ndarray]:
        """One class's matches in each resample as ``envelope_ap`` takes them: (R, L) ranks, (R, L, T) hits."""
        lengths = copies.sum(1)
        flat = copies.ravel()
        match = np.repeat(np.tile(np.arange(span.start, span.stop), len(copies)), flat)
        copy = _counting(flat)
        ranks = np.repeat(start.ravel(), flat) + self.hit_offset[match] + copy * self.hit_size[match]
        row = np.repeat(np.arange(len(copies)), lengths)
        if self.reorder:
            order = np.lexsort((ranks, row))
            ranks, match = ranks[order], match[order]
        place = _counting(lengths)
        ranked = np.full((len(copies), int(lengths.max(initial=0))), np.inf)
        ranked[row, place] = ranks
        hits = np.zeros((*ranked.shape, self.hits.shape[1]), dtype=bool)
        hits[row, place] = self.hits[match]
        return ranked, hits


def _draw_counts(rows: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """The resamples ``rows`` (R, n_images) as (batch, n_images) counts of each image's draws."""
    n = rows.shape[1]
    for first in range(0, len(rows), batch):
        part = rows[first:first + batch]
        yield np.bincount((part + n * np.arange(len(part))[:, None]).ravel(), minlength=part.size).reshape(part.shape)


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
    everything = figure(*(s(np.ones((1, n), dtype=np.int64))[0] for s in scorers))
    batches = _draw_counts(resample_indices(n, resamples, seed), min(s.batch for s in scorers))
    draws = np.concatenate([figure(*(s(drawn) for s in scorers)) for drawn in batches])
    low, high = np.percentile(draws, PERCENTILES, axis=0)
    return {name: Interval(float(everything[i]), float(low[i]), float(high[i])) for i, name in enumerate(METRIC_NAMES)}


def interval(stats: PerImageStats, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, Interval]:
    """mAP50-95 and mAP50 of one evaluation with their bootstrap intervals."""
    return _bootstrap([stats], lambda a: a, resamples, seed)


def paired_delta(model: PerImageStats, reference: PerImageStats, resamples: int = RESAMPLES,
                 seed: int = SEED) -> dict[str, Interval]:
    """``model`` minus ``reference`` in mAP50-95 and mAP50, both scored on the same resampled images."""
    return _bootstrap([model, _aligned(reference, model.images)], lambda a, b: a - b, resamples, seed)
