"""Detections with a known character on real labels, to compare evaluators without a model.

Ground-truth boxes from a YOLO-format split are copied with seeded jitter (hits and near
misses), duplicated (what NMS leaves behind), dropped (misses) and mixed with random false
positives, each with a random score. The same set feeds our metrics and COCOeval.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from utils.boxes import xywhn2xyxy


@dataclass
class LabelledSplit:
    files: list[Path]
    shapes: list[tuple[int, int]]  # (h, w)
    labels: list[np.ndarray]       # (m, 5) [cls, x1, y1, x2, y2] in pixels


def load_yolo_split(dataset_dir: str | Path, split: str = "val2017") -> LabelledSplit:
    """Images of ``dataset_dir/images/<split>`` with their labels converted to pixel corners."""
    root = Path(dataset_dir)
    files = sorted((root / "images" / split).glob("*.jpg"))
    shapes, labels = [], []
    for f in files:
        w, h = Image.open(f).size
        txt = root / "labels" / split / f"{f.stem}.txt"
        rows = np.loadtxt(txt, ndmin=2).reshape(-1, 5) if txt.is_file() else np.zeros((0, 5))
        boxes = xywhn2xyxy(rows[:, 1:], w, h)
        shapes.append((h, w))
        labels.append(np.concatenate((rows[:, :1], boxes), 1))
    return LabelledSplit(files, shapes, labels)


def jittered_detections(split: LabelledSplit, seed: int = 0, miss_rate: float = 0.15, max_copies: int = 3,
                        false_positives: int = 8, nc: int = 80) -> list[np.ndarray]:
    """Per-image (n, 6) [x1, y1, x2, y2, conf, cls], rounded as COCO JSON stores them (boxes to 3
    decimals, scores to 5) so both evaluators see the same numbers."""
    rng = np.random.default_rng(seed)
    out = []
    for (h, w), lab in zip(split.shapes, split.labels):
        dets = []
        for cls, *box in lab:
            if rng.random() < miss_rate:
                continue
            box = np.array(box)
            size = np.maximum(box[2:] - box[:2], 1.0)
            for _ in range(rng.integers(1, max_copies + 1)):
                noise = rng.normal(0, rng.choice([0.03, 0.1, 0.25]), 4) * np.tile(size, 2)
                dets.append([*(box + noise), rng.random(), cls])
        for _ in range(rng.poisson(false_positives)):
            xy = rng.random(2) * (w, h)
            wh = rng.random(2) * (w, h) / 3 + 2
            dets.append([*xy, *(xy + wh), rng.random() * 0.6, rng.integers(nc)])
        d = np.array(dets, dtype=np.float64).reshape(-1, 6)
        d[:, :4] = np.concatenate((np.minimum(d[:, :2], d[:, 2:4]), np.maximum(d[:, :2], d[:, 2:4])), 1)
        d[:, [0, 2]] = d[:, [0, 2]].clip(0, w)
        d[:, [1, 3]] = d[:, [1, 3]].clip(0, h)
        d[:, :4] = np.round(d[:, :4], 3)
        d[:, 4] = np.round(d[:, 4], 5)
        out.append(d[np.argsort(-d[:, 4], kind="stable")])
    return out
