"""Image resizing and training augmentations that move boxes and instance polygons together with pixels.

Every function takes a BGR uint8 image and labels as an (n, 5) float array [cls, ...] and
returns both transformed, so the pairing of pixels and boxes is kept in one place. Segmentation
data adds ``segments``, a list of each instance's (k, 2) polygon in pixels, which moves with the
boxes; for detection data it is None and stays None. Polygons are cut exactly where an image ends
(``utils.data.polygons.clip_polygon``), and where a transform moves them, the boxes become the
bounding boxes of the moved and cut polygons, which fit an object tighter than the moved corners
of its old box. A straight edge stays straight under every transform here (affine and
perspective), so a polygon's vertices are all that needs moving. Randomness comes from the ``random`` module, which the dataloader
seeds per worker.
"""
from __future__ import annotations

import math
import random

import cv2
import numpy as np

from utils.boxes import xywhn2xyxy
from utils.data.polygons import clip_polygon

Polygons = list  # of (k, 2) float arrays, one per instance, in the order of the label rows

PAD_VALUE = 114  # grey used by upstream for letterbox and mosaic borders; trained models expect it


def letterbox(im: np.ndarray, new_shape: int | tuple[int, int] = (640, 640),
              color: tuple[int, int, int] = (PAD_VALUE,) * 3, auto: bool = True, scaleup: bool = True,
              stride: int = 32) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` (h, w).

    With ``auto`` the padding is trimmed to the smallest multiple of ``stride`` (inference);
    without ``scaleup`` small images are only padded (validation: upscaling would invent detail).
    Returns (image, (gain_w, gain_h), (pad_left, pad_top)); the pads are the exact integer
    offsets used, so boxes can be mapped back without half-pixel error.
    """
    h0, w0 = im.shape[:2]
    if np.ndim(new_shape) == 0:
        new_shape = (int(new_shape), int(new_shape))
    new_shape = (int(new_shape[0]), int(new_shape[1]))
    r = min(new_shape[0] / h0, new_shape[1] / w0)
    if not scaleup:
        r = min(r, 1.0)
    w, h = int(round(w0 * r)), int(round(h0 * r))
    dw, dh = new_shape[1] - w, new_shape[0] - h
    if auto:
        dw, dh = dw % stride, dh % stride
    if (w, h) != (w0, h0):
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    left, top = dw // 2, dh // 2
    im = cv2.copyMakeBorder(im, top, dh - top, left, dw - left, cv2.BORDER_CONSTANT, value=color)
    return im, (w / w0, h / h0), (left, top)


def augment_hsv(im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5) -> None:
    """Jitter hue, saturation and value in place by random factors within the gains."""
    if not (hgain or sgain or vgain):
        return
    gains = np.random.uniform(-1, 1, 3) * [hgain, sgain, vgain] + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=gains.dtype)
    lut_hue = ((x * gains[0]) % 180).astype(np.uint8)  # OpenCV hue wraps at 180
    lut_sat = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_val = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_hue), cv2.LUT(sat, lut_sat), cv2.LUT(val, lut_val)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def random_flip(im: np.ndarray, labels: np.ndarray, segments: Polygons | None = None, flipud: float = 0.0,
                fliplr: float = 0.5) -> tuple[np.ndarray, np.ndarray, Polygons | None]:
    """Flip with the given probabilities; labels are normalised [cls, x, y, w, h], segments in pixels."""
    if random.random() < flipud:
        im = np.flipud(im)
        labels[:, 2] = 1 - labels[:, 2]
        if segments is not None:
            segments = [p * (1, -1) + (0, im.shape[0]) for p in segments]
    if random.random() < fliplr:
        im = np.fliplr(im)
        labels[:, 1] = 1 - labels[:, 1]
        if segments is not None:
            segments = [p * (-1, 1) + (im.shape[1], 0) for p in segments]
    return im, labels, segments


def mosaic4(tiles: list[tuple[np.ndarray, np.ndarray, Polygons | None]], size: int,
            center: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, Polygons | None]:
    """Place four images around ``center`` (x, y) on a 2*size square canvas.

    ``tiles`` holds (image, normalised [cls, x, y, w, h] labels, normalised segments or None) in
    the order top-left, top-right, bottom-left, bottom-right; each image is anchored at the centre
    and cropped where it leaves the canvas. Returns the canvas, pixel [cls, x1, y1, x2, y2] labels
    and pixel segments, clipped to the canvas.
    """
    xc, yc = center
    s2 = 2 * size
    canvas = np.full((s2, s2, tiles[0][0].shape[2]), PAD_VALUE, dtype=np.uint8)
    placed, placed_segments = [], []
    for k, (img, labels, segments) in enumerate(tiles):
        h, w = img.shape[:2]
        right, bottom = k in (1, 3), k in (2, 3)
        # Region on the canvas: the tile grows away from the centre along both axes.
        x1, x2 = (xc, min(xc + w, s2)) if right else (max(xc - w, 0), xc)
        y1, y2 = (yc, min(yc + h, s2)) if bottom else (max(yc - h, 0), yc)
        # Matching region in the tile: its edge nearest to the centre is kept.
        tx1 = 0 if right else w - (x2 - x1)
        ty1 = 0 if bottom else h - (y2 - y1)
        canvas[y1:y2, x1:x2] = img[ty1:ty1 + (y2 - y1), tx1:tx1 + (x2 - x1)]
        boxes = labels.copy()
        if len(boxes):
            boxes[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, x1 - tx1, y1 - ty1)
        placed.append(boxes)
        if segments is not None:
            placed_segments += [clip_polygon(p * (w, h) + (x1 - tx1, y1 - ty1), s2, s2) for p in segments]
    labels = np.concatenate(placed, 0) if placed else np.zeros((0, 5), np.float32)
    np.clip(labels[:, 1:], 0, s2, out=labels[:, 1:])
    if tiles[0][2] is None:
        return canvas, labels, None
    for row, polygon in zip(labels, placed_segments):  # the box of what the canvas shows of each outline
        row[1:] = np.concatenate((polygon.min(0), polygon.max(0))) if len(polygon) else 0
    return canvas, labels, placed_segments


def mixup(im: np.ndarray, labels: np.ndarray, segments: Polygons | None, im2: np.ndarray, labels2: np.ndarray,
          segments2: Polygons | None) -> tuple[np.ndarray, np.ndarray, Polygons | None]:
    """Blend two same-size images with a ratio near 0.5 and keep the boxes (and polygons) of both."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0), None if segments is None else segments + segments2


def random_perspective(im: np.ndarray, labels: np.ndarray, segments: Polygons | None = None, degrees: float = 10,
                       translate: float = 0.1, scale: float = 0.1, shear: float = 10, perspective: float = 0.0,
                       border: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray, Polygons | None]:
    """Random rotation, scale, shear, translation and perspective of an image, its boxes and polygons.

    ``labels`` are pixel [cls, x1, y1, x2, y2], ``segments`` pixel polygons or None. A negative
    ``border`` (h, w) crops that much off each side, which turns a 2s mosaic canvas into an s
    output. Boxes are mapped by their four corners (or are the bounds of their mapped polygon),
    clipped to the output, and dropped when too little of them is left.
    """
    height = im.shape[0] + 2 * border[0]
    width = im.shape[1] + 2 * border[1]

    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -im.shape[1] / 2, -im.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = random.uniform(-perspective, perspective), random.uniform(-perspective, perspective)
    gain = random.uniform(1 - scale, 1 + scale)
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=random.uniform(-degrees, degrees), scale=gain)
    shear_m = np.eye(3)
    shear_m[0, 1] = math.tan(math.radians(random.uniform(-shear, shear)))
    shear_m[1, 0] = math.tan(math.radians(random.uniform(-shear, shear)))
    move = np.eye(3)
    move[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * width
    move[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * height
    m = move @ shear_m @ rot @ persp @ centre  # applied right to left

    if border[0] or border[1] or (m != np.eye(3)).any():
        if perspective:
            im = cv2.warpPerspective(im, m, dsize=(width, height), borderValue=(PAD_VALUE,) * 3)
        else:
            im = cv2.warpAffine(im, m[:2], dsize=(width, height), borderValue=(PAD_VALUE,) * 3)

    n = len(labels)
    if n:
        if segments is None:
            corners = labels[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1, x2y2, x1y2, x2y1
            xy = _transform_points(corners, m, perspective).reshape(n, 4, 2)
            xy[..., 0] = xy[..., 0].clip(0, width)
            xy[..., 1] = xy[..., 1].clip(0, height)
            boxes = np.concatenate((xy.min(1), xy.max(1)), 1)
        else:
            moved = np.split(_transform_points(np.concatenate(segments), m, perspective),
                             np.cumsum([len(p) for p in segments])[:-1])
            segments = [clip_polygon(p, width, height) for p in moved]
            boxes = np.array([np.concatenate((p.min(0), p.max(0))) if len(p) else np.zeros(4) for p in segments])
        keep = box_candidates(labels[:, 1:5].T * gain, boxes.T)
        labels = labels[keep]
        labels[:, 1:5] = boxes[keep]
        if segments is not None:
            segments = [p for p, k in zip(segments, keep) if k]
    return im, labels, segments


def _transform_points(xy: np.ndarray, m: np.ndarray, perspective: bool) -> np.ndarray:
    """(p, 2) points through the 3x3 matrix ``m`` (divided by w for a perspective matrix)."""
    mapped = np.concatenate((xy, np.ones((len(xy), 1))), 1) @ m.T
    return mapped[:, :2] / mapped[:, 2:3] if perspective else mapped[:, :2]


def box_candidates(before: np.ndarray, after: np.ndarray, min_side: float = 2, max_aspect: float = 100,
                   min_area_kept: float = 0.1, eps: float = 1e-16) -> np.ndarray:
    """Which transformed boxes (4, n) still show enough of the object to be worth training on."""
    w1, h1 = before[2] - before[0], before[3] - before[1]
    w2, h2 = after[2] - after[0], after[3] - after[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > min_side) & (h2 > min_side) & (w2 * h2 / (w1 * h1 + eps) > min_area_kept) & (aspect < max_aspect)
