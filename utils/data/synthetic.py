"""A small, deterministic detection or segmentation dataset that needs no download.

The demo (``python qat.py demo``) and CPU tests need real images with real boxes, but no dataset
may be fetched at run time. Coloured squares, discs and triangles on a textured background are
easy enough for a small GELAN to learn in minutes on a CPU, and hard enough that quantization
errors show up in mAP.

With ``masks=True`` the shapes may overlap, a later one hiding part of an earlier one, and every
instance comes with its exact mask: the pixels it shows, written as an instance-id PNG under
``masks/`` (0 background, k the k-th row of the label file) and as a YOLO polygon traced along
those pixels' edges, which COCO's rasteriser turns back into exactly the same pixels.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

from utils.data.polygons import mask_to_polygon

CLASS_NAMES = ("square", "disc", "triangle")
MIN_VISIBLE = 0.5  # an overlapped shape keeps at least this share of its pixels in view
OVERLAP_RATE = 0.5  # share of shapes placed right beside an earlier one
PLACEMENT_TRIES = 20


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random texture, so the model cannot find objects by colour against a flat field."""
    small = rng.integers(40, 200, size=(6, 6, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 8, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _draw(img: np.ndarray, cls: int, cx: float, cy: float, r: float, color) -> None:
    if cls == 0:
        cv2.rectangle(img, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), color, -1)
    elif cls == 1:
        cv2.circle(img, (int(cx), int(cy)), int(r), color, -1)
    else:
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], dtype=np.int32)
        cv2.fillPoly(img, [pts], color)


def _image_with_labels(rng: np.random.Generator, size: int, max_objects: int):
    img = _background(rng, size)
    labels, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        r = float(rng.uniform(0.06, 0.16) * size)
        for _attempt in range(PLACEMENT_TRIES):  # keep objects apart so every box is unambiguous
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if all(np.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        _draw(img, cls, cx, cy, r, color)
        placed.append((cx, cy, r))
        labels.append((cls, cx / size, cy / size, 2 * r / size, 2 * r / size))
    return img, labels


def _shows_whole(instances: np.ndarray, k: int, drawn: int) -> bool:
    """Instance ``k`` shows enough of its ``drawn`` pixels, in one piece without holes (one exact polygon)."""
    visible = (instances == k).astype(np.uint8)
    if visible.sum() < MIN_VISIBLE * drawn:
        return False
    contours, _ = cv2.findContours(visible, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return len(contours) == 1


def _image_with_instances(rng: np.random.Generator, size: int, max_objects: int):
    """Shapes that may overlap, their instance-id map (uint8, 0 background) and class ids in drawing order."""
    img = _background(rng, size)
    instances = np.zeros((size, size), np.uint8)
    classes, drawn, placed = [], [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        r = float(rng.uniform(0.06, 0.16) * size)
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        for _attempt in range(PLACEMENT_TRIES):
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            if drawn and rng.random() < OVERLAP_RATE:  # beside an earlier shape, close enough to overlap it
                px, py, pr = placed[int(rng.integers(len(placed)))]
                angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.1) * (r + pr)
                cx, cy = np.clip((px + reach * np.cos(angle), py + reach * np.sin(angle)), r + 1, size - r - 1)
            shape = np.zeros_like(instances)
            _draw(shape, cls, cx, cy, r, 1)
            trial = np.where(shape > 0, len(classes) + 1, instances).astype(np.uint8)
            sizes = drawn + [int(shape.sum())]
            if all(_shows_whole(trial, k + 1, n) for k, n in enumerate(sizes)):
                instances = trial
                img[shape > 0] = color
                classes.append(cls)
                drawn.append(sizes[-1])
                placed.append((cx, cy, r))
                break
    return img, instances, classes


def _polygon_rows(instances: np.ndarray, classes: list[int]) -> list[str]:
    h, w = instances.shape
    rows = []
    for k, cls in enumerate(classes, 1):
        polygon, _ = mask_to_polygon(instances == k)
        rows.append(f"{cls} " + " ".join(f"{v:.6f}" for v in (polygon / (w, h)).ravel()))
    return rows


def make_shapes_dataset(out_dir: str | Path, n_train: int = 240, n_val: int = 60, imgsz: int = 160,
                        max_objects: int = 4, seed: int = 0, masks: bool = False, n_test: int = 0) -> Path:
    """Write a YOLO-format dataset under ``out_dir`` and return the path of its data yaml.

    ``n_test`` images make a test split of their own (a study chooses on val and reports on test);
    without them the yaml's test split is the val images.

    ``masks=True`` writes polygon labels and ``masks/<split>/<stem>.png`` instance-id images.
    The same arguments always give the same images and labels (a fixed-seed generator).
    """
    out_dir = Path(out_dir).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)) + ((("test", n_test),) if n_test else ()):
        img_dir, lbl_dir, mask_dir = (out_dir / kind / split for kind in ("images", "labels", "masks"))
        for folder in (img_dir, lbl_dir) + ((mask_dir,) if masks else ()):
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            stem = f"{split}_{i:05d}"
            if masks:
                img, instances, classes = _image_with_instances(rng, imgsz, max_objects)
                cv2.imwrite(str(mask_dir / f"{stem}.png"), instances)
                rows = _polygon_rows(instances, classes)
            else:
                img, labels = _image_with_labels(rng, imgsz, max_objects)
                rows = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
            cv2.imwrite(str(img_dir / f"{stem}.png"), img)
            (lbl_dir / f"{stem}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    data_yaml = out_dir / "shapes.yaml"
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val",
            "test": "images/test" if n_test else "images/val", "names": list(CLASS_NAMES), "nc": len(CLASS_NAMES)}
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
