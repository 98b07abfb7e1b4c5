"""A stand-in segmentation model whose predictions come from the ground truth, with known flaws.

With no trained segmentation model at hand, the evaluator is checked on predictions built from a
segmentation dataloader's own labels: for every image, one prototype per true instance holds that
instance's signed distance field at prototype resolution (positive inside), plus one constant
prototype. A detection's coefficients pick its instance's prototype (score >= 0.5 inside after
the sigmoid) and shift the threshold by the constant one, which grows or shrinks the mask by a few
pixels; some mix in another instance's field. Boxes are jittered (which also crops the mask),
instances are dropped or duplicated, and false positives with random boxes, classes and
coefficients are added, all with random scores and seeded. The output has a segmentation head's
eval-mode form, so predictions go through the evaluator's real path: NMS, mask assembly from
coefficients and prototypes, resizing to the original image, mask IoU.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from utils.boxes import xywh2xyxy, xyxy2xywh
from utils.data.polygons import rasterize

PROTO_STRIDE = 4
FIELD_CLIP = 8.0  # prototype pixels; beyond this far from an outline a field stays flat


@dataclass
class Flaws:
    """How far the synthetic predictions stray from the truth."""

    miss_rate: float = 0.15
    max_copies: int = 2
    false_positives: float = 4.0  # per image, Poisson mean
    box_jitter: tuple[float, ...] = (0.02, 0.08, 0.2)  # std as a share of box size, one drawn per detection
    grow: float = 1.5  # std of the threshold shift, prototype pixels
    mix_rate: float = 0.2  # share of detections that add a part of another instance's field


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Distance to the outline, positive inside, clipped to +-FIELD_CLIP (prototype pixels)."""
    mask = mask.astype(np.uint8)
    inside = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 3)
    return np.clip(inside - outside + 0.5 * np.where(mask > 0, 1, -1), -FIELD_CLIP, FIELD_CLIP).astype(np.float32)


class SyntheticSegmenter:
    """Call it with the batches of ``loader`` in order: it answers each with predictions built from that batch.

    ``nc`` is the class count (the width of the score block); ``nm`` the prototypes per image, which
    bounds the instances one image may hold (one field each, plus the constant).
    """

    def __init__(self, loader, nc: int, nm: int = 64, flaws: Flaws | None = None, seed: int = 0):
        self.nc, self.nm, self.flaws = nc, nm, flaws or Flaws()
        self.rng = np.random.default_rng(seed)
        self.outputs = [self._batch_output(imgs.shape[2:], targets, polygons)
                        for imgs, targets, _, _, _, polygons in loader]
        self.calls = 0

    def __call__(self, images: torch.Tensor):
        output = self.outputs[self.calls]
        self.calls += 1
        return output

    def _batch_output(self, hw, targets: torch.Tensor, polygons: tuple[list[np.ndarray], ...]):
        h, w = int(hw[0]), int(hw[1])
        ph, pw = h // PROTO_STRIDE, w // PROTO_STRIDE
        prototypes = torch.zeros(len(polygons), self.nm, ph, pw)
        rows = []
        for b, image_polygons in enumerate(polygons):
            if len(image_polygons) >= self.nm:
                raise ValueError(f"{len(image_polygons)} instances in one image; raise nm above that")
            masks = rasterize(image_polygons, ph, pw, scale=1 / PROTO_STRIDE)
            for k, mask in enumerate(masks):
                prototypes[b, k] = torch.from_numpy(signed_distance(mask))
            prototypes[b, -1] = 1.0
            labels = targets[targets[:, 0] == b, 1:].numpy()
            rows.append(self._detections(labels, w, h))
        anchors = max(max(len(r) for r in rows), 1)
        pred = torch.zeros(len(polygons), 4 + self.nc + self.nm, anchors)
        for b, r in enumerate(rows):
            if len(r):
                pred[b, :, :len(r)] = torch.from_numpy(r).T
        coefficients = pred[:, 4 + self.nc:]
        return pred, (None, coefficients, prototypes)

    def _detections(self, labels: np.ndarray, w: int, h: int) -> np.ndarray:
        """(n, 4 + nc + nm) rows: xywh in input pixels, one-hot scores, coefficients."""
        f, rng, rows = self.flaws, self.rng, []
        boxes = xywh2xyxy(labels[:, 1:5] * (w, h, w, h)) if len(labels) else np.zeros((0, 4))
        for k, (cls, box) in enumerate(zip(labels[:, 0], boxes)):
            if rng.random() < f.miss_rate:
                continue
            size = np.maximum(box[2:] - box[:2], 1.0)
            for _ in range(rng.integers(1, f.max_copies + 1)):
                jittered = box + rng.normal(0, rng.choice(f.box_jitter), 4) * np.tile(size, 2)
                coefficients = np.zeros(self.nm)
                coefficients[k] = 1.0
                coefficients[-1] = rng.normal(0, f.grow)
                if len(labels) > 1 and rng.random() < f.mix_rate:
                    coefficients[rng.choice([j for j in range(len(labels)) if j != k])] = rng.uniform(0.2, 0.8)
                rows.append(self._row(jittered, int(cls), rng.random(), coefficients, w, h))
        for _ in range(rng.poisson(f.false_positives)):
            xy = rng.random(2) * (w, h)
            coefficients = np.zeros(self.nm)
            coefficients[rng.integers(0, max(len(labels), 1))] = rng.uniform(-1, 1)
            coefficients[-1] = rng.normal(0, 2)
            rows.append(self._row(np.concatenate((xy, xy + rng.random(2) * (w, h) / 3 + 2)), int(rng.integers(self.nc)),
                                  rng.random() * 0.6, coefficients, w, h))
        return np.array(rows, dtype=np.float32).reshape(-1, 4 + self.nc + self.nm)

    def _row(self, xyxy: np.ndarray, cls: int, score: float, coefficients: np.ndarray, w: int, h: int) -> np.ndarray:
        xyxy = np.concatenate((np.minimum(xyxy[:2], xyxy[2:]), np.maximum(xyxy[:2], xyxy[2:])))
        xyxy = xyxy.clip(0, (w, h, w, h))
        scores = np.zeros(self.nc)
        scores[cls] = max(score, 1e-3)
        return np.concatenate((xyxy2xywh(xyxy), scores, coefficients))
