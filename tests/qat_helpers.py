"""Small models, data and a scale checker shared by the quantization tests.

Models keep every config's layer graph but shrink its widths, so each builds and runs in well
under a second on one CPU thread. The scale checker verifies the tie rules on a *running*
quantized model, independently of how ``models.quantize_rules`` derived them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from models.common import make_divisible
from models.config import load_config, resolve_config
from models.quant_modules import TensorQuantizer
from models.yolo import DetectionModel
from utils.checkpoint import save_checkpoint
from utils.paths import ROOT
from utils.torch_utils import cpu_threads

CONFIGS = ("gelan-t", "gelan-s", "gelan-m", "gelan-c", "gelan-e",
           "yolov9-t", "yolov9-s", "yolov9-m", "yolov9-c", "yolov9-e")
# One config per distinct set of blocks and heads: gelan-t (AConv, ELAN1, the single DDetect head),
# yolov9-t (the dual DualDDetect head) and yolov9-c (ADown, CBLinear / CBFuse, Silence). The other
# seven repeat these blocks at other widths and depths (tests/test_export.py checks the union).
BLOCK_CONFIGS = ("gelan-t", "yolov9-t", "yolov9-c")
SHAPES = ["square", "disc", "triangle"]


def slow_matrix_case(bench: str) -> pytest.MarkDecorator:
    """Skip a case of a per-config matrix unless YOLOV9_SLOW_TESTS=1: ``bench`` runs every config."""
    return pytest.mark.skipif(not os.environ.get("YOLOV9_SLOW_TESTS"),
                              reason=f"a slow matrix case: set YOLOV9_SLOW_TESTS=1 ({bench} covers every config)")


def one_thread():
    """Tiny convolutions on a loaded 2-core machine run ~20x faster on one thread than on two."""
    return cpu_threads(1)


def shrunk_config(name: str, width: float = 0.0625, nc: int = 2) -> dict:
    """``name``'s layer graph with widths scaled by ``width`` (CBLinear's explicit channel lists too)."""
    d = load_config(resolve_config(name))
    gw = d.get("width_multiple", 1.0) * width
    d["width_multiple"], d["nc"] = gw, nc
    for row in d["backbone"] + d["head"]:
        if row[2] == "CBLinear":
            row[3] = [[make_divisible(c * gw, 8) for c in row[3][0]], *row[3][1:]]
    return d


def tiny_config(nc: int = 3) -> dict:
    """gelan-t at half width with one bottleneck per stage: trainable in seconds."""
    d = shrunk_config("gelan-t", 0.5, nc)
    for row in d["backbone"] + d["head"]:
        if row[2] == "RepNCSPELAN4":
            row[3] = [*row[3][:3], 1]
    return d


def tiny_model(nc: int = 3, seed: int = 0) -> DetectionModel:
    """A tiny detector whose BatchNorm statistics are set from a few random images, so that its
    features keep a trained network's scale instead of vanishing layer by layer."""
    torch.manual_seed(seed)
    model = DetectionModel(tiny_config(nc))
    model.names = SHAPES[:nc]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None  # cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 3, 64, 64))
    for bn in bns:
        bn.momentum = 0.03
    return model.eval()


def save_float_checkpoint(model: DetectionModel, path: Path) -> Path:
    """An upstream-format FP checkpoint of ``model`` (what qat.py quantize starts from)."""
    return save_checkpoint({"epoch": -1, "best_fitness": 0.0, "model": model.half(), "ema": None, "updates": 0,
                            "optimizer": None, "opt": {}, "git": None, "date": ""}, path)


class _ScaleRecorder(TorchFunctionMode):
    """Which quantizer produced / read each tensor, and the joins, pools and adds between them."""

    def __init__(self):
        super().__init__()
        self.produced_by: dict[int, float] = {}  # tensor id -> amax of the quantizer that output it
        self.read_by: dict[int, list[float]] = defaultdict(list)  # tensor id -> amax of quantizers reading it
        self.cats: list[tuple[list[int], int]] = []
        self.pass_through: list[tuple[int, int]] = []
        self.adds: list[tuple[int, int]] = []
        self.alive: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.cat:
            self.alive += [*args[0], out]
            self.cats.append(([id(t) for t in args[0]], id(out)))
        elif func in (F.max_pool2d, F.interpolate) and isinstance(out, torch.Tensor):
            self.alive += [args[0], out]
            self.pass_through.append((id(args[0]), id(out)))
        elif func is torch.Tensor.add and len(args) == 2 and isinstance(args[1], torch.Tensor):
            self.alive += list(args)
            self.adds.append((id(args[0]), id(args[1])))
        return out


def scale_violations(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Places where a calibrated model breaks a TensorRT scale rule while it runs on ``x``."""
    rec = _ScaleRecorder()
    hooks = []
    for m in model.modules():
        if isinstance(m, TensorQuantizer) and m.is_enabled and m.axis is None:
            def hook(mod, args, out, rec=rec):
                rec.alive += [args[0], out]
                amax = float(mod.amax)
                rec.read_by[id(args[0])].append(amax)
                rec.produced_by[id(out)] = amax
            hooks.append(m.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad(), rec:
            model(x)
    finally:
        for h in hooks:
            h.remove()
    bad = []
    for tid, amaxes in rec.read_by.items():
        if len(set(amaxes)) > 1:
            bad.append(f"one tensor read with scales {sorted(set(amaxes))}")
    for ins, out in rec.cats:
        quantized = [rec.produced_by.get(t) for t in ins]
        if all(q is None for q in quantized):
            continue  # a float concat (the head's output)
        scales = set(quantized) | set(rec.read_by.get(out, []))
        if None in quantized or len(scales) > 1:
            bad.append(f"concat inputs/consumers with scales {quantized} -> {rec.read_by.get(out)}")
    for src, out in rec.pass_through:
        if src in rec.produced_by and out in rec.read_by and {rec.produced_by[src]} != set(rec.read_by[out]):
            bad.append(f"pool/upsample changes the scale {rec.produced_by[src]} -> {rec.read_by[out]}")
    for a, b in rec.adds:
        if a in rec.produced_by or b in rec.produced_by:
            if rec.produced_by.get(a) is None or rec.produced_by.get(a) != rec.produced_by.get(b):
                bad.append(f"residual add with scales {rec.produced_by.get(a)} and {rec.produced_by.get(b)}")
    return bad


def check_torchrun_quantize(data: Path, tmp_path: Path, device: str, imgsz: int) -> None:
    """``torchrun --nproc_per_node 2 qat.py quantize`` on ``device`` ('cpu' runs gloo, '0,1' NCCL):
    calibration once on rank 0, its ranges on both ranks (the run checks them bit for bit), DDP
    fine-tuning, and a single run folder."""
    weights = save_float_checkpoint(tiny_model(), tmp_path / "fp.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "qat.py",
           "quantize", "--weights", str(weights), "--data", str(data), "--imgsz", str(imgsz), "--batch-size", "4",
           "--device", device, "--workers", "0", "--calib-batches", "2", "--epochs", "1", "--iters", "2",
           "--project", str(tmp_path / "runs"), "--name", "ddp"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "quantizer ranges identical on all 2 ranks" in proc.stdout + proc.stderr
    run = tmp_path / "runs" / "ddp"
    report = json.loads((run / "report.json").read_text())
    assert [e["epoch"] for e in report["epochs"]] == [1] and (run / "weights" / "qat_best.pt").is_file()
    assert not (tmp_path / "runs" / "ddp2").exists()  # only rank 0 made a run folder
