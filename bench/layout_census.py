"""How many of a QAT step's tensors reach an op in another memory layout than the op's other operand
(CPU, tiny input: the counts depend on the network's graph, not on the image size).

One channels-last QAT step with the feature distillation of every layer, on PyTorch's own ops (the
CUDA kernels of models/fused_ops.py never run on a CPU), and one forward pass of the fused FP32
teacher. It counts:

- the activations' straight-through backward calls (``where``) whose gradient lies otherwise than
  its mask, e.g. a channel slice handed back by ``cat``: on a GPU these took PyTorch's generic
  strided kernel (models/fused_ops.straight_through now writes every such gradient dense);
- the gradient sums (``add``) whose two operands lie differently;
- the teacher's convolutions and max-pools fed a strided input (a ``chunk`` slice), which PyTorch
  copies dense first.

    python bench/layout_census.py --cfg gelan-c.yaml      -> printed, and <out>/layout_census.json

A diagnosis tool: it writes no record.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class _Census(TorchDispatchMode):
    """Counts, by op, the calls whose tensor operands differ in strides (or whose input is not dense)."""

    def __init__(self, ops: dict[str, str], batch: int):
        super().__init__()
        self.ops = ops  # aten op name prefix -> "mixed" (two operands) or "strided" (the input)
        self.batch = batch  # activations only: a weight's first dimension is its output channels
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        for prefix, kind in self.ops.items():
            if name.startswith(prefix) and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 \
                    and args[0].shape[0] == self.batch:
                self.counts[f"{prefix} calls"] += 1
                if kind == "strided":
                    odd = not _dense(args[0])
                else:
                    pair = [t for t in args[:3] if isinstance(t, torch.Tensor) and t.dim() == 4][:2]
                    odd = len(pair) == 2 and pair[0].shape == pair[1].shape and pair[0].stride() != pair[1].stride()
                self.counts[f"{prefix} {kind}"] += odd
        return func(*args, **(kwargs or {}))


def census(cfg: str, imgsz: int = 64, nc: int = 3) -> dict:
    """The counts for one config (see the module docstring)."""
    from copy import deepcopy

    from models.quantize import calibrate, prepare, set_trainable
    from models.yolo import DetectionModel
    from utils.data.config import load_hyp
    from utils.quantization.distill import FeatureDistillation, supervised_layers
    from utils.training.loss import build_loss

    torch.manual_seed(0)
    float_model = DetectionModel(cfg, nc=nc)
    x = torch.rand(2, 3, imgsz, imgsz).contiguous(memory_format=torch.channels_last)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.2]])
    teacher = deepcopy(float_model).eval().fuse().to(memory_format=torch.channels_last)
    student = prepare(deepcopy(float_model))
    calibrate(student, [x])
    student = set_trainable(student).to(memory_format=torch.channels_last).train()
    distill = FeatureDistillation(student, teacher, supervised_layers(len(student.model), 1))
    preds = student(x)
    loss_fn = build_loss(student, load_hyp(ROOT / "data/hyps/hyp.qat.yaml"))
    loss = loss_fn(preds, targets)[0] + distill(x, preds, targets)
    distill.remove()
    backward = _Census({"aten.where": "mixed", "aten.add.Tensor": "mixed"}, len(x))
    with backward:
        loss.backward()
    forward = _Census({"aten.convolution": "strided", "aten.max_pool2d": "strided"}, len(x))
    with forward, torch.no_grad():
        teacher(x)
    return {"cfg": cfg, "imgsz": imgsz, "qat_backward": dict(backward.counts), "teacher_forward": dict(forward.counts)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="gelan-c.yaml")
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "runs/layout_census"))
    args = p.parse_args(argv)
    result = census(args.cfg, args.imgsz)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layout_census.json").write_text(json.dumps(result, indent=2) + "\n")
    for part in ("qat_backward", "teacher_forward"):
        print(part, json.dumps(result[part]))
    return result


if __name__ == "__main__":
    run_cli(main)
