"""Exponential moving average of a model's weights, the copy that is validated and shipped.

The decay ramps up from 0 towards ``decay`` over the first few thousand updates (upstream's
``decay * (1 - exp(-updates / tau))``) so that the average does not cling to the random start.
A fine-tune starts from a trained model, which the average should cling to: ``tau=0`` holds the
decay at ``decay`` from the first update.
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
        if self.tau <= 0:
            return self.decay_max
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights.

        The pairs of tensors are looked up once per model: two state dicts per step cost the CPU demo
        model 13 ms of a 180 ms step. Training changes weights and BatchNorm statistics in place, so
        the same tensors hold them from step to step; a model moved or cast meanwhile (new tensors)
        is looked up again."""
        self.updates += 1
        d = self.decay(self.updates)
        averages, currents = self._pairs(de_parallel(model))
        if averages:
            # one fused kernel per dtype group instead of ~1000 small ones per step on gelan-c
            torch._foreach_lerp_(averages, [n.to(a.dtype) for a, n in zip(averages, currents)], 1.0 - d)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The EMA's floating-point tensors and ``model``'s matching ones; parameters as themselves, which
        stay the same objects when ``.to()`` swaps their data."""
        cached = getattr(self, "_cache", None)
        if cached is not None and cached[0] is model and all(
                t is now for t, now in zip(cached[3], (b for _, b in model.named_buffers()))):
            return cached[1], cached[2]
        current = model.state_dict(keep_vars=True)
        pairs = [(v, current[k]) for k, v in self.ema.state_dict(keep_vars=True).items() if v.dtype.is_floating_point]
        averages, currents = [a for a, _ in pairs], [n for _, n in pairs]
        self._cache = (model, averages, currents, [b for _, b in model.named_buffers()])
        return averages, currents

    def update_attr(self, model: nn.Module,
                    include: tuple[str, ...] = ("yaml", "nc", "hyp", "names", "stride")) -> None:
        """Copy plain attributes (class names, hyp...) that a checkpoint reader expects on the model."""
        src = de_parallel(model)
        for k in include:
            if hasattr(src, k):
                setattr(self.ema, k, getattr(src, k))
