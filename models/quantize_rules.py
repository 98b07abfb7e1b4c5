"""Which input quantizers must share one scale, read off the model's own dataflow.

TensorRT runs a Concat, a max-pool or a residual Add in INT8 only when the scales around it agree;
when they differ it inserts reformat layers and an INT8 engine can end up slower than FP16. The
rules, as union-find over tensors:

* one tensor read by several quantized consumers is quantized once: all their quantizers tie;
* a Concat ties all its inputs and its output (hence its consumer's input quantizer);
* a residual Add ties its two inputs;
* max-pool, nearest up-sampling, chunk, split and slicing only move values, so their output
  keeps the input's scale.

The dataflow is recorded by running the quantized model once on a small input with every quantizer
switched off, under a ``TorchFunctionMode`` that sees each torch call with its tensors, and a
pre-hook on each input quantizer that sees which tensor it reads. Nothing is listed per block or
per config, so the same code serves every GELAN / YOLOv9 variant.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models.quant_modules import TensorQuantizer, is_weight_quantizer

# torch calls whose outputs carry their first input's values, hence its scale
_PASS_THROUGH = {torch.Tensor.chunk, torch.chunk, torch.Tensor.split, torch.split, torch.Tensor.__getitem__,
                 torch.Tensor.narrow, F.max_pool2d, torch.max_pool2d, torch.Tensor.contiguous}
_JOINS = {torch.cat, torch.concat}
_ADDS = {torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.add}


@dataclass
class QuantPlan:
    """Input-quantizer names grouped by the scale they must share (one list per scale)."""

    groups: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"groups": [list(g) for g in self.groups]}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        return cls([list(g) for g in d["groups"]])

    def sites(self) -> set[str]:
        return {s for g in self.groups for s in g}


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, *items: int) -> None:
        roots = [self.find(i) for i in items]
        for r in roots[1:]:
            self.parent[r] = roots[0]


def flat_tensors(obj) -> list[torch.Tensor]:
    """The tensors of a layer's output (or arguments), nested lists and tuples flattened in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flat_tensors(o)]
    return []


def _is_nearest_interpolate(func, args, kwargs) -> bool:
    if func is not F.interpolate:
        return False
    mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
    return mode == "nearest"


class _DataflowRecorder(TorchFunctionMode):
    """Unions tensors (by identity) that must share a scale, as the model runs."""

    def __init__(self):
        super().__init__()
        self.sets = _UnionFind()
        self.alive: list[torch.Tensor] = []  # keeps every seen tensor alive so that ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _PASS_THROUGH or _is_nearest_interpolate(func, args, kwargs):
            self._tie(flat_tensors(args[0])[:1] + flat_tensors(out))
        elif func in _JOINS:
            self._tie(flat_tensors(args[0]) + flat_tensors(out))
        elif func in _ADDS:
            ins = flat_tensors(args[:2])
            if len(ins) == 2 and ins[0].shape == ins[1].shape:
                self._tie(ins)
        return out

    def _tie(self, tensors: list[torch.Tensor]) -> None:
        if len(tensors) > 1:
            self.alive.extend(tensors)
            self.sets.union(*(id(t) for t in tensors))


def input_quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every activation quantizer of ``model`` by its module path (weight quantizers excluded)."""
    return {n: m for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, TensorQuantizer) and not is_weight_quantizer(n)}


@torch.no_grad()
def derive_plan(model: nn.Module, example: torch.Tensor) -> QuantPlan:
    """Group the input quantizers of a freshly quantized (untied) ``model`` by shared scale.

    ``model`` is run once on ``example`` with its quantizers disabled and is left as it was.
    """
    sites = input_quantizers(model)
    if len({id(q) for q in sites.values()}) != len(sites):
        raise ValueError("derive_plan needs untied quantizers (one per site); call it before tying")
    seen: dict[str, torch.Tensor] = {}
    hooks = [q.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0]))
             for name, q in sites.items()]
    every = [m for m in model.modules() if isinstance(m, TensorQuantizer)]  # weight quantizers too: speed
    was_disabled = [q._disabled for q in every]
    was_training = model.training
    for q in every:
        q.disable()
    recorder = _DataflowRecorder()
    try:
        model.eval()
        with recorder:
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for q, was in zip(every, was_disabled):
            q._disabled = was
        model.train(was_training)
    groups: dict[tuple, list[str]] = {}
    for name in sites:  # sites never reached by the example (none in these models) stay alone
        key = ("tensor", recorder.sets.find(id(seen[name]))) if name in seen else ("unreached", name)
        groups.setdefault(key, []).append(name)
    return QuantPlan(sorted(groups.values()))
