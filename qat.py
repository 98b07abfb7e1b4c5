"""INT8 quantization of a trained YOLOv9 / GELAN detector for TensorRT: PTQ, QAT, sensitivity, evaluation.

    python qat.py quantize --weights runs/train/exp/weights/best.pt --data data/bccd.yaml --device 0
    python qat.py quantize ... --calib-method auto --epochs 10 --iters 200 --skip-layers 22
    python qat.py quantize --resume runs/qat/exp/weights/qat_last.pt
    torchrun --nproc_per_node 2 qat.py quantize ... --device 0,1
    python qat.py sensitive --weights best.pt --data data/bccd.yaml
    python qat.py eval --weights runs/qat/exp/weights/qat_best.pt --data data/bccd.yaml --postprocess none
    python qat.py demo        # no weights, no dataset: train, PTQ, QAT, export and check on CPU in minutes

quantize writes runs/qat/<name>/weights/{ptq.pt,qat_last.pt,qat_best.pt} and report.md / report.json
(Origin / PTQ / QAT rows of AP50-95, AP50, P, R and their deltas). Export with export_qat.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from typing import Callable

from utils.errors import run_cli
from utils.options import parse_flags
from utils.quantization.options import add_eval_args, add_quantize_args, add_sensitive_args


def _demo_args(p: argparse.ArgumentParser) -> None:
    from utils.demo import add_args

    add_args(p)


def _run_demo(opt: argparse.Namespace):
    from utils.demo import run_demo

    return run_demo(opt)


def _check_checkpoints(opt: argparse.Namespace) -> None:
    """The checkpoints named on the command line exist, before Model Optimizer's import: a mistyped
    path is reported in a few seconds instead of ten on a 2-core machine."""
    from utils.paths import existing_file

    for flag in ("weights", "reference"):
        if getattr(opt, flag, "") and not getattr(opt, "resume", None):  # a resume takes them from its checkpoint
            existing_file(getattr(opt, flag), "checkpoint")


def _run(name: str) -> Callable[[argparse.Namespace], object]:
    def run(opt: argparse.Namespace):
        _check_checkpoints(opt)
        from utils.quantization import pipeline as qat_pipeline

        return getattr(qat_pipeline, name)(opt)
    return run


# Subcommand -> (help, add its flags, run it). Other commands (e.g. a demo) register here.
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "quantize": ("PTQ calibration then QAT fine-tuning, with a report", add_quantize_args, _run("run_quantize")),
    "sensitive": ("per-layer quantization sensitivity (table, JSON, chart)", add_sensitive_args, _run("run_sensitive")),
    "eval": ("evaluate a PTQ/QAT checkpoint", add_eval_args, _run("run_eval")),
}
# The demo needs this repo's trainer; patch_yolov9.sh leaves it behind, so offer it only where it exists.
if importlib.util.find_spec("utils.demo") is not None:
    COMMANDS["demo"] = ("the whole workflow on a built-in shapes dataset, on a CPU, in minutes", _demo_args, _run_demo)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    return parse_flags(p, argv)


def main(argv=None):
    main_process = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only rank 0 narrates
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    opt = parse_args(argv)
    return COMMANDS[opt.cmd][2](opt)


if __name__ == "__main__":
    run_cli(main)
