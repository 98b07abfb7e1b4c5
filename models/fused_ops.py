"""One-pass CUDA kernels (Triton) for the ops an eager QAT step spends most of its GPU time on.

The H200 profile of gelan-c (batch 16, 640 px, bf16; BENCHMARKS.md) put the INT8 fake quantization
(``models/fake_quant.py``: eight PyTorch kernels over float32 copies of every quantized activation)
at about a third of the QAT step's GPU time, the feature distillation (float32 copies, squares and
means of every supervised layer's outputs) at ~25 ms a step, and the 2x2 stride-1 average pool of
ADown / AConv at ~2 ms a call: PyTorch's channels-last ``avg_pool2d`` kernels are bound by index
arithmetic. Here each is one kernel each way that reads its inputs once. Fake quantization and the
blur keep the float32 arithmetic and its order, so their values and gradients are bit for bit
those of the PyTorch ops they replace; the distillation's sums are taken in blocks, so they agree
to float32 rounding (tests/test_fused_ops.py runs all of them through Triton's interpreter). A
fused convolution's bias and SiLU (``bias_silu``) take one kernel each way too, but only in passes
recorded into a CUDA graph (``graph_recording``): launched from Python each step, it slowed eager steps.

The kernels are used on CUDA tensors in eager mode only: never while exporting (the graph keeps
AveragePool and Q/DQ nodes), tracing or compiling (Inductor fuses the PyTorch ops itself), and not
at all where Triton is missing, cannot build them (no C compiler, an older GPU: one warning, then
the PyTorch ops) or ``enabled(False)`` is in force (the benches time both ways).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import Iterator

import torch
import torch.nn.functional as F

from utils.logs import LOGGER

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024
BIAS_TILE = 64  # rows and channels of bias_silu_grad's tiles
# YOLOV9_FUSED_KERNELS=0 keeps the PyTorch ops everywhere (to rule the kernels out when chasing a problem)
_state = {"enabled": os.environ.get("YOLOV9_FUSED_KERNELS", "1") != "0", "failed": "", "graph_recording": False}


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Use (or not) the fused kernels inside the block, e.g. to time a step both ways."""
    before, _state["enabled"] = _state["enabled"], on
    try:
        yield
    finally:
        _state["enabled"] = before


@contextlib.contextmanager
def graph_recording() -> Iterator[None]:
    """Marks passes recorded into a CUDA graph (utils/training/cuda_graphs.py): where ``in_graph_recording``,
    kernels that cost more Python per launch than the PyTorch ops they replace (``bias_silu``) are used, as
    their launches are replayed for free; an eager step, paced by launches, keeps PyTorch's ops."""
    before, _state["graph_recording"] = _state["graph_recording"], True
    try:
        yield
    finally:
        _state["graph_recording"] = before


def in_graph_recording() -> bool:
    return _state["graph_recording"]


def usable(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through a fused kernel here: CUDA, eager, a float dtype, dense layout."""
    return (_state["enabled"] and x.is_cuda and x.dtype in DTYPES and x.numel() < 2 ** 31
            and not torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not _state["failed"] and _triton_installed())


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels():
    """models.fused_kernels, imported on first use: Triton decides then whether to interpret them."""
    from models import fused_kernels

    return fused_kernels


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _launch(kernel: str, n: int, *args, grid: tuple[int, ...] | None = None, **meta) -> bool:
    """Run ``kernel`` over ``n`` elements (in blocks of ``BLOCK``, or on ``grid`` with the caller's block
    sizes); False (and the PyTorch ops from then on) if Triton cannot build it here, e.g. without a C
    compiler or on a GPU older than Triton supports."""
    if not n:
        return True
    device = args[0].device  # Triton launches on the current CUDA device: make it the tensors' one
    if grid is None:
        grid, meta = ((n + BLOCK - 1) // BLOCK,), {"BLOCK": BLOCK, **meta}
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            getattr(_kernels(), kernel)[grid](*args, **meta)
    except Exception as exc:  # Triton's build errors have no common base class
        _state["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        LOGGER.warning(f"fused CUDA kernels unavailable ({_state['failed']}); using PyTorch's ops instead")
        return False
    return True


def fake_quant_int8(x: torch.Tensor, amax: torch.Tensor, narrow_range: bool, save_inside: bool
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``models.fake_quant``'s forward in one kernel: (y, the straight-through mask or None), or
    None where this layout / range shape has no kernel (the caller then uses the PyTorch ops).

    ``amax`` is a 0-d tensor (per tensor) or one value per index of ``x``'s first dimension. A strided
    4-D activation (a channel slice of a channels-last tensor: RepNCSPELAN4's and ADown's ``chunk``)
    is read through its strides and written dense, where the PyTorch ops would take eight passes over
    strided memory (42 quantizers a step of gelan-c in the H200 profile)."""
    per_channel = amax.dim() > 0
    if amax.dtype not in DTYPES:
        return None
    strided = not _dense(x)
    if strided and per_channel:
        return None
    if strided and x.dim() != 4:  # the kernel walks strides in 4-D only
        x, strided = x.contiguous(), False
    if per_channel and (amax.numel() != x.shape[0] or amax.shape[0] != x.shape[0] or x.stride(0) * x.shape[0]
                        != x.numel()):
        return None
    amax = amax.contiguous()
    # dense in x's own layout; a channel slice of a channels-last tensor becomes channels-last
    layout = torch.preserve_format if not strided else \
        torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
    y = torch.empty_like(x, memory_format=layout)
    inside = torch.empty_like(y, dtype=torch.uint8) if save_inside else y
    n = x.numel()
    if not _launch("fake_quant", n, x, amax, y, inside, n, max(n // x.shape[0], 1) if per_channel else 1,
                   *_strides_in_layout_of(x, y), LOW=-127.0 if narrow_range else -128.0, PER_CHANNEL=per_channel,
                   SAVE_INSIDE=save_inside, BF16=x.dtype == torch.bfloat16, STRIDED=strided, enable_fp_fusion=False):
        return None
    return y, (inside.view(torch.bool) if save_inside else None)


def _strides_in_layout_of(x: torch.Tensor, dense: torch.Tensor) -> tuple[int, ...]:
    """The sizes of ``dense``'s memory dimensions after the first and ``x``'s strides in that order: how
    a kernel walking ``dense`` element by element finds the same element of ``x``. Zeros where nothing
    is walked that way (below 4-D, or ``x`` laid out as ``dense``): the kernel ignores them then, and
    constants keep Triton, which specializes integer arguments on their divisibility, from compiling
    another copy of the same kernel for each layer's shape, on the first QAT step's critical path."""
    if dense.dim() != 4 or x.stride() == dense.stride():
        return (0,) * 7
    order = (0, 2, 3, 1) if _layout(dense) == torch.channels_last else (0, 1, 2, 3)
    return (*(dense.shape[d] for d in order[1:]), *(x.stride(d) for d in order))


def straight_through(grad: torch.Tensor, inside: torch.Tensor) -> torch.Tensor | None:
    """``torch.where(inside, grad, 0)`` in one kernel, laid out as ``inside``; None where there is none
    (not 4-D, or Triton cannot build it).

    PyTorch's ``where`` took 8.2 ms of gelan-c's QAT step in the H200 profile (batch 16, 640 px), with
    a gradient arriving as a channel slice of a bigger one (the backward of ``cat``; 86 of its 271
    activation quantizers a step, counted on the CPU) on its generic strided kernel. Here a gradient is
    read once, through its strides where it has to be, and the result is dense, which also keeps the
    gradient sums of tensors read by several quantizers in one layout."""
    if grad.dim() != 4 or inside.shape != grad.shape or not _dense(inside):
        return None
    dx = torch.empty_like(inside, dtype=grad.dtype)
    n = dx.numel()
    if not _launch("straight_through", n, grad, inside.view(torch.uint8), dx, n, *_strides_in_layout_of(grad, dx),
                   STRIDED=grad.stride() != dx.stride()):
        return None
    return dx


def _layout(x: torch.Tensor) -> torch.memory_format:
    """channels-last where ``x`` lies so (and only so), else NCHW."""
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format


def _bhwc(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A (B, H, W, C) view of ``t`` laid out as ``fmt``: channels-last as it lies, NCHW as (N * C, H, W, 1)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1) if fmt == torch.channels_last else t.view(n * c, h, w, 1)


class _Blur(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        ctx.fmt, ctx.shape = _layout(x), x.shape
        y = torch.empty((n, c, h - 1, w - 1), dtype=x.dtype, device=x.device, memory_format=ctx.fmt)
        src = _bhwc(x, ctx.fmt)
        if not _launch("blur", y.numel(), src, _bhwc(y, ctx.fmt), y.numel(), h, w, src.shape[3],
                       BF16=x.dtype == torch.bfloat16):
            return F.avg_pool2d(x, 2, 1, 0, False, True)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous(memory_format=ctx.fmt)
        dx = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.fmt)
        dst = _bhwc(dx, ctx.fmt)
        if not _launch("blur_grad", dx.numel(), _bhwc(grad, ctx.fmt), dst, dx.numel(), ctx.shape[2], ctx.shape[3],
                       dst.shape[3], BF16=dx.dtype == torch.bfloat16):
            return torch.ops.aten.avg_pool2d_backward(grad, dx, [2, 2], [1, 1], [0, 0], False, True, None)
        return dx


def blur2x2(x: torch.Tensor) -> torch.Tensor | None:
    """``F.avg_pool2d(x, 2, 1)`` (no padding) in one kernel each way, or None where there is none."""
    if x.dim() != 4 or not _dense(x) or x.shape[2] < 2 or x.shape[3] < 2:
        return None
    return _Blur.apply(x)


def average_blur(x: torch.Tensor) -> torch.Tensor:
    """ADown's and AConv's 2x2 stride-1 average pool: the fused kernel where ``usable``, else PyTorch's."""
    y = blur2x2(x) if usable(x) else None
    return F.avg_pool2d(x, 2, 1, 0, False, True) if y is None else y


def _libdevice() -> bool:
    """Whether the kernels can call CUDA's libdevice (not in Triton's interpreter, which the CPU tests run)."""
    return os.environ.get("TRITON_INTERPRET") != "1"


class _BiasSiLU(torch.autograd.Function):
    """silu(z + bias), per channel of a channels-last ``z``: one kernel forward; backward one kernel for
    the input gradient and the bias gradient's partial sums (over tiles of BIAS_TILE rows), then their sum."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(z)
        if not _launch("bias_silu", z.numel(), z, bias, y, z.numel(), z.shape[1], BF16=z.dtype == torch.bfloat16,
                       LIBDEVICE=_libdevice()):
            y = F.silu(z + bias.view(1, -1, 1, 1))
        ctx.save_for_backward(z, bias)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, bias = ctx.saved_tensors
        rows, channels = z.numel() // z.shape[1], z.shape[1]
        dz = torch.empty_like(z, dtype=grad.dtype)
        partial = torch.empty(((rows + BIAS_TILE - 1) // BIAS_TILE, channels), dtype=torch.float32, device=z.device)
        grid = (partial.shape[0], (channels + BIAS_TILE - 1) // BIAS_TILE)
        if not _launch("bias_silu_grad", z.numel(), grad, z, bias, dz, partial, rows, channels,
                       *_strides_in_layout_of(grad, z),
                       STRIDED=grad.stride() != z.stride(), BF16=dz.dtype == torch.bfloat16, LIBDEVICE=_libdevice(),
                       BLOCK_M=BIAS_TILE, BLOCK_C=BIAS_TILE, grid=grid):
            biased = (z + bias.view(1, -1, 1, 1)).detach()
            dz = torch.ops.aten.silu_backward(grad, biased)
            return dz, dz.sum((0, 2, 3)).to(bias.dtype)
        return dz, partial.sum(0).to(bias.dtype)


def bias_silu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """``F.silu(z + bias)`` (a convolution's output without its bias, and that bias, cast to ``z``'s dtype
    as autocast casts it) in one kernel each way, or None where there is none: ``z`` must be 4-D and
    channels-last, float32 or bfloat16.

    On a channels-last output PyTorch adds a convolution's bias with its generic strided kernel and then
    runs SiLU: 126 bias adds took 3.2 ms of a 13.3 ms pass of gelan-c's distillation teacher (H200, batch
    16, 640 px, bf16). The gradient pass also takes the bias gradient's sums from the tile it writes,
    where PyTorch reads the whole gradient again. Values as PyTorch's ops round them (the biased output
    and SiLU's, in ``z``'s dtype); the bias gradient is summed in float32 in another order."""
    if (z.dim() != 4 or z.dtype not in (torch.float32, torch.bfloat16) or bias.shape != (z.shape[1],)
            or not z.is_contiguous(memory_format=torch.channels_last) or z.device != bias.device):
        return None
    return _BiasSiLU.apply(z, bias.to(z.dtype))


def biased_silu(z: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.silu(z + bias)`` of a convolution's output without its bias: ``bias_silu``'s kernel where
    ``usable``, else PyTorch's add and SiLU."""
    y = bias_silu(z, bias) if usable(z) else None
    return F.silu(z + bias.to(z.dtype).view(1, -1, 1, 1)) if y is None else y


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.stride() == b.stride() and _dense(a) and a.device == b.device


def _sum_squares(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
    """sum((a - b)^2), or sum(a^2), in float32 from one pass over the features; None if not launched."""
    n = a.numel()
    partial = torch.zeros(1, device=a.device) if not n else \
        torch.empty((n + BLOCK - 1) // BLOCK, dtype=torch.float32, device=a.device)  # one sum per block
    if not _launch("sum_squares", n, a, a if b is None else b, partial, n, HAS_B=b is not None):
        return None
    return partial.sum()


class _MeanSquaredError(torch.autograd.Function):
    """mean((s - t)^2) in float32 with the gradient for ``s`` only (``t`` is the frozen teacher's)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(s, t)
        total = _sum_squares(s, t)
        if total is None:
            total = torch.sub(s.float(), t.float()).square().sum()
        return total / max(s.numel(), 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        s, t = ctx.saved_tensors
        factor = (grad.float() * (2.0 / max(s.numel(), 1))).reshape(1)
        ds = torch.empty_like(s)
        if not _launch("squared_error_grad", s.numel(), s, t, factor, ds, s.numel(), BF16=s.dtype == torch.bfloat16):
            ds = (factor * (s.float() - t.float())).to(s.dtype)
        return ds, None


def mean_square(t: torch.Tensor) -> torch.Tensor | None:
    """mean(t^2) in float32 (no gradient) from one kernel, or None where ``usable`` says no."""
    if not (usable(t) and _dense(t)):
        return None
    total = _sum_squares(t, None)
    return None if total is None else total / max(t.numel(), 1)


def mean_squared_error(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor | None:
    """mean((s - t)^2) in float32, differentiable in ``s``, from one kernel each way; None where
    there is none (the features must lie alike: same shape, strides and device)."""
    if not (usable(s) and t.dtype in DTYPES and _same_layout(s, t)):
        return None
    return _MeanSquaredError.apply(s, t.detach())
