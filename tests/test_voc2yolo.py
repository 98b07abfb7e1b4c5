"""tools/voc2yolo.py on the real BCCD dataset and on small broken VOC folders made from it."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tools.voc2yolo import convert_voc
from utils.data.config import load_data_config
from utils.dataloaders import YoloDataset
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
    return out, proc


def test_bccd_counts_classes_and_splits(bccd_converted):
    out, proc = bccd_converted
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
    assert f"train: 205 images, 2804 boxes written; 1 boxes dropped" in proc.stdout


def test_bccd_degenerate_boxes_warned_by_file(bccd_converted):
    _, proc = bccd_converted
    warnings = [line for line in proc.stderr.splitlines() if "degenerate" in line]
    assert len(warnings) == 2
    assert any("BloodImage_00338.xml" in w for w in warnings) and any("BloodImage_00343.xml" in w for w in warnings)


def test_bccd_boxes_and_images_are_right(bccd_converted, bccd_dir):
    out, _ = bccd_converted
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


def test_names_option_sets_class_order(tmp_path, bccd_dir):
    yaml_file, stats = convert_voc(bccd_dir / "BCCD", tmp_path / "o", names=["RBC", "WBC", "Platelets"],
                                   splits=("test",))
    with pytest.raises(UserError, match="neither a 'train' nor a 'val'"):  # a test-only yaml cannot train or validate
        load_data_config(yaml_file)
    assert list(stats) == ["test"] and stats["test"].images == 72
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


def test_broken_files_are_skipped_with_warnings_not_crashes(small_voc, tmp_path, caplog):
    voc, ids = small_voc
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        yaml_file, stats = convert_voc(voc, tmp_path / "out", names=["RBC", "WBC", "Platelets"])
    assert stats["train"].images == 1 and stats["train"].skipped == 2
    assert stats["val"].images == 2 and stats["val"].dropped == 1
    assert f"{ids[1]}.xml: not valid XML" in caplog.text
    assert f"no image for {ids[2]}" in caplog.text
    assert "'Neutrophil' is not in --names" in caplog.text
    assert load_data_config(yaml_file)["nc"] == 3
    # Without --names the unexpected class becomes a class of its own.
    _, stats = convert_voc(voc, tmp_path / "out2")
    assert stats["val"].dropped == 0
    assert "Neutrophil" in (tmp_path / "out2" / "data.yaml").read_text()


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
    with pytest.raises(UserError, match="ImageSets/Main"):
        convert_voc(tmp_path, tmp_path.parent / "o2")
