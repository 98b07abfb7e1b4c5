"""Exponential moving average of a model's weights, the copy that is validated and shipped.

The decay ramps up from 0 towards ``decay`` over the first few thousand updates (upstream's
``decay * (1 - exp(-updates / tau))``) so that the average does not cling to the random start.
"""
from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn as nn

from utils.torch_utils import de_parallel


class ModelEMA:
    """FP32 moving average of every floating-point entry of a model's state dict (weights and BN stats)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max = decay
        self.tau = tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self, updates: int) -> float:
        """Weight of the old average after ``updates`` updates."""
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.updates += 1
        d = self.decay(self.updates)
        current = de_parallel(model).state_dict()
        pairs = [(v, current[k].detach()) for k, v in self.ema.state_dict().items() if v.dtype.is_floating_point]
        if pairs:
            # one fused kernel per dtype group instead of ~1000 small ones per step on gelan-c
            torch._foreach_lerp_([a for a, _ in pairs], [n.to(a.dtype) for a, n in pairs], 1.0 - d)

    def update_attr(self, model: nn.Module,
                    include: tuple[str, ...] = ("yaml", "nc", "hyp", "names", "stride")) -> None:
        """Copy plain attributes (class names, hyp...) that a checkpoint reader expects on the model."""
        src = de_parallel(model)
        for k in include:
            if hasattr(src, k):
                setattr(self.ema, k, getattr(src, k))
