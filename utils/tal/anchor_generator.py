"""Anchor points of the anchor-free heads and the ltrb <-> box conversions around them.

The module path is upstream's (``utils/tal/anchor_generator.py``) so that scripts copied into
an upstream checkout find the same functions there.
"""
from __future__ import annotations

import torch


def make_anchors(feats: list[torch.Tensor], strides, grid_cell_offset: float = 0.5):
    """Cell centres of every feature map, in grid units, and the stride of each point."""
    points, stride_tensor = [], []
    dtype, device = feats[0].dtype, feats[0].device
    for feat, stride in zip(feats, strides):
        h, w = feat.shape[-2:]
        sx = torch.arange(w, device=device, dtype=dtype) + grid_cell_offset
        sy = torch.arange(h, device=device, dtype=dtype) + grid_cell_offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), float(stride), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(stride_tensor)


def dist2bbox(distance: torch.Tensor, anchor_points: torch.Tensor, xywh: bool = True, dim: int = -1):
    """Distances (left, top, right, bottom) from an anchor point to a box, xywh or xyxy."""
    lt, rb = distance.chunk(2, dim)
    x1y1 = anchor_points - lt
    x2y2 = anchor_points + rb
    if xywh:
        return torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), dim)
    return torch.cat((x1y1, x2y2), dim)


def bbox2dist(anchor_points: torch.Tensor, bbox: torch.Tensor, reg_max: int):
    """xyxy boxes to ltrb distances, clipped just below ``reg_max`` (the last DFL bin index)."""
    x1y1, x2y2 = bbox.chunk(2, -1)
    return torch.cat((anchor_points - x1y1, x2y2 - anchor_points), -1).clamp(0, reg_max - 0.01)
