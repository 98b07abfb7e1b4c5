"""Run a tool as ``python <script> <args>`` would, but interrupt it as Ctrl-C would when an epoch begins.

    python tests/interrupt_driver.py <epoch> train.py --cfg ...   (also under torchrun, on every rank)
    python tests/interrupt_driver.py --first '<JSON list of args>' <epoch> qat.py quantize ...

A KeyboardInterrupt is raised in every process at the start of epoch ``<epoch>`` (numbered from 0
like the engine's), after the previous epoch's checkpoint was written: the same point a Ctrl-C
between epochs reaches, without timing anything. The tool's own command line then handles it.

``--first``: the same script runs to the end with those arguments before, in the same processes. A
torchrun launch spends most of its time importing torch and Model Optimizer in every process (80%
of the resume tests' CPU time in a profile of the suite), so the uninterrupted reference run and the
interrupted one share a launch. Under torchrun they also share the process group, which the first run
leaves up: a driver that set a second default group up in the same processes hung once, cause unknown.
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


def _interrupting(train_one_epoch, stop_at: int):
    def wrapped(*args, epoch: int, **kwargs):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return train_one_epoch(*args, epoch=epoch, **kwargs)
    return wrapped


@contextlib.contextmanager
def _process_group_kept() -> Iterator[None]:
    """The tool leaves its process group at the end of a run; inside, it stays up for the next run,
    which then finds it joined (utils.training.distributed.init_distributed)."""
    import torch.distributed as dist

    leave = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None
    try:
        yield
    finally:
        dist.destroy_process_group = leave


def _run(script: str, argv: list[str]) -> None:
    sys.argv = [script, *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


def main() -> None:
    args = sys.argv[1:]
    first = None
    if args[0] == "--first":
        first, args = json.loads(args[1]), args[2:]
    stop_at, script, *argv = args
    if first is not None:
        with _process_group_kept():
            _run(script, first)
    # The modules that call the epoch, as imported by the script: patch their reference to it.
    module = "utils.quantization.pipeline" if Path(script).name == "qat.py" else "utils.training.trainer"
    target = __import__(module, fromlist=["train_one_epoch"])
    target.train_one_epoch = _interrupting(target.train_one_epoch, int(stop_at))
    _run(script, argv)


if __name__ == "__main__":
    main()
