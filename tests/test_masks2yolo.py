"""tools/masks2yolo.py: instance-id PNGs -> YOLO polygons that rasterise back to the same pixels."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tools.masks2yolo import convert_masks
from utils.data.dataset import YoloDataset
from utils.data.polygons import rasterize
from utils.data.synthetic import CLASS_NAMES, make_shapes_dataset
from utils.errors import UserError
from utils.paths import ROOT


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=0, imgsz=64, seed=13, masks=True)


def rows_of(label: Path) -> list[tuple[int, np.ndarray]]:
    rows = [line.split() for line in label.read_text().splitlines()]
    return [(int(r[0]), np.array(r[1:], float).reshape(-1, 2) * 64) for r in rows]


def test_one_class_polygons_rasterise_to_the_instance_pixels(shapes, tmp_path):
    root = shapes.parent
    yaml_file, report = convert_masks(root / "images" / "train", root / "masks" / "train", tmp_path / "out",
                                      ["shape"], fractions=(1.0, 0.0, 0.0))
    labels = sorted((yaml_file.parent / "labels" / "train").glob("*.txt"))
    assert len(labels) == 6 and report.splits["train"].dropped == 0
    for label in labels:
        ids = cv2.imread(str(root / "masks" / "train" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        rows = rows_of(label)
        assert {c for c, _ in rows} == {0} and len(rows) == ids.max()
        for k, mask in enumerate(rasterize([p for _, p in rows], 64, 64), 1):
            assert np.array_equal(mask, ids == k)
    ds = YoloDataset(str(yaml_file.parent / "images" / "train"), img_size=64, task="segment")
    assert ds.label_kind == "polygons" and ds.scan.dropped == 0


def test_class_map_bad_masks_and_missing_classes_are_reported(shapes, tmp_path):
    root = shapes.parent
    masks = tmp_path / "masks"
    shutil.copytree(root / "masks" / "train", masks)
    class_map = {}
    for label in sorted((root / "labels" / "train").glob("*.txt")):
        class_map[label.stem] = {str(k): CLASS_NAMES[c] for k, (c, _) in enumerate(rows_of(label), 1)}
    del class_map["train_00000"]["1"]  # an instance the map does not name
    (tmp_path / "classes.json").write_text(json.dumps(class_map))
    colour = cv2.imread(str(masks / "train_00001.png"), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(masks / "train_00001.png"), np.dstack([colour] * 3))
    cv2.imwrite(str(masks / "train_00002.png"), np.zeros((32, 64), np.uint8))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "tools/masks2yolo.py", "--images", str(root / "images" / "train"),
                           "--masks", str(masks), "--out", str(out), "--classes", *CLASS_NAMES,
                           "--class-map", str(tmp_path / "classes.json"), "--split", "1", "0", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = (out / "conversion_report.md").read_text()
    assert "instance 1 has no class in the class map; dropped" in report
    assert "3 channels" in report and "64x32 pixels, its image 64x64" in report
    for stem in ("train_00003", "train_00004"):
        assert [c for c, _ in rows_of(out / "labels" / "train" / f"{stem}.txt")] == \
            [c for c, _ in rows_of(root / "labels" / "train" / f"{stem}.txt")]
    assert len(rows_of(out / "labels" / "train" / "train_00000.txt")) == \
        len(rows_of(root / "labels" / "train" / "train_00000.txt")) - 1


def test_several_classes_without_a_map_is_one_line_exit_2(shapes, tmp_path):
    root = shapes.parent
    proc = subprocess.run([sys.executable, "tools/masks2yolo.py", "--images", str(root / "images" / "train"),
                           "--masks", str(root / "masks" / "train"), "--out", str(tmp_path / "out"),
                           "--classes", "a", "b"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--class-map" in proc.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        convert_masks(root / "images" / "train", root / "masks" / "train", tmp_path / "o", ["a", "b"],
                      tmp_path / "bad.json")
