"""Signed INT8 fake quantization from PyTorch ops, with Model Optimizer's arithmetic.

Model Optimizer 0.47 fake-quantizes CUDA tensors with a C++/CUDA extension that it compiles the
first time a quantizer runs on a GPU: 45-56 s on a fresh machine, before the first calibrated
forward pass. Its kernel (``tensor_quant_gpu.cu``) and its CPU path compute, in float32 whatever
the input dtype:

    scale = 127 / amax                                  an IEEE division
    y = clamp(round_half_even(x * scale), lo, 127) / scale
    y = 0 where amax < 2**-24                           (a dead channel quantizes to zero)

with ``lo = -128``, or -127 for a ``narrow_range`` quantizer (ours are not: Model Optimizer's
default), and their straight-through gradient passes where ``|x| <= amax`` (zero elsewhere;
``amax`` gets none), compared in ``x``'s dtype when ``amax`` is a scalar tensor (PyTorch's type
promotion). Every step above is one correctly rounded float32 operation in PyTorch too, so the
same ops give bit-identical values and gradients on any device, with nothing to compile. Eager
on CUDA, models/fused_ops.py computes them in one Triton kernel with the same arithmetic (eight
kernels over float32 copies otherwise); under ``torch.compile`` Inductor fuses the ops itself.

Deployment agrees on the range: the exported QuantizeLinear (Model Optimizer's ``export_int8``:
``scale = amax / 127``, INT8 zero point) and TensorRT's IQuantizeLayer round ``x / scale`` half to
even and clamp to [-128, 127]. Only the arithmetic differs (``x / (amax / 127)`` there, ``x * (127 /
amax)`` here), which can move a value lying within a float32 rounding of a half step by one step.
"""
from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

from models import fused_ops

MAX_BOUND = 127.0  # the scale maps amax to 127; -128 is reached only below -amax
DEAD_AMAX = 2.0 ** -24  # the extension's EPSILON: below it every value quantizes to 0


class _FakeQuantInt8(torch.autograd.Function):
    """``fake_quant_int8`` with the straight-through estimator; exports as a Q/DQ pair."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax_in: torch.Tensor, narrow_range: bool) -> torch.Tensor:
        fused = fused_ops.fake_quant_int8(x, amax_in, narrow_range, ctx.needs_input_grad[0]) \
            if fused_ops.usable(x) else None
        if fused is not None:  # the same values and mask from one CUDA kernel (models/fused_ops.py)
            y, inside = fused
            if inside is not None:
                ctx.save_for_backward(inside)
            return y
        amax = amax_in.float()
        scale = torch.full_like(amax, MAX_BOUND).div_(amax)  # not 127.0 / amax: that is 127 * (1 / amax)
        # a scale of at least one dimension makes the product float32 whatever x's dtype, without a copy of x
        scale = scale.reshape(1) if scale.dim() == 0 and x.dim() > 0 else scale
        low = -MAX_BOUND if narrow_range else -MAX_BOUND - 1
        y = torch.mul(x, scale).round_().clamp_(low, MAX_BOUND).div_(scale)
        y = y.masked_fill_(amax < DEAD_AMAX, 0.0)
        if ctx.needs_input_grad[0]:
            # x's own dtype: against a 0-d amax, PyTorch's type promotion then rounds amax to bf16/fp16, as
            # in Model Optimizer's backward. A bool mask holds a half or a quarter of the input it replaces.
            ctx.save_for_backward(x.abs() <= amax_in)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        fused = fused_ops.straight_through(grad, inside) if fused_ops.usable(grad) else None
        return (torch.where(inside, grad, 0.0) if fused is None else fused), None, None

    @staticmethod
    @symbolic_helper.parse_args("v", "t", "b")
    def symbolic(g, x, amax, narrow_range):
        # Model Optimizer's own INT8 export, so graphs are the ones its TensorQuantizer writes
        from modelopt.torch.quantization.export_onnx import export_int8

        return export_int8(g, x, amax, 8, False, narrow_range, None)


class _ExportedFakeQuantInt8(_FakeQuantInt8):
    """The node the ONNX exporter traces: it writes ``symbolic``'s Q/DQ pair whatever the forward
    computes, and nothing downstream of an export trace reads values, only shapes and dtypes. Tracing
    the arithmetic was half of a full-width QAT export's time, for the same bytes (bench/bench_export.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax_in: torch.Tensor, narrow_range: bool) -> torch.Tensor:
        return x.clone()


def exported_fake_quant_int8(x: torch.Tensor, amax: torch.Tensor, narrow_range: bool = False) -> torch.Tensor:
    """``fake_quant_int8`` as an ONNX export traces it: the same Q/DQ pair, without the arithmetic."""
    return _ExportedFakeQuantInt8.apply(x, amax, narrow_range)


def fake_quant_int8(x: torch.Tensor, amax: torch.Tensor, narrow_range: bool = False) -> torch.Tensor:
    """``x`` quantized to signed INT8 with range ``amax`` and back, in ``x``'s dtype.

    ``amax`` is a scalar tensor (per tensor) or broadcasts against ``x`` (per channel, e.g. (C, 1, 1, 1)).
    """
    return _FakeQuantInt8.apply(x, amax, narrow_range)
