"""Check one image and its YOLO label file before they enter a dataset.

Real datasets hold broken files. The policy here is that nothing crashes a run and nothing
disappears without a word; every row or image is kept, repaired or dropped, and each change
comes back as a note naming the file:

- image that cannot be opened or fully decoded, or is under 10 px a side: image dropped (corrupt);
- label file that cannot be read as text: image dropped (corrupt), because training on it as a
  background image would teach the model that its objects are background;
- row with a field count other than 5 (``cls x y w h``) or ``1 + 2k`` with k >= 3 (a polygon
  ``cls x1 y1 x2 y2 ...``, whose box is its bounding box): row dropped; a 3-field row is a
  polygon of one point, fewer than the three an outline needs;
- a file holds boxes or polygons, not both: in a file with polygon rows, a 5-field row (a box, or
  a polygon of two points) is dropped, since it has no outline to train a mask on;
- row with non-numbers, a class id that is negative, fractional or >= nc: row dropped;
- coordinate (x, y, w, h or a polygon point) outside [0, 1] by more than ``FAR``: row dropped,
  because such a row is almost always in pixels rather than normalised and cannot be repaired
  by guessing;
- box whose corners (or polygon whose points) stick out of the image by any amount up to that:
  clipped to the image and counted as repaired; overshoots under ``ROUNDING`` are clipped
  silently, being float noise;
- polygon whose edges cross each other: redrawn as the outline of its pixels at the image's
  resolution (the parity rule decides which pixels are inside, as COCO's rasteriser does), and
  counted as repaired; polygon with no area (all points on a line): dropped;
- box with zero or negative width or height (after clipping): row dropped as degenerate;
- exact duplicate row: the copy is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.data.polygons import polygon_area, redraw_polygon, self_intersects

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
FAR = 0.01
ROUNDING = 1e-6
MIN_IMAGE_SIDE = 10
EXIF_ORIENTATION = 0x0112
MAX_NOTES = 8  # per file; a file with hundreds of bad rows gets a count, not hundreds of lines
DEFAULT_POLYGON_WH = (1000, 1000)  # where a crossing polygon is redrawn when the image size is unknown


@dataclass
class LabelRows:
    """Labels that survived the checks, as an (n, 5) array [cls, x, y, w, h], plus what happened.

    ``segments`` holds each row's normalised polygon (k, 2) for a polygon file and is empty for a
    box file; ``kind`` says which the file's rows were written as ('polygons', 'boxes' or '' with no rows).
    """
    labels: np.ndarray
    repaired: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)
    segments: list[np.ndarray] = field(default_factory=list)
    kind: str = ""


@dataclass
class PairCheck:
    """Outcome for one image/label pair; ``status`` is 'found', 'missing', 'empty' or 'corrupt'."""
    im_file: str
    status: str
    labels: np.ndarray | None = None
    shape: tuple[int, int] | None = None  # (width, height) after EXIF rotation
    repaired: int = 0
    dropped: int = 0
    message: str = ""
    segments: list[np.ndarray] = field(default_factory=list)
    kind: str = ""


def image_size(im_file: str | Path) -> tuple[int, int]:
    """(width, height) of an image that decodes completely; ``ValueError`` saying why not otherwise.

    The full decode costs a few ms per image but runs only when the label cache is rebuilt, and
    it is the only way to catch truncated files before they break a batch mid-epoch.
    """
    try:
        with Image.open(im_file) as im:
            fmt = (im.format or "").lower()
            im.verify()
        with Image.open(im_file) as im:
            im.load()
            width, height = im.size
            if im.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                width, height = height, width
    except Exception as exc:  # PIL raises many types for broken files; all mean "unreadable"
        raise ValueError(f"unreadable image ({exc})") from exc
    if fmt not in IMG_FORMATS:
        raise ValueError(f"unsupported image format {fmt or 'unknown'}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is {width}x{height}, under {MIN_IMAGE_SIDE} px a side")
    return width, height


def parse_label_text(text: str, nc: int | None = None, image_wh: tuple[int, int] | None = None) -> LabelRows:
    """Parse YOLO label text and apply the row policy of this module.

    ``image_wh`` is the resolution a crossing polygon is redrawn at (default 1000 x 1000).
    """
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.split()]
    kind = "polygons" if any(_is_polygon(f) for _, f in lines) else "boxes" if lines else ""
    rows, segments, repaired, dropped, notes = [], [], 0, 0, []
    for line_no, fields in lines:
        if kind == "polygons" and len(fields) == 5:
            dropped += 1
            notes.append(f"line {line_no}: 5 fields in a polygon label file (a box, or a polygon of 2 points), dropped")
            continue
        row, polygon, problem, fix = _check_row(fields, nc, image_wh or DEFAULT_POLYGON_WH)
        if problem:
            dropped += 1
            notes.append(f"line {line_no}: {problem}, dropped")
            continue
        if fix:
            repaired += 1
            notes.append(f"line {line_no}: {fix}")
        rows.append(row)
        segments.append(polygon)
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    keys = [row.tobytes() + (poly.tobytes() if poly is not None else b"") for row, poly in zip(labels, segments)]
    first = sorted({key: i for i, key in reversed(list(enumerate(keys)))}.values())
    if len(first) < len(labels):
        duplicates = len(labels) - len(first)
        labels, segments = labels[first], [segments[i] for i in first]
        dropped += duplicates
        notes.append(f"{duplicates} duplicate row(s) dropped")
    return LabelRows(labels, repaired, dropped, notes, segments if kind == "polygons" else [], kind)


def check_pair(im_file: str, lb_file: str, nc: int | None = None) -> PairCheck:
    """Check an image and its label file; never raises for bad data."""
    try:
        shape = image_size(im_file)
    except ValueError as exc:
        return PairCheck(im_file, "corrupt", message=f"{im_file}: {exc}, image dropped")
    label_path = Path(lb_file)
    if not label_path.is_file():
        return PairCheck(im_file, "missing", np.zeros((0, 5), np.float32), shape)
    try:
        text = label_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return PairCheck(im_file, "corrupt", message=f"{lb_file}: unreadable label file ({exc}), image dropped")
    rows = parse_label_text(text, nc, shape)
    status = "found" if text.strip() else "empty"
    message = ""
    if rows.notes:
        shown = rows.notes[:MAX_NOTES]
        more = len(rows.notes) - len(shown)
        message = f"{lb_file}: " + "; ".join(shown) + (f"; and {more} more" if more else "")
    return PairCheck(im_file, status, rows.labels, shape, rows.repaired, rows.dropped, message, rows.segments,
                     rows.kind)


def _is_polygon(fields: list[str]) -> bool:
    return len(fields) >= 7 and len(fields) % 2 == 1


def _check_row(fields: list[str], nc: int | None, image_wh: tuple[int, int]
               ) -> tuple[list[float] | None, np.ndarray | None, str, str]:
    """One row -> ([cls, x, y, w, h], normalised polygon or None, problem, repair note).

    ``problem`` is empty for a kept row; ``repair`` says what was changed to keep it.
    """
    n = len(fields)
    if n == 3:
        return None, None, "polygon of 1 point (an outline needs 3)", ""
    if n != 5 and not _is_polygon(fields):
        return None, None, f"{n} fields (expected 5: class x y w h, or class x1 y1 x2 y2 x3 y3 ...)", ""
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None, None, "not all fields are numbers", ""
    if not all(math.isfinite(v) for v in values):
        return None, None, "non-finite number", ""
    cls = values[0]
    if cls < 0 or cls != int(cls):
        return None, None, f"class id {fields[0]} is not a whole number >= 0", ""
    if nc is not None and cls >= nc:
        return None, None, f"class id {int(cls)} >= nc {nc}", ""
    if n != 5:
        polygon, problem, fix = _check_polygon(np.array(values[1:]).reshape(-1, 2), image_wh)
        if problem:
            return None, None, problem, ""
        (x1, y1), (x2, y2) = polygon.min(0), polygon.max(0)
        return [int(cls), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], polygon.astype(np.float32), "", fix
    x, y, w, h = values[1:]
    if w <= 0 or h <= 0:
        return None, None, "degenerate box (zero or negative width or height)", ""
    if any(v < -FAR or v > 1 + FAR for v in (x, y, w, h)):
        return None, None, "coordinates outside [0, 1] (labels must be normalised x y w h)", ""
    corners = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
    clipped = [min(max(c, 0.0), 1.0) for c in corners]
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None, None, "degenerate box (no area inside the image)", ""
    overshoot = max(abs(a - b) for a, b in zip(corners, clipped))
    if overshoot > 0:
        x1, y1, x2, y2 = clipped
        x, y, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
    return [int(cls), x, y, w, h], None, "", "box outside the image, clipped" if overshoot > ROUNDING else ""


def _check_polygon(xy: np.ndarray, image_wh: tuple[int, int]) -> tuple[np.ndarray | None, str, str]:
    """(normalised polygon to keep, problem, repair note) for one polygon row's points."""
    if (xy < -FAR).any() or (xy > 1 + FAR).any():
        return None, "polygon points outside [0, 1] (polygons must be normalised x y pairs)", ""
    clipped = xy.clip(0.0, 1.0)
    notes = ["polygon outside the image, clipped"] if np.abs(clipped - xy).max() > ROUNDING else []
    if self_intersects(clipped):
        w, h = image_wh
        redrawn = redraw_polygon(clipped * (w, h), w, h)
        if redrawn is None:
            return None, "polygon crosses itself and covers no pixel", ""
        clipped = redrawn / (w, h)
        notes.append("polygon crosses itself, redrawn as the outline of its pixels")
    elif polygon_area(clipped) == 0:  # a crossing polygon's signed area may cancel out; its pixels decide
        return None, "polygon has no area (its points lie on one line)", ""
    if np.ptp(clipped[:, 0]) <= 0 or np.ptp(clipped[:, 1]) <= 0:
        return None, "degenerate polygon (no width or height)", ""
    return clipped, "", "; ".join(notes)
