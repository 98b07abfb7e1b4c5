"""What makes a training step cheaper on a GPU without changing what it computes.

At batch 16 a YOLO training step is bound by the CPU launching thousands of small kernels, not by
the GPU (BENCHMARKS.md's profile). Two remedies, both for CUDA only:

- channels-last tensors: cuDNN's bf16 convolutions work in NHWC, so NCHW tensors cost a transpose
  kernel before and after each convolution;
- ``torch.compile``: fuses the elementwise work between convolutions (BatchNorm statistics, SiLU,
  fake quantization, the distillation terms) into a few generated kernels. It compiles for a
  minute or more first, so it pays on long runs and is asked for explicitly (``--compile``).

Compilation wraps a callable; the module itself stays as it was, so checkpoints, EMA and ONNX
export see the plain module. Without CUDA (no Triton) ``maybe_compile`` returns the callable
unchanged unless a backend is named (a CPU dry run traces with ``aot_eager``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from utils.logs import LOGGER


def channels_last(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in channels-last memory format on CUDA (in place); unchanged elsewhere."""
    return module.to(memory_format=torch.channels_last) if device.type == "cuda" else module


def memory_format(module: nn.Module) -> torch.memory_format:
    """The layout ``module``'s convolutions were given: images fed in that layout need no transposes."""
    for p in module.parameters():
        if p.dim() == 4 and p.shape[2] * p.shape[3] > 1:  # a 1x1 kernel is contiguous in both layouts
            return torch.contiguous_format if p.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def maybe_compile(fn: Callable, device: torch.device, enabled: bool, *, backend: str | None = None,
                  mode: str | None = None) -> Callable:
    """``torch.compile(fn)`` when ``enabled`` and on CUDA (or with an explicit ``backend``); else ``fn``."""
    if not enabled:
        return fn
    if backend is None and device.type != "cuda":
        LOGGER.info("--compile: torch.compile is used on CUDA devices only; running eagerly on %s", device)
        return fn
    return torch.compile(fn, backend=backend or "inductor", mode=mode)
