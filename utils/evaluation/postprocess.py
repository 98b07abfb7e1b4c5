"""Turn raw detection-head output into per-image boxes: with NMS, or without it for NMS-free heads.

Every function here takes upstream's head output, (B, 4 + nc, N) with boxes as centre-size in
input pixels followed by class scores, and returns one (n, 6) tensor per image holding
[x1, y1, x2, y2, conf, cls] in input pixels, on the device the prediction came from. A
segmentation head appends ``nm`` mask coefficients to every anchor, (B, 4 + nc + nm, N): with
``nm`` given they are left out of the scores and carried along, (n, 6 + nm) per image.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torchvision

from utils.boxes import xywh2xyxy
from utils.errors import UserError

# More candidates than this per image only slow NMS down; a converged model never gets near it.
MAX_NMS_CANDIDATES = 30000


def select_prediction(output) -> torch.Tensor:
    """The main (B, 4+nc, N) inference tensor from any head output.

    Eval-mode heads return ``(inference, train_maps)``; dual heads put two inference tensors
    in a list ``[aux, main]``, where the last is the one to evaluate. Both wrappings nest
    (``([y1, y2], [d1, d2])``), so unwrap until a tensor remains.
    """
    while not isinstance(output, torch.Tensor):
        if not isinstance(output, (list, tuple)) or len(output) == 0:
            raise TypeError(f"cannot find a prediction tensor in a {type(output).__name__}")
        if all(isinstance(o, torch.Tensor) and o.ndim == 3 for o in output):
            output = output[-1]
        else:
            output = output[0]
    if output.ndim != 3:
        raise TypeError(f"expected a (batch, 4+nc, anchors) prediction, got shape {tuple(output.shape)}")
    return output


def _candidates(prediction, conf_thres: float, nm: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, N, 4+nc+nm) float view of the prediction, a (B, N) mask of anchors above the threshold, nc."""
    if not 0 <= conf_thres <= 1:
        raise UserError(f"conf_thres={conf_thres}: must lie in [0, 1]")
    pred = select_prediction(prediction).float().transpose(1, 2)
    nc = pred.shape[-1] - 4 - nm
    return pred, pred[..., 4:4 + nc].amax(-1) > conf_thres, nc


def _keep_classes(det: torch.Tensor, classes: Sequence[int] | None) -> torch.Tensor:
    if classes is None:
        return det
    wanted = torch.as_tensor(list(classes), device=det.device, dtype=det.dtype)
    return det[(det[:, 5:6] == wanted).any(1)]


def non_max_suppression(prediction, conf_thres: float = 0.25, iou_thres: float = 0.45,
                        classes: Sequence[int] | None = None, agnostic: bool = False,
                        multi_label: bool = False, max_det: int = 300, nm: int = 0) -> list[torch.Tensor]:
    """Per-image detections after class-aware (or class-agnostic) NMS.

    ``multi_label`` lets one anchor yield a box for every class scoring above ``conf_thres``,
    which raises mAP at a low threshold; otherwise each anchor keeps only its best class.
    """
    if not 0 <= iou_thres <= 1:
        raise UserError(f"iou_thres={iou_thres}: must lie in [0, 1]")
    pred, above, nc = _candidates(prediction, conf_thres, nm)
    multi_label = multi_label and nc > 1
    output = []
    for x, keep in zip(pred, above):
        x = x[keep]
        box, scores, coefficients = xywh2xyxy(x[:, :4]), x[:, 4:4 + nc], x[:, 4 + nc:]
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((box[i], scores[i, j, None], j[:, None].float(), coefficients[i]), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((box, conf, j.float(), coefficients), 1)
        det = _keep_classes(det, classes)
        if det.shape[0] > MAX_NMS_CANDIDATES:
            det = det[det[:, 4].argsort(descending=True)[:MAX_NMS_CANDIDATES]]
        if agnostic:
            kept = torchvision.ops.nms(det[:, :4], det[:, 4], iou_thres)
        else:
            kept = torchvision.ops.batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou_thres)
        output.append(det[kept[:max_det]])
    return output


def no_max_suppression(prediction, conf_thres: float = 0.25, max_det: int = 300,
                       classes: Sequence[int] | None = None, nm: int = 0) -> list[torch.Tensor]:
    """Per-image detections for NMS-free heads: each anchor's best class, the ``max_det`` highest.

    Equal scores keep anchor order (stable sort), so the cut at ``max_det`` is the same on
    every run and every device.
    """
    pred, above, nc = _candidates(prediction, conf_thres, nm)
    output = []
    for x, keep in zip(pred, above):
        x = x[keep]
        conf, j = x[:, 4:4 + nc].max(1, keepdim=True)
        det = _keep_classes(torch.cat((xywh2xyxy(x[:, :4]), conf, j.float(), x[:, 4 + nc:]), 1), classes)
        order = torch.sort(det[:, 4], descending=True, stable=True).indices
        output.append(det[order[:max_det]])
    return output


def postprocess(prediction, kind: str = "nms", conf_thres: float = 0.25, iou_thres: float = 0.45,
                max_det: int = 300, classes: Sequence[int] | None = None, agnostic: bool = False,
                multi_label: bool = False, nm: int = 0) -> list[torch.Tensor]:
    """Dispatch on ``kind``: 'nms' for ordinary heads, 'none' for NMS-free heads (which ignore
    the NMS-only ``iou_thres``, ``agnostic`` and ``multi_label``)."""
    if kind == "nms":
        return non_max_suppression(prediction, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, nm)
    if kind == "none":
        return no_max_suppression(prediction, conf_thres, max_det, classes, nm)
    raise UserError(f"postprocess={kind!r}: expected 'nms' or 'none'")
