"""Instance polygons and their pixels: resampling, self-intersection, joining parts, rasterising, tracing.

A polygon is a float (k, 2) array of x, y points in continuous image coordinates: pixel (i, j)
covers [i, i + 1) x [j, j + 1), so a polygon through pixel corners describes whole pixels. Pixels
come from COCO's own rasteriser (``pycocotools.mask``), the one that defines a COCO polygon's
mask; training targets, evaluation ground truth and pycocotools' ``segm`` evaluation therefore
agree to the pixel. Tracing goes the other way along pixel edges (not through pixel centres), so
a traced polygon rasterises back to exactly the pixels it came from.

A YOLO label row holds one polygon per instance. An instance in several parts (an occluded
object, a multi-polygon COCO annotation) is joined into one polygon by zero-width bridges that
run from one part to the next and back; the bridges cover no area, so the pixels are the union of
the parts.
"""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as coco_mask

_CROSSING_CHUNK = 256  # edges tested at once against all others: bounds memory for long traced outlines


def clip_polygon(polygon: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of a polygon inside [0, width] x [0, height] (Sutherland-Hodgman); (0, 2) if none.

    Exact, unlike clamping each point to the image, which runs the hidden part of an outline
    along the border: the pixels barely change, but the bounding box grows by the hidden part.
    A concave polygon cut into pieces stays one outline joined along the border.
    """
    p = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    for axis, bound, keep_below in ((0, 0.0, False), (0, width, True), (1, 0.0, False), (1, height, True)):
        if len(p) == 0:
            break
        v = p[:, axis]
        inside = v <= bound if keep_below else v >= bound
        q, q_inside = np.roll(p, -1, 0), np.roll(inside, -1)
        crosses = inside != q_inside
        t = np.divide(bound - v, q[:, axis] - v, out=np.zeros_like(v), where=crosses)
        crossing = p + t[:, None] * (q - p)
        crossing[:, axis] = bound
        # each edge gives its start point if inside, then the point where it crosses the bound, if it does
        p = np.stack((p, crossing), 1)[np.stack((inside, crosses), 1)]
    return p if len(p) >= 3 else np.zeros((0, 2))


def polygon_area(polygon: np.ndarray) -> float:
    """Signed shoelace area (positive for counter-clockwise in x-right, y-up axes)."""
    x, y = np.asarray(polygon, dtype=np.float64).reshape(-1, 2).T
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def self_intersects(polygon: np.ndarray) -> bool:
    """Whether two non-adjacent edges cross properly (each one's ends strictly on either side of the other).

    Touching and collinear overlap do not count (a polygon that touches itself at a vertex still
    rasterises right), nor do bridges: an edge walked there and back (``join_parts``) bounds no
    area, so whatever it crosses, it crosses twice.
    """
    p = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    a, b = p, np.roll(p, -1, 0)
    walked = {(tuple(u), tuple(v)) for u, v in zip(a, b)}
    outline = np.array([(tuple(v), tuple(u)) not in walked for u, v in zip(a, b)])
    a, b = a[outline], b[outline]
    n = len(a)
    if n < 4:
        return False

    def side(o, d, q):  # sign of the cross product (d - o) x (q - o), broadcast (rows, cols)
        return np.sign((d[..., 0] - o[..., 0]) * (q[..., 1] - o[..., 1]) - (d[..., 1] - o[..., 1]) * (q[..., 0] - o[..., 0]))

    idx = np.arange(n)
    for start in range(0, n, _CROSSING_CHUNK):
        i = idx[start:start + _CROSSING_CHUNK, None]
        ai, bi = a[i[:, 0]][:, None], b[i[:, 0]][:, None]
        crosses = (side(ai, bi, a[None]) * side(ai, bi, b[None]) < 0) & \
                  (side(a[None], b[None], ai) * side(a[None], b[None], bi) < 0)
        adjacent = (np.abs(i - idx[None]) <= 1) | (np.abs(i - idx[None]) == n - 1)
        if (crosses & ~adjacent).any():
            return True
    return False


def join_parts(parts: list[np.ndarray]) -> np.ndarray:
    """One polygon covering every part: the largest first, then each nearest remaining part, linked
    by a zero-width bridge between their closest vertices that is walked there and back."""
    parts = [np.asarray(q, dtype=np.float64).reshape(-1, 2) for q in parts if len(q)]
    if len(parts) == 1:
        return parts[0]
    order = [int(np.argmax([abs(polygon_area(q)) for q in parts]))]
    links = []  # (vertex leaving the previous part, vertex entering the next part)
    left = set(range(len(parts))) - set(order)
    while left:
        last = parts[order[-1]]
        best = None
        for k in left:
            d = ((last[:, None] - parts[k][None]) ** 2).sum(-1)
            i, j = np.unravel_index(int(d.argmin()), d.shape)
            if best is None or d[i, j] < best[0]:
                best = (d[i, j], k, int(i), int(j))
        _, k, i, j = best
        links.append((i, j))
        order.append(k)
        left.remove(k)
    # Walk the chain out and back: part t from its entry to its exit, the rest of the chain, then
    # from its exit around to its entry again.
    entries = [0] + [j for _, j in links]
    exits = [i for i, _ in links] + [entries[-1]]
    outward, homeward = [], []
    for t, k in enumerate(order):
        q = np.roll(parts[k], -entries[t], 0)  # starts at the entry vertex
        cut = (exits[t] - entries[t]) % len(q)
        last = t == len(order) - 1  # the end of the chain: once around, back to where it was entered
        outward.append(q[:cut + 1])
        homeward.append(np.concatenate((q[cut + 1:] if last else q[cut:], q[:1])))
    return np.concatenate(outward + homeward[::-1])


def rasterize(polygons: list[np.ndarray], height: int, width: int, scale: float = 1.0) -> np.ndarray:
    """(n, height, width) uint8 masks of the polygons (pixel coordinates times ``scale``)."""
    masks = np.zeros((len(polygons), height, width), dtype=np.uint8)
    for k, polygon in enumerate(polygons):
        flat = (np.asarray(polygon, dtype=np.float64).reshape(-1, 2) * scale).ravel()
        if len(flat) >= 6:  # pycocotools reads a 4-number list as a box
            masks[k] = coco_mask.decode(coco_mask.frPyObjects([flat.tolist()], height, width))[..., 0]
    return masks


def trace_mask(mask: np.ndarray) -> list[np.ndarray]:
    """The outer outlines of a binary mask's 8-connected parts, along pixel edges, largest first.

    Holes are not traced (a YOLO polygon cannot hold one): an outline covers the part with its holes
    filled. Doubling the mask makes each pixel edge a pair of pixel rows that OpenCV's contour
    follows; halving with rounding up puts the outline on pixel corners. Vertices in the middle of
    a straight run are dropped.
    """
    doubled = np.kron(np.asarray(mask, dtype=np.uint8) > 0, np.ones((2, 2), dtype=np.uint8)).astype(np.uint8)
    doubled = cv2.copyMakeBorder(doubled, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)  # outlines on the edge close
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outlines = []
    for c in contours:
        corners = c.reshape(-1, 2) // 2  # (u - 1 + 1) // 2: undo the border, then round halves up
        corners = corners[np.any(corners != np.roll(corners, 1, 0), 1)]
        before, after = corners - np.roll(corners, 1, 0), np.roll(corners, -1, 0) - corners
        straight = (before[:, 0] * after[:, 1] == before[:, 1] * after[:, 0]) & ((before * after).sum(1) > 0)
        outlines.append(corners[~straight].astype(np.float64))
    return sorted((o for o in outlines if len(o) >= 3), key=lambda o: -abs(polygon_area(o)))


def mask_to_polygon(mask: np.ndarray) -> tuple[np.ndarray | None, int]:
    """One polygon for a binary instance mask (parts joined) and how many parts it had; None if empty."""
    outlines = trace_mask(mask)
    return (join_parts(outlines) if outlines else None), len(outlines)


def redraw_polygon(polygon: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """A self-intersecting polygon redrawn as the outline of its pixels (what buffer(0) does, at pixel
    precision): rasterised by the parity rule, traced, parts joined. Coordinates in pixels."""
    p = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    x0, y0 = np.floor(p.min(0)).astype(int).clip(0, (width, height))
    x1, y1 = np.ceil(p.max(0)).astype(int).clip(0, (width, height))
    if x1 <= x0 or y1 <= y0:
        return None
    local = rasterize([p - (x0, y0)], int(y1 - y0), int(x1 - x0))[0]
    redrawn, _ = mask_to_polygon(local)
    return None if redrawn is None else redrawn + (x0, y0)
