"""Instance masks for evaluation: predicted masks in original-image pixels, ground truth, mask IoU.

A predicted mask is ``sigmoid(coefficients @ prototypes)``, a map that covers the letterboxed
input at prototype resolution. It is resized bilinearly (``align_corners=False``, as
``F.interpolate``) to the input size, the letterbox padding is cut off, the rest is resized to
the original image, cropped to the detection's box and thresholded at 0.5. Both resizes are
linear, so they are applied as one pair of (row, column) weight matrices, and only inside the
box: the cost follows the boxes' area, not detections x image size. An End2End export's masks
(already assembled, at prototype resolution) go through the same path as prototypes with unit
coefficients (``utils.deployment.backends.end2end_masks_as_prototypes``).

Ground truth is the instance polygons, mapped back to original pixels and rasterised there by
COCO's rasteriser, so mask IoU here is the IoU pycocotools' ``segm`` evaluation computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.polygons import rasterize

MASK_THRESHOLD = 0.5


@dataclass
class BoxMask:
    """A predicted mask where it may be non-zero: the pixels of its box, from row ``y0``, column ``x0``."""

    y0: int
    x0: int
    pixels: np.ndarray  # bool (h, w)

    @property
    def area(self) -> int:
        return int(self.pixels.sum())

    def full(self, height: int, width: int) -> np.ndarray:
        """The mask as a whole (height, width) bool image."""
        out = np.zeros((height, width), dtype=bool)
        h, w = self.pixels.shape
        out[self.y0:self.y0 + h, self.x0:self.x0 + w] = self.pixels
        return out


def segmentation_output(output) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(prediction (B, 4 + nc + nm, A), prototypes (B, nm, h, w)) of a segmentation model's output; None otherwise.

    Accepts the eval-mode form ``(prediction, (levels, coefficients, prototypes))`` and the export
    form ``(prediction, prototypes)``; the coefficients are the last ``nm`` rows of the prediction in both.
    """
    if not (isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor)):
        return None
    extra = output[1]
    if isinstance(extra, torch.Tensor) and extra.ndim == 4:
        return output[0], extra
    if (isinstance(extra, (tuple, list)) and len(extra) == 3 and isinstance(extra[1], torch.Tensor)
            and extra[1].ndim == 3 and isinstance(extra[2], torch.Tensor) and extra[2].ndim == 4):
        return output[0], extra[2]
    return None


def mask_probabilities(coefficients: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(n, h, w) mask probabilities from (n, nm) coefficients and one image's (nm, h, w) prototypes."""
    nm, h, w = prototypes.shape
    return (coefficients.float() @ prototypes.float().reshape(nm, -1)).sigmoid().reshape(-1, h, w)


def _bilinear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output position of ``F.interpolate``'s bilinear resize (align_corners=False): the two input
    positions it reads and the weight of the second."""
    src = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).clip(0, None)
    lo = np.floor(src).astype(int).clip(0, n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo


def resize_weights(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of ``F.interpolate``'s bilinear weights along one axis (align_corners=False)."""
    lo, hi, frac = _bilinear_taps(n_out, n_in)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (np.arange(n_out), lo), 1 - frac)
    np.add.at(weights, (np.arange(n_out), hi), frac)
    return weights


def _axis_weights(map_size: int, input_size: int, pad: int, inner: int, original: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map pixels -> input pixels -> (padding cut) -> original pixels along one axis: the (original, map)
    weight matrix, and for each original pixel the first and past-the-last map pixel it reads."""
    lo1, hi1, f1 = (a[pad:pad + inner] for a in _bilinear_taps(input_size, map_size))
    lo2, hi2, f2 = _bilinear_taps(original, inner)
    taps = np.stack((lo1[lo2], hi1[lo2], lo1[hi2], hi1[hi2]), 1)
    weights = np.stack(((1 - f2) * (1 - f1[lo2]), (1 - f2) * f1[lo2], f2 * (1 - f1[hi2]), f2 * f1[hi2]), 1)
    matrix = np.zeros((original, map_size), dtype=np.float32)
    np.add.at(matrix, (np.repeat(np.arange(original), 4), taps.ravel()), weights.ravel())
    return matrix, taps.min(1), taps.max(1) + 1


def masks_in_original(probabilities: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int],
                      ratio_pad, boxes: torch.Tensor | np.ndarray) -> list[BoxMask]:
    """Threshold (n, h, w) maps covering the letterboxed input into masks of the original image.

    ``ratio_pad`` is the dataloader's ``((h / h0, w / w0), (pad_w, pad_h))``; ``boxes`` (n, 4) are xyxy
    in original pixels. A pixel belongs to a box when its centre lies inside it.
    """
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    h0, w0 = original_hw
    maps = probabilities.detach().float().cpu().numpy()
    _, mh, mw = maps.shape
    rows, row_from, row_to = _axis_weights(mh, input_hw[0], int(pad_h), round(h0 * gain_h), h0)
    cols, col_from, col_to = _axis_weights(mw, input_hw[1], int(pad_w), round(w0 * gain_w), w0)
    boxes = np.asarray(boxes.detach().cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64)
    first = np.ceil(boxes - 0.5).astype(int)  # first pixel whose centre is at or after the edge
    x1, y1 = first[:, 0].clip(0, w0), first[:, 1].clip(0, h0)
    x2, y2 = first[:, 2].clip(0, w0), first[:, 3].clip(0, h0)
    masks = []
    for k in range(len(boxes)):
        if y2[k] <= y1[k] or x2[k] <= x1[k]:
            masks.append(BoxMask(int(y1[k]), int(x1[k]), np.zeros((max(y2[k] - y1[k], 0), max(x2[k] - x1[k], 0)),
                                                                   dtype=bool)))
            continue
        # only the band of map rows and columns these pixels read from (both maps are monotonic)
        r0, r1, c0, c1 = row_from[y1[k]], row_to[y2[k] - 1], col_from[x1[k]], col_to[x2[k] - 1]
        values = rows[y1[k]:y2[k], r0:r1] @ maps[k, r0:r1, c0:c1] @ cols[x1[k]:x2[k], c0:c1].T
        masks.append(BoxMask(int(y1[k]), int(x1[k]), values > MASK_THRESHOLD))
    return masks


def masks_at_input(probabilities: torch.Tensor, boxes: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """(n, H, W) bool masks on the letterboxed input (for drawing): upsampled, cropped to the xyxy input
    ``boxes``, thresholded."""
    if not len(probabilities):
        return torch.zeros((0, *input_hw), dtype=torch.bool)
    up = F.interpolate(probabilities[None].float(), input_hw, mode="bilinear", align_corners=False)[0]
    centres_y = torch.arange(input_hw[0], device=up.device) + 0.5
    centres_x = torch.arange(input_hw[1], device=up.device) + 0.5
    b = boxes.to(up.device).float()
    inside = ((centres_y[None, :, None] >= b[:, 1, None, None]) & (centres_y[None, :, None] < b[:, 3, None, None])
              & (centres_x[None, None] >= b[:, 0, None, None]) & (centres_x[None, None] < b[:, 2, None, None]))
    return (up > MASK_THRESHOLD) & inside


def polygons_in_original(polygons: list[np.ndarray], ratio_pad) -> list[np.ndarray]:
    """Polygons in letterboxed-input pixels back in original pixels (the inverse of the dataloader's mapping)."""
    (gain_h, gain_w), (pad_w, pad_h) = ratio_pad
    return [(np.asarray(p, dtype=np.float64) - (pad_w, pad_h)) / (gain_w, gain_h) for p in polygons]


def ground_truth_masks(polygons: list[np.ndarray], original_hw: tuple[int, int]) -> np.ndarray:
    """(m, h0, w0) bool masks of polygons given in original pixels."""
    return rasterize(polygons, *original_hw).astype(bool)


def mask_iou(predicted: list[BoxMask], pred_cls: np.ndarray, truth: np.ndarray, true_cls: np.ndarray) -> np.ndarray:
    """(n, m) IoU of predicted and true masks; zero across classes (those pairs never match)."""
    iou = np.zeros((len(predicted), len(truth)))
    if not (len(predicted) and len(truth)):
        return iou
    true_area = truth.reshape(len(truth), -1).sum(1)
    for i, (mask, cls) in enumerate(zip(predicted, pred_cls)):
        same = np.flatnonzero(true_cls == cls)
        if not len(same):
            continue
        h, w = mask.pixels.shape
        window = truth[same, mask.y0:mask.y0 + h, mask.x0:mask.x0 + w]
        inter = (window & mask.pixels).reshape(len(same), -1).sum(1)
        union = mask.area + true_area[same] - inter
        iou[i, same] = np.divide(inter, union, out=np.zeros(len(same)), where=union > 0)
    return iou
