"""The flags of ``qat.py quantize / sensitive / eval``, defined once for the command line and the demo.

The demo builds a real ``quantize`` option set with ``quantize_options`` so that every option the
pipeline reads is present with the command's own default.
"""
from __future__ import annotations

import argparse

from utils.options import AMP_MODES, OPTIMIZERS, REFERENCE_CONF, parse_flags
from utils.paths import ROOT

CALIB_CHOICES = ("max", "percentile", "mse", "entropy", "auto")


def add_common_args(p: argparse.ArgumentParser, project: str, required: bool = True,
                    task_help: str = "split every evaluation uses") -> None:
    p.add_argument("--weights", required=required, default="", help="checkpoint (.pt)")
    p.add_argument("--data", required=required, default="", help="dataset yaml")
    p.add_argument("--batch-size", type=int, default=16, help="total batch (training); evaluation uses twice it")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="image size (pixels)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1 or cpu")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers")
    p.add_argument("--task", default="val", choices=("val", "test"), help=task_help)
    p.add_argument("--conf-thres", type=float, default=0.001, help="evaluation confidence threshold")
    p.add_argument("--iou-thres", type=float, default=0.7, help="evaluation NMS IoU threshold")
    p.add_argument("--postprocess", default="nms", choices=("nms", "none"), help="NMS, or top-k without NMS")
    p.add_argument("--project", default=str(ROOT / project), help="save to project/name")
    p.add_argument("--name", default="exp", help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle --weights without the class allowlist (trusted files only)")


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib-method", default="max", choices=CALIB_CHOICES,
                   help="activation range: max, percentile, mse, entropy, or auto (try all, keep the best PTQ)")
    p.add_argument("--percentile", type=float, default=99.999, help="percentile for --calib-method percentile")
    p.add_argument("--calib-batches", type=int, default=32, help="training batches used for calibration")
    p.add_argument("--seed", type=int, default=57)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "runs/qat", required=False,  # --resume restores them from the checkpoint
                    task_help="split that chooses the best QAT epoch and auto's calibration method")
    p.add_argument("--report-task", default=None, choices=("test", "val", "none"),
                   help="split every row is reported on, with intervals (default: test when the data has one; "
                        "none: the --task split)")
    add_calibration_args(p)
    p.add_argument("--hyp", default=str(ROOT / "data/hyps/hyp.qat.yaml"), help="fine-tuning hyperparameters")
    p.add_argument("--epochs", type=int, default=10, help="QAT epochs (0: PTQ only)")
    p.add_argument("--iters", type=int, default=200, help="batches per QAT epoch at most")
    p.add_argument("--lr", type=float, default=None, help="initial learning rate (default: the hyp's lr0)")
    p.add_argument("--optimizer", default="SGD", choices=OPTIMIZERS)
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="evaluate and ship a moving average of the fine-tuned weights, starting at the PTQ "
                        "model, with this decay per step (e.g. 0.95; 0: the weights themselves)")
    p.add_argument("--amp", default="bf16", choices=AMP_MODES, help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the QAT step (CUDA; pays off after a minute or two of compiling)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay the QAT forward and backward passes from CUDA graphs (default: on with one CUDA "
                        "GPU and no --compile; --no-cuda-graphs runs them eagerly); an epoch's short last batch "
                        "is then dropped")
    p.add_argument("--supervision-stride", type=int, default=1,
                   help="distil every N-th layer from the FP32 model (0: no distillation)")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="weight of the mean relative feature error next to the detection loss (0: none)")
    p.add_argument("--no-eval-origin", action="store_true", help="do not evaluate the FP32 model")
    p.add_argument("--no-eval-ptq", action="store_true", help="do not evaluate the PTQ model")
    p.add_argument("--skip-layers", default="", help="layers kept in floating point, e.g. 22 or 15,22")
    p.add_argument("--auto-skip", type=int, default=0, help="also keep the K most sensitive layers in float")
    p.add_argument("--control", action="store_true",
                   help="also fine-tune the FP32 model by the same recipe, without quantizers or distillation: "
                        "the report's QAT - control row")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the given qat_last.pt, or project/name's, with its own options; a flag typed "
                        "again replaces the saved value (the change is printed)")


def add_sensitive_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "runs/qat_sensitive")
    add_calibration_args(p)
    p.add_argument("--layers", default="", help="measure only these layers, e.g. 15,22 (two evaluations each; "
                                                "default: every layer that holds an INT8 convolution)")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, "runs/qat_eval", required=False)  # --data or --source: run_eval checks
    p.add_argument("--reference", default="", help="FP32 checkpoint whose own detections are the ground truth "
                                                   "on --source (agreement, no labels needed)")
    p.add_argument("--source", nargs="+", default=None, help="unlabelled images, videos or folders of them")
    p.add_argument("--reference-conf", type=float, default=REFERENCE_CONF,
                   help="confidence at which the reference's detections count as ground truth")



def quantize_options(argv: list[str]) -> argparse.Namespace:
    """``qat.py quantize`` options parsed from ``argv`` (flags only, no subcommand)."""
    p = argparse.ArgumentParser(prog="qat.py quantize")
    add_quantize_args(p)
    return parse_flags(p, argv)
