"""Optimizer parameter groups, learning-rate schedules and the warm-up ramp used by training and QAT.

Weight decay is applied only to convolution / linear weights: decaying BatchNorm scales or biases
pulls them towards zero for no regularisation benefit and hurts from-scratch training.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.options import OPTIMIZERS


def param_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split trainable parameters into 'bias', 'decay' (weights of convs/linears) and 'no_decay' (norms, 1-D)."""
    groups: dict[str, list[nn.Parameter]] = {"bias": [], "decay": [], "no_decay": []}
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))  # incl. SyncBN
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if name == "bias":
                groups["bias"].append(p)
            elif is_norm or p.ndim <= 1:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
    return groups


def build_optimizer(model: nn.Module, name: str = "SGD", lr: float = 0.01, momentum: float = 0.937,
                    weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """Upstream's three-group optimizer; each param group carries a 'name' so warm-up can find the biases."""
    groups = param_groups(model)
    specs = [{"params": groups["bias"], "weight_decay": 0.0, "name": "bias"},
             {"params": groups["decay"], "weight_decay": weight_decay, "name": "decay"},
             {"params": groups["no_decay"], "weight_decay": 0.0, "name": "no_decay"}]
    specs = [s for s in specs if s["params"]]
    if name == "SGD":
        return torch.optim.SGD(specs, lr=lr, momentum=momentum, nesterov=True)
    if name == "Adam":
        return torch.optim.Adam(specs, lr=lr, betas=(momentum, 0.999))
    if name == "AdamW":
        return torch.optim.AdamW(specs, lr=lr, betas=(momentum, 0.999))
    raise UserError(f"--optimizer {name}: expected one of {', '.join(OPTIMIZERS)}")


def lr_lambda(epochs: int, lrf: float, cosine: bool = False, hold: int = 0) -> Callable[[float], float]:
    """LR factor per epoch: 1 at epoch 0 down to ``lrf``, linearly or along a half cosine, reached at
    ``epochs - hold`` and kept for the last ``hold`` epochs: validation mAP that stays flat there shows
    that more training at the lowest LR (what a QAT fine-tune does) gains the FP32 model nothing."""
    span = max(epochs - hold, 1)
    if cosine:
        return lambda e: ((1 - math.cos(min(e, span) * math.pi / span)) / 2) * (lrf - 1) + 1
    return lambda e: (1 - min(e, span) / span) * (1.0 - lrf) + lrf


def set_momentum(group: dict, value: float) -> None:
    """SGD keeps momentum in 'momentum', Adam-family in betas[0]."""
    if "momentum" in group:
        group["momentum"] = value
    elif "betas" in group:
        group["betas"] = (value, group["betas"][1])


class Warmup:
    """Linear warm-up over the first ``iters`` batches (upstream's recipe).

    Bias LR falls from ``bias_lr`` while the other LRs rise from 0 to the scheduled value, momentum
    rises from ``momentum_start``, and gradient accumulation grows from 1 batch to the nominal batch,
    so the first noisy steps of a from-scratch model stay small.
    """

    def __init__(self, iters: int, bias_lr: float = 0.1, momentum_start: float = 0.8, momentum: float = 0.937,
                 accumulate: int = 1):
        self.iters = iters
        self.bias_lr = bias_lr
        self.momentum_start = momentum_start
        self.momentum = momentum
        self.accumulate = accumulate

    def active(self, ni: int) -> bool:
        return ni <= self.iters

    def apply(self, optimizer: torch.optim.Optimizer, ni: int, lr_factor: float) -> int:
        """Set LRs and momentum for batch ``ni``; return how many batches to accumulate per step now."""
        xi = [0, self.iters]
        for g in optimizer.param_groups:
            start = self.bias_lr if g.get("name") == "bias" else 0.0
            g["lr"] = float(np.interp(ni, xi, [start, g["initial_lr"] * lr_factor]))
            set_momentum(g, float(np.interp(ni, xi, [self.momentum_start, self.momentum])))
        return max(1, int(np.interp(ni, xi, [1, self.accumulate]).round()))
