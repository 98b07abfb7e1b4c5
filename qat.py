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

from utils.training.engine import AMP_MODES
from utils.errors import run_cli
from utils.training.optim import OPTIMIZERS
from utils.paths import ROOT

CALIB_CHOICES = ("max", "percentile", "mse", "entropy", "auto")


def _common(p: argparse.ArgumentParser, project: str, required: bool = True) -> None:
    p.add_argument("--weights", required=required, default="", help="checkpoint (.pt)")
    p.add_argument("--data", required=required, default="", help="dataset yaml")
    p.add_argument("--batch-size", type=int, default=16, help="total batch (training); evaluation uses twice it")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="image size (pixels)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1 or cpu")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers")
    p.add_argument("--task", default="val", choices=("val", "test"), help="split every evaluation uses")
    p.add_argument("--conf-thres", type=float, default=0.001, help="evaluation confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.7, help="evaluation NMS IoU threshold")
    p.add_argument("--postprocess", default="nms", choices=("nms", "none"), help="NMS, or top-k without NMS")
    p.add_argument("--project", default=str(ROOT / project), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")


def _calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-method", default="max", choices=CALIB_CHOICES,
                   help="activation range: max, percentile, mse, entropy, or auto (try all, keep the best PTQ)")
    p.add_argument("--percentile", type=float, default=99.999, help="percentile for --calib-method percentile")
    p.add_argument("--calib-batches", type=int, default=32, help="training batches used for calibration")
    p.add_argument("--seed", type=int, default=57)


def _quantize_args(p: argparse.ArgumentParser) -> None:
    _common(p, "runs/qat", required=False)  # --resume restores them from the checkpoint
    _calibration(p)
    p.add_argument("--hyp", default=str(ROOT / "data/hyps/hyp.qat.yaml"), help="fine-tuning hyperparameters")
    p.add_argument("--epochs", type=int, default=10, help="QAT epochs (0: PTQ only)")
    p.add_argument("--iters", type=int, default=200, help="batches per QAT epoch at most")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the hyp's lr0)")
    p.add_argument("--optimizer", default="SGD", choices=OPTIMIZERS)
    p.add_argument("--amp", default="bf16", choices=AMP_MODES, help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--supervision-stride", type=int, default=1,
                   help="distil every N-th layer from the FP32 model (0: no distillation)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the mean relative feature error next to the detection loss (0: none)")
    p.add_argument("--no-eval-origin", action="store_true", help="do not evaluate the FP32 model")
    p.add_argument("--no-eval-ptq", action="store_true", help="do not evaluate the PTQ model")
    p.add_argument("--skip-layers", default="", help="layers kept in floating point, e.g. 22 or 15,22")
    p.add_argument("--auto-skip", type=int, default=0, help="also keep the K most sensitive layers in float")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the given qat_last.pt, or project/name's")


def _sensitive_args(p: argparse.ArgumentParser) -> None:
    _common(p, "runs/qat_sensitive")
    _calibration(p)


def _eval_args(p: argparse.ArgumentParser) -> None:
    _common(p, "runs/qat_eval")


def _demo_args(p: argparse.ArgumentParser) -> None:
    from utils.demo import add_args

    add_args(p)


def _run_demo(opt: argparse.Namespace):
    from utils.demo import run_demo

    return run_demo(opt)


def _run(name: str) -> Callable[[argparse.Namespace], object]:
    def run(opt: argparse.Namespace):
        from utils.quantization import pipeline as qat_pipeline

        return getattr(qat_pipeline, name)(opt)
    return run


# Subcommand -> (help, add its flags, run it). Other commands (e.g. a demo) register here.
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "quantize": ("PTQ calibration then QAT fine-tuning, with a report", _quantize_args, _run("run_quantize")),
    "sensitive": ("per-layer quantization sensitivity (table, JSON, chart)", _sensitive_args, _run("run_sensitive")),
    "eval": ("evaluate a PTQ/QAT checkpoint", _eval_args, _run("run_eval")),
}
# The demo needs this repo's trainer; patch_yolov9.sh leaves it behind, so offer it only where it exists.
if importlib.util.find_spec("utils.demo") is not None:
    COMMANDS["demo"] = ("the whole workflow on a built-in shapes dataset, on a CPU, in minutes", _demo_args, _run_demo)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qat.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    return p.parse_args(argv)


def main(argv=None):
    main_process = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only rank 0 narrates
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    opt = parse_args(argv)
    return COMMANDS[opt.cmd][2](opt)


if __name__ == "__main__":
    run_cli(main)
