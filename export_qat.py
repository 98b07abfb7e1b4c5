"""Export an FP, PTQ or QAT checkpoint to ONNX for TensorRT: raw prediction or End2End.

    python export_qat.py --weights runs/qat/exp/weights/qat_best.pt --include onnx onnx_end2end \
        --imgsz 640 --dynamic --simplify

A quantized checkpoint exports with QuantizeLinear/DequantizeLinear pairs (TensorRT runs those
layers in INT8); an FP checkpoint exports without any (the FP16 baseline). Every export ends
with the Q/DQ lint; its report is written beside the ONNX.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from utils.errors import run_cli
from utils.paths import existing_file

if TYPE_CHECKING:
    from utils.deployment.onnx_export import ExportResult


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="FP, PTQ or QAT checkpoint (.pt)")
    p.add_argument("--include", nargs="+", default=["onnx"], help="onnx and/or onnx_end2end")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="h w, or one size")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dynamic", action="store_true", help="dynamic batch dimension")
    p.add_argument("--simplify", action="store_true", help="simplify with onnxsim")
    p.add_argument("--slim", action="store_true", help="simplify with onnxslim")
    p.add_argument("--opset", type=int, default=17, help=">= 13 (per-channel INT8 weights)")
    p.add_argument("--postprocess", default="nms", choices=("nms", "none"),
                   help="onnx_end2end: EfficientNMS_TRT plugin (nms) or TopK without NMS (none)")
    p.add_argument("--topk-all", type=int, default=100, help="End2End: detections kept per image")
    p.add_argument("--iou-thres", type=float, default=0.45, help="End2End NMS IoU threshold")
    p.add_argument("--conf-thres", type=float, default=0.25, help="End2End score threshold")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA device (export traces on it)")
    p.add_argument("--exist-ok", action="store_true",
                   help="replace ONNX files that exist beside the weights (without it, export refuses)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle the checkpoint without the class allowlist (trusted files only)")
    opt = p.parse_args(argv)
    if len(opt.imgsz) not in (1, 2):
        p.error("--imgsz takes one or two integers")
    opt.imgsz = opt.imgsz[0] if len(opt.imgsz) == 1 else tuple(opt.imgsz)
    return opt


def main(argv: list[str] | None = None) -> list[ExportResult]:
    opt = parse_opt(argv)
    existing_file(opt.weights, "checkpoint")  # a mistyped path is told before torch and Model Optimizer load
    from utils.deployment.export import export_checkpoint

    return export_checkpoint(opt.weights, tuple(opt.include), opt.imgsz, opt.batch_size, opt.dynamic, opt.simplify,
                             opt.slim, opt.opset, opt.postprocess, opt.topk_all, opt.iou_thres, opt.conf_thres,
                             opt.device, opt.exist_ok, opt.unsafe_load)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
