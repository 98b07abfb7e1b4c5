"""Run a detector on an image, a folder of images and videos, or a video; save annotated copies.

    python detect.py --weights gelan-c.pt --source data/images --imgsz 640 --conf-thres 0.25
    python detect.py --weights runs/qat/exp/weights/qat_best.onnx --source data/images

An exported model (.onnx on ONNX Runtime, or TensorRT with --backend; .engine on TensorRT) runs at
its own input size and draws the detections the PyTorch model draws on the same letterboxed input.

Results go to runs/detect/exp (exp2, exp3... when it exists): annotated images / videos, with
--save-txt one YOLO label file per image or video frame (boxes; for a segmentation model, each
mask's outline as a polygon row that train.py and val.py read back), and summary.json with
detection counts.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.errors import run_cli
from utils.options import BACKENDS
from utils.paths import ROOT, existing_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect objects in images and videos; save annotated copies.")
    parser.add_argument("--weights", type=str, required=True,
                        help="model checkpoint (.pt), exported ONNX (.onnx) or TensorRT engine (.engine)")
    parser.add_argument("--source", type=str, required=True, help="image, video or folder of them")
    parser.add_argument("--cfg", type=str, default=None, help="model YAML, only for plain state-dict weights")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                        help="inference size (pixels; default 640); an exported model uses its own size, "
                             "a different --imgsz is ignored with a note")
    parser.add_argument("--backend", default="auto", choices=BACKENDS,
                        help=".onnx only: auto takes TensorRT when installed, else ONNX Runtime")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--save-txt", action="store_true", help="save YOLO label files (polygons for a segmentation model)")
    parser.add_argument("--save-conf", action="store_true", help="add the confidence to --save-txt labels")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images / videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class indices")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--project", default=str(ROOT / "runs/detect"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    parser.add_argument("--line-thickness", type=int, default=3, help="box line width (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="draw boxes only")
    parser.add_argument("--hide-conf", action="store_true", help="draw class names without confidences")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only, .pt weights)")
    parser.add_argument("--vid-stride", type=int, default=1, help="use every n-th video frame")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle the checkpoint without the class allowlist (trusted files only)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    opt = build_parser().parse_args(argv)
    existing_file(opt.weights, "model file")  # a mistyped path is told before torch loads
    from utils.deployment.predict import run

    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(main)
