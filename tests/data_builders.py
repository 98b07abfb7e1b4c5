"""Tiny YOLO datasets built in a temporary folder from real COCO128 images, for the data tests.

Images are shrunk to at most 160 px so that a scan decodes them in milliseconds; labels are
normalised, so they stay valid for the smaller images.
"""
from __future__ import annotations

from pathlib import Path

import cv2

MAX_SIDE = 160


def coco128_pairs(coco128_dir: Path, n: int, split: str = "train2017") -> list[tuple[Path, Path]]:
    """The first ``n`` (image, label) pairs of COCO128 that have a label file."""
    pairs = []
    for im in sorted((coco128_dir / "images" / split).glob("*.jpg")):
        lb = coco128_dir / "labels" / split / f"{im.stem}.txt"
        if lb.is_file():
            pairs.append((im, lb))
        if len(pairs) == n:
            break
    return pairs


def build_dataset(root: Path, coco128_dir: Path, n: int = 8, split: str = "train") -> Path:
    """``root/images/<split>`` + ``root/labels/<split>`` with ``n`` shrunk COCO128 images; returns the images dir."""
    images, labels = root / "images" / split, root / "labels" / split
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for im_file, lb_file in coco128_pairs(coco128_dir, n):
        im = cv2.imread(str(im_file))
        r = MAX_SIDE / max(im.shape[:2])
        im = cv2.resize(im, (round(im.shape[1] * r), round(im.shape[0] * r)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(images / im_file.name), im)
        (labels / lb_file.name).write_text(lb_file.read_text())
    return images
