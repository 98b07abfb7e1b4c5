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


# Pure colours that photographs rarely contain, one per class, for checking that boxes follow pixels.
CLASS_COLOURS = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 0, 255))  # BGR


def painted_image(coco128_dir: Path, index: int, boxes: list[tuple[int, float, float, float, float]]):
    """A shrunk real COCO128 image with each normalised box painted in its class colour."""
    im_file = coco128_pairs(coco128_dir, index + 1)[index][0]
    im = cv2.imread(str(im_file))
    r = MAX_SIDE / max(im.shape[:2])
    im = cv2.resize(im, (round(im.shape[1] * r), round(im.shape[0] * r)), interpolation=cv2.INTER_AREA)
    h, w = im.shape[:2]
    for c, x, y, bw, bh in boxes:
        x1, y1, x2, y2 = round((x - bw / 2) * w), round((y - bh / 2) * h), round((x + bw / 2) * w), round((y + bh / 2) * h)
        im[y1:y2, x1:x2] = CLASS_COLOURS[c]
    return im


# Non-overlapping boxes, away from the centre line so that left-right flips move them.
PAINTED_BOXES = [(0, 0.25, 0.3, 0.3, 0.3), (1, 0.75, 0.7, 0.3, 0.4), (2, 0.2, 0.8, 0.2, 0.2)]


def build_painted_dataset(root: Path, coco128_dir: Path, n: int = 4) -> Path:
    """``n`` real images with ``PAINTED_BOXES`` painted in and written as their labels."""
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(n):
        cv2.imwrite(str(images / f"p{i}.png"), painted_image(coco128_dir, i, PAINTED_BOXES))
        (labels / f"p{i}.txt").write_text("".join(f"{c} {x} {y} {w} {h}\n" for c, x, y, w, h in PAINTED_BOXES))
    return images
