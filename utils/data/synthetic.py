"""A small, deterministic detection dataset that needs no download.

The demo (``python qat.py demo``) and CPU tests need real images with real boxes, but no dataset
may be fetched at run time. Coloured squares, discs and triangles on a textured background are
easy enough for a small GELAN to learn in minutes on a CPU, and hard enough that quantization
errors show up in mAP.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

CLASS_NAMES = ("square", "disc", "triangle")


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
        for _attempt in range(20):  # keep objects apart so every box is unambiguous
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


def make_shapes_dataset(out_dir: str | Path, n_train: int = 240, n_val: int = 60, imgsz: int = 160,
                        max_objects: int = 4, seed: int = 0) -> Path:
    """Write a YOLO-format dataset under ``out_dir`` and return the path of its data yaml.

    The same arguments always give the same images and labels (a fixed-seed generator).
    """
    out_dir = Path(out_dir).resolve()
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("val", n_val)):
        img_dir, lbl_dir = out_dir / "images" / split, out_dir / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img, labels = _image_with_labels(rng, imgsz, max_objects)
            cv2.imwrite(str(img_dir / f"{split}_{i:05d}.png"), img)
            rows = [f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}" for c, x, y, w, h in labels]
            (lbl_dir / f"{split}_{i:05d}.txt").write_text("\n".join(rows) + ("\n" if rows else ""))
    data_yaml = out_dir / "shapes.yaml"
    data = {"path": str(out_dir), "train": "images/train", "val": "images/val", "test": "images/val",
            "names": list(CLASS_NAMES), "nc": len(CLASS_NAMES)}
    data_yaml.write_text(yaml.safe_dump(data, sort_keys=False))
    return data_yaml
