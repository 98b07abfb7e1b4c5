"""Run tools one after another in the same processes, as ``python <script> <args>`` would, and
interrupt any of them as Ctrl-C would when an epoch begins.

    python tests/interrupt_driver.py '<JSON plan>'    (also under torchrun, on every rank)

The plan is a list of runs, ``{"script": "qat.py", "argv": [...], "stop_at": 1}``; ``stop_at``
(optional) raises a KeyboardInterrupt in every process at the start of that epoch (numbered from 0
like the engine's), after the previous epoch's checkpoint was written: the same point a Ctrl-C
between epochs reaches, without timing anything. The tool's own command line then handles it and
exits; the driver says how (``driver: <script> exited <code>`` on stderr) and goes on to the next run.

A torchrun launch spends most of its time importing torch and Model Optimizer in every process (80%
of the resume tests' CPU time in a profile of the suite), so runs share a launch. Under torchrun they
also share the process group, which each run leaves up for the next: a driver that set a second
default group up in the same processes hung once, cause unknown.
"""
from __future__ import annotations

import contextlib
import json
import runpy
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The module that calls the epoch, as each tool imports it: the interrupt patches its reference.
EPOCH_CALLERS = {"qat.py": "utils.quantization.pipeline", "train.py": "utils.training.trainer"}


def _interrupting(train_one_epoch, stop_at: int):
    def wrapped(*args, epoch: int, **kwargs):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return train_one_epoch(*args, epoch=epoch, **kwargs)
    return wrapped


@contextlib.contextmanager
def _process_group_kept() -> Iterator[None]:
    """A tool leaves its process group at the end of a run; inside, it stays up for the next run,
    which then finds it joined (utils.training.distributed.init_distributed), and is left at the end."""
    import torch.distributed as dist

    leave = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dist.destroy_process_group = leave
        if dist.is_initialized():
            leave()


@contextlib.contextmanager
def _interrupted_at(script: str, stop_at: int | None) -> Iterator[None]:
    if stop_at is None:
        yield
        return
    caller = __import__(EPOCH_CALLERS[Path(script).name], fromlist=["train_one_epoch"])
    epoch = caller.train_one_epoch
    caller.train_one_epoch = _interrupting(epoch, stop_at)
    try:
        yield
    finally:
        caller.train_one_epoch = epoch


def _run(script: str, argv: list[str]) -> int:
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _all_ranks_done() -> None:
    """Under torchrun, wait until every process finished the run, as separate commands would: rank 0
    writes the checkpoints, and a resume on another rank must not start before they exist."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    plan = json.loads(sys.argv[1])
    with _process_group_kept():
        for run in plan:
            with _interrupted_at(run["script"], run.get("stop_at")):
                code = _run(run["script"], run["argv"])
            print(f"driver: {run['script']} exited {code}", file=sys.stderr, flush=True)
            _all_ranks_done()


if __name__ == "__main__":
    main()
