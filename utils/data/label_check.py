"""Check one image and its YOLO label file before they enter a dataset.

Real datasets hold broken files. The policy here is that nothing crashes a run and nothing
disappears without a word; every row or image is kept, repaired or dropped, and each change
comes back as a note naming the file:

- image that cannot be opened or fully decoded, or is under 10 px a side: image dropped (corrupt);
- label file that cannot be read as text: image dropped (corrupt), because training on it as a
  background image would teach the model that its objects are background;
- row with a field count other than 5 (``cls x y w h``) or ``1 + 2k`` with k >= 3 (a polygon,
  turned into its bounding box as upstream does): row dropped;
- row with non-numbers, a class id that is negative, fractional or >= nc: row dropped;
- coordinate (x, y, w or h) outside [0, 1] by more than ``FAR``: row dropped, because such a
  row is almost always in pixels rather than normalised and cannot be repaired by guessing;
- box whose corners stick out of the image (any amount up to that): clipped to the image and
  counted as repaired; overshoots under ``ROUNDING`` are clipped silently, being float noise;
- box with zero or negative width or height (after clipping): row dropped as degenerate;
- exact duplicate row: the copy is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
FAR = 0.01
ROUNDING = 1e-6
MIN_IMAGE_SIDE = 10
EXIF_ORIENTATION = 0x0112
MAX_NOTES = 8  # per file; a file with hundreds of bad rows gets a count, not hundreds of lines


@dataclass
class LabelRows:
    """Labels that survived the checks, as an (n, 5) array [cls, x, y, w, h], plus what happened."""
    labels: np.ndarray
    repaired: int = 0
    dropped: int = 0
    notes: list[str] = field(default_factory=list)


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


def parse_label_text(text: str, nc: int | None = None) -> LabelRows:
    """Parse YOLO label text and apply the row policy of this module."""
    rows, repaired, dropped, notes = [], 0, 0, []
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        row, problem, was_clipped = _check_row(fields, nc)
        if problem:
            dropped += 1
            notes.append(f"line {line_no}: {problem}, dropped")
            continue
        if was_clipped:
            repaired += 1
            notes.append(f"line {line_no}: box outside the image, clipped")
        rows.append(row)
    labels = np.array(rows, dtype=np.float32).reshape(-1, 5)
    _, first = np.unique(labels, axis=0, return_index=True)
    if len(first) < len(labels):
        duplicates = len(labels) - len(first)
        labels = labels[np.sort(first)]
        dropped += duplicates
        notes.append(f"{duplicates} duplicate row(s) dropped")
    return LabelRows(labels, repaired, dropped, notes)


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
    rows = parse_label_text(text, nc)
    status = "found" if text.strip() else "empty"
    message = ""
    if rows.notes:
        shown = rows.notes[:MAX_NOTES]
        more = len(rows.notes) - len(shown)
        message = f"{lb_file}: " + "; ".join(shown) + (f"; and {more} more" if more else "")
    return PairCheck(im_file, status, rows.labels, shape, rows.repaired, rows.dropped, message)


def _check_row(fields: list[str], nc: int | None) -> tuple[list[float] | None, str, bool]:
    """One row -> ([cls, x, y, w, h], problem, clipped). ``problem`` is empty for a kept row."""
    n = len(fields)
    is_polygon = n >= 7 and n % 2 == 1
    if n != 5 and not is_polygon:
        return None, f"{n} fields (expected 5: class x y w h)", False
    try:
        values = [float(f) for f in fields]
    except ValueError:
        return None, "not all fields are numbers", False
    if not all(math.isfinite(v) for v in values):
        return None, "non-finite number", False
    cls = values[0]
    if cls < 0 or cls != int(cls):
        return None, f"class id {fields[0]} is not a whole number >= 0", False
    if nc is not None and cls >= nc:
        return None, f"class id {int(cls)} >= nc {nc}", False
    if is_polygon:
        xy = np.array(values[1:]).reshape(-1, 2)
        (x1, y1), (x2, y2) = xy.min(0), xy.max(0)
        xywh = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    else:
        xywh = values[1:]
    x, y, w, h = xywh
    if w <= 0 or h <= 0:
        return None, "degenerate box (zero or negative width or height)", False
    if any(v < -FAR or v > 1 + FAR for v in xywh):
        return None, "coordinates outside [0, 1] (labels must be normalised x y w h)", False
    corners = [x - w / 2, y - h / 2, x + w / 2, y + h / 2]
    clipped = [min(max(c, 0.0), 1.0) for c in corners]
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        return None, "degenerate box (no area inside the image)", False
    overshoot = max(abs(a - b) for a, b in zip(corners, clipped))
    if overshoot > 0:
        x1, y1, x2, y2 = clipped
        xywh = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]
    return [int(cls), *xywh], "", overshoot > ROUNDING
