"""torchrun process-group set-up and the few collective calls the trainer needs.

``torchrun --nproc_per_node N train.py ...`` sets RANK / LOCAL_RANK / WORLD_SIZE; a plain
``python train.py`` leaves them unset and everything here is a no-op for a single process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

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


def same_on_all_ranks(value, info: DistInfo) -> bool:
    """Whether every rank holds an equal ``value`` (a picklable digest); True for a single process."""
    if not info.distributed:
        return True
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[DistInfo]:
    """Join the torchrun job for the body, then leave it so torchrun sees a clean exit.

    After a body that succeeded every rank meets at a barrier first: a rank that tore its group
    down while another was still writing its last files aborted that one (gloo, SIGABRT). After a
    failure there is no barrier, which the failed rank's peers would wait at for ever.
    """
    info = init_distributed(device)
    try:
        yield info
        if info.distributed:
            dist.barrier()
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()
