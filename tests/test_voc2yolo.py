"""tools/voc2yolo.py on the real BCCD dataset, on small broken VOC folders and on user-shaped folders made from it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import torch

from tools.voc2yolo import convert_voc, convert_voc_folders
from utils.data.config import load_data_config
from utils.data.dataset import YoloDataset, create_dataloader
from utils.errors import UserError
from utils.paths import ROOT

SPLIT_SIZES = {"train": 205, "val": 87, "test": 72}  # lines of BCCD's ImageSets/Main/*.txt


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def bccd_converted(tmp_path_factory, bccd_dir):
    """The documented command, run as a user would, into a temporary --out."""
    voc = bccd_dir / "BCCD"
    before = snapshot(voc)
    out = tmp_path_factory.mktemp("bccd") / "yolo"
    proc = subprocess.run([sys.executable, "tools/voc2yolo.py", "--voc", str(voc), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(voc) == before  # the source dataset is only read
    return out, proc, json.loads((out / "conversion_report.json").read_text())


def test_bccd_counts_classes_and_splits(bccd_converted):
    out, _, report = bccd_converted
    data = load_data_config(out / "data.yaml")
    assert sorted(data["names"]) == ["Platelets", "RBC", "WBC"] and data["nc"] == 3
    per_class, total = Counter(), 0
    for split, size in SPLIT_SIZES.items():
        labels = sorted((out / "labels" / split).glob("*.txt"))
        assert len(labels) == size == len(list((out / "images" / split).iterdir()))
        for f in labels:
            for line in f.read_text().splitlines():
                per_class[data["names"][int(line.split()[0])]] += 1
                total += 1
    assert total == 4888 - 2
    assert per_class == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}
    assert report["splits"]["train"] == {"images": 205, "backgrounds": 0, "boxes": 2804, "dropped": 1, "clipped": 0,
                                         "classes": {"Platelets": 209, "RBC": 2381, "WBC": 214}}
    assert report["split_from"] == "ImageSets/Main lists (train, val, test)"
    assert sum((Counter(st["classes"]) for st in report["splits"].values()), Counter()) == per_class


def test_bccd_degenerate_boxes_reported_by_file(bccd_converted):
    _, proc, report = bccd_converted
    notes = report["box_notes"]
    assert len(notes) == 2 and all("degenerate" in n for n in notes)
    assert "BloodImage_00338.xml" in notes[0] and "BloodImage_00343.xml" in notes[1]
    assert "boxes dropped or clipped: 2" in proc.stdout and "BloodImage_00338.xml" in proc.stdout
    assert not any(report[k] for k in ("without_annotation", "without_image", "unreadable_images",
                                       "unreadable_annotations", "left_out"))


def test_bccd_boxes_and_images_are_right(bccd_converted, bccd_dir):
    out, _, _ = bccd_converted
    data = load_data_config(out / "data.yaml")
    image = out / "images" / "val" / "BloodImage_00000.jpg"  # BloodImage_00000 is in val.txt
    assert image.is_symlink() and Path(os.readlink(image)) == (bccd_dir / "BCCD" / "JPEGImages" / image.name).absolute()
    first = (out / "labels" / "val" / "BloodImage_00000.txt").read_text().splitlines()[0].split()
    # <object> WBC 260 177 491 376 in a 640x480 image; corners shifted to 0-based.
    assert data["names"][int(first[0])] == "WBC"
    assert [float(v) for v in first[1:]] == pytest.approx([749 / 2 / 640, 551 / 2 / 480, 231 / 640, 199 / 480], abs=1e-6)
    ds = YoloDataset(data["val"], img_size=64, nc=data["nc"])
    assert len(ds) == 87 and ds.scan.corrupt == 0 and ds.scan.dropped == 0 and ds.scan.repaired == 0
    assert sum(len(lb) for lb in ds.labels) == 1137  # val boxes written by the conversion


def test_classes_option_sets_class_order(tmp_path, bccd_dir):
    yaml_file, report = convert_voc(bccd_dir / "BCCD", tmp_path / "o", names=["RBC", "WBC", "Platelets"],
                                    splits=("test",))
    with pytest.raises(UserError, match="neither a 'train' nor a 'val'"):  # a test-only yaml cannot train or validate
        load_data_config(yaml_file)
    assert list(report.splits) == ["test"] and report.splits["test"].images == 72
    assert report.names_from == "from --classes"
    assert "0: RBC" in yaml_file.read_text() and "2: Platelets" in yaml_file.read_text()


@pytest.fixture()
def small_voc(tmp_path, bccd_dir):
    """A five-image VOC copy of BCCD files with one broken XML, one missing image and an odd class."""
    src, voc = bccd_dir / "BCCD", tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    ids = [f"BloodImage_0000{i}" for i in range(5)]
    for i in ids:
        shutil.copy(src / "Annotations" / f"{i}.xml", voc / "Annotations")
        shutil.copy(src / "JPEGImages" / f"{i}.jpg", voc / "JPEGImages")
    (voc / "Annotations" / f"{ids[1]}.xml").write_text("<annotation><object>")
    (voc / "JPEGImages" / f"{ids[2]}.jpg").unlink()
    xml = voc / "Annotations" / f"{ids[3]}.xml"
    xml.write_text(xml.read_text().replace("<name>WBC</name>", "<name>Neutrophil</name>", 1))
    (voc / "ImageSets/Main/train.txt").write_text("\n".join(ids[:3]) + "\n")
    (voc / "ImageSets/Main/val.txt").write_text("\n".join(ids[3:]) + "\n")
    return voc, ids


def test_broken_files_are_reported_not_crashes(small_voc, tmp_path):
    voc, ids = small_voc
    yaml_file, report = convert_voc(voc, tmp_path / "out")
    assert report.splits["train"].images == 1 and report.splits["val"].images == 2
    assert [(Path(p.file).name, p.reason.split(" (")[0]) for p in report.unreadable_annotations] == \
        [(f"{ids[1]}.xml", "not valid XML")]
    assert report.without_image == [str(voc / "Annotations" / f"{ids[2]}.xml")]
    # Without --classes an unexpected class becomes a class of its own ...
    assert report.names == ["Neutrophil", "Platelets", "RBC", "WBC"] and load_data_config(yaml_file)["nc"] == 4
    # ... and with --classes it is an error naming the file, before anything is written.
    with pytest.raises(UserError, match=f"{ids[3]}.xml: class 'Neutrophil' is not in --classes"):
        convert_voc(voc, tmp_path / "out2", names=["RBC", "WBC", "Platelets"])
    assert not (tmp_path / "out2").exists()


def test_devkit_without_split_lists_gets_a_seeded_split(small_voc, tmp_path):
    voc, ids = small_voc
    shutil.rmtree(voc / "ImageSets")
    _, report = convert_voc(voc, tmp_path / "out", seed=1)
    assert report.split_from == "seeded split 0.7 / 0.15 / 0.15 (train / val / test), seed 1"
    assert {s: st.images for s, st in report.splits.items()} == {"train": 1, "val": 1, "test": 1}  # 3 usable


def test_out_folder_rules(small_voc, tmp_path):
    voc, _ = small_voc
    with pytest.raises(UserError, match="outside the source dataset"):
        convert_voc(voc, voc / "yolo")
    with pytest.raises(UserError, match="outside the source dataset"):
        convert_voc(voc, tmp_path)  # would contain the source
    convert_voc(voc, tmp_path / "out")
    with pytest.raises(UserError, match="not empty; pass --exist-ok"):
        convert_voc(voc, tmp_path / "out")
    stale = tmp_path / "out" / "labels" / "train" / "stale.txt"
    stale.write_text("0 0.5 0.5 0.1 0.1\n")
    convert_voc(voc, tmp_path / "out", exist_ok=True)
    assert not stale.exists() and (tmp_path / "out" / "data.yaml").is_file()


def test_not_a_voc_folder_is_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "tools/voc2yolo.py", "--voc", str(tmp_path), "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == f"error: {tmp_path}: no Annotations/ folder (expected a VOC dataset root)\n"
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(UserError, match="JPEGImages: no images found"):
        convert_voc(tmp_path, tmp_path.parent / "o2")


# A one-class dataset as users bring it: a folder of images (one subfolder, one upper-case extension)
# and a folder of XML files, other names than VOC's, no split lists, plus the usual debris.
ONE_CLASS = "WBC"
ANNOTATED = [f"BloodImage_0000{i}" for i in range(8)]
IMAGE_PLACES = {i: f"{i}.jpg" for i in ANNOTATED[:5]} | {ANNOTATED[5]: f"{ANNOTATED[5]}.JPG",
                                                        ANNOTATED[6]: f"batch2/{ANNOTATED[6]}.jpg",
                                                        ANNOTATED[7]: f"batch2/{ANNOTATED[7]}.jpg"}


def one_class_xml(src: Path, dst: Path) -> int:
    """Copy a BCCD XML keeping only the one class's objects; returns how many it kept."""
    tree = ET.parse(src)
    root = tree.getroot()
    for obj in root.findall("object"):
        if obj.findtext("name") != ONE_CLASS:
            root.remove(obj)
    tree.write(dst)
    return len(root.findall("object"))


@pytest.fixture(scope="module")
def user_folders(tmp_path_factory, bccd_dir):
    src, root = bccd_dir / "BCCD", tmp_path_factory.mktemp("mine")
    imgs, xml = root / "photos", root / "labels_xml"
    (imgs / "batch2").mkdir(parents=True)
    xml.mkdir()
    boxes = 0
    for image_id, place in IMAGE_PLACES.items():
        (imgs / place).symlink_to(src / "JPEGImages" / f"{image_id}.jpg")
        boxes += one_class_xml(src / "Annotations" / f"{image_id}.xml", xml / f"{image_id}.xml")
    (imgs / "unlabelled_slide.jpg").symlink_to(src / "JPEGImages" / "BloodImage_00008.jpg")  # no XML
    one_class_xml(src / "Annotations" / "BloodImage_00010.xml", xml / "lost_slide.xml")  # no image
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")  # an XML, but no readable image
    one_class_xml(src / "Annotations" / "BloodImage_00009.xml", xml / "broken.xml")
    return imgs, xml, boxes


def convert_cli(imgs: Path, xml: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/voc2yolo.py", "--images", str(imgs), "--annotations", str(xml),
                           "--out", str(out), *extra], cwd=ROOT, capture_output=True, text=True)


def split_contents(out: Path) -> dict[str, list[str]]:
    return {split: sorted(p.name for p in (out / "images" / split).iterdir())
            for split in ("train", "val", "test") if (out / "images" / split).is_dir()}


@pytest.fixture(scope="module")
def one_class_converted(user_folders, tmp_path_factory):
    imgs, xml, _ = user_folders
    out = tmp_path_factory.mktemp("one") / "yolo"
    proc = convert_cli(imgs, xml, out, "--split", "0.5", "0.25", "0.25", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    return out, proc, json.loads((out / "conversion_report.json").read_text())


def test_one_class_folders_convert_with_a_seeded_split(one_class_converted, user_folders):
    out, _, report = one_class_converted
    _, _, boxes = user_folders
    data = load_data_config(out / "data.yaml")
    assert data["nc"] == 1 and data["names"] == [ONE_CLASS]
    assert report["names_from"] == "found in the XML files, sorted"
    contents = split_contents(out)
    assert {split: len(names) for split, names in contents.items()} == {"train": 5, "val": 2, "test": 2}  # 9 images
    every = sum(contents.values(), [])
    assert "batch2__BloodImage_00006.jpg" in every and "BloodImage_00005.JPG" in every and "broken.jpg" not in every
    assert sum(st["classes"][ONE_CLASS] for st in report["splits"].values()) == boxes == 8
    assert sum(st["backgrounds"] for st in report["splits"].values()) == 1
    [split] = [s for s, names in contents.items() if "unlabelled_slide.jpg" in names]
    assert (out / "labels" / split / "unlabelled_slide.txt").read_text() == ""


def test_one_class_report_names_every_problem(one_class_converted, user_folders):
    out, proc, report = one_class_converted
    imgs, xml, _ = user_folders
    assert report["without_annotation"] == [str(imgs / "unlabelled_slide.jpg")]
    assert report["without_image"] == [str(xml / "lost_slide.xml")]
    [unreadable] = report["unreadable_images"]
    assert unreadable["file"] == str(imgs / "broken.jpg") and unreadable["reason"].startswith("unreadable image")
    for line in ("images with no annotation, kept as background images (empty label files): 1",
                 "annotations with no image, skipped: 1", "images that could not be read, skipped: 1",
                 "unlabelled_slide.jpg", "lost_slide.xml", "broken.jpg"):
        assert line in proc.stdout
    md = (out / "conversion_report.md").read_text()
    assert "| WBC | " in md and str(imgs / "broken.jpg") in md and str(xml / "lost_slide.xml") in md


def test_one_class_split_is_reproducible(one_class_converted, user_folders, tmp_path):
    out, _, _ = one_class_converted
    imgs, xml, _ = user_folders
    convert_voc_folders(imgs, xml, tmp_path / "again", fractions=(0.5, 0.25, 0.25), seed=3)
    assert split_contents(tmp_path / "again") == split_contents(out)
    convert_voc_folders(imgs, xml, tmp_path / "other", fractions=(0.5, 0.25, 0.25), seed=4)
    assert split_contents(tmp_path / "other") != split_contents(out)
    # Converted again over the first output without a test split: the old test split goes.
    convert_voc_folders(imgs, xml, tmp_path / "again", fractions=(0.8, 0.2, 0), seed=3, exist_ok=True)
    assert list(split_contents(tmp_path / "again")) == ["train", "val"]
    assert not (tmp_path / "again" / "labels" / "test").exists()
    assert load_data_config(tmp_path / "again" / "data.yaml")["test"] is None


def test_one_class_dataset_loads_for_training(one_class_converted):
    out, _, report = one_class_converted
    data = load_data_config(out / "data.yaml")
    loader, dataset = create_dataloader(data["train"], 64, batch_size=3, stride=32, workers=0, nc=data["nc"])
    assert len(dataset) == 5 and dataset.scan.corrupt == 0
    rows = torch.cat([targets for _, targets, _, _ in loader])
    assert rows.shape == (report["splits"]["train"]["boxes"], 6) and set(rows[:, 1].tolist()) <= {0.0}


@pytest.mark.parametrize("case,problem", [
    ("fractions", "--split 0.5 0.5 0.5: fractions sum to 1.5, not 1"),
    ("classes", "class 'WBC' is not in --classes (RBC)"),
    ("no xml folder", "nowhere: folder of XML files not found"),
    ("no images", "empty: no images found"),
])
def test_bad_input_is_one_line_and_leaves_the_output_alone(case, problem, one_class_converted, user_folders,
                                                           tmp_path):
    out, _, _ = one_class_converted
    imgs, xml, _ = user_folders
    extra = {"fractions": ["--split", "0.5", "0.5", "0.5"], "classes": ["--classes", "RBC"]}.get(case, [])
    if case == "no xml folder":
        xml = tmp_path / "nowhere"
    if case == "no images":
        imgs = tmp_path / "empty"
        imgs.mkdir()
    before = snapshot(out)
    proc = convert_cli(imgs, xml, out, "--exist-ok", *extra)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and problem in proc.stderr, proc.stderr
    assert snapshot(out) == before
