"""torchrun process-group set-up and the few collective calls the trainer needs.

``torchrun --nproc_per_node N train.py ...`` sets RANK / LOCAL_RANK / WORLD_SIZE; a plain
``python train.py`` leaves them unset and everything here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; rank -1 means no process group (single process)."""

    rank: int = -1
    local_rank: int = -1
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process validates, writes files and shows progress."""
        return self.rank in (-1, 0)

    @property
    def distributed(self) -> bool:
        return self.rank != -1


def dist_info() -> DistInfo:
    """Read the torchrun environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), world)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group (NCCL on GPUs, gloo on CPU) when launched by torchrun."""
    info = dist_info()
    if info.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info


def broadcast_object(value, info: DistInfo):
    """Rank 0's ``value`` on every rank (run folder, early-stop decision)."""
    if not info.distributed:
        return value
    box = [value if info.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    """Leave the process group so torchrun sees a clean exit."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
