"""PTQ / QAT checkpoints: upstream's checkpoint dict, with the quantized model stored as plain data.

Upstream pickles the model object under ``'model'``. A quantized model holds Model Optimizer
objects that a safe ``torch.load(weights_only=True)`` cannot and should not rebuild, so here
``'model'`` and ``'ema'`` are None and ``'quant'`` holds ``models.quantize.quant_state``: the YAML,
the fused state dict with every quantizer range, the tie plan and the skipped layers. Loading
rebuilds the same modules and loads the same tensors, so a checkpoint evaluates, resumes and
exports bit for bit as it was saved. ``'qat'`` holds the run's report so far (for resuming).
"""
from __future__ import annotations

import datetime as _dt
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

from models.quantize import build_quantized, quant_state
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.options import run_options
from utils.torch_utils import de_parallel


def is_quantized_checkpoint(ckpt: dict) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("quant"), dict)


def _run_fields(epoch: int, best_fitness: float, optimizer: torch.optim.Optimizer | None, opt: dict | None,
                report: dict | None) -> dict:
    """The fields of upstream's checkpoint dict that describe the run, plus our report so far."""
    return {
        "epoch": epoch,
        "best_fitness": float(best_fitness),
        "model": None,
        "ema": None,
        "updates": 0,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "opt": run_options(opt or {}),
        "git": None,
        "date": _dt.datetime.now().isoformat(),
        "qat": report or {},
    }


def make_checkpoint(model: nn.Module, *, epoch: int = -1, best_fitness: float = 0.0, updates: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, opt: dict | None = None,
                    report: dict | None = None) -> dict:
    """The dict ``utils.checkpoint.save_checkpoint`` writes for a quantized ``model`` (plain containers, tensors)."""
    return {**_run_fields(epoch, best_fitness, optimizer, opt, report), "updates": updates,
            "quant": quant_state(de_parallel(model))}


def make_float_checkpoint(model: nn.Module, *, epoch: int = -1, best_fitness: float = 0.0,
                          optimizer: torch.optim.Optimizer | None = None, opt: dict | None = None,
                          report: dict | None = None) -> dict:
    """The same for a float model fine-tuned beside QAT (the control): upstream's format, the module
    itself kept in FP32 so that it evaluates exactly as it did during the run."""
    return {**_run_fields(epoch, best_fitness, optimizer, opt, report), "model": deepcopy(de_parallel(model)).float()}


def read_checkpoint(path: str | Path, unsafe: bool = False) -> dict:
    """A PTQ/QAT checkpoint read safely (weights only); a float checkpoint is a user error."""
    ckpt = load_checkpoint(path, unsafe=unsafe)
    if not is_quantized_checkpoint(ckpt):
        raise UserError(f"{path}: not a PTQ/QAT checkpoint (no 'quant' entry); quantize it with qat.py quantize")
    return ckpt


def load_quantized(path: str | Path, device: torch.device | str = "cpu",
                   unsafe: bool = False) -> tuple[nn.Module, dict]:
    """The quantized model of a PTQ/QAT checkpoint (eval mode, float32, ready to evaluate or export)
    and the checkpoint dict."""
    ckpt = read_checkpoint(path, unsafe)
    return build_quantized(ckpt["quant"], device), ckpt
