"""Device selection and small torch helpers shared by training, evaluation and export."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.logs import LOGGER


def select_device(device: str | int | torch.device | None = "") -> torch.device:
    """Turn upstream's ``--device`` value ('', 'cpu', '0', '0,1', 'cuda:1') into a torch device.

    Asking for a GPU where none exists is a user error, not a silent fall-back to the CPU:
    a QAT run that quietly lands on the CPU would take days.
    """
    if isinstance(device, torch.device):
        return device
    spec = str(device if device is not None else "").strip().lower().replace("cuda:", "")
    if spec in ("", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    ids = [s for s in spec.split(",") if s]
    if not all(s.isdigit() for s in ids):
        raise UserError(f"--device {device!r}: expected 'cpu', a GPU index like 0, or a list like 0,1")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    bad = [i for i in ids if int(i) >= count]
    if bad:
        raise UserError(f"--device {device}: GPU {bad[0]} does not exist (this machine has {count})")
    local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if local_rank >= 0:  # torchrun: each process drives the GPU of its local rank
        return torch.device("cuda", local_rank)
    return torch.device("cuda", int(ids[0]))


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """PyTorch's CPU thread count set to ``n`` for the block, then restored. Tiny convolutions run
    faster on one thread than split across the cores of a small machine that other jobs share."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(n, 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero on the CPU for the block, then PyTorch's default again. Training
    from scratch leaves denormals (below 1.2e-38) in gradients and optimizer moments, each a slow path on
    x86: flushing them cut the demo model's CPU training step by about 13% (BENCHMARKS.md, "The demo").
    No weight, activation or INT8 scale of a trained model lives that close to zero."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def de_parallel(model: nn.Module) -> nn.Module:
    """The plain model inside a DataParallel / DistributedDataParallel wrapper."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One biased conv equal to ``bn(conv(x))`` with BN in eval mode (its running statistics)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    fused = fused.requires_grad_(False).to(device=conv.weight.device, dtype=conv.weight.dtype)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def initialize_weights(model: nn.Module) -> None:
    """YOLO's BatchNorm settings (eps 1e-3, momentum 0.03) and in-place activations."""
    for m in model.modules():
        t = type(m)
        if t is nn.BatchNorm2d:
            m.eps = 1e-3
            m.momentum = 0.03
        elif t in (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU):
            m.inplace = True


def _thop_ops(m: nn.Module, out: torch.Tensor) -> int:
    """Operations per image of one layer, counted the way thop (upstream's FLOPs counter) does."""
    per_image = out.numel() // out.shape[0]
    if isinstance(m, nn.Conv2d):
        return per_image * (m.in_channels // m.groups) * m.weight[0, 0].numel()
    if isinstance(m, nn.BatchNorm2d):
        return per_image * (4 if m.affine else 2)
    if isinstance(m, nn.Upsample):
        return per_image
    return 0


def count_gflops(model: nn.Module, imgsz: int | tuple[int, int] = 640) -> float:
    """GFLOPs at ``imgsz`` as upstream YOLOv9 reports them: 2 x thop's operation count.

    thop counts a convolution's multiply-adds, four per element of an affine BatchNorm, one per
    output element of an Upsample, and nothing for activations, functional pooling or bias adds.
    The model runs once on an input of its largest stride and the count is scaled to ``imgsz``,
    which is exact because every feature map scales with the input.
    """
    h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    p = next(model.parameters())
    stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
    ops = 0

    def hook(m: nn.Module, _inp, out: torch.Tensor) -> None:
        nonlocal ops
        ops += _thop_ops(m, out)

    counted = (nn.Conv2d, nn.BatchNorm2d, nn.Upsample)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, counted)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, p.shape[1], stride, stride, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return 2 * ops / 1e9 * (h / stride) * (w / stride)


def model_info(model: nn.Module, verbose: bool = False, imgsz: int | tuple[int, int] = 640) -> dict:
    """Layer, parameter and gradient counts and GFLOPs at ``imgsz``; logged as one summary line."""
    info = {
        "layers": len(list(model.modules())),
        "parameters": sum(p.numel() for p in model.parameters()),
        "gradients": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops": count_gflops(model, imgsz),
    }
    if verbose:
        for name, p in model.named_parameters():
            LOGGER.info(f"{name:>60} {str(p.requires_grad):>6} {p.numel():>10} {str(list(p.shape)):>20}")
    name = getattr(model, "yaml_file", None) or type(model).__name__
    LOGGER.info(f"{name} summary: {info['layers']} layers, {info['parameters']} parameters, "
                f"{info['gradients']} gradients, {info['gflops']:.1f} GFLOPs")
    return info
