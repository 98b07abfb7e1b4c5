"""What makes a training step cheaper without changing what it computes (beyond bf16 rounding).

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

On a CPU, training is opt-in faster (``cpu_speedups``, the demo's trainer knob): bf16 autocast
where the CPU computes bf16 natively (AMX / AVX512-BF16; elsewhere oneDNN emulates it, slower than
FP32), channels-last convolutions, and the optimizer's multi-tensor step (what each saved per
step: BENCHMARKS.md, "The demo").
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from utils.logs import LOGGER


def channels_last(module: nn.Module, device: torch.device, cpu: bool = False) -> nn.Module:
    """``module`` in channels-last memory format on CUDA, and with ``cpu`` on the CPU (in place);
    unchanged elsewhere."""
    wanted = device.type == "cuda" or (cpu and device.type == "cpu")
    return module.to(memory_format=torch.channels_last) if wanted else module


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware (AMX tiles or AVX512-BF16)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def cpu_bf16(device: torch.device, enabled: bool) -> bool:
    """bf16 autocast for CPU training: asked for, on the CPU, and computed natively there."""
    return enabled and device.type == "cpu" and cpu_computes_bf16()


def multi_tensor_step(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer's foreach implementation (the default on CUDA only): on a CPU the per-parameter
    loop of AdamW took 15% of the demo model's training step."""
    for group in optimizer.param_groups:
        if "foreach" in group:
            group["foreach"] = True
    return optimizer


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
