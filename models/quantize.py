"""INT8 quantization of a YOLOv9 / GELAN detection model: our thin adapter over NVIDIA Model Optimizer.

The life of a quantized model:

1. ``prepare(model, skip_layers)`` fuses Conv+BN and RepConvN branches (``model.fuse()``), swaps
   every layer that has a quantized variant (``models.quant_modules``) except in ``skip_layers``
   and DFL, and ties input quantizers that must share a scale (``models.quantize_rules``).
2. ``calibrate(model, batches, method)`` sets weight ranges from the weights and activation ranges
   from real images (``max``, ``percentile``, ``mse`` or ``entropy``); ``collect_stats`` +
   ``load_amax`` do the same in two steps so several methods can be tried on one pass.
3. QAT fine-tunes the weights; ranges (``_amax`` buffers) stay fixed, as the anchor keeps them.
4. ``quant_state(model)`` / ``build_quantized(state)`` save and rebuild it from plain tensors,
   lists and dicts (``torch.load(weights_only=True)`` reads them): the model YAML, the fused
   state dict with every ``_amax``, the tie plan and the skipped layers.
"""
from __future__ import annotations

import contextlib
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from models.quant_modules import (
    CALIB_METHODS,
    FLOAT_ONLY,
    QuantConv2d,
    RangeCalibrator,
    TensorQuantizer,
    quantize_modules,
)
from models.quantize_rules import QuantPlan, derive_plan, input_quantizers
from utils.errors import UserError

STATE_VERSION = 1
DEFAULT_PERCENTILE = 99.999


@dataclass
class QuantInfo:
    """What a quantized model remembers about how it was made (kept as ``model.quant_info``)."""

    plan: QuantPlan
    skip_layers: list[int] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)  # method, percentile, batches


# ----------------------------------------------------------------------------------------------
# Preparing
# ----------------------------------------------------------------------------------------------


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def _example_input(model: nn.Module) -> torch.Tensor:
    s = int(max(model.stride)) * 2  # the smallest input on which every level has a 2x2 map
    p = next(model.parameters())
    return torch.zeros(1, model.yaml.get("ch", 3), s, s, device=p.device, dtype=p.dtype)


def parse_skip_layers(spec: str | Iterable[int] | None, n_layers: int, flag: str = "--skip-layers") -> list[int]:
    """'22,23' or [22, 23] -> sorted layer indices; negative indices count from the end. ``flag``
    names the option in errors."""
    if spec is None or spec == "":
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        try:
            i = int(item)
        except ValueError as exc:
            raise UserError(f"{flag} {spec}: {item!r} is not a layer index") from exc
        if not -n_layers <= i < n_layers:
            raise UserError(f"{flag} {spec}: layer {i} does not exist (the model has {n_layers})")
        out.add(i % n_layers)
    return sorted(out)


def prepare(model: nn.Module, skip_layers: str | Iterable[int] = (), plan: QuantPlan | None = None) -> nn.Module:
    """Quantize a detection model in place (fusing it first) and return it.

    ``plan`` comes from a checkpoint when rebuilding; otherwise it is derived from the graph of the
    fully quantized model, so that skipping layers never changes which scales are shared.
    """
    if is_quantized(model):
        raise ValueError("model is already quantized")
    with torch.no_grad():  # upstream's fuse builds the fused weights inside autograd otherwise
        model.float().eval().fuse()
    skip = parse_skip_layers(skip_layers, len(model.model))
    if plan is None and skip:  # the plan is the fully quantized model's, found on a copy
        probe = quantize_modules(deepcopy(model))
        plan = derive_plan(probe, _example_input(model))
    for i, layer in enumerate(model.model):
        if i not in skip:
            model.model[i] = quantize_modules(layer)
    if plan is None:  # nothing skipped: the model is fully quantized and its own probe
        plan = derive_plan(model, _example_input(model))
    _tie(model, plan)
    model.quant_info = QuantInfo(plan, skip)
    return model


def _reads_conv(model: nn.Module, site: str) -> bool:
    parent = site.rpartition(".")[0]
    return site.endswith(".input_quantizer") and isinstance(model.get_submodule(parent), QuantConv2d)


def _tie(model: nn.Module, plan: QuantPlan) -> None:
    """One quantizer object per group of sites; groups that feed no quantized conv are removed,
    since a scale that no INT8 conv consumes only costs TensorRT a reformat."""
    sites = input_quantizers(model)
    unknown = set(sites) - plan.sites()
    if unknown:
        raise ValueError(f"quantization plan does not cover {sorted(unknown)[:3]}... (model changed?)")
    for group in plan.groups:
        present = [s for s in group if s in sites]
        if not present:
            continue
        if not any(_reads_conv(model, s) for s in present):
            for s in present:
                model.set_submodule(s, nn.Identity())
            continue
        for s in present[1:]:
            model.set_submodule(s, sites[present[0]])


def set_trainable(model: nn.Module) -> nn.Module:
    """Let QAT train every weight and bias (fusing froze them); DFL's fixed integral stays frozen."""
    model.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, FLOAT_ONLY):
            m.requires_grad_(False)
    return model


def quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Every distinct quantizer (a tied one once)."""
    return [m for m in model.modules() if isinstance(m, TensorQuantizer)]


def float_conv_names(model: nn.Module) -> list[str]:
    """Convolutions left in floating point on purpose (skipped layers, DFL): export and lint read this."""
    return [n for n, m in model.named_modules() if type(m) is nn.Conv2d]


def layer_of(name: str) -> int | None:
    """Top-level layer index of a module path 'model.<i>....'."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "model" and parts[1].isdigit() else None


# ----------------------------------------------------------------------------------------------
# Switching quantization on and off
# ----------------------------------------------------------------------------------------------


def set_quantization(module: nn.Module, enabled: bool) -> None:
    """Switch every quantizer under ``module`` on or off. Tied quantizers are one object, so
    switching one also switches the sites in other layers that share its scale."""
    for q in quantizers(module):
        q.enable() if enabled else q.disable()


@contextlib.contextmanager
def quantization_disabled(module: nn.Module, activations_only: bool = False) -> Iterator[nn.Module]:
    """Run ``module`` in floating point for the duration (e.g. the FP32 reference of the same weights),
    or with ``activations_only`` its INT8 weights on float activations (what the activations cost)."""
    qs = [q for q in quantizers(module) if not (activations_only and q.axis is not None)]  # weights: per channel
    before = [q._disabled for q in qs]
    for q in qs:
        q.disable()
    try:
        yield module
    finally:
        for q, was in zip(qs, before):
            q._disabled = was


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set weight ranges, then feed ``batches`` (float images in [0, 1]) through ``model`` with
    quantization off, recording each activation's histogram and max. Returns the batch count."""
    for m in model.modules():
        if isinstance(m, QuantConv2d):
            m.calibrate_weight()
    acts = [q for q in set(input_quantizers(model).values()) if not q._disabled]
    weights = [m.weight_quantizer for m in model.modules() if isinstance(m, QuantConv2d)]
    for q in acts:  # statistics of the float network, as TensorRT calibrates: nothing is quantized
        q._calibrator.reset()
        q.disable_quant()
        q.enable_calib()
    weights_on = [not q._disabled for q in weights]
    for q in weights:
        q.disable()
    was_training = model.training
    model.eval()
    n = 0
    try:
        for imgs in batches:
            model(imgs)
            n += 1
    finally:
        for q in acts:
            q.disable_calib()
            q.enable_quant()
        for q, on in zip(weights, weights_on):
            q._disabled = not on
        model.train(was_training)
    return n


def load_amax(model: nn.Module, method: str = "max", percentile: float = DEFAULT_PERCENTILE) -> None:
    """Activation ranges from the collected statistics with ``method``, every histogram searched at once."""
    if method not in CALIB_METHODS:
        raise UserError(f"--calib-method {method}: expected one of {', '.join(CALIB_METHODS)} or auto")
    if not 0 < percentile <= 100:
        raise UserError(f"--percentile {percentile}: expected a value in (0, 100]")
    device = next(model.parameters()).device
    active = [q for q in set(input_quantizers(model).values()) if not q._disabled]
    amaxes = RangeCalibrator.compute_amaxes([q._calibrator for q in active], method, percentile=percentile)
    for q, amax in zip(active, amaxes):
        if amax is None:
            raise RuntimeError("a quantizer saw no data during calibration; the calibration loader is empty?")
        q.amax = amax.float().clamp(min=1e-8).to(device)


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], method: str = "max",
              percentile: float = DEFAULT_PERCENTILE) -> None:
    """Post-training calibration of a prepared model in one call."""
    n = collect_stats(model, batches)
    if n == 0:
        raise UserError("calibration: the loader gave no batches")
    load_amax(model, method, percentile)
    model.quant_info.calibration = {"method": method, "percentile": percentile, "batches": n}


def amax_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantizer's range by site name (tied sites repeat the value)."""
    return {n: m.amax.detach().clone() for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TensorQuantizer) and m.amax is not None}


def load_amax_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set ranges by site name; sites ``model`` lacks (skipped layers) are ignored."""
    for n, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, TensorQuantizer) and n in state:
            m.amax = state[n].to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------------
# Saving and rebuilding
# ----------------------------------------------------------------------------------------------


def quant_state(model: nn.Module) -> dict:
    """Everything needed to rebuild ``model`` exactly, as tensors and plain containers only."""
    info: QuantInfo = model.quant_info
    return {
        "version": STATE_VERSION,
        "yaml": deepcopy(model.yaml),
        "names": list(model.names.values()) if isinstance(model.names, dict) else list(model.names),
        "skip_layers": list(info.skip_layers),
        "plan": info.plan.to_dict(),
        "calibration": dict(info.calibration),
        "state_dict": {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
                       for k, v in model.state_dict().items()},  # contiguous: as saved without channels_last
    }


def build_quantized(state: dict, device: torch.device | str = "cpu") -> nn.Module:
    """The quantized model ``quant_state`` described, in eval mode on ``device``."""
    from models.yolo import Model

    if state.get("version") != STATE_VERSION:
        raise UserError(f"quantized checkpoint version {state.get('version')} (this code reads {STATE_VERSION})")
    model = Model(deepcopy(state["yaml"]))  # a SegmentationModel for a segmentation YAML
    model.names = list(state["names"])
    prepare(model, state["skip_layers"], QuantPlan.from_dict(state["plan"]))
    model.quant_info.calibration = dict(state["calibration"])
    sd = state["state_dict"]
    for name, q in model.named_modules(remove_duplicate=False):
        key = f"{name}._amax"
        if isinstance(q, TensorQuantizer) and key in sd and q.amax is None:
            q.amax = torch.zeros_like(sd[key])  # the buffer exists only once calibrated
    model.load_state_dict(sd, strict=True)
    return model.to(device).eval()
