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
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError, run_cli
from utils.deployment.onnx_export import ExportResult, export_onnx
from utils.paths import existing_file
from utils.torch_utils import select_device

SUFFIXES = {("onnx", "nms"): ".onnx", ("onnx", "none"): ".onnx",
            ("onnx_end2end", "nms"): "-end2end.onnx", ("onnx_end2end", "none"): "-end2end-topk.onnx"}


def load_model(weights: str | Path, device: torch.device) -> tuple[nn.Module, list[str]]:
    """The model in a checkpoint, fused and in eval mode, and its convolutions kept in float on
    purpose (empty for an FP model). A PTQ/QAT checkpoint is rebuilt with its quantizers."""
    from models.loading import attempt_load
    from models.quantize import build_quantized, float_conv_names
    from utils.checkpoint import load_checkpoint
    from utils.quantization.checkpoint import is_quantized_checkpoint

    path = existing_file(weights, "weights")
    ckpt = load_checkpoint(path)
    if is_quantized_checkpoint(ckpt):
        model = build_quantized(ckpt["quant"], device)
        return model, float_conv_names(model)
    return attempt_load(path, device=device, fuse=True), []


def run(weights: str | Path, include: tuple[str, ...] = ("onnx",), imgsz: int | tuple[int, int] = 640,
        batch_size: int = 1, dynamic: bool = False, simplify: bool = False, slim: bool = False, opset: int = 17,
        postprocess: str = "nms", topk_all: int = 100, iou_thres: float = 0.45, conf_thres: float = 0.25,
        device: str = "cpu") -> list[ExportResult]:
    """Export ``weights`` in each format of ``include``; files go beside the weights."""
    unknown = set(include) - {"onnx", "onnx_end2end"}
    if unknown:
        raise UserError(f"--include {' '.join(include)}: unknown format(s) {sorted(unknown)}; "
                        "expected onnx and/or onnx_end2end")
    if postprocess not in ("nms", "none"):
        raise UserError(f"--postprocess {postprocess}: expected nms or none")
    if simplify and slim:
        raise UserError("--simplify and --slim: choose one simplifier")
    model, float_convs = load_model(weights, select_device(device))
    results = []
    for fmt in include:
        kind = "raw" if fmt == "onnx" else ("nms" if postprocess == "nms" else "topk")
        file = Path(weights).with_name(Path(weights).stem + SUFFIXES[(fmt, postprocess)])
        result = export_onnx(model, file, imgsz, batch_size, dynamic, opset, kind, topk_all, iou_thres, conf_thres,
                             "onnxsim" if simplify else "onnxslim" if slim else None, float_convs,
                             metadata={"weights": Path(weights).name})
        results.append(result)
        print(summary(result))
    return results


def summary(result: ExportResult) -> str:
    """One paragraph per export: what was written and what the lint says."""
    kind = f"INT8 Q/DQ ({result.qdq_pairs} Q/DQ pairs, {result.merged_qdq} redundant merged)" if result.quantized \
        else "floating point (no Q/DQ)"
    lines = [f"{result.path}: {kind}"]
    if result.float_convs:
        lines.append(f"  kept in floating point on purpose: {len(result.float_convs)} conv(s)")
    lint_md = result.path.with_suffix(".qdq_lint.md")
    lines.append(f"  Q/DQ lint: {len(result.findings)} finding(s)" + (f", see {lint_md}" if result.findings else ""))
    return "\n".join(lines)


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
    opt = p.parse_args(argv)
    if len(opt.imgsz) not in (1, 2):
        p.error("--imgsz takes one or two integers")
    opt.imgsz = opt.imgsz[0] if len(opt.imgsz) == 1 else tuple(opt.imgsz)
    return opt


def main(argv: list[str] | None = None) -> list[ExportResult]:
    opt = parse_opt(argv)
    return run(opt.weights, tuple(opt.include), opt.imgsz, opt.batch_size, opt.dynamic, opt.simplify, opt.slim,
               opt.opset, opt.postprocess, opt.topk_all, opt.iou_thres, opt.conf_thres, opt.device)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
