"""tools/coco2yolo.py: COCO128 labels -> COCO instances JSON -> YOLO labels must round-trip exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools.coco2yolo import convert_coco
from utils.data.config import load_data_config
from utils.errors import UserError
from utils.paths import ROOT

# COCO's 80 detection category ids (1..90 with gaps): the sparse ids real COCO files use.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def yolo_to_coco_json(coco128_dir: Path, split: str, names: list[str], limit: int | None = None) -> dict:
    """A COCO instances dict built from COCO128's YOLO labels, as pycocotools would read it."""
    images, annotations = [], []
    files = sorted((coco128_dir / "images" / split).glob("*.jpg"))[:limit]
    for image_id, im in enumerate(files, 1):
        with Image.open(im) as pil:
            w, h = pil.size
        images.append({"id": image_id, "file_name": im.name, "width": w, "height": h})
        lb = coco128_dir / "labels" / split / f"{im.stem}.txt"
        for line in lb.read_text().splitlines() if lb.is_file() else []:
            c, x, y, bw, bh = (float(v) for v in line.split())
            bbox = [(x - bw / 2) * w, (y - bh / 2) * h, bw * w, bh * h]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": COCO_IDS[int(c)],
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    categories = [{"id": cid, "name": names[k], "supercategory": "x"} for k, cid in enumerate(COCO_IDS)]
    return {"images": images, "annotations": annotations, "categories": categories[::-1]}  # any order


@pytest.fixture(scope="module")
def converted(tmp_path_factory, coco128_dir):
    names = load_data_config(ROOT / "data" / "coco128.yaml")["names"]
    work = tmp_path_factory.mktemp("coco")
    train = yolo_to_coco_json(coco128_dir, "train2017", names)
    n_real = len(train["annotations"])
    extra = [  # what real COCO files also hold: a crowd region, plus two broken annotations
        {"id": 900001, "image_id": 1, "category_id": 1, "bbox": [10, 10, 100, 100], "area": 1e4, "iscrowd": 1},
        {"id": 900002, "image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 50], "area": 0, "iscrowd": 0},
        {"id": 900003, "image_id": 3, "category_id": 12, "bbox": [10, 10, 5, 5], "area": 25, "iscrowd": 0},
    ]
    train["annotations"] += extra
    (work / "train.json").write_text(json.dumps(train))
    (work / "val.json").write_text(json.dumps(yolo_to_coco_json(coco128_dir, "val2017", names, limit=5)))
    out = work / "yolo"
    proc = subprocess.run([sys.executable, "tools/coco2yolo.py",
                           "--split", "train", str(work / "train.json"), str(coco128_dir / "images" / "train2017"),
                           "--split", "val", str(work / "val.json"), str(coco128_dir / "images" / "val2017"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc, n_real, names


def test_round_trip_reproduces_coco128_labels(converted, coco128_dir):
    out, _, n_real, _ = converted
    compared = 0
    for split, ours, limit in (("train2017", "train", None), ("val2017", "val", 5)):
        for im in sorted((coco128_dir / "images" / split).glob("*.jpg"))[:limit]:
            mine = out / "labels" / ours / f"{im.stem}.txt"
            original = coco128_dir / "labels" / split / f"{im.stem}.txt"
            rows = [line.split() for line in mine.read_text().splitlines()]
            expected = [line.split() for line in original.read_text().splitlines()] if original.is_file() else []
            assert len(rows) == len(expected), im.name
            for got, want in zip(rows, expected):
                assert got[0] == want[0]
                assert [float(v) for v in got[1:]] == pytest.approx([float(v) for v in want[1:]], abs=1.5e-6)
                compared += 1
            assert (out / "images" / ours / im.name).is_symlink()
    assert compared >= n_real > 900


def test_yaml_maps_contiguous_classes_to_coco_ids(converted):
    out, _, _, names = converted
    data = load_data_config(out / "data.yaml")
    assert data["names"] == names and data["nc"] == 80
    assert data["coco_ids"] == COCO_IDS  # index -> original COCO category id
    assert data["train"] == str(out / "images" / "train") and data["test"] is None


def test_crowd_skipped_broken_annotations_dropped_with_warnings(converted):
    _, proc, n_real, _ = converted
    assert f"train: 128 images, {n_real} boxes written; 2 boxes dropped" in proc.stdout
    assert "annotation 900002" in proc.stderr and "degenerate" in proc.stderr
    assert "annotation 900003" in proc.stderr and "unknown image_id or category_id" in proc.stderr
    assert "900001" not in proc.stderr  # crowd regions are skipped by design, not bad data


def test_bad_inputs_are_user_errors(tmp_path, coco128_dir):
    images = coco128_dir / "images" / "val2017"
    with pytest.raises(UserError, match="COCO annotation file not found"):
        convert_coco({"val": (tmp_path / "none.json", images)}, tmp_path / "o")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        convert_coco({"val": (tmp_path / "bad.json", images)}, tmp_path / "o")
    (tmp_path / "cap.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(UserError, match="not a COCO instances file .*categories"):
        convert_coco({"val": (tmp_path / "cap.json", images)}, tmp_path / "o")
    a = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    b = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "human"}]}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(UserError, match="categories differ"):
        convert_coco({"train": (tmp_path / "a.json", images), "val": (tmp_path / "b.json", images)}, tmp_path / "o")
    with pytest.raises(UserError, match="image folder of split val not found"):
        convert_coco({"val": (tmp_path / "a.json", tmp_path / "nowhere")}, tmp_path / "o")


def test_cli_rejects_unknown_split_name_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "tools/coco2yolo.py", "--split", "holdout", "a.json", ".",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --split holdout")
