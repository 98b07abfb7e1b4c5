"""Run a tool as ``python <script> <args>`` would, but interrupt it as Ctrl-C would when an epoch begins.

    python tests/interrupt_driver.py <epoch> train.py --cfg ... (also under torchrun, on every rank)

A KeyboardInterrupt is raised in every process at the start of epoch ``<epoch>`` (numbered from 0
like the engine's), after the previous epoch's checkpoint was written: the same point a Ctrl-C
between epochs reaches, without timing anything. The tool's own command line then handles it.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _interrupting(train_one_epoch, stop_at: int):
    def wrapped(*args, epoch: int, **kwargs):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return train_one_epoch(*args, epoch=epoch, **kwargs)
    return wrapped


def main() -> None:
    stop_at, script, *argv = sys.argv[1:]
    # The modules that call the epoch, as imported by the script: patch their reference to it.
    module = "utils.quantization.pipeline" if Path(script).name == "qat.py" else "utils.training.trainer"
    target = __import__(module, fromlist=["train_one_epoch"])
    target.train_one_epoch = _interrupting(target.train_one_epoch, int(stop_at))
    sys.argv = [script, *argv]
    runpy.run_path(str(ROOT / script), run_name="__main__")


if __name__ == "__main__":
    main()
