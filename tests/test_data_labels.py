"""Bad data is dropped or repaired with a warning naming the file, and counted; the label cache."""
from __future__ import annotations

import logging
import os
import pickle

import numpy as np
import pytest

from tests.data_builders import build_dataset
from utils.data import label_check as label_check
from utils.data.label_check import parse_label_text
from utils.dataloaders import YoloDataset, img2label_paths
from utils.errors import UserError

GOOD = "0 0.5 0.5 0.2 0.2"


@pytest.mark.parametrize("row, kept, repaired, note", [
    (GOOD, [[0, 0.5, 0.5, 0.2, 0.2]], 0, ""),
    ("3.0 0.5 0.5 0.2 0.2", [[3, 0.5, 0.5, 0.2, 0.2]], 0, ""),
    ("1 0.5 0.5 0.2", [], 0, "4 fields"),
    ("1 0.5 0.5 0.2 0.2 0.3", [], 0, "6 fields"),
    ("a 0.5 0.5 0.2 0.2", [], 0, "not all fields are numbers"),
    ("1 nan 0.5 0.2 0.2", [], 0, "non-finite"),
    ("-1 0.5 0.5 0.2 0.2", [], 0, "not a whole number"),
    ("1.5 0.5 0.5 0.2 0.2", [], 0, "not a whole number"),
    ("80 0.5 0.5 0.2 0.2", [], 0, "class id 80 >= nc 80"),
    ("0 320 240 50 50", [], 0, "outside [0, 1]"),  # pixels instead of normalised
    ("0 0.5 0.5 0 0.2", [], 0, "degenerate"),
    ("0 0.5 0.5 -0.1 0.2", [], 0, "degenerate"),
    ("0 0.95 0.5 0.2 0.2", [[0, 0.925, 0.5, 0.15, 0.2]], 1, "clipped"),  # right edge at 1.05
    ("0 1.005 0.5 0.2 0.2", [[0, 0.9525, 0.5, 0.095, 0.2]], 1, "clipped"),  # slightly out: repaired
    ("0 1.2 0.5 0.2 0.2", [], 0, "outside [0, 1]"),  # far out: dropped
    ("0 0.5 0.5 1.0000001 0.2", [[0, 0.5, 0.5, 1.0, 0.2]], 0, ""),  # float noise: clipped quietly
    ("2 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4", [[2, 0.2, 0.25, 0.2, 0.3]], 0, ""),  # polygon -> its box
])
def test_row_policy(row, kept, repaired, note):
    result = parse_label_text(row + "\n", nc=80)
    np.testing.assert_allclose(result.labels, np.array(kept, np.float32).reshape(-1, 5), atol=1e-6)
    assert result.repaired == repaired
    assert result.dropped == (0 if kept else 1)
    assert (note in " ".join(result.notes)) if note else not result.notes


def test_duplicates_dropped_keeping_order_and_blank_lines_ignored():
    text = f"2 0.3 0.3 0.1 0.1\n\n{GOOD}\n2 0.3 0.3 0.1 0.1\n{GOOD}\n"
    result = parse_label_text(text, nc=3)
    np.testing.assert_allclose(result.labels[:, 0], [2, 0])
    assert result.dropped == 2 and "2 duplicate row(s) dropped" in result.notes


def test_without_nc_any_whole_class_id_is_kept():
    assert len(parse_label_text("500 0.5 0.5 0.2 0.2").labels) == 1


@pytest.fixture()
def messy_dataset(tmp_path, coco128_dir):
    """Eight real images; six of them damaged in a different way."""
    images = build_dataset(tmp_path / "messy", coco128_dir, n=8)
    im = sorted(images.glob("*.jpg"))
    lb = [images.parent.parent / "labels" / "train" / f"{p.stem}.txt" for p in im]
    im[0].write_bytes(b"this is not a JPEG at all")
    data = im[1].read_bytes()
    im[1].write_bytes(data[: len(data) // 2])  # truncated mid-scan
    lb[2].unlink()
    lb[3].write_text("")
    lb[4].write_text(f"{GOOD}\n1 0.5 0.5 0.2\n80 0.5 0.5 0.1 0.1\n{GOOD}\n0 0.97 0.5 0.1 0.1\n"
                     "0 320 240 50 50\n0 0.5 0.5 0 0.1\nx 0.5 0.5 0.1 0.1\n")
    lb[5].write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    return images, im, lb


def test_messy_dataset_is_repaired_counted_and_named(messy_dataset, caplog, capsys):
    images, im, lb = messy_dataset
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        ds = YoloDataset(str(images), img_size=64, batch_size=2, nc=80)
    scan = ds.scan
    assert (scan.found, scan.missing, scan.empty, scan.corrupt) == (3, 1, 1, 3)
    assert (scan.repaired, scan.dropped) == (1, 6)  # 4 bad rows + 1 duplicate + 1 degenerate dropped, 1 clipped
    assert len(ds) == 5
    assert str(im[0]) not in ds.im_files and str(im[1]) not in ds.im_files and str(im[5]) not in ds.im_files
    assert str(im[2]) in ds.im_files and str(im[3]) in ds.im_files  # backgrounds stay

    log = caplog.text
    for f in (im[0], im[1], lb[4], lb[5]):
        assert str(f) in log
    assert "unreadable image" in log and "class id 80 >= nc 80" in log and "1 duplicate row(s)" in log
    totals = "5 images: 3 label files found, 1 missing, 1 empty, 3 corrupt images dropped; " \
             "1 label rows repaired, 6 dropped"
    assert scan.summary() == totals
    assert totals in capsys.readouterr().err

    labels = ds.labels[ds.im_files.index(str(im[4]))]
    np.testing.assert_allclose(labels, [[0, 0.5, 0.5, 0.2, 0.2], [0, 0.96, 0.5, 0.08, 0.1]], atol=1e-6)
    for i in range(len(ds)):  # every surviving image loads
        img, targets, _, _ = ds[i]
        assert img.shape[0] == 3 and targets.shape[1] == 6


def test_cache_is_reused_without_reading_labels_and_warnings_repeat(messy_dataset, monkeypatch, caplog):
    images, im, lb = messy_dataset
    first = YoloDataset(str(images), img_size=64, nc=80)
    assert not first.cache_reused and first.cache_path.name == "train.cache" and first.cache_path.is_file()

    def no_reading(*args):
        raise AssertionError("label files were read although the cache is current")

    monkeypatch.setattr(label_check, "check_pair", no_reading)
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        second = YoloDataset(str(images), img_size=64, nc=80)
    assert second.cache_reused
    assert second.im_files == first.im_files
    assert all(np.array_equal(a, b) for a, b in zip(second.labels, first.labels))
    np.testing.assert_array_equal(second.shapes, first.shapes)
    assert second.scan.summary() == first.scan.summary()
    assert str(lb[4]) in caplog.text  # problems are shown again, not forgotten


def test_cache_rebuilt_when_a_label_changes_or_nc_changes(messy_dataset, monkeypatch):
    images, im, lb = messy_dataset
    YoloDataset(str(images), img_size=64, nc=80)
    calls = []
    real = label_check.check_pair
    monkeypatch.setattr(label_check, "check_pair", lambda *a: calls.append(a) or real(*a))

    lb[3].write_text("5 0.5 0.5 0.5 0.5\n")
    ds = YoloDataset(str(images), img_size=64, nc=80)
    assert not ds.cache_reused and len(calls) == 8
    assert ds.scan.empty == 0 and ds.scan.found == 4

    calls.clear()
    ds = YoloDataset(str(images), img_size=64, nc=3)  # class 5 is now out of range
    assert not ds.cache_reused and len(calls) == 8
    assert "class id 5 >= nc 3" in " ".join(ds.scan.messages)


def test_cache_is_never_unpickled(tmp_path, coco128_dir):
    images = build_dataset(tmp_path / "ds", coco128_dir, n=2)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    cache = images.parent.parent / "labels" / "train.cache"
    np.save(open(cache, "wb"), np.array([Exploit()], dtype=object), allow_pickle=True)
    ds = YoloDataset(str(images), img_size=64)
    assert not marker.exists() and not ds.cache_reused and len(ds) == 2
    cache.write_bytes(pickle.dumps({"version": 1}))
    assert not YoloDataset(str(images), img_size=64).cache_reused


def test_read_only_label_folder_gets_no_cache_but_works(tmp_path, coco128_dir):
    images = build_dataset(tmp_path / "ro", coco128_dir, n=2)
    labels_parent = images.parent.parent / "labels"
    labels_parent.chmod(0o555)
    try:
        ds = YoloDataset(str(images), img_size=64)
        assert len(ds) == 2 and not ds.cache_path.exists()
    finally:
        labels_parent.chmod(0o755)


def test_list_file_source_with_relative_lines(tmp_path, coco128_dir):
    images = build_dataset(tmp_path / "ds", coco128_dir, n=3)
    names = sorted(p.name for p in images.glob("*.jpg"))
    listing = tmp_path / "ds" / "train.txt"
    listing.write_text("".join(f"./images/train/{n}\n" for n in names[:2]) + f"images/train/{names[0]}\n")
    ds = YoloDataset(str(listing), img_size=64)
    assert [os.path.basename(f) for f in ds.im_files] == names[:2]
    assert ds.cache_path == tmp_path / "ds" / "train.cache"
    assert img2label_paths([f"/a/images/b/images/c/x.jpg"]) == ["/a/images/b/labels/c/x.txt"]


def test_empty_or_unusable_dataset_is_user_error(tmp_path, coco128_dir):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="no images found"):
        YoloDataset(str(tmp_path / "empty" / "images"))
    with pytest.raises(UserError, match="does not exist"):
        YoloDataset(str(tmp_path / "nowhere"))

    images = build_dataset(tmp_path / "broken", coco128_dir, n=2)
    for p in images.glob("*.jpg"):
        p.write_bytes(b"junk")
    with pytest.raises(UserError, match="no usable images .*2 corrupt"):
        YoloDataset(str(images))

    images = build_dataset(tmp_path / "unlabelled", coco128_dir, n=2)
    for p in (images.parent.parent / "labels" / "train").glob("*.txt"):
        p.unlink()
    assert len(YoloDataset(str(images))) == 2  # fine for validation (all backgrounds)
    with pytest.raises(UserError, match="nothing to train on"):
        YoloDataset(str(images), augment=True)
