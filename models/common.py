"""Building blocks of the YOLOv9 / GELAN detection and segmentation models.

Class names, constructor arguments and attribute names (``cv1``, ``m``, ``c``, ``conv``, ``bn``...)
are upstream YOLOv9's on purpose: they are the keys of every upstream state dict and the names
inside every pickled upstream checkpoint, so they must not change. This module stays a single file
so that ``models.common.Conv`` resolves for those pickles; it is grouped by family instead.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import fused_ops
from utils.torch_utils import fuse_conv_and_bn


def autopad(k: int | Sequence[int], p: int | Sequence[int] | None = None, d: int = 1) -> int | list[int]:
    """Padding that keeps the spatial size for stride 1 ('same'), honouring dilation."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def make_divisible(x: float, divisor: int) -> int:
    """Smallest multiple of ``divisor`` that is >= ``x`` (channel counts after width scaling)."""
    return int(math.ceil(x / divisor) * divisor)


# ----------------------------------------------------------------------------------------------
# Convolutions
# ----------------------------------------------------------------------------------------------


def conv_then_act(conv: nn.Conv2d, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(conv(x))`` of a fused (biased) convolution. In a pass recorded into a CUDA graph, where the
    fused CUDA kernels are usable and the activation is SiLU, the bias and SiLU take one kernel each way
    (models/fused_ops.bias_silu) instead of PyTorch's broadcast add and SiLU; a quantized convolution
    quantizes its input and weights as ever. Eager passes keep PyTorch's ops: on the H200 the kernel's
    launches from Python made an eager QAT step slower (gelan-s 203 -> 349 ms), a graphed one faster."""
    if type(act) is nn.SiLU and conv.bias is not None and fused_ops.in_graph_recording() and fused_ops.usable(x):
        without_bias = conv.conv_forward(x, None) if hasattr(conv, "conv_forward") else \
            conv._conv_forward(x, conv.weight, None)
        return fused_ops.biased_silu(without_bias, conv.bias)
    return act(conv(x))


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation; after ``fuse`` the BN is folded into the conv."""

    default_act = nn.SiLU()  # a yaml 'activation:' swaps this while that model is built

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "bn" not in self._modules:  # fused
            return self.forward_fuse(x)
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return conv_then_act(self.conv, self.act, x)

    def fuse(self) -> None:
        """Fold the BatchNorm into the convolution (inference only)."""
        if "bn" in self._modules:
            self.conv = fuse_conv_and_bn(self.conv, self.bn)
            del self.bn


class DWConv(Conv):
    """Depth-wise convolution (groups = gcd of the channel counts)."""

    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=math.gcd(c1, c2), d=d, act=act)


class AConv(nn.Module):
    """Down-sampling: 2x2 average blur, then a stride-2 3x3 Conv."""

    def __init__(self, c1, c2):
        super().__init__()
        self.cv1 = Conv(c1, c2, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv1(fused_ops.average_blur(x))


class ADown(nn.Module):
    """Down-sampling in two halves: a stride-2 3x3 Conv and a max-pool + 1x1 Conv, concatenated."""

    def __init__(self, c1, c2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1 // 2, self.c, 3, 2, 1)
        self.cv2 = Conv(c1 // 2, self.c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = fused_ops.average_blur(x).chunk(2, 1)
        return torch.cat((self.cv1(x1), self.cv2(F.max_pool2d(x2, 3, 2, 1))), 1)


class RepConvN(nn.Module):
    """Re-parameterisable 3x3 conv: a 3x3 and a 1x1 Conv+BN branch summed; ``fuse_convs`` merges them.

    ``bn`` is the identity branch of RepVGG; YOLOv9 never uses it but upstream pickles carry the
    attribute (always None), so it is kept, as are the unused ``bn`` / ``deploy`` arguments.
    """

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, d=1, act=True, bn=False, deploy=False):
        super().__init__()
        if k != 3 or p != 1:
            raise ValueError(f"RepConvN needs k=3, p=1 (got k={k}, p={p})")
        self.g = g
        self.c1 = c1
        self.c2 = c2
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()
        self.bn = None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "conv" in self._modules:  # fused
            return self.forward_fuse(x)
        return self.act(self.conv1(x) + self.conv2(x))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return conv_then_act(self.conv, self.act, x)

    def fuse_convs(self) -> None:
        """Replace both branches by one biased 3x3 convolution with the same output."""
        if "conv" in self._modules:
            return
        k3 = fuse_conv_and_bn(self.conv1.conv, self.conv1.bn)
        k1 = fuse_conv_and_bn(self.conv2.conv, self.conv2.bn)
        with torch.no_grad():
            k3.weight += F.pad(k1.weight, [1, 1, 1, 1])
            k3.bias += k1.bias
        self.conv = k3
        del self.conv1, self.conv2


# ----------------------------------------------------------------------------------------------
# Bottlenecks and CSP stages
# ----------------------------------------------------------------------------------------------


class _TwoConvBottleneck(nn.Module):
    """Two convolutions with an optional residual; subclasses choose the first convolution."""

    first_conv: type[nn.Module] = Conv

    def __init__(self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = self.first_conv(c1, c_, k[0], 1)
        self.cv2 = Conv(c_, c2, k[1], 1, g=g)
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class Bottleneck(_TwoConvBottleneck):
    """Conv -> Conv bottleneck."""


class RepNBottleneck(_TwoConvBottleneck):
    """RepConvN -> Conv bottleneck (the repeated unit of RepNCSP)."""

    first_conv = RepConvN


class RepNCSP(nn.Module):
    """CSP stage: one half through ``n`` RepNBottlenecks, the other straight, merged by a 1x1 Conv."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(RepNBottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


# ----------------------------------------------------------------------------------------------
# GELAN blocks
# ----------------------------------------------------------------------------------------------


class ELAN1(nn.Module):
    """Small ELAN: split a 1x1 Conv in two, chain two 3x3 Convs on the second half, concat all."""

    def __init__(self, c1, c2, c3, c4):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = Conv(c3 // 2, c4, 3, 1)
        self.cv3 = Conv(c4, c4, 3, 1)
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


class RepNCSPELAN4(nn.Module):
    """GELAN block: ELAN1 whose two chained stages are RepNCSP + 3x3 Conv (``c5`` bottlenecks each)."""

    def __init__(self, c1, c2, c3, c4, c5=1):
        super().__init__()
        self.c = c3 // 2
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = nn.Sequential(RepNCSP(c3 // 2, c4, c5), Conv(c4, c4, 3, 1))
        self.cv3 = nn.Sequential(RepNCSP(c4, c4, c5), Conv(c4, c4, 3, 1))
        self.cv4 = Conv(c3 + 2 * c4, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.append(self.cv2(y[-1]))
        y.append(self.cv3(y[-1]))
        return self.cv4(torch.cat(y, 1))


# ----------------------------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------------------------


class SP(nn.Module):
    """Max-pool that keeps the spatial size (stride 1)."""

    def __init__(self, k=3, s=1):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=s, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class MP(nn.Module):
    """Max-pool down-sampling by ``k``."""

    def __init__(self, k=2):
        super().__init__()
        self.m = nn.MaxPool2d(kernel_size=k, stride=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


class SPPELAN(nn.Module):
    """Spatial pyramid pooling as an ELAN: three chained 5x5 max-pools, all outputs concatenated."""

    def __init__(self, c1, c2, c3):
        super().__init__()
        self.c = c3
        self.cv1 = Conv(c1, c3, 1, 1)
        self.cv2 = SP(5)
        self.cv3 = SP(5)
        self.cv4 = SP(5)
        self.cv5 = Conv(4 * c3, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for pool in (self.cv2, self.cv3, self.cv4):
            y.append(pool(y[-1]))
        return self.cv5(torch.cat(y, 1))


class SPPCSPC(nn.Module):
    """CSP spatial pyramid pooling of YOLOv7 (used by upstream's yolov7-af.yaml)."""

    def __init__(self, c1, c2, n=1, shortcut=False, g=1, e=0.5, k=(5, 9, 13)):
        super().__init__()
        c_ = int(2 * c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(c_, c_, 3, 1)
        self.cv4 = Conv(c_, c_, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])
        self.cv5 = Conv(4 * c_, c_, 1, 1)
        self.cv6 = Conv(c_, c_, 3, 1)
        self.cv7 = Conv(2 * c_, c2, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.cv4(self.cv3(self.cv1(x)))
        y1 = self.cv6(self.cv5(torch.cat([x1] + [m(x1) for m in self.m], 1)))
        return self.cv7(torch.cat((y1, self.cv2(x)), 1))


# ----------------------------------------------------------------------------------------------
# Routing: joining layers of the graph
# ----------------------------------------------------------------------------------------------


class Concat(nn.Module):
    """Concatenate a list of tensors along ``dimension``."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(x, self.d)


class Silence(nn.Module):
    """Identity; lets a second backbone branch start again from the input image (layer 0)."""

    def forward(self, x):
        return x


class CBLinear(nn.Module):
    """One 1x1 conv whose output is split into several feature maps for CBFuse (CBNet routing)."""

    def __init__(self, c1, c2s, k=1, s=1, p=None, g=1):
        super().__init__()
        self.c2s = c2s
        self.conv = nn.Conv2d(c1, sum(c2s), k, s, autopad(k, p), groups=g, bias=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.conv(x).split(self.c2s, dim=1)


class CBFuse(nn.Module):
    """Sum the last input with picked CBLinear outputs resized (nearest) to its size."""

    def __init__(self, idx):
        super().__init__()
        self.idx = idx

    def forward(self, xs: list) -> torch.Tensor:
        size = xs[-1].shape[2:]
        resized = [F.interpolate(x[self.idx[i]], size=size, mode="nearest") for i, x in enumerate(xs[:-1])]
        return torch.sum(torch.stack(resized + xs[-1:]), dim=0)


# ----------------------------------------------------------------------------------------------
# Instance masks
# ----------------------------------------------------------------------------------------------


class Proto(nn.Module):
    """Prototype masks of the Segment head: 3x3 Conv, 2x nearest upsampling, 3x3 Conv, 1x1 Conv.

    Fed the stride-8 level, it returns ``c2`` prototypes at stride 4 that the per-anchor mask
    coefficients combine into instance masks.
    """

    def __init__(self, c1, c_=256, c2=32):
        super().__init__()
        self.cv1 = Conv(c1, c_, k=3)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.cv2 = Conv(c_, c_, k=3)
        self.cv3 = Conv(c_, c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(self.cv2(self.upsample(self.cv1(x))))


# ----------------------------------------------------------------------------------------------
# Box decoding
# ----------------------------------------------------------------------------------------------


class DFL(nn.Module):
    """Distribution Focal Loss integral: expected value of a softmax over ``c1`` distance bins."""

    def __init__(self, c1=17):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape  # (batch, 4 * c1, anchors)
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)
