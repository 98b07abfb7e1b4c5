"""Segmentation data: polygons and their pixels, the polygon row policy, masks that follow the pixels
through every augmentation, the drawn shapes with exact masks, and coco128-seg."""
from __future__ import annotations

import logging
import random

import cv2
import numpy as np
import pytest

from utils.data.config import load_hyp
from utils.data.dataset import YoloDataset, check_task, create_dataloader
from utils.data.label_check import parse_label_text
from utils.data.label_cache import load_scan, cache_key
from utils.data.polygons import (
    clip_polygon,
    join_parts,
    mask_to_polygon,
    polygon_area,
    rasterize,
    self_intersects,
    trace_mask,
)
from utils.data.synthetic import make_shapes_dataset
from utils.errors import UserError
from utils.paths import ROOT

SQUARE = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)


def random_blobs(rng: np.random.Generator, h: int = 40, w: int = 50) -> np.ndarray:
    """A mask of a few discs, partly cut by a rectangle: several parts, concave edges, diagonal touches."""
    m = np.zeros((h, w), np.uint8)
    for _ in range(4):
        cv2.circle(m, (int(rng.integers(5, w - 5)), int(rng.integers(5, h - 5))), int(rng.integers(1, 9)), 1, -1)
    cv2.rectangle(m, tuple(int(v) for v in rng.integers(0, w, 2)), tuple(int(v) for v in rng.integers(0, h, 2)), 0, -1)
    return m


def filled(mask: np.ndarray) -> np.ndarray:
    """The mask with its holes filled (what an outline can describe)."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(out, contours, -1, 1, -1)
    return out


def test_traced_and_joined_outlines_rasterise_to_the_same_pixels():
    rng = np.random.default_rng(1)
    multi = 0
    for _ in range(60):
        mask = random_blobs(rng)
        polygon, parts = mask_to_polygon(mask)
        if polygon is None:
            continue
        multi += parts > 1
        assert np.array_equal(rasterize([polygon], *mask.shape)[0], filled(mask))
    assert multi > 10  # joining parts was exercised
    assert mask_to_polygon(np.zeros((5, 5)))[0] is None


def test_trace_follows_pixel_edges():
    mask = np.zeros((6, 8), np.uint8)
    mask[1:4, 2:7] = 1
    (outline,) = trace_mask(mask)
    assert sorted(map(tuple, outline.astype(int))) == [(2, 1), (2, 4), (7, 1), (7, 4)]
    assert abs(polygon_area(outline)) == mask.sum()


def test_clipping_cuts_exactly_where_the_image_ends():
    triangle = np.array([[-5, 2], [8, 2], [8, 15]], float)
    clipped = clip_polygon(triangle, 10, 10)
    assert clipped.min(0).tolist() == [0, 2] and clipped.max(0).tolist() == [8, 10]
    assert abs(polygon_area(clipped)) == pytest.approx(0.5 * 13 * 13 - 0.5 * 5 * 5 - 0.5 * 5 * 5)
    assert clip_polygon(SQUARE + 20, 10, 10).shape == (0, 2)
    np.testing.assert_array_equal(clip_polygon(SQUARE, 10, 10), SQUARE)
    u_shape = np.array([[0, 0], [9, 0], [9, 9], [6, 9], [6, 3], [3, 3], [3, 9], [0, 9]], float) + (0, 4)
    cut = clip_polygon(u_shape, 12, 10)  # the two arms leave the image: one outline joined along the edge
    expected = rasterize([u_shape], 13, 12)[0]
    expected[10:] = 0
    assert np.array_equal(rasterize([cut], 10, 12)[0], expected[:10])


def test_self_intersection_ignores_touching_and_bridges():
    bowtie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], float)
    assert self_intersects(bowtie) and not self_intersects(SQUARE)
    far = SQUARE + (30, 0)
    crossing_bridge = SQUARE + (15, -20)  # a third part the bridge between the first two will cross
    joined = join_parts([SQUARE, far])
    assert not self_intersects(joined)
    union = rasterize([SQUARE, far], 12, 45).max(0)
    assert np.array_equal(rasterize([joined], 12, 45)[0], union)
    assert join_parts([crossing_bridge]).shape == (4, 2)


@pytest.mark.parametrize("row, box, repaired, note", [
    ("0 0.1 0.1 0.5 0.1 0.5 0.5", [0, 0.3, 0.3, 0.4, 0.4], 0, ""),
    ("0 -0.005 0.1 0.5 0.1 0.5 0.5", [0, 0.25, 0.3, 0.5, 0.4], 1, "polygon outside the image, clipped"),
    ("0 0 0 1 1 1 0 0 1", [0, 0.5, 0.495, 1.0, 0.99], 1, "crosses itself, redrawn"),  # a bow tie
    ("0 0.1 0.1 0.2 0.2 0.3 0.3", None, 0, "no area"),
    ("0 5 5 60 6 7 90", None, 0, "outside [0, 1]"),  # pixels
    ("0 0.5", None, 0, "2 fields"),
    ("0 0.5 0.5", None, 0, "1 point"),
    ("0 0.1 0.1 0.5 0.1 0.5", None, 0, "6 fields"),
])
def test_polygon_row_policy(row, box, repaired, note):
    result = parse_label_text(row + "\n", nc=3, image_wh=(100, 100))
    if box is None:
        assert result.dropped == 1 and len(result.labels) == 0 and result.segments == []
    else:
        np.testing.assert_allclose(result.labels[0], box, atol=1e-6)
        assert result.kind == "polygons" and len(result.segments) == 1 and result.dropped == 0
    assert result.repaired == repaired
    assert (note in " ".join(result.notes)) if note else not result.notes


def test_box_rows_in_a_polygon_file_are_dropped_and_duplicates_compare_whole_polygons():
    text = "1 0.1 0.1 0.5 0.1 0.5 0.5\n0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.5 0.1 0.5 0.5\n1 0.1 0.1 0.5 0.5 0.5 0.1\n"
    result = parse_label_text(text, nc=3)
    assert result.kind == "polygons" and len(result.labels) == 2 and result.dropped == 2
    assert "5 fields in a polygon label file" in result.notes[0] and "1 duplicate" in result.notes[-1]
    assert parse_label_text("0 0.5 0.5 0.2 0.2\n").kind == "boxes" and parse_label_text("\n").kind == ""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=6, n_val=3, imgsz=64, seed=5, masks=True)


def test_drawn_shapes_come_with_exact_masks(shapes, tmp_path):
    root = shapes.parent
    instances = 0
    for label in sorted((root / "labels" / "train").glob("*.txt")):
        ids = cv2.imread(str(root / "masks" / "train" / f"{label.stem}.png"), cv2.IMREAD_UNCHANGED)
        rows = [line.split() for line in label.read_text().splitlines()]
        polygons = [np.array(r[1:], float).reshape(-1, 2) * 64 for r in rows]
        for k, mask in enumerate(rasterize(polygons, 64, 64), 1):
            assert np.array_equal(mask, ids == k)
        assert ids.max() == len(rows)
        instances += len(rows)
    assert instances >= 6
    again = make_shapes_dataset(tmp_path, n_train=6, n_val=3, imgsz=64, seed=5, masks=True)
    assert (again.parent / "labels/train/train_00005.txt").read_bytes() == \
        (root / "labels/train/train_00005.txt").read_bytes()


def test_masks_follow_the_pixels_through_every_augmentation(shapes):
    """Mosaic, affine with rotation and shear, flips: every instance's mask lies on its one colour,
    and its box is the mask's bounding box."""
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
    hyp.update(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=0.0, degrees=20.0, shear=5.0, flipud=0.5, fliplr=0.5)
    ds = YoloDataset(str(shapes.parent / "images" / "train"), img_size=64, augment=True, hyp=hyp, task="segment",
                     mask_ratio=1)
    random.seed(0)
    np.random.seed(0)
    checked = 0
    for mosaic in (True, False):
        ds.mosaic = mosaic
        for i in range(8):
            img, targets, _, _, masks, polygons = ds[i % len(ds)]
            assert len(masks) == len(targets) == len(polygons) and masks.shape[1:] == img.shape[1:]
            pixels = img.permute(1, 2, 0).numpy()
            for (_, _, x, y, w, h), mask in zip(targets.tolist(), masks.numpy()):
                ys, xs = np.nonzero(mask)
                assert len(xs), "an instance kept without pixels"
                box = np.array([(x - w / 2) * 64, (y - h / 2) * 64, (x + w / 2) * 64, (y + h / 2) * 64])
                np.testing.assert_allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)
                core = cv2.erode(mask, np.ones((3, 3), np.uint8)).astype(bool)
                if core.sum() >= 4:  # inside the outline, away from interpolated edges: one flat colour
                    assert pixels[core].astype(float).std(0).max() < 12
                    checked += 1
    assert checked >= 20


def test_validation_polygons_map_back_to_the_label_file(shapes):
    loader, ds = create_dataloader(str(shapes.parent / "images" / "val"), 96, 3, 32, rect=True, workers=0,
                                   task="segment")
    imgs, targets, paths, shapes_, masks, polygons = next(iter(loader))
    assert masks.shape == (len(targets), imgs.shape[2] // 4, imgs.shape[3] // 4) and masks.dtype.is_floating_point is False
    for path, (hw0, (gain, pad)), image_polygons in zip(paths, shapes_, polygons):
        rows = [line.split() for line in open(path.replace("images", "labels").replace(".png", ".txt"))]
        assert len(rows) == len(image_polygons)
        for row, polygon in zip(rows, image_polygons):
            original = (polygon - pad) / (gain[1], gain[0]) / (hw0[1], hw0[0])
            np.testing.assert_allclose(original, np.array(row[1:], float).reshape(-1, 2), atol=1e-5)


def test_scan_of_coco128_seg_keeps_every_polygon_and_caches_them(datasets_dir, tmp_path, caplog):
    images = datasets_dir / "coco128-seg" / "images" / "val2017"
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        ds = YoloDataset(str(images), img_size=64, task="segment", nc=80)
    assert ds.label_kind == "polygons" and ds.scan.dropped == 0 and ds.scan.repaired > 0
    assert sum(len(s) for s in ds.segments) == sum(len(lb) for lb in ds.labels) > 700
    assert "crosses itself, redrawn" in caplog.text
    for labels, polygons in zip(ds.labels, ds.segments):  # each box is its polygon's bounding box
        for row, polygon in zip(labels, polygons):
            (x1, y1), (x2, y2) = polygon.min(0), polygon.max(0)
            np.testing.assert_allclose(row[1:], [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], atol=1e-6)


def test_label_cache_round_trips_polygons(shapes):
    ds = YoloDataset(str(shapes.parent / "images" / "train"), img_size=64, task="segment")
    key = cache_key(ds.scan.im_files, [f.replace("images", "labels").replace(".png", ".txt")
                                       for f in ds.scan.im_files], None)
    cached = load_scan(ds.cache_path, key)
    assert cached is not None and cached.kinds == ds.scan.kinds
    for a, b in zip(cached.segments, ds.scan.segments):
        assert len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b))


def test_mixed_polygon_and_box_files_are_refused_for_segmentation(shapes, tmp_path, caplog):
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(shapes.parent / "images" / "train", root / "images")
    shutil.copytree(shapes.parent / "labels" / "train", root / "labels")
    (root / "labels" / "train_00001.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(UserError, match=r"5 label files hold polygons .* and 1 holds boxes \(e\.g\. .*train_00001"):
        YoloDataset(str(root / "images"), img_size=64, task="segment")
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        ds = YoloDataset(str(root / "images"), img_size=64)
    assert ds.label_kind == "boxes" and "detection uses each polygon's bounding box" in caplog.text


def test_model_task_must_fit_the_labels(shapes, coco128_dir):
    seg = YoloDataset(str(shapes.parent / "images" / "val"), img_size=64, task="segment")
    with pytest.raises(UserError, match=r"^det\.pt is a detection model but .*images/val holds segmentation labels"):
        check_task(seg, "det.pt", "detect")
    check_task(seg, "seg.pt", "segment")
    boxes = YoloDataset(str(coco128_dir / "images" / "val2017"), img_size=64)
    with pytest.raises(UserError, match=r"^seg\.pt is a segmentation model but .*val2017 holds box labels"):
        check_task(boxes, "seg.pt", "segment")
