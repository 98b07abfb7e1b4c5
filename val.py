"""Evaluate a detection model on a data yaml split: the mAP table, results.json/.md and plots.

    python val.py --data data/coco.yaml --weights gelan-c.pt --imgsz 640 --batch-size 32

The evaluation itself is utils/evaluation/validate.py's ``run`` (also reachable as ``val.run``, as upstream).
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from utils.errors import run_cli
from utils.options import EVAL_SPLITS
from utils.paths import ROOT, existing_file

if TYPE_CHECKING:
    from utils.evaluation.evaluator import EvalResult


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=str, default=str(ROOT / "data/coco.yaml"), help="dataset.yaml path")
    parser.add_argument("--weights", type=str, required=True, help="model checkpoint (.pt)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.7, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", choices=EVAL_SPLITS, help="which split of the data yaml")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="dataloader workers")
    parser.add_argument("--single-cls", action="store_true", help="treat every class as one")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    parser.add_argument("--save-json", action="store_true", help="write COCO JSON and score it with pycocotools")
    parser.add_argument("--postprocess", default="nms", choices=("nms", "none"),
                        help="'none' for NMS-free heads: best class per anchor, top max-det")
    parser.add_argument("--project", default=str(ROOT / "runs/val"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    parser.add_argument("--verbose", action="store_true", help="print every class, even for many classes")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle the checkpoint without the class allowlist (trusted files only)")
    return parser.parse_args(argv)


def main(argv=None) -> EvalResult:
    opt = parse_args(argv)
    existing_file(opt.weights, "checkpoint")  # a mistyped path is told before torch loads
    from utils.evaluation.validate import run

    return run(**vars(opt))


def __getattr__(name: str):
    """``val.run``, upstream's entry point name, imported (with torch) on first use."""
    if name == "run":
        from utils.evaluation.validate import run

        return run
    raise AttributeError(f"module 'val' has no attribute {name!r}")


if __name__ == "__main__":
    run_cli(main)
