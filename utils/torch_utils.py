"""Device selection and small torch helpers shared by training, evaluation and export."""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from utils.errors import UserError


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


def de_parallel(model: nn.Module) -> nn.Module:
    """The plain model inside a DataParallel / DistributedDataParallel wrapper."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model
