"""The fused kernels give the PyTorch ops' values and gradients: bit for bit (fake quantization,
the blur), to float32 rounding (the distillation error).

Run through Triton's interpreter on the CPU (no GPU here or in CI); the GPU bench
(``bench/bench_qat_step.py``) checks the compiled kernels on the device the same way.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (the fused kernels are CUDA-only extras)")

from models import fused_ops  # noqa: E402
from models.fake_quant import _FakeQuantInt8  # noqa: E402

# the interpreter computes with numpy, which warns about the inf arithmetic these tests feed it on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(scope="module", autouse=True)
def interpreted():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels in Triton's interpreter on CPU tensors (tests/conftest.py chooses it on "
                    "machines without an NVIDIA driver); on a GPU, bench/bench_qat_step.py checks them")


def reference(x: torch.Tensor, amax: torch.Tensor, narrow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch ops' forward and mask (the path every non-CUDA tensor takes)."""
    x = x.detach().requires_grad_()
    y = _FakeQuantInt8.apply(x, amax, narrow)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad != 0


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def activations(dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 7) * 3
    x.view(-1)[:8] = torch.tensor([-0.3, 0.3, -0.0, 2.5, -2.5, 1e9, float("inf"), float("-inf")]) / 30
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("narrow", (False, True))
def test_fake_quant_per_tensor_matches_the_pytorch_ops(dtype, channels_last, narrow):
    x = activations(dtype, channels_last)
    for amax in (torch.tensor(2.7), torch.tensor(0.05), torch.tensor(1e-30)):  # the last: a dead range
        y, inside = fused_ops.fake_quant_int8(x, amax, narrow, save_inside=True)
        want_y, want_inside = reference(x, amax, narrow)
        assert y.dtype == dtype and y.stride() == x.stride()
        assert torch.equal(bits(y), bits(want_y))  # signed zeros and NaNs too
        assert torch.equal(inside, want_inside | (x == 0)) and torch.equal(inside, x.abs() <= amax)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fake_quant_per_channel_matches_the_pytorch_ops(dtype):
    torch.manual_seed(1)
    w = (torch.randn(8, 4, 3, 3) * torch.logspace(-3, 1, 8).view(8, 1, 1, 1)).to(dtype)
    amax = w.float().abs().amax(dim=(1, 2, 3), keepdim=True) * 0.8
    amax[3] = 0.0  # a dead channel quantizes to zero
    for weights in (w, w.contiguous(memory_format=torch.channels_last)):
        y, inside = fused_ops.fake_quant_int8(weights, amax, False, save_inside=True)
        want_y, _ = reference(weights, amax, False)
        assert torch.equal(bits(y), bits(want_y)) and torch.equal(inside, weights.abs() <= amax)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_fake_quant_of_a_strided_activation_matches_the_pytorch_ops(dtype):
    torch.manual_seed(3)
    x = (torch.randn(2, 8, 5, 6) * 3).to(dtype)
    amax = torch.tensor(2.5)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    for strided in (x[:, ::2], nhwc[:, 2:6], x.chunk(2, 1)[1], nhwc.chunk(2, 1)[1], nhwc[:, 1:4, 2:3, 3:4]):
        y, inside = fused_ops.fake_quant_int8(strided, amax, False, save_inside=True)
        want_y, _ = reference(strided, amax, False)
        assert fused_ops._dense(y) and inside.stride() == y.stride()  # read through the strides, written dense
        assert torch.equal(bits(y), bits(want_y)) and torch.equal(inside, strided.abs() <= amax)


def test_fake_quant_declines_what_it_has_no_kernel_for():
    x = torch.randn(2, 8, 4, 4)
    assert fused_ops.fake_quant_int8(x, torch.ones(8, 1, 1, 1), False, True) is None  # range per dim 1
    assert fused_ops.fake_quant_int8(x.transpose(0, 1), torch.ones(8), False, True) is None  # per channel, strided


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("mask_channels_last", (False, True))
def test_straight_through_matches_where_for_every_gradient_layout(dtype, mask_channels_last):
    torch.manual_seed(4)
    x = torch.randn(2, 6, 5, 7)
    inside = (x.abs() <= 1.0).contiguous(memory_format=torch.channels_last if mask_channels_last else
                                         torch.contiguous_format)
    wide = torch.randn(2, 10, 5, 7).to(dtype)
    gradients = (wide.contiguous(memory_format=torch.channels_last)[:, 2:8],  # cat's backward: a channel slice
                 wide[:, 4:10],  # a slice of an NCHW gradient
                 torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last if not
                                                               mask_channels_last else torch.contiguous_format),
                 torch.randn(1, 1, 1, 1).to(dtype).expand(2, 6, 5, 7),  # a mean's backward: one value, stride 0
                 torch.randn(2, 6, 5, 7).to(dtype).contiguous(memory_format=torch.channels_last if
                                                               mask_channels_last else torch.contiguous_format))
    for grad in gradients:
        dx = fused_ops.straight_through(grad, inside)
        want = torch.where(inside, grad, 0.0)
        assert dx.dtype == dtype and dx.stride() == inside.stride()  # dense, as the mask lies
        assert torch.equal(bits(dx), bits(want))


def test_straight_through_leaves_other_shapes_to_pytorch():
    assert fused_ops.straight_through(torch.randn(6, 4), torch.rand(6, 4) > 0.5) is None
    assert fused_ops.straight_through(torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 1) > 0.5) is None


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("shape", ((2, 6, 5, 7), (1, 3, 2, 2), (1, 1, 9, 4)))
@pytest.mark.parametrize("channels_last", (False, True))
def test_blur_matches_avg_pool2d_both_ways(dtype, shape, channels_last):
    torch.manual_seed(2)
    x = torch.randn(shape).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    grad = torch.randn(shape[0], shape[1], shape[2] - 1, shape[3] - 1).to(dtype)
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    y = fused_ops.blur2x2(a)
    want = F.avg_pool2d(b, 2, 1, 0, False, True)
    assert torch.equal(y, want) and y.is_contiguous(memory_format=fused_ops._layout(x))
    y.backward(grad)
    # reference gradient summed in float32, as the CUDA kernel sums (the CPU's bf16 kernel rounds each add)
    b32 = x.detach().float().requires_grad_()
    F.avg_pool2d(b32, 2, 1, 0, False, True).backward(grad.float())
    assert torch.equal(a.grad, b32.grad.to(dtype))


def test_blur_declines_inputs_without_a_window():
    assert fused_ops.blur2x2(torch.randn(1, 2, 1, 5)) is None
    assert fused_ops.blur2x2(torch.randn(2, 5, 5)) is None


def test_usable_only_for_eager_cuda_tensors():
    assert not fused_ops.usable(torch.randn(2, 2))  # a CPU tensor
    with fused_ops.enabled(False):
        assert not fused_ops._state["enabled"]
    assert fused_ops._state["enabled"]


def test_a_kernel_triton_cannot_build_falls_back_to_the_pytorch_ops(monkeypatch, caplog):
    class Unbuildable:
        def __getitem__(self, grid):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    monkeypatch.setattr(fused_ops, "_kernels", lambda: type("K", (), dict.fromkeys(
        ("fake_quant", "blur", "blur_grad"), Unbuildable()))())
    monkeypatch.setitem(fused_ops._state, "failed", "")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    assert fused_ops.fake_quant_int8(x.detach(), torch.tensor(1.0), False, True) is None
    assert "C compiler" in fused_ops._state["failed"] and "using PyTorch's ops" in caplog.text
    y = fused_ops.blur2x2(x)  # the forward and backward fall back inside the autograd function
    y.backward(torch.ones_like(y))
    ref = x.detach().requires_grad_()
    F.avg_pool2d(ref, 2, 1, 0, False, True).backward(torch.ones_like(y))
    assert torch.equal(y, F.avg_pool2d(x.detach(), 2, 1, 0, False, True)) and torch.equal(x.grad, ref.grad)
    assert not fused_ops.usable(x)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("channels_last", (False, True))
def test_distillation_error_and_gradient_match_the_pytorch_ops(dtype, channels_last):
    torch.manual_seed(3)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    t = (torch.randn(2, 5, 7, 9) * 3).to(dtype).contiguous(memory_format=layout)
    s = (t.float() + torch.randn(t.shape) * 0.1).to(dtype).contiguous(memory_format=layout).requires_grad_()
    energy = fused_ops._sum_squares(t, None) / t.numel()
    assert torch.allclose(energy, t.float().square().mean(), rtol=1e-6)
    err = fused_ops._MeanSquaredError.apply(s, t)
    ref_s = s.detach().clone().requires_grad_()
    ref = torch.sub(ref_s, t.float()).square().mean()
    assert err.dtype == torch.float32 and torch.allclose(err, ref, rtol=1e-6)
    (err * 3).backward()
    (ref * 3).backward()
    assert s.grad.dtype == dtype and s.grad.stride() == s.stride()
    assert torch.allclose(s.grad.float(), ref_s.grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                          atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
# (2, 130, 5, 7): 70 rows and 130 channels, a partial tile past one and past two of the gradient's 64-wide tiles;
# (3, 130, 4, 67) covered no more and took 9 s in the interpreter (CPU), against 1 s
@pytest.mark.parametrize("shape", ((2, 70, 5, 3), (1, 1, 1, 1), (2, 130, 5, 7)))
def test_bias_silu_matches_add_then_silu_both_ways(dtype, shape):
    torch.manual_seed(5)
    z = (torch.randn(shape) * 4).to(dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(shape[1])
    wide = torch.randn(shape[0], shape[1] + 9, *shape[2:]).to(dtype)
    gradients = (torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last),
                 wide.contiguous(memory_format=torch.channels_last)[:, 4:4 + shape[1]],  # cat's backward: a slice
                 torch.randn(shape).to(dtype))  # NCHW
    for grad in gradients:
        z1, b1 = z.detach().clone().requires_grad_(), bias.clone().requires_grad_()
        z2, b2 = z.detach().clone().requires_grad_(), bias.clone().requires_grad_()
        y = fused_ops.bias_silu(z1, b1)
        want = F.silu(z2 + b2.to(dtype).view(1, -1, 1, 1))
        assert y.dtype == dtype and y.stride() == z.stride()
        y.backward(grad)
        want.backward(grad)
        assert z1.grad.stride() == z.stride() and b1.grad.dtype == torch.float32
        # rounded where PyTorch rounds; the interpreter's exp is numpy's and PyTorch's CPU SiLU kernels compute
        # in another order than its CUDA ones (which the GPU bench compares with)
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -20  # float32: a few units in the last place
        assert torch.allclose(y, want, rtol=ulp, atol=1e-30)
        # where SiLU's slope crosses 0 (z + bias near -1.28) the gradient cancels: compared with the incoming one
        assert ((z1.grad.float() - z2.grad.float()).abs() <= ulp * (z2.grad.float().abs() + grad.float().abs())).all()
        assert torch.allclose(b1.grad, b2.grad, rtol=1e-4, atol=1e-4)  # summed in another order


def test_bias_silu_declines_what_it_has_no_kernel_for():
    z = torch.randn(2, 4, 3, 3)
    assert fused_ops.bias_silu(z, torch.randn(4)) is None  # NCHW: PyTorch's ops
    assert fused_ops.bias_silu(z.to(torch.float16).contiguous(memory_format=torch.channels_last),
                               torch.randn(4)) is None
    assert fused_ops.bias_silu(torch.randn(2, 4, 3), torch.randn(4)) is None


def test_a_qat_student_step_gives_the_same_loss_and_gradients_with_the_bias_silu_kernel(monkeypatch):
    """Every fused Conv / RepConvN of a quantized model (QuantConv2d: quantizers in the path) goes through
    bias_silu in a pass recorded into a CUDA graph (not in an eager one); that step matches the eager step."""
    from models.quantize import calibrate, prepare, set_trainable
    from models.yolo import DetectionModel
    from tests.qat_helpers import one_thread
    from utils.paths import ROOT

    with one_thread():
        torch.manual_seed(0)
        model = DetectionModel(str(ROOT / "tests" / "assets" / "gelan-tiny.yaml"), nc=1)
        imgs = torch.rand(1, 3, 32, 64).contiguous(memory_format=torch.channels_last)  # non-square
        student = prepare(model)
        calibrate(student, [imgs])
        student = set_trainable(student).train().to(memory_format=torch.channels_last)
        calls, calls_per_pass = [], []
        kernel = fused_ops.bias_silu
        monkeypatch.setattr(fused_ops, "bias_silu", lambda z, b: calls.append(z.shape) or kernel(z, b))
        results = []
        monkeypatch.setattr(fused_ops, "usable", lambda x: x.dtype in fused_ops.DTYPES)
        for other in ("fake_quant_int8", "straight_through", "blur2x2"):  # PyTorch's ops: the interpreter is slow
            monkeypatch.setattr(fused_ops, other, lambda *args, **kwargs: None)
        for kernels in (False, True):  # a pass recorded into a CUDA graph uses the kernel, an eager one does not
            student.zero_grad()
            with fused_ops.graph_recording() if kernels else contextlib.nullcontext():
                out = student(imgs)
            loss = sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple)) else [out])
                       if isinstance(o, torch.Tensor))
            loss.backward()
            results.append((loss.detach(), torch.cat([p.grad.flatten() for p in student.parameters()
                                                      if p.grad is not None])))
            calls_per_pass.append(len(calls) - sum(calls_per_pass))
    assert calls_per_pass[0] == 0 < calls_per_pass[1]  # eager: PyTorch's ops; recorded: the kernel
    (loss_ref, grads_ref), (loss_k, grads_k) = results
    assert torch.allclose(loss_k, loss_ref, rtol=1e-5)
    assert (grads_k - grads_ref).norm() <= 1e-4 * grads_ref.norm()
