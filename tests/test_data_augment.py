"""Letterbox geometry, and that every augmentation moves boxes together with the pixels."""
from __future__ import annotations

import random

import numpy as np
import pytest

from tests.data_builders import CLASS_COLOURS, PAINTED_BOXES, build_painted_dataset, painted_image
from utils.boxes import xywh2xyxy
from utils.data.augment import augment_hsv, letterbox, mosaic4, random_perspective
from utils.data.config import load_hyp
from utils.dataloaders import YoloDataset
from utils.paths import ROOT


@pytest.mark.parametrize("hw, new_shape, auto, scaleup, out_hw, gain, pad", [
    ((480, 640), 160, False, True, (160, 160), 0.25, (0, 20)),
    ((480, 640), 160, True, True, (128, 160), 0.25, (0, 4)),  # padding trimmed to a stride multiple
    ((640, 480), (160, 128), False, True, (160, 128), 0.25, (4, 0)),
    ((50, 100), 160, False, False, (160, 160), 1.0, (30, 55)),  # no upscaling for validation
    ((50, 100), 160, False, True, (160, 160), 1.6, (0, 40)),
    ((333, 500), 160, False, True, (160, 160), 0.32, (0, 26)),  # 53 px of padding: 26 above, 27 below
])
def test_letterbox_shapes_gain_and_pad(hw, new_shape, auto, scaleup, out_hw, gain, pad):
    im = np.full((*hw, 3), 7, np.uint8)
    out, (gw, gh), (left, top) = letterbox(im, new_shape, auto=auto, scaleup=scaleup, stride=32)
    assert out.shape[:2] == out_hw
    assert gw == pytest.approx(gain, abs=0.005) and gh == pytest.approx(gain, abs=0.005)
    assert (left, top) == pad
    inner_h, inner_w = round(hw[0] * gh), round(hw[1] * gw)
    assert (out[top:top + inner_h, left:left + inner_w] == 7).all()  # image exactly where the pads say
    assert (out == 114).sum() == (out.size - inner_h * inner_w * 3)


def colour_fraction(img: np.ndarray, box, colour) -> float:
    """Share of pixels inside an xyxy pixel box that have (about) the given BGR colour.

    The box is shrunk by one pixel a side, since interpolation blends its edge with the
    background; boxes too small for that count as matching (1.0) and are not judged.
    """
    x1, y1, x2, y2 = int(np.ceil(box[0])) + 1, int(np.ceil(box[1])) + 1, int(box[2]) - 1, int(box[3]) - 1
    if x2 - x1 < 2 or y2 - y1 < 2:
        return 1.0
    patch = img[y1:y2, x1:x2].astype(int)
    return float((np.abs(patch - colour).max(-1) < 40).mean())


def test_mosaic_then_affine_keeps_boxes_on_their_pixels(coco128_dir):
    labels = np.array(PAINTED_BOXES, np.float32)
    tiles = [(painted_image(coco128_dir, i, PAINTED_BOXES), labels, None) for i in range(4)]
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
    s, kept = 160, 0
    for seed in range(8):
        random.seed(seed)
        centre = (random.randint(s // 2, 3 * s // 2), random.randint(s // 2, 3 * s // 2))
        canvas, boxes, no_segments = mosaic4(tiles, s, centre)
        assert no_segments is None
        assert canvas.shape == (2 * s, 2 * s, 3)
        assert (boxes[:, 1:] >= 0).all() and (boxes[:, 1:] <= 2 * s).all()
        img, boxes, _ = random_perspective(canvas, boxes, degrees=hyp["degrees"], translate=hyp["translate"],
                                           scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"],
                                           border=(-s // 2, -s // 2))
        assert img.shape == (s, s, 3)
        assert (boxes[:, [1, 3]] >= 0).all() and (boxes[:, [1, 3]] <= s).all()
        assert (boxes[:, [2, 4]] >= 0).all() and (boxes[:, [2, 4]] <= s).all()
        assert set(boxes[:, 0].astype(int)) <= {0, 1, 2}
        for c, *xyxy in boxes:
            assert colour_fraction(img, xyxy, CLASS_COLOURS[int(c)]) > 0.8
        kept += len(boxes)
    assert kept >= 8  # the check above was not vacuous


def test_rotation_and_shear_keep_boxes_inside_and_around_their_object(coco128_dir):
    img = painted_image(coco128_dir, 0, PAINTED_BOXES)
    h, w = img.shape[:2]
    labels = np.array(PAINTED_BOXES, np.float32)
    labels[:, 1:] = xywh2xyxy(labels[:, 1:]) * [w, h, w, h]
    random.seed(3)
    out, boxes, _ = random_perspective(img, labels.copy(), degrees=20, translate=0.05, scale=0.2, shear=5,
                                       perspective=0.0005)
    assert out.shape == img.shape and len(boxes)
    assert (boxes[:, [1, 3]] <= w).all() and (boxes[:, [2, 4]] <= h).all() and (boxes[:, 1:] >= 0).all()
    for c, *xyxy in boxes:  # a rotated rectangle fills about half or more of its bounding box
        assert colour_fraction(out, xyxy, CLASS_COLOURS[int(c)]) > 0.45


def test_hsv_jitter_changes_colours_not_shape():
    im = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    before = im.copy()
    augment_hsv(im, 0.0, 0.0, 0.0)
    assert np.array_equal(im, before)
    np.random.seed(1)
    augment_hsv(im, 0.015, 0.7, 0.4)
    assert im.shape == before.shape and im.dtype == np.uint8 and not np.array_equal(im, before)


def test_training_samples_from_dataset_keep_labels_consistent(tmp_path, coco128_dir):
    """Full training path (mosaic, mixup off, affine, flips): every target box sits on its colour."""
    images = build_painted_dataset(tmp_path / "painted", coco128_dir, n=4)
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
    hyp.update(hsv_h=0.0, hsv_s=0.0, hsv_v=0.0, mixup=0.0, fliplr=0.5, flipud=0.5)
    ds = YoloDataset(str(images), img_size=128, augment=True, hyp=hyp, nc=3)
    random.seed(0)
    np.random.seed(0)
    checked = 0
    for mosaic in (True, False):
        ds.mosaic = mosaic
        for i in range(12):
            img, targets, path, shapes = ds[i % len(ds)]
            assert img.shape == (3, 128, 128)
            assert (shapes is None) == mosaic
            assert (targets[:, 2:] >= 0).all() and (targets[:, 2:] <= 1).all()
            bgr = img.numpy().transpose(1, 2, 0)[:, :, ::-1]
            boxes = xywh2xyxy(targets[:, 2:].numpy()) * 128
            for c, box in zip(targets[:, 1].int().tolist(), boxes):
                assert colour_fraction(bgr, box, CLASS_COLOURS[c]) > 0.7
                checked += 1
    assert checked >= 30
