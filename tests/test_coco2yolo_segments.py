"""tools/coco2yolo.py --segments: COCO polygons and RLE -> YOLO polygon rows, exact to the pixel."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from tools.coco2yolo import convert_coco_file
from utils.data.polygons import rasterize
from utils.data.synthetic import make_shapes_dataset
from utils.paths import ROOT


def read_rows(label: Path, w: int, h: int) -> list[tuple[int, np.ndarray]]:
    rows = [line.split() for line in label.read_text().splitlines()]
    return [(int(r[0]), np.array(r[1:], float).reshape(-1, 2) * (w, h)) for r in rows]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Drawn shapes with exact instance masks, overlapping: the masks are the truth to reproduce."""
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=0, imgsz=64, seed=11, masks=True)


def shapes_to_coco(root: Path, encoding: str) -> dict:
    """A COCO instances dict of the shapes' train split with each instance as 'polygon', 'rle' or 'rle-list'."""
    images, annotations = [], []
    for image_id, label in enumerate(sorted((root / "labels" / "train").glob("*.txt")), 1):
        ids = cv2.imread(str(root / "masks" / "train" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        images.append({"id": image_id, "file_name": f"{label.stem}.png", "width": 64, "height": 64})
        for k, (cls, polygon) in enumerate(read_rows(label, 64, 64), 1):
            rle = coco_mask.encode(np.asfortranarray((ids == k).astype(np.uint8)))
            if encoding == "polygon":
                segmentation = [polygon.ravel().tolist()]
            elif encoding == "rle":
                segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            else:  # uncompressed: run lengths down the columns
                flat = (ids == k).astype(np.uint8).ravel(order="F")
                change = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]]))))
                segmentation = {"size": [64, 64], "counts": np.diff(np.concatenate(([0], change))).tolist()}
            x, y, w, h = coco_mask.toBbox(rle).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1,
                                "bbox": [x, y, w, h], "area": float(coco_mask.area(rle)), "iscrowd": 0,
                                "segmentation": segmentation})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(("square", "disc", "triangle"))]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.mark.parametrize("encoding", ["polygon", "rle", "rle-list"])
def test_segments_reproduce_every_instance_mask(shapes, tmp_path, encoding):
    root = shapes.parent
    coco = shapes_to_coco(root, encoding)
    (tmp_path / "in.json").write_text(json.dumps(coco))
    yaml_file, report = convert_coco_file(tmp_path / "in.json", root / "images" / "train", tmp_path / "out",
                                          fractions=(1.0, 0.0, 0.0), segments=True)
    checked = 0
    for label in sorted((yaml_file.parent / "labels" / "train").glob("*.txt")):
        ids = cv2.imread(str(root / "masks" / "train" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        original = read_rows(root / "labels" / "train" / label.name, 64, 64)
        rows = read_rows(label, 64, 64)
        assert [c for c, _ in rows] == [c for c, _ in original]
        for k, mask in enumerate(rasterize([p for _, p in rows], 64, 64), 1):
            assert np.array_equal(mask, ids == k), (label.name, k)
            checked += 1
    assert checked == len(coco["annotations"]) and report.splits["train"].dropped == 0


def test_multi_part_polygons_join_and_bad_segmentations_are_dropped(shapes, tmp_path):
    root = shapes.parent
    coco = shapes_to_coco(root, "polygon")
    first = coco["annotations"][0]
    square = [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]
    first["segmentation"] = first["segmentation"] + [square]  # a second part
    coco["annotations"] += [
        {**first, "id": 901, "segmentation": [[1.0, 2.0, 3.0, 4.0]]},  # two points
        {**first, "id": 902, "segmentation": {"size": [64, 64], "counts": "not an rle"}},
        {**first, "id": 903, "segmentation": [[70.0, 70.0, 80.0, 70.0, 80.0, 80.0]]},  # outside the image
    ]
    (tmp_path / "in.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/coco2yolo.py", "--annotations", str(tmp_path / "in.json"),
                           "--images", str(root / "images" / "train"), "--split", "1", "0", "0", "--segments",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    ids = cv2.imread(str(root / "masks" / "train" / "train_00000.png"), cv2.IMREAD_UNCHANGED)
    rows = read_rows(out / "labels" / "train" / "train_00000.txt", 64, 64)
    joined = rasterize([rows[0][1]], 64, 64)[0].astype(bool)
    expected = (ids == 1) | rasterize([np.array(square).reshape(-1, 2)], 64, 64)[0].astype(bool)
    assert np.array_equal(joined, expected)
    assert len(rows) == sum(a["image_id"] == 1 for a in coco["annotations"]) - 3
    report = (out / "conversion_report.md").read_text()
    assert report.count("; dropped") >= 3 and "not a readable RLE" in report
