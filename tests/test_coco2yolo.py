"""tools/coco2yolo.py: COCO128 labels -> COCO instances JSON -> YOLO labels must round-trip exactly."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tools.coco2yolo import convert_coco, convert_coco_file
from utils.data.config import load_data_config
from utils.data.dataset import create_dataloader
from utils.errors import UserError
from utils.paths import ROOT

# COCO's 80 detection category ids (1..90 with gaps): the sparse ids real COCO files use.
COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]


def yolo_to_coco_json(coco128_dir: Path, split: str, names: list[str], files: list[Path] | None = None) -> dict:
    """A COCO instances dict built from COCO128's YOLO labels (of ``files``, default all), as pycocotools reads it."""
    images, annotations = [], []
    files = files or sorted((coco128_dir / "images" / split).glob("*.jpg"))
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
    val_files = sorted((coco128_dir / "images" / "val2017").glob("*.jpg"))[:5]
    (work / "val.json").write_text(json.dumps(yolo_to_coco_json(coco128_dir, "val2017", names, val_files)))
    out = work / "yolo"
    proc = subprocess.run([sys.executable, "tools/coco2yolo.py",
                           "--split", "train", str(work / "train.json"), str(coco128_dir / "images" / "train2017"),
                           "--split", "val", str(work / "val.json"), str(coco128_dir / "images" / "val2017"),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out, proc, n_real, names


def same_labels(mine: Path, original: Path) -> int:
    """Assert a converted label file holds COCO128's rows; returns how many it compared."""
    rows = [line.split() for line in mine.read_text().splitlines()]
    expected = [line.split() for line in original.read_text().splitlines()] if original.is_file() else []
    assert len(rows) == len(expected), mine
    for got, want in zip(rows, expected):
        assert got[0] == want[0]
        assert [float(v) for v in got[1:]] == pytest.approx([float(v) for v in want[1:]], abs=1.5e-6)
    return len(rows)


def test_round_trip_reproduces_coco128_labels(converted, coco128_dir):
    out, _, n_real, _ = converted
    compared = 0
    for split, ours, limit in (("train2017", "train", None), ("val2017", "val", 5)):
        for im in sorted((coco128_dir / "images" / split).glob("*.jpg"))[:limit]:
            compared += same_labels(out / "labels" / ours / f"{im.stem}.txt",
                                    coco128_dir / "labels" / split / f"{im.stem}.txt")
            assert (out / "images" / ours / im.name).is_symlink()
    assert compared >= n_real > 900


def test_yaml_maps_contiguous_classes_to_coco_ids(converted):
    out, _, _, names = converted
    data = load_data_config(out / "data.yaml")
    assert data["names"] == names and data["nc"] == 80
    assert data["coco_ids"] == COCO_IDS  # index -> original COCO category id
    assert data["train"] == str(out / "images" / "train") and data["test"] is None


def test_crowd_skipped_broken_annotations_dropped_and_reported(converted):
    out, proc, n_real, _ = converted
    report = json.loads((out / "conversion_report.json").read_text())
    train = report["splits"]["train"]
    assert (train["images"], train["boxes"], train["dropped"], train["backgrounds"]) == (128, n_real, 2, 2)
    assert sum(train["classes"].values()) == n_real
    [degenerate, unknown] = report["box_notes"]
    assert "annotation 900002" in degenerate and "degenerate" in degenerate
    assert "annotation 900003" in unknown and "category_id 12 is not in the categories table" in unknown
    assert degenerate in proc.stdout and unknown in proc.stdout
    assert "900001" not in proc.stdout + proc.stderr  # crowd regions are skipped by design, not bad data
    assert report["without_annotation"] == [str(Path(p).absolute()) for p in report["without_annotation"]]
    assert [Path(p).stem for p in report["without_annotation"]] == ["000000000250", "000000000508"]  # no labels
    # COCO128's val folder holds 128 images; the 5-image val JSON leaves the rest out, and says so.
    assert len(report["left_out"]) == 123 and all(p["reason"] == "no JSON's images table lists it"
                                                  for p in report["left_out"])


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
    with pytest.raises(UserError, match="nowhere: folder of images not found"):
        convert_coco({"val": (tmp_path / "a.json", tmp_path / "nowhere")}, tmp_path / "o")


def test_cli_rejects_unknown_split_name_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "tools/coco2yolo.py", "--split", "holdout", "a.json", ".",
                           "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --split holdout")


# One JSON for everything, as labelling tools export it, beside a folder that also holds debris.
FIRST_TEN, BACKGROUND = slice(0, 10), "000000000250.jpg"  # COCO128 has no labels for 000000000250


@pytest.fixture(scope="module")
def one_json(tmp_path_factory, coco128_dir):
    names = load_data_config(ROOT / "data" / "coco128.yaml")["names"]
    source = coco128_dir / "images" / "train2017"
    files = sorted(source.glob("*.jpg"))[FIRST_TEN] + [source / BACKGROUND]
    work = tmp_path_factory.mktemp("one_json")
    photos = work / "photos"
    photos.mkdir()
    for f in files:
        (photos / f.name).symlink_to(f)
    (photos / "not_in_json.jpg").symlink_to(source / "000000000077.jpg")
    (photos / "broken.jpg").write_bytes(b"\x89PNG but not really")
    coco = yolo_to_coco_json(coco128_dir, "train2017", names, files)
    coco["images"][0]["file_name"] = f"C:\\export\\project 3\\{files[0].name}"  # a labelling tool's own path
    coco["images"] += [{"id": 9001, "file_name": "broken.jpg", "width": 640, "height": 480},
                       {"id": 9002, "file_name": "gone.jpg", "width": 640, "height": 480}]
    coco["annotations"] += [{"id": 9901, "image_id": 9001, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0},
                            {"id": 9902, "image_id": 4242, "category_id": 1, "bbox": [1, 1, 50, 50], "iscrowd": 0}]
    (work / "labels.json").write_text(json.dumps(coco))
    return work, photos, files


def run_one_json(work: Path, photos: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/coco2yolo.py", "--annotations", str(work / "labels.json"),
                           "--images", str(photos), "--out", str(out), *extra], cwd=ROOT, capture_output=True,
                          text=True)


def test_one_json_is_split_with_a_seed_and_reported(one_json, coco128_dir, tmp_path):
    work, photos, files = one_json
    proc = run_one_json(work, photos, tmp_path / "out", "--split", "0.6", "0.2", "0.2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    data = load_data_config(out / "data.yaml")
    assert data["nc"] == 80 and data["coco_ids"] == COCO_IDS
    stems = {s: sorted(p.stem for p in (out / "labels" / s).glob("*.txt")) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in stems.items()} == {"train": 7, "val": 2, "test": 2}  # 11 readable images
    assert sorted(sum(stems.values(), [])) == sorted(f.stem for f in files)
    for split, split_stems in stems.items():
        for stem in split_stems:
            same_labels(out / "labels" / split / f"{stem}.txt", coco128_dir / "labels" / "train2017" / f"{stem}.txt")

    report = json.loads((out / "conversion_report.json").read_text())
    assert report["without_annotation"] == [str(photos / BACKGROUND)]
    json_file = work / "labels.json"
    assert report["without_image"] == [f"{json_file}: gone.jpg",
                                       f"{json_file}: annotation 9902: image_id 4242 is not in the images table"]
    [unreadable] = report["unreadable_images"]
    assert unreadable["file"] == str(photos / "broken.jpg") and unreadable["reason"].startswith("unreadable image")
    assert report["left_out"] == [{"file": str(photos / "not_in_json.jpg"),
                                   "reason": "no JSON's images table lists it"}]
    for line in ("images with no annotation, kept as background images (empty label files): 1",
                 "annotations with no image, skipped: 2", "images that could not be read, skipped: 1"):
        assert line in proc.stdout

    _, again = convert_coco_file(work / "labels.json", photos, tmp_path / "again", (0.6, 0.2, 0.2), seed=1)
    assert {s: sorted(p.stem for p in (tmp_path / "again" / "labels" / s).glob("*.txt")) for s in stems} == stems
    loader, dataset = create_dataloader(data["train"], 64, batch_size=4, stride=32, workers=0, nc=80)
    assert len(dataset) == 7 and sum(len(t) for _, t, _, _ in loader) == report["splits"]["train"]["boxes"]


@pytest.mark.parametrize("extra,problem", [
    (["--split", "0.6", "0.6", "0"], "--split 0.6 0.6 0.0: fractions sum to 1.2, not 1"),
    (["--split", "train", "a.json", "imgs"], "--split train a.json imgs: with --annotations, --split takes three"),
])
def test_one_json_bad_split_is_exit_2(one_json, extra, problem, tmp_path):
    work, photos, _ = one_json
    proc = run_one_json(work, photos, tmp_path / "out", *extra)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {problem}") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
