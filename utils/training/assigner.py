"""Task-aligned label assignment (TOOD) for the anchor-free YOLOv9 heads.

An anchor point becomes a positive for a ground-truth box when its centre lies inside the box and
its alignment ``score**alpha * IoU**beta`` is among the ``topk`` best for that box, so the labels
follow the predictions that are already both well-classified and well-localised. The constructor is
upstream's; utils/tal/assigner.py (upstream's module path) re-exports this module.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from utils.boxes import bbox_iou


class Assignment(NamedTuple):
    """Per-anchor targets: labels (b, A), boxes xyxy (b, A, 4), soft scores (b, A, nc), positives (b, A),
    and which of the image's boxes each anchor was given (b, A; meaningful where ``fg_mask``)."""

    labels: torch.Tensor
    bboxes: torch.Tensor
    scores: torch.Tensor
    fg_mask: torch.Tensor
    gt_idx: torch.Tensor


def anchors_inside_boxes(points: torch.Tensor, gt_bboxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Which anchor points (A, 2) lie strictly inside which xyxy boxes (b, n, 4): bool (b, n, A)."""
    lt, rb = gt_bboxes[..., None, :2], gt_bboxes[..., None, 2:]
    margins = torch.cat((points - lt, rb - points), -1)
    return margins.amin(-1) > eps


def resolve_overlaps(mask_pos: torch.Tensor, overlaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each anchor for at most one box (the one it overlaps most); return (mask_pos, gt index per anchor).

    ``overlaps`` is zero outside the boxes that contain an anchor, so the winner is always one of them
    (upstream compares against every box and can hand an anchor to a box it lies outside).
    """
    multi = mask_pos.sum(1, keepdim=True) > 1
    if multi.any():
        # scatter, not one_hot: an int64 (b, A, n) one-hot is ~0.6 GB for a batch of 32 crowded mosaics
        best = torch.zeros_like(mask_pos).scatter_(1, overlaps.argmax(1, keepdim=True), 1.0)
        mask_pos = torch.where(multi, best, mask_pos)
    return mask_pos, mask_pos.argmax(1)


class TaskAlignedAssigner(nn.Module):
    """Pick the ``topk`` anchors per box by ``score**alpha * CIoU**beta`` among those inside the box."""

    def __init__(self, topk: int = 10, num_classes: int = 80, alpha: float = 0.5, beta: float = 6.0,
                 eps: float = 1e-9):
        super().__init__()
        self.topk = topk
        self.num_classes = num_classes
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def forward(self, pd_scores: torch.Tensor, pd_bboxes: torch.Tensor, anc_points: torch.Tensor,
                gt_labels: torch.Tensor, gt_bboxes: torch.Tensor, mask_gt: torch.Tensor) -> Assignment:
        """Assign targets.

        pd_scores (b, A, nc) sigmoid scores; pd_bboxes (b, A, 4) xyxy; anc_points (A, 2), all in the same
        pixel units as gt_bboxes (b, n, 4) xyxy; gt_labels (b, n, 1); mask_gt (b, n, 1) marks real boxes
        (rows beyond an image's box count are padding).
        """
        b, n_anchors, nc = pd_scores.shape
        n_boxes = gt_bboxes.shape[1]
        if n_boxes == 0:
            return Assignment(torch.full((b, n_anchors), nc, dtype=torch.long, device=pd_scores.device),
                              torch.zeros_like(pd_bboxes), torch.zeros_like(pd_scores),
                              torch.zeros((b, n_anchors), dtype=torch.bool, device=pd_scores.device),
                              torch.zeros((b, n_anchors), dtype=torch.long, device=pd_scores.device))

        labels = gt_labels.long().squeeze(-1).clamp(0, nc - 1)  # (b, n)
        inside = anchors_inside_boxes(anc_points, gt_bboxes, self.eps) & mask_gt.bool()  # (b, n, A)
        align, overlaps = self._alignment(pd_scores, pd_bboxes, labels, gt_bboxes, inside)

        topk = min(self.topk, n_anchors)
        top_idx = align.topk(topk, dim=-1).indices  # (b, n, k)
        mask_pos = torch.zeros_like(align).scatter_(-1, top_idx, 1.0) * inside
        mask_pos, gt_idx = resolve_overlaps(mask_pos, overlaps)
        fg_mask = mask_pos.sum(1) > 0  # (b, A)

        target_labels = labels.gather(1, gt_idx)  # (b, A)
        target_bboxes = gt_bboxes.gather(1, gt_idx[..., None].expand(-1, -1, 4))
        target_scores = nn.functional.one_hot(target_labels, nc).to(pd_scores.dtype) * fg_mask[..., None]

        # Soft targets: each box's best anchor gets that box's best IoU, the others proportionally less,
        # so classification confidence learns to predict localisation quality.
        align = align * mask_pos
        best_align = align.amax(-1, keepdim=True)
        best_iou = (overlaps * mask_pos).amax(-1, keepdim=True)
        quality = (align * best_iou / (best_align + self.eps)).amax(1)  # (b, A)
        return Assignment(target_labels, target_bboxes, target_scores * quality[..., None], fg_mask, gt_idx)

    def _alignment(self, pd_scores, pd_bboxes, labels, gt_bboxes, inside):
        """Alignment metric and CIoU (b, n, A), computed only for anchors inside their box (zero elsewhere)."""
        b, n = labels.shape
        align = torch.zeros(inside.shape, dtype=pd_scores.dtype, device=pd_scores.device)
        overlaps = torch.zeros_like(align)
        scores = pd_scores.permute(0, 2, 1).gather(1, labels[..., None].expand(-1, -1, pd_scores.shape[1]))
        bi, _, ai = inside.nonzero(as_tuple=True)
        gt = gt_bboxes[..., None, :].expand(-1, -1, pd_bboxes.shape[1], -1)[inside]
        pd = pd_bboxes[bi, ai]
        overlaps[inside] = bbox_iou(gt, pd, xywh=False, CIoU=True).squeeze(-1).clamp_(0).to(align.dtype)
        align[inside] = scores[inside].pow(self.alpha) * overlaps[inside].pow(self.beta)
        return align, overlaps
