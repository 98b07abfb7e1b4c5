"""Edge cases of the segmentation converters (tools/masks2yolo.py, tools/coco2yolo.py --segments).

What a YOLO polygon row can hold decides the policy: one outline per instance, no holes. An
instance in several parts is one row whose parts are joined by zero-width bridges (every part
kept, like upstream's ``merge_multi_segment``, not only the largest); a hole is filled. Each
case is checked against the pixels the written row rasterises to.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from scipy.ndimage import binary_fill_holes

from tools.coco2yolo import convert_coco_file
from tools.masks2yolo import convert_masks
from utils.data.dataset import YoloDataset
from utils.data.polygons import rasterize

H, W = 48, 64  # non-square on purpose


def ring_and_split() -> dict[str, np.ndarray]:
    """Instance masks with a hole (a ring) and in two parts (two separate bars)."""
    ring = np.zeros((H, W), bool)
    ring[4:20, 4:24] = True
    ring[8:16, 8:20] = False
    split = np.zeros((H, W), bool)
    split[26:44, 30:34] = True
    split[26:44, 50:56] = True
    return {"ring": ring, "split": split}


def read_rows(label: Path) -> list[tuple[int, np.ndarray]]:
    rows = [line.split() for line in label.read_text().splitlines()]
    return [(int(r[0]), np.array(r[1:], float).reshape(-1, 2) * (W, H)) for r in rows]


def pixels(rows: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
    return list(rasterize([p for _, p in rows], H, W).astype(bool))


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("empty", "shapes", "many"):
        cv2.imwrite(str(folder / f"{name}.jpg"), np.full((H, W, 3), 90, np.uint8))
    return folder


def test_masks2yolo_empty_png_holes_parts_and_16_bit_ids(images, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    cv2.imwrite(str(masks / "empty.png"), np.zeros((H, W), np.uint8))  # a mask with no instance
    shapes = ring_and_split()
    ids = np.zeros((H, W), np.uint8)
    ids[shapes["ring"]], ids[shapes["split"]] = 1, 2
    cv2.imwrite(str(masks / "shapes.png"), ids)
    many = np.zeros((H, W), np.uint16)  # 16 x 21 = 336 instances of 2 x 2 pixels, ids 1000..1335: past 8 bits
    for k in range(336):
        r, c = divmod(k, 21)
        many[r * 3:r * 3 + 2, c * 3:c * 3 + 2] = 1000 + k
    cv2.imwrite(str(masks / "many.png"), many)
    assert cv2.imread(str(masks / "many.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16

    yaml_file, report = convert_masks(images, masks, tmp_path / "out", ["object"], fractions=(1.0, 0.0, 0.0))
    labels = yaml_file.parent / "labels" / "train"
    assert (labels / "empty.txt").read_text() == ""  # an image with no instance: a background image

    ring, split = pixels(read_rows(labels / "shapes.txt"))
    assert np.array_equal(ring, binary_fill_holes(shapes["ring"]))  # the hole filled
    assert np.array_equal(split, shapes["split"])  # both parts kept, joined in one row

    rows = read_rows(labels / "many.txt")
    assert len(rows) == 336
    for k, mask in zip(range(1000, 1336), pixels(rows)):  # rows in id order
        assert np.array_equal(mask, many == k), k
    assert report.splits["train"].dropped == 0
    dataset = YoloDataset(str(yaml_file.parent / "images" / "train"), img_size=64, task="segment")
    assert dataset.scan.dropped == dataset.scan.repaired == 0 and dataset.scan.empty == 1


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def test_coco_segments_rle_holes_parts_empty_and_images_without_annotations(images, tmp_path):
    shapes = ring_and_split()
    two_parts = [[2.0, 30.0, 12.0, 30.0, 12.0, 40.0, 2.0, 40.0], [16.0, 30.0, 26.0, 30.0, 21.0, 44.0]]
    coco = {"images": [{"id": i, "file_name": f"{n}.jpg", "width": W, "height": H}
                       for i, n in enumerate(("empty", "shapes", "many"), 1)],
            "categories": [{"id": 1, "name": "object"}],
            "annotations": [{"id": i, "image_id": image, "category_id": 1, "iscrowd": 0, "segmentation": seg}
                            for i, (image, seg) in enumerate([
                                (2, _rle(shapes["ring"])), (2, _rle(shapes["split"])), (2, two_parts),
                                (3, _rle(np.zeros((H, W), bool)))], 1)]}  # the last: an RLE of no pixel
    (tmp_path / "in.json").write_text(json.dumps(coco))
    yaml_file, report = convert_coco_file(tmp_path / "in.json", images, tmp_path / "out", fractions=(1.0, 0.0, 0.0),
                                          segments=True)
    labels = yaml_file.parent / "labels" / "train"
    assert (labels / "empty.txt").read_text() == ""  # in the JSON without annotations: a background image
    ring, split, polygons = pixels(read_rows(labels / "shapes.txt"))
    assert np.array_equal(ring, binary_fill_holes(shapes["ring"]))
    assert np.array_equal(split, shapes["split"])
    parts = rasterize([np.reshape(p, (-1, 2)) for p in two_parts], H, W).astype(bool)
    assert np.array_equal(polygons, parts[0] | parts[1])
    assert (labels / "many.txt").read_text() == ""  # its only annotation had no pixel: dropped, and said so
    assert report.splits["train"].dropped == 1
    written = (yaml_file.parent / "conversion_report.md").read_text()
    assert "annotation 4 (many.jpg): no polygon or RLE with an area" in written
