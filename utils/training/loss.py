"""Training loss of the anchor-free YOLOv9 heads: BCE classification, CIoU and DFL box terms, and masks.

``ComputeLoss`` serves the single-branch ``DDetect`` (GELAN); ``DualComputeLoss`` serves ``DualDDetect``
(YOLOv9 with its auxiliary reversible branch), adding the auxiliary branch's loss at a quarter of the
main branch's weight as upstream trains it. Both return upstream's pair: the weighted loss times the
batch size (what ``backward`` takes) and the detached ``(box, cls, dfl)`` items for logging.

``SegmentationLoss`` serves the segmentation heads (``Segment``, ``DSegment``, ``DualDSegment``): the
same box and class terms from the same task-aligned assignment, plus a mask term. Each positive
anchor's mask (its coefficients times the image's prototypes) is scored by per-pixel BCE against the
mask of the box it was assigned, inside that box only, averaged over the box's area, so a small
object weighs as much as a large one (upstream's ``loss_tal`` segment variants). Its items are
upstream's ``(box, seg, cls, dfl)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.boxes import bbox_iou, xywh2xyxy
from utils.data.dataset import model_task
from utils.tal.anchor_generator import bbox2dist, dist2bbox, make_anchors
from utils.torch_utils import de_parallel
from utils.training.assigner import Assignment, TaskAlignedAssigner

DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}  # upstream's hyp.scratch-high values
MASK_GAIN = 2.5  # upstream's segment loss_tal (a constant there, with no hyp key)
AUX_BRANCH_WEIGHT = 0.25  # upstream loss_tal_dual: auxiliary branch counts a quarter of the main one


class Targets(NamedTuple):
    """A batch's labels padded per image: classes (b, m, 1), xyxy pixel boxes (b, m, 4), which rows are
    real (b, m, 1), and each slot's row in the batch's target list (b, m; -1 for padding)."""

    labels: torch.Tensor
    boxes: torch.Tensor
    mask: torch.Tensor
    rows: torch.Tensor


def distribution_focal_loss(pred_dist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL: cross-entropy towards the two bins around a continuous target distance.

    pred_dist (n, 4, bins) logits, target (n, 4) in [0, bins - 1); returns (n, 1), the mean over the 4 sides.
    """
    left = target.long()
    w_right = target - left
    logp = pred_dist.float().log_softmax(-1)
    nll_left = -logp.gather(-1, left[..., None]).squeeze(-1)
    nll_right = -logp.gather(-1, (left + 1)[..., None]).squeeze(-1)
    return (nll_left * (1 - w_right) + nll_right * w_right).mean(-1, keepdim=True)


class BranchLoss:
    """Box, class and DFL losses of one head branch against its own task-aligned assignment."""

    def __init__(self, nc: int, reg_max: int, assigner: TaskAlignedAssigner):
        self.nc = nc
        self.reg_max = reg_max
        self.assigner = assigner
        self.bce = nn.BCEWithLogitsLoss(reduction="none")

    def decode(self, anchor_points: torch.Tensor, pred_dist: torch.Tensor) -> torch.Tensor:
        """Expected ltrb distance of each side's softmax over bins -> xyxy boxes in grid units."""
        b, a, _ = pred_dist.shape
        bins = torch.arange(self.reg_max, device=pred_dist.device, dtype=pred_dist.dtype)
        dist = pred_dist.view(b, a, 4, self.reg_max).softmax(3).matmul(bins)
        return dist2bbox(dist, anchor_points, xywh=False)

    def __call__(self, feats: list[torch.Tensor], gt_labels, gt_bboxes, mask_gt,
                 anchor_points, stride_tensor) -> torch.Tensor:
        """(3,) tensor [box, cls, dfl] before gains."""
        return self.with_assignment(feats, gt_labels, gt_bboxes, mask_gt, anchor_points, stride_tensor)[0]

    def with_assignment(self, feats: list[torch.Tensor], gt_labels, gt_bboxes, mask_gt, anchor_points,
                        stride_tensor) -> tuple[torch.Tensor, Assignment]:
        """The (3,) losses and the assignment they were scored against (the mask term reuses it)."""
        b = feats[0].shape[0]
        flat = torch.cat([f.reshape(b, self.reg_max * 4 + self.nc, -1) for f in feats], 2).float()
        pred_dist, pred_logits = flat.permute(0, 2, 1).split((self.reg_max * 4, self.nc), 2)
        pred_boxes = self.decode(anchor_points, pred_dist)  # grid units

        t: Assignment = self.assigner(pred_logits.detach().sigmoid(), pred_boxes.detach() * stride_tensor,
                                      anchor_points * stride_tensor, gt_labels, gt_bboxes, mask_gt)
        score_sum = t.scores.sum().clamp(min=1)
        loss = torch.zeros(3, device=flat.device)
        loss[1] = self.bce(pred_logits, t.scores).sum() / score_sum
        if t.fg_mask.any():
            fg = t.fg_mask
            weight = t.scores.sum(-1)[fg][:, None]
            target_boxes = t.bboxes[fg] / stride_tensor.expand(b, -1, -1)[fg]
            iou = bbox_iou(pred_boxes[fg], target_boxes, xywh=False, CIoU=True)
            loss[0] = ((1.0 - iou) * weight).sum() / score_sum
            target_ltrb = bbox2dist(anchor_points.expand(b, -1, -1)[fg], target_boxes, self.reg_max - 1)
            dfl = distribution_focal_loss(pred_dist[fg].view(-1, 4, self.reg_max), target_ltrb)
            loss[2] = (dfl * weight).sum() / score_sum
        return loss, t


class ComputeLoss:
    """Loss for a model whose last layer is a ``DDetect``-style head (one branch)."""

    branch_weights: tuple[float, ...] = (1.0,)
    item_names = ("box", "cls", "dfl")  # what the detached items are, in order

    def __init__(self, model: nn.Module, hyp: dict | None = None, topk: int = 10, alpha: float = 0.5,
                 beta: float = 6.0):
        head = de_parallel(model).model[-1]
        hyp = hyp if hyp is not None else getattr(de_parallel(model), "hyp", None) or {}
        self.gains = torch.tensor([float(hyp.get(k, v)) for k, v in DEFAULT_GAINS.items()])
        self.stride = head.stride
        self.nc = head.nc
        self.branch = BranchLoss(head.nc, head.reg_max, TaskAlignedAssigner(topk, head.nc, alpha, beta))

    def branches(self, preds) -> list[list[torch.Tensor]]:
        """The per-branch lists of raw feature maps, from training-mode or eval-mode ``(y, x)`` output."""
        feats = preds[1] if isinstance(preds, tuple) else preds
        return [feats]

    def pad_targets(self, targets: torch.Tensor, batch_size: int, img_hw: torch.Tensor) -> Targets:
        """(n, 6) [image, cls, x, y, w, h] normalised -> ``Targets`` padded per image (see there)."""
        device = img_hw.device
        targets = targets.to(device).float()
        image = targets[:, 0].long()
        counts = torch.bincount(image, minlength=batch_size)
        m = int(counts.max()) if len(targets) else 0
        order = torch.sort(image, stable=True).indices
        image = image[order]
        slot = torch.arange(len(image), device=device) - (counts.cumsum(0) - counts)[image]
        padded = torch.zeros(batch_size, m, 5, device=device)
        padded[image, slot] = targets[order, 1:]
        rows = torch.full((batch_size, m), -1, dtype=torch.long, device=device)
        rows[image, slot] = order
        boxes = xywh2xyxy(padded[..., 1:] * img_hw[[1, 0, 1, 0]])
        mask = (torch.arange(m, device=device) < counts[:, None])[..., None]
        return Targets(padded[..., :1], boxes, mask, rows)

    def prepare(self, feats: list[torch.Tensor], targets: torch.Tensor):
        """Padded targets, anchor points, strides and the input (h, w) of one batch's level maps, in full precision."""
        device = feats[0].device
        stride = self.stride.to(device)
        img_hw = torch.tensor(feats[0].shape[2:], device=device, dtype=torch.float32) * stride[0]
        # fp32 shapes, not AMP copies; 4-D like a feature map, as upstream's make_anchors reads them
        grids = [torch.empty((1, 1, *f.shape[2:]), device=device) for f in feats]
        anchor_points, stride_tensor = make_anchors(grids, stride, 0.5)
        return self.pad_targets(targets, feats[0].shape[0], img_hw), anchor_points, stride_tensor, img_hw

    def branch_weights_for(self, n_branches: int) -> tuple[float, ...]:
        """The weights of the branches present: an eval-mode output may carry only the main one."""
        return self.branch_weights[-n_branches:]

    def __call__(self, preds, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of gained losses * batch size, detached [box, cls, dfl])."""
        branches = self.branches(preds)
        feats = branches[0]
        device = feats[0].device
        # Targets, anchors and box decoding need full precision; a bf16 box loses pixels at 640.
        with torch.autocast(device.type, enabled=False):
            t, anchor_points, stride_tensor, _ = self.prepare(feats, targets)
            loss = sum(w * self.branch(f, t.labels, t.boxes, t.mask, anchor_points, stride_tensor)
                       for w, f in zip(self.branch_weights_for(len(branches)), branches))
            loss = loss * self.gains.to(device)
        return loss.sum() * feats[0].shape[0], loss.detach()


class DualComputeLoss(ComputeLoss):
    """Loss for ``DualDDetect``: auxiliary branch (first) at 0.25 plus main branch (second) at 1."""

    branch_weights = (AUX_BRANCH_WEIGHT, 1.0)

    def branches(self, preds) -> list[list[torch.Tensor]]:
        feats = preds[1] if isinstance(preds, tuple) else preds
        if len(feats) != 2:
            raise ValueError(f"DualComputeLoss expects [aux, main] branch outputs, got {len(feats)} entries")
        return list(feats)


def mask_loss(coefficients: torch.Tensor, prototypes: torch.Tensor, masks: torch.Tensor, t: Assignment,
              rows: torch.Tensor, img_hw: torch.Tensor) -> torch.Tensor:
    """Sum over images of the mean, over an image's positive anchors, of the box-cropped mask BCE / box area.

    coefficients (b, nm, A), prototypes (b, nm, h, w), masks (n, H', W') one per target row (resized to
    (h, w) when the dataset's mask ratio differs), ``rows`` (b, m) maps box slots to target rows.
    """
    b, nm, h, w = prototypes.shape
    masks = masks.float()
    if masks.shape[-2:] != (h, w):
        masks = F.interpolate(masks[None], (h, w), mode="nearest")[0]
    centres_y = torch.arange(h, device=masks.device, dtype=torch.float32) + 0.5
    centres_x = torch.arange(w, device=masks.device, dtype=torch.float32) + 0.5
    scale = torch.tensor((w, h, w, h), device=masks.device, dtype=torch.float32) / img_hw[[1, 0, 1, 0]]
    total = torch.zeros((), device=masks.device)
    for i in range(b):
        fg = t.fg_mask[i]
        if not fg.any():
            continue
        truth = masks[rows[i, t.gt_idx[i][fg]]]  # (p, h, w)
        logits = (coefficients[i, :, fg].T.float() @ prototypes[i].float().reshape(nm, -1)).reshape(-1, h, w)
        bce = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
        x1, y1, x2, y2 = (t.bboxes[i][fg] * scale).T[..., None, None]
        inside = ((centres_y[:, None] >= y1) & (centres_y[:, None] < y2) & (centres_x >= x1) & (centres_x < x2))
        area = ((x2 - x1) * (y2 - y1)).flatten() / (h * w)  # box area as a share of the image
        total = total + ((bce * inside).mean((1, 2)) / area.clamp(min=1e-9)).mean()
    return total


class SegmentationLoss(ComputeLoss):
    """Loss for the segmentation heads: every branch's box, class and DFL terms plus its mask term.

    Called as ``loss(preds, targets, masks)`` with the segmentation batch's masks; returns
    (sum of gained losses * batch size, detached [box, seg, cls, dfl]).
    """

    item_names = ("box", "seg", "cls", "dfl")

    def branches(self, preds) -> list[tuple]:
        """(level maps, coefficients, prototypes) per branch, from training- or eval-mode output."""
        if isinstance(preds, tuple) and len(preds) == 2:  # eval mode: (inference, (levels, coefficients, prototypes))
            preds = preds[1]
        feats, coefficients, prototypes = preds
        if isinstance(feats[0], (list, tuple)):  # dual heads in training: [aux, main] of each
            return list(zip(feats, coefficients, prototypes))
        return [(feats, coefficients, prototypes)]

    def __call__(self, preds, targets: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        branches = self.branches(preds)
        feats = branches[0][0]
        device, batch = feats[0].device, feats[0].shape[0]
        with torch.autocast(device.type, enabled=False):
            t, anchor_points, stride_tensor, img_hw = self.prepare(feats, targets)
            loss = torch.zeros(4, device=device)
            for weight, (f, coefficients, prototypes) in zip(self.branch_weights_for(len(branches)), branches):
                terms, assigned = self.branch.with_assignment(f, t.labels, t.boxes, t.mask, anchor_points,
                                                              stride_tensor)
                seg = mask_loss(coefficients, prototypes, masks.to(device), assigned, t.rows, img_hw) / batch
                loss = loss + weight * torch.stack((terms[0], seg, terms[1], terms[2]))
            loss = loss * torch.cat((self.gains[:1], torch.tensor([MASK_GAIN]), self.gains[1:])).to(device)
        return loss.sum() * batch, loss.detach()


class DualSegmentationLoss(SegmentationLoss):
    """``SegmentationLoss`` for ``DualDSegment``: auxiliary branch at 0.25, main branch at 1."""

    branch_weights = (AUX_BRANCH_WEIGHT, 1.0)


def build_loss(model: nn.Module, hyp: dict | None = None) -> ComputeLoss:
    """The loss that matches the model's head: dual-branch heads carry the extra ``cv4``/``cv5`` towers,
    segmentation heads ``proto``; the head's class names the task."""
    head = de_parallel(model).model[-1]
    dual = hasattr(head, "cv4") and hasattr(head, "cv5")
    if model_task(de_parallel(model)) == "segment":
        return (DualSegmentationLoss if hasattr(head, "proto2") else SegmentationLoss)(model, hyp)
    return (DualComputeLoss if dual else ComputeLoss)(model, hyp)
