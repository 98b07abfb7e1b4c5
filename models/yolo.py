"""Detection and segmentation heads and the YAML-described YOLOv9 / GELAN models.

Head classes keep upstream's names and attributes (``cv2``..``cv7``, ``dfl``, ``dfl2``, ``proto``...)
because those are the keys of upstream state dicts and the names inside upstream pickles.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import math
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from models.common import (
    DFL,
    ELAN1,
    MP,
    SP,
    SPPCSPC,
    SPPELAN,
    AConv,
    ADown,
    Bottleneck,
    CBFuse,
    CBLinear,
    Concat,
    Conv,
    DWConv,
    Proto,
    RepConvN,
    RepNBottleneck,
    RepNCSP,
    RepNCSPELAN4,
    Silence,
    make_divisible,
)
from models.config import load_config, resolve_config
from utils.errors import UserError
from utils.tal.anchor_generator import dist2bbox, make_anchors
from utils.torch_utils import LOGGER, initialize_weights, model_info

UPSTREAM_STRIDE_PROBE = 256  # input size upstream measures a new model's strides at (DetectionModel._measure_strides)


# ----------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------


def _unwrap(items: list):
    """A single branch's value as is, several as a list (upstream's output nesting)."""
    return items[0] if len(items) == 1 else items


def _numbered(name: str, b: int) -> str:
    """Upstream's attribute name of branch ``b``'s copy of a head part: 'dfl', 'dfl2', 'proto', 'proto2'."""
    return name if b == 0 else f"{name}{b + 1}"


class Detect(nn.Module):
    """Anchor-free head: per level a box tower (4 x reg_max DFL logits) and a class tower.

    Multi-branch subclasses (Dual, Triple) read ``branches`` groups of ``nl`` input levels; branch
    ``b`` owns the towers ``cv{2+2b}`` / ``cv{3+2b}`` and the integral ``dfl`` / ``dfl{b+1}``.
    ``outputs`` lists the branches decoded in eval mode.
    """

    dynamic = False  # recompute anchors on every call (export with dynamic shapes)
    export = False  # eval forward returns only the decoded prediction
    shape = None
    anchors = torch.empty(0)
    strides = torch.empty(0)
    branches = 1
    outputs: tuple[int, ...] = (0,)
    grouped_box_convs = False

    def __init__(self, nc=80, ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.nl = len(ch) // self.branches
        self.reg_max = 16
        self.no = nc + self.reg_max * 4
        self.inplace = inplace
        self.stride = torch.zeros(self.nl)
        for b in range(self.branches):
            level_ch = ch[b * self.nl:(b + 1) * self.nl]
            setattr(self, f"cv{2 + 2 * b}", nn.ModuleList(self._box_tower(c, level_ch[0]) for c in level_ch))
            setattr(self, f"cv{3 + 2 * b}", nn.ModuleList(self._cls_tower(c, level_ch[0]) for c in level_ch))
        for b in range(self.branches):
            setattr(self, _numbered("dfl", b), DFL(self.reg_max))

    @staticmethod
    def _tower(c_in: int, c: int, c_out: int, g: int = 1) -> nn.Sequential:
        """Two 3x3 Convs of width ``c`` and a 1x1 prediction conv: every per-level tower of the heads."""
        return nn.Sequential(Conv(c_in, c, 3), Conv(c, c, 3, g=g), nn.Conv2d(c, c_out, 1, groups=g))

    def _box_tower(self, c_in: int, c_first: int) -> nn.Sequential:
        c = max(c_first // 4, self.reg_max * 4, 16)
        if self.grouped_box_convs:
            return self._tower(c_in, make_divisible(c, 4), 4 * self.reg_max, g=4)
        return self._tower(c_in, c, 4 * self.reg_max)

    def _cls_tower(self, c_in: int, c_first: int) -> nn.Sequential:
        return self._tower(c_in, max(c_first, min(self.nc * 2, 128)), self.nc)

    def branch(self, b: int) -> tuple[nn.ModuleList, nn.ModuleList, DFL]:
        """Box towers, class towers and DFL of branch ``b`` (0 = first / auxiliary)."""
        return getattr(self, f"cv{2 + 2 * b}"), getattr(self, f"cv{3 + 2 * b}"), getattr(self, _numbered("dfl", b))

    def level_features(self, train_out) -> list[torch.Tensor]:
        """The first branch's per-level maps inside this head's training-mode output."""
        return train_out if self.branches == 1 else train_out[0]

    def branch_inputs(self, b: int) -> list[int]:
        """Positions in this head's input list (its ``f``) that branch ``b`` reads."""
        return list(range(b * self.nl, (b + 1) * self.nl))

    def forward(self, x: list[torch.Tensor]):
        feats = []
        for b in range(self.branches):
            box, cls, _ = self.branch(b)
            levels = x[b * self.nl:(b + 1) * self.nl]
            feats.append([torch.cat((box[i](xi), cls[i](xi)), 1) for i, xi in enumerate(levels)])
        if self.training:
            return _unwrap(feats)
        if self.dynamic or self.shape != x[0].shape:
            self.anchors, self.strides = (t.transpose(0, 1) for t in make_anchors(feats[0], self.stride, 0.5))
            self.shape = x[0].shape
        y = _unwrap([self._decode(feats[b], self.branch(b)[2]) for b in self.outputs])
        return y if self.export else (y, _unwrap([feats[b] for b in self.outputs]))

    def _decode(self, feats: list[torch.Tensor], dfl: DFL) -> torch.Tensor:
        """(B, 4 + nc, anchors): xywh boxes in input pixels and sigmoid class scores."""
        box, cls = torch.cat([f.view(f.shape[0], self.no, -1) for f in feats], 2).split((self.reg_max * 4, self.nc), 1)
        dbox = dist2bbox(dfl(box), self.anchors.unsqueeze(0), xywh=True, dim=1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)

    def bias_init(self) -> None:
        """Box logits start at 1; class logits at the prior of ~5 objects per 640 image. Needs ``stride``."""
        for b in range(self.branches):
            box, cls, _ = self.branch(b)
            for a, c, s in zip(box, cls, self.stride):
                a[-1].bias.data[:] = 1.0
                c[-1].bias.data[:self.nc] = math.log(5 / self.nc / (640 / s) ** 2)


class DDetect(Detect):
    """Detect with grouped (g=4) box convolutions: the YOLOv9 / GELAN head."""

    grouped_box_convs = True


class DualDetect(Detect):
    """Two heads: inputs are (auxiliary levels..., main levels...); eval returns both predictions."""

    branches = 2
    outputs = (0, 1)

    def forward(self, x: list[torch.Tensor]):
        # A function of its own, named DualDetect.forward, so that a DualDSegment pickled here names
        # it as its ``detect`` (see SegmentHead): upstream's code calls that for the dual boxes.
        return super().forward(x)


class DualDDetect(DualDetect):
    """DualDetect with grouped box convolutions (YOLOv9 with programmable gradient information)."""

    grouped_box_convs = True


class TripleDDetect(DDetect):
    """Three heads (upstream yolov9-cf); eval returns only the last (main) prediction."""

    branches = 3
    outputs = (2,)


class SegmentHead:
    """Instance masks added to a Detect head (mixed in before it).

    Per branch ``b``: mask-coefficient towers ``cv{2 + 2 * branches + b}`` (``nm`` per anchor, after
    the box and class towers) and a prototype layer ``proto`` / ``proto2`` giving ``nm`` masks;
    an instance mask is sigmoid(coefficients . prototypes). Outputs, as upstream's:

    - training: ``(detect_out, coefficients, prototypes)``: Detect's training output, (B, nm, anchors)
      and (B, nm, Hp, Wp) tensors, each a list over branches for a dual head;
    - eval: ``(cat(prediction, coefficients), (level maps, coefficients, prototypes))`` of the one
      branch in ``outputs``: (B, 4 + nc + nm, anchors) first;
    - export: ``(cat(prediction, coefficients), prototypes)``.
    """

    extra_proto_inputs = False  # prototypes read extra input layers (one per branch, listed last)

    def __init__(self, nc=80, nm=32, npr=256, ch=(), inplace=True):
        det_ch = ch[:len(ch) - self.branches] if self.extra_proto_inputs else ch
        super().__init__(nc, det_ch, inplace)
        self.nm = nm
        self.npr = npr
        for b in range(self.branches):
            first_level = det_ch[b * self.nl]
            proto = Conv(ch[len(det_ch) + b], nm, 1) if self.extra_proto_inputs else Proto(first_level, npr, nm)
            setattr(self, _numbered("proto", b), proto)
        for b in range(self.branches):
            level_ch = det_ch[b * self.nl:(b + 1) * self.nl]
            c = max(level_ch[0] // 4, nm)
            setattr(self, f"cv{2 + 2 * self.branches + b}", nn.ModuleList(self._tower(x, c, nm) for x in level_ch))
        # Upstream's forward runs the boxes through this attribute; our forward does not need it,
        # but upstream code running a model pickled here does.
        self.detect = super().forward.__func__

    def mask_branch(self, b: int) -> tuple[nn.ModuleList, nn.Module]:
        """Mask-coefficient towers and prototype layer of branch ``b``."""
        return getattr(self, f"cv{2 + 2 * self.branches + b}"), getattr(self, _numbered("proto", b))

    def _masks(self, x: list[torch.Tensor], b: int) -> tuple[torch.Tensor, torch.Tensor]:
        towers, proto = self.mask_branch(b)
        levels = x[b * self.nl:(b + 1) * self.nl]
        coefficients = torch.cat([t(xi).flatten(2) for t, xi in zip(towers, levels)], 2)
        return coefficients, proto(x[self.nl * self.branches + b] if self.extra_proto_inputs else levels[0])

    def forward(self, x: list[torch.Tensor]):
        det = super().forward(x[:self.nl * self.branches])
        # Every branch runs in eval too, as upstream's (its GFLOPs count them); export drops the unused.
        coefficients, prototypes = (list(t) for t in zip(*(self._masks(x, b) for b in range(self.branches))))
        if self.training:
            return det, _unwrap(coefficients), _unwrap(prototypes)
        b = self.outputs[0]
        if self.export:
            return torch.cat((det, coefficients[b]), 1), prototypes[b]
        prediction, levels = det
        return torch.cat((prediction, coefficients[b]), 1), (levels, coefficients[b], prototypes[b])

    def level_features(self, train_out) -> list[torch.Tensor]:
        return super().level_features(train_out[0])

    def branch_inputs(self, b: int) -> list[int]:
        extra = [self.nl * self.branches + b] if self.extra_proto_inputs else []
        return super().branch_inputs(b) + extra


class Segment(SegmentHead, Detect):
    """Detect with instance masks; a Proto on the first (stride-8) level makes the prototypes."""


class DSegment(SegmentHead, DDetect):
    """DDetect with instance masks; a 1x1 Conv on one extra input layer makes the prototypes."""

    extra_proto_inputs = True


class DualDSegment(SegmentHead, DualDDetect):
    """DualDDetect with instance masks on both branches; eval decodes only the main one (upstream)."""

    extra_proto_inputs = True
    outputs = (1,)


SEGMENT_HEADS = (Segment, DSegment, DualDSegment)
HEADS = (Detect, DDetect, DualDetect, DualDDetect, TripleDDetect, *SEGMENT_HEADS)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class BaseModel(nn.Module):
    """A ``nn.Sequential`` of layers, each reading the layer(s) named by its ``f`` ('from')."""

    def forward(self, x: torch.Tensor):
        outputs = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

    def fuse(self) -> "BaseModel":
        """Fold BatchNorms into convolutions and merge RepConvN branches, in place (inference only)."""
        for m in self.model.modules():
            if isinstance(m, RepConvN):
                m.fuse_convs()
            elif isinstance(m, Conv):
                m.fuse()
        self._log_summary()
        return self

    def info(self, verbose: bool = False, img_size: int = 640) -> dict:
        return model_info(self, verbose, img_size)

    def _log_summary(self) -> None:
        """Upstream's summary line after building and fusing. Counting GFLOPs runs the model once, so
        it is skipped where the line would not be shown (a library caller without INFO logging)."""
        if LOGGER.isEnabledFor(logging.INFO):
            self.info()

    def _apply(self, fn, *args, **kwargs):
        # stride / anchors are plain tensor attributes of the head, not buffers; move them too.
        self = super()._apply(fn, *args, **kwargs)
        head = self.model[-1]
        if isinstance(head, Detect):
            head.stride = fn(head.stride)
            head.anchors = fn(head.anchors)
            head.strides = fn(head.strides)
        return self


class DetectionModel(BaseModel):
    """YOLO detection model built from a YAML description (a path, a bundled name or a dict)."""

    def __init__(self, cfg: str | Path | dict = "yolov9-c.yaml", ch: int = 3, nc: int | None = None, anchors=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = cfg
        else:
            path = resolve_config(cfg)
            self.yaml_file = path.name
            self.yaml = load_config(path)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:  # accepted for upstream call compatibility; anchor-free heads ignore it
            self.yaml["anchors"] = round(anchors)
        self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.nc = self.yaml["nc"]
        self.inplace = self.yaml.get("inplace", True)

        head = self.model[-1]
        if isinstance(head, Detect):
            head.inplace = self.inplace
            self.stride = head.stride = self._measure_strides(ch)
            head.bias_init()
        initialize_weights(self)
        self._log_summary()

    def _measure_strides(self, ch: int, s: int = 64) -> torch.Tensor:
        """Strides of the head's levels from one training-mode forward pass on an s x s input.

        Upstream measures at 256 px. Any size whose coarsest map keeps 2 rows gives the same strides,
        and 64 px costs a sixth of the time (yolov9-e: 0.26 s against 1.75 s on one CPU thread); a head
        too coarse for it (a 1-row map, or BatchNorm refusing a 1 x 1 one) is measured at upstream's
        256 px. The pass also moves the fresh model's BatchNorm running statistics: on the zero input
        by the same amount at any size, except after a layer with a bias (yolov9-c/m/e's CBLinear, some
        of gelan-e's layers), where these untrained statistics differ from upstream's; a checkpoint or
        any training replaces them."""
        try:
            with torch.no_grad():
                levels = self.model[-1].level_features(self.forward(torch.zeros(1, ch, s, s)))
        except ValueError:  # BatchNorm in training mode: "Expected more than 1 value per channel"
            if s >= UPSTREAM_STRIDE_PROBE:
                raise
            levels = None
        if s < UPSTREAM_STRIDE_PROBE and (levels is None or min(f.shape[-2] for f in levels) < 2):
            return self._measure_strides(ch, UPSTREAM_STRIDE_PROBE)
        return torch.tensor([s / f.shape[-2] for f in levels])


class SegmentationModel(DetectionModel):
    """A model whose head also predicts instance masks (upstream's class, named in its checkpoints)."""

    def __init__(self, cfg: str | Path | dict = "gelan-c-seg.yaml", ch: int = 3, nc: int | None = None,
                 anchors=None):
        super().__init__(cfg, ch, nc, anchors)
        head = self.model[-1]
        if not isinstance(head, SegmentHead):
            raise UserError(f"{getattr(self, 'yaml_file', 'model config')}: head is {type(head).__name__}, "
                            f"not a segmentation head ({', '.join(h.__name__ for h in SEGMENT_HEADS)})")


def Model(cfg: str | Path | dict = "yolov9-c.yaml", ch: int = 3, nc: int | None = None,  # noqa: N802
          anchors=None) -> DetectionModel:
    """Upstream's name for building a model: a SegmentationModel when the YAML's head is a
    segmentation head, else a DetectionModel."""
    d = cfg if isinstance(cfg, dict) else load_config(resolve_config(cfg))
    last = d["head"][-1] if d.get("head") else None
    is_segment = isinstance(last, list) and len(last) > 2 and MODULES.get(str(last[2])) in SEGMENT_HEADS
    return (SegmentationModel if is_segment else DetectionModel)(cfg, ch, nc, anchors)


# ----------------------------------------------------------------------------------------------
# YAML parsing
# ----------------------------------------------------------------------------------------------

# Module names a model YAML may use. Upstream eval()s these strings; here they are looked up.
MODULES: dict[str, type[nn.Module]] = {
    m.__name__: m
    for m in (Conv, DWConv, AConv, ADown, RepConvN, Bottleneck, RepNBottleneck, RepNCSP, ELAN1, RepNCSPELAN4,
              SP, MP, SPPELAN, SPPCSPC, Concat, Silence, CBLinear, CBFuse, *HEADS)
}
MODULES.update({f"nn.{m.__name__}": m for m in (nn.Upsample, nn.MaxPool2d, nn.BatchNorm2d, nn.Identity)})

# Layers whose first argument is their output channel count (scaled by width_multiple).
_CHANNEL_FIRST = {Conv, DWConv, AConv, ADown, Bottleneck, ELAN1, RepNCSPELAN4, SPPELAN, SPPCSPC}

# Activations a YAML 'activation:' entry may name, e.g. "nn.ReLU()" or "nn.LeakyReLU(0.1)".
_ACTIVATIONS = {m.__name__: m for m in (nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Mish,
                                         nn.GELU, nn.Sigmoid, nn.Tanh, nn.Identity)}


def parse_activation(spec: str) -> nn.Module:
    """Build an activation from text like 'nn.LeakyReLU(0.1)' without eval: only listed classes
    and literal arguments are accepted."""
    try:
        call = ast.parse(spec.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and isinstance(call.func.value, ast.Name) and call.func.value.id == "nn"):
            raise ValueError
        cls = _ACTIVATIONS[call.func.attr]
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, KeyError) as exc:
        raise UserError(f"activation {spec!r}: expected nn.<Activation>(literal args), "
                        f"one of {sorted(_ACTIVATIONS)}") from exc
    return cls(*args, **kwargs)


@contextlib.contextmanager
def _default_activation(act: nn.Module | None) -> Iterator[None]:
    """Use ``act`` as the default activation of Conv / RepConvN while one model is built."""
    saved = Conv.default_act, RepConvN.default_act
    if act is not None:
        Conv.default_act = RepConvN.default_act = act
    try:
        yield
    finally:
        Conv.default_act, RepConvN.default_act = saved


def _resolve_arg(a: Any, names: dict[str, Any]) -> Any:
    """YAML arguments are literals or a few names upstream eval()s: 'None', 'nc', 'anchors'."""
    return names.get(a, a) if isinstance(a, str) else a


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Layers and the sorted indices whose outputs later layers read, from a model dict."""
    nc, gd, gw = d["nc"], d.get("depth_multiple", 1.0), d.get("width_multiple", 1.0)
    anchors = d.get("anchors")
    na = (len(anchors[0]) // 2 if isinstance(anchors, list) else anchors) or 0
    no = na * (nc + 5)  # an anchor-based output width that must not be width-scaled (upstream rule)
    act = parse_activation(d["activation"]) if d.get("activation") else None
    names = {"None": None, "nc": nc, "anchors": anchors, "True": True, "False": False}

    layers, save, c2 = [], [], ch[-1]
    with _default_activation(act):
        for i, (f, n, m_name, args) in enumerate(d["backbone"] + d["head"]):
            m = MODULES.get(m_name) if isinstance(m_name, str) else None
            if m is None:
                raise UserError(f"layer {i}: unknown module {m_name!r} (known: {', '.join(sorted(MODULES))})")
            args = [_resolve_arg(a, names) for a in args]
            n = n_ = max(round(n * gd), 1) if n > 1 else n
            if m in _CHANNEL_FIRST:
                c1, c2 = ch[f], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m is SPPCSPC:
                    args.insert(2, n)
                    n = 1
            elif m is nn.BatchNorm2d:
                args = [ch[f]]
            elif m is Concat:
                c2 = sum(ch[x] for x in f)
            elif m is CBLinear:
                c2 = args[0]
                args = [ch[f], c2, *args[1:]]
            elif m is CBFuse:
                c2 = ch[f[-1]]
            elif m in HEADS:
                args.append([ch[x] for x in f])
                if m in SEGMENT_HEADS:  # the prototype width scales like a layer's (upstream rule)
                    args[2] = make_divisible(args[2] * gw, 8)
            else:
                c2 = ch[f]

            m_ = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
            m_.i, m_.f, m_.type = i, f, f"{m.__module__}.{m.__qualname__}"
            m_.np = sum(x.numel() for x in m_.parameters())
            LOGGER.debug(f"{i:>3}{str(f):>18}{n_:>3}{m_.np:10.0f}  {m_.type:<40}{str(args):<30}")
            save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m_)
            if i == 0:
                ch = []
            ch.append(c2)
    return nn.Sequential(*layers), sorted(save)
