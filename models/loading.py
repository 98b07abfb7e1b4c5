"""Loading a ready-to-run model from any checkpoint kind users bring.

Kinds: upstream / our training checkpoints ({'model', 'ema', ...}, fp16 modules), upstream
'converted' checkpoints ({'model': gelan module, 'ema': None, ...}), a bare pickled model, and
plain state dicts (``{'model.0.conv.weight': tensor, ...}``, optionally under 'model' /
'state_dict'), which need the model YAML (``cfg``) to build the network first, and PTQ/QAT
checkpoints ('model' None, the quantized model as plain data under 'quant'), rebuilt already fused.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from utils.checkpoint import load_checkpoint
from utils.errors import UserError


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _state_dict_of(ckpt: dict) -> dict | None:
    for candidate in (ckpt, ckpt.get("ema"), ckpt.get("model"), ckpt.get("state_dict")):
        if _is_state_dict(candidate):
            return candidate
    return None


def _nc_of(state_dict: dict) -> int | None:
    """Class count read from the last class-tower conv of the head (``...cv3.<i>.2.weight``)."""
    cls_convs = [k for k in state_dict if k.endswith(".2.weight") and ".cv3." in k]
    return int(state_dict[cls_convs[-1]].shape[0]) if cls_convs else None


def model_from_checkpoint(ckpt: dict, source: str | Path = "checkpoint", cfg: str | Path | dict | None = None
                          ) -> nn.Module:
    """The fp32 model inside a loaded checkpoint: its EMA if present, else 'model'; a state dict is
    loaded into ``Model(cfg)`` (a SegmentationModel for a segmentation YAML); a PTQ/QAT
    checkpoint's quantized model is rebuilt."""
    if isinstance(ckpt.get("quant"), dict):  # utils.quantization.checkpoint's format; imports Model Optimizer
        from models.quantize import build_quantized

        return build_quantized(ckpt["quant"])
    for key in ("ema", "model"):
        if isinstance(ckpt.get(key), nn.Module):
            return ckpt[key].float()
    state_dict = _state_dict_of(ckpt)
    if state_dict is None:
        raise UserError(f"{source}: no model in this checkpoint (keys: {', '.join(map(str, list(ckpt)[:8]))})")
    if cfg is None:
        raise UserError(f"{source}: holds only a state dict; pass the model YAML too (--cfg)")
    from models.yolo import Model

    model = Model(cfg, nc=_nc_of(state_dict))
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{source}: does not fit {cfg} ({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model


def _class_attributes(model: nn.Module) -> None:
    """``nc`` and ``names`` for a model pickled without them (e.g. saved by hand from ``Model(cfg)``,
    which only training sets them on): the class count from its head, the names from its YAML
    when it lists one per class, else the class indices."""
    head = model.model[-1] if isinstance(getattr(model, "model", None), nn.Sequential) else None
    if getattr(model, "nc", None) is None and head is not None and hasattr(head, "nc"):
        model.nc = int(head.nc)
    if getattr(model, "names", None) is None and getattr(model, "nc", None) is not None:
        listed = (getattr(model, "yaml", None) or {}).get("names")
        fits = isinstance(listed, (list, tuple, dict)) and len(listed) == model.nc
        model.names = (list(listed.values()) if isinstance(listed, dict) else list(listed)) if fits \
            else [str(i) for i in range(model.nc)]


def _upgrade(model: nn.Module, inplace: bool) -> None:
    """Attribute fixes for modules pickled by older code / torch releases (as upstream does)."""
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    _class_attributes(model)
    if isinstance(getattr(model, "names", None), (list, tuple)):
        model.names = dict(enumerate(model.names))
    for m in model.modules():
        if isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = inplace
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None


def attempt_load(weights: str | Path | list, device: str | torch.device | None = None, inplace: bool = True,
                 fuse: bool = True, unsafe: bool = False, cfg: str | Path | dict | None = None) -> nn.Module:
    """An fp32 model in eval mode from a checkpoint file, fused for inference unless ``fuse=False``.

    ``names`` becomes a dict {index: name} like upstream's loader. ``cfg`` is needed only for
    plain state dicts. ``unsafe`` allows full unpickling (see utils.checkpoint).
    """
    if isinstance(weights, (list, tuple)):
        if len(weights) != 1:
            raise UserError(f"{', '.join(map(str, weights))}: model ensembles are not supported; pass one file")
        weights = weights[0]
    return ready_model(load_checkpoint(weights, unsafe=unsafe), weights, device, inplace, fuse, cfg)


def ready_model(ckpt: dict, source: str | Path, device: str | torch.device | None = None, inplace: bool = True,
                fuse: bool = True, cfg: str | Path | dict | None = None) -> nn.Module:
    """``attempt_load`` of a checkpoint already read, for callers that inspect it first: a safe
    load of a pickled module is the slow part (0.5 s for the demo's 2 MB model on 2 CPU cores)."""
    model = model_from_checkpoint(ckpt, source, cfg)
    _upgrade(model, inplace)
    if device is not None:
        model = model.to(device)
    if fuse and hasattr(model, "fuse") and not hasattr(model, "quant_info"):  # quantized: fused when built
        # Upstream's fuse_conv_and_bn (in a patched upstream checkout) records autograd history: without
        # no_grad the fused weights are non-leaf tensors that QAT can neither train nor deep-copy.
        with torch.no_grad():
            model = model.fuse()
    return model.eval()
