"""Training loss of the anchor-free YOLOv9 heads: BCE classification, CIoU and DFL box terms.

``ComputeLoss`` serves the single-branch ``DDetect`` (GELAN); ``DualComputeLoss`` serves ``DualDDetect``
(YOLOv9 with its auxiliary reversible branch), adding the auxiliary branch's loss at a quarter of the
main branch's weight as upstream trains it. Both return upstream's pair: the weighted loss times the
batch size (what ``backward`` takes) and the detached ``(box, cls, dfl)`` items for logging.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.boxes import bbox_iou, xywh2xyxy
from utils.tal.anchor_generator import bbox2dist, dist2bbox, make_anchors
from utils.torch_utils import de_parallel
from utils.training.assigner import Assignment, TaskAlignedAssigner

DEFAULT_GAINS = {"box": 7.5, "cls": 0.5, "dfl": 1.5}  # upstream's hyp.scratch-high values
AUX_BRANCH_WEIGHT = 0.25  # upstream loss_tal_dual: auxiliary branch counts a quarter of the main one


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
        return loss


class ComputeLoss:
    """Loss for a model whose last layer is a ``DDetect``-style head (one branch)."""

    branch_weights: tuple[float, ...] = (1.0,)

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

    def pad_targets(self, targets: torch.Tensor, batch_size: int, img_hw: torch.Tensor):
        """(n, 6) [image, cls, x, y, w, h] normalised -> padded labels (b, m, 1), xyxy pixel boxes (b, m, 4)
        and a mask (b, m, 1) of the real rows."""
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
        boxes = xywh2xyxy(padded[..., 1:] * img_hw[[1, 0, 1, 0]])
        mask = (torch.arange(m, device=device) < counts[:, None])[..., None]
        return padded[..., :1], boxes, mask

    def __call__(self, preds, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of gained losses * batch size, detached [box, cls, dfl])."""
        branches = self.branches(preds)
        feats = branches[0]
        device = feats[0].device
        # Targets, anchors and box decoding need full precision; a bf16 box loses pixels at 640.
        with torch.autocast(device.type, enabled=False):
            stride = self.stride.to(device)
            img_hw = torch.tensor(feats[0].shape[2:], device=device, dtype=torch.float32) * stride[0]
            gt_labels, gt_bboxes, mask_gt = self.pad_targets(targets, feats[0].shape[0], img_hw)
            # fp32 shapes, not AMP copies; 4-D like a feature map, as upstream's make_anchors reads them
            grids = [torch.empty((1, 1, *f.shape[2:]), device=device) for f in feats]
            anchor_points, stride_tensor = make_anchors(grids, stride, 0.5)
            loss = sum(w * self.branch(f, gt_labels, gt_bboxes, mask_gt, anchor_points, stride_tensor)
                       for w, f in zip(self.branch_weights, branches))
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


def build_loss(model: nn.Module, hyp: dict | None = None) -> ComputeLoss:
    """The loss that matches the model's head: dual-branch heads carry the extra ``cv4``/``cv5`` towers."""
    head = de_parallel(model).model[-1]
    dual = hasattr(head, "cv4") and hasattr(head, "cv5")
    return (DualComputeLoss if dual else ComputeLoss)(model, hyp)
