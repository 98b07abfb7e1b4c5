"""Export a checkpoint (FP, PTQ or QAT) to ONNX files beside it: raw prediction and/or End2End.

export_qat.py is this module's command line; the demo and bench call ``export_checkpoint`` directly.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from utils.deployment.onnx_export import ExportResult, export_onnx, trace_prediction
from utils.errors import UserError
from utils.options import check_flags, check_imgsz
from utils.paths import existing_file
from utils.torch_utils import select_device

SUFFIXES = {("onnx", "nms"): ".onnx", ("onnx", "none"): ".onnx",
            ("onnx_end2end", "nms"): "-end2end.onnx", ("onnx_end2end", "none"): "-end2end-topk.onnx"}


def load_model(weights: str | Path, device: torch.device, unsafe: bool = False) -> tuple[nn.Module, list[str]]:
    """The model in a checkpoint, fused and in eval mode, and its convolutions kept in float on
    purpose (empty for an FP model). A PTQ/QAT checkpoint is rebuilt with its quantizers."""
    from models.loading import ready_model
    from models.quantize import build_quantized, float_conv_names
    from utils.checkpoint import load_checkpoint
    from utils.quantization.checkpoint import is_quantized_checkpoint

    path = existing_file(weights, "weights")
    ckpt = load_checkpoint(path, unsafe=unsafe)
    if is_quantized_checkpoint(ckpt):
        model = build_quantized(ckpt["quant"], device)
        return model, float_conv_names(model)
    return ready_model(ckpt, path, device=device, fuse=True), []


def export_checkpoint(weights: str | Path, include: tuple[str, ...] = ("onnx",), imgsz: int | tuple[int, int] = 640,
        batch_size: int = 1, dynamic: bool = False, simplify: bool = False, slim: bool = False, opset: int = 17,
        postprocess: str = "nms", topk_all: int = 100, iou_thres: float = 0.45, conf_thres: float = 0.25,
        device: str = "cpu", exist_ok: bool = False, unsafe_load: bool = False) -> list[ExportResult]:
    """Export ``weights`` in each format of ``include``; files go beside the weights.

    An existing file is replaced only with ``exist_ok``: each export is checked before the first is
    written, so a refused run writes nothing.
    """
    check_flags(locals())  # the parameters are export_qat.py's flags
    unknown = set(include) - {"onnx", "onnx_end2end"}
    if unknown:
        raise UserError(f"--include {' '.join(include)}: unknown format(s) {sorted(unknown)}; "
                        "expected onnx and/or onnx_end2end")
    if postprocess not in ("nms", "none"):
        raise UserError(f"--postprocess {postprocess}: expected nms or none")
    if simplify and slim:
        raise UserError("--simplify and --slim: choose one simplifier")
    model, float_convs = load_model(weights, select_device(device), unsafe_load)
    check_imgsz(imgsz, max(int(model.stride.max()), 32))
    files = {fmt: Path(weights).with_name(Path(weights).stem + SUFFIXES[(fmt, postprocess)]) for fmt in include}
    taken = [str(f) for f in files.values() if f.exists()]
    if taken and not exist_ok:
        raise UserError(f"{', '.join(taken)}: exists; pass --exist-ok to replace it")
    results = []
    prediction = trace_prediction(model, imgsz, batch_size, dynamic, opset)  # once for every format: the slow part
    for fmt, file in files.items():
        kind = "raw" if fmt == "onnx" else ("nms" if postprocess == "nms" else "topk")
        result = export_onnx(model, file, imgsz, batch_size, dynamic, opset, kind, topk_all, iou_thres, conf_thres,
                             "onnxsim" if simplify else "onnxslim" if slim else None, float_convs,
                             metadata={"weights": Path(weights).name}, prediction=prediction)
        results.append(result)
        print(summary(result))
    return results


def summary(result: ExportResult) -> str:
    """One paragraph per export: what was written and what the lint says."""
    kind = f"INT8 Q/DQ ({result.qdq_pairs} Q/DQ pairs, {result.merged_qdq} redundant merged)" if result.quantized \
        else "floating point (no Q/DQ)"
    lines = [f"{result.path}: {kind}"]
    if result.normalized_qdq:
        lines.append(f"  Q/DQ parameters rewritten into the form ONNX Runtime and TensorRT accept: "
                     f"{result.normalized_qdq} node(s)")
    if result.float_convs:
        lines.append(f"  kept in floating point on purpose: {len(result.float_convs)} conv(s)")
    lint_md = result.path.with_suffix(".qdq_lint.md")
    lines.append(f"  Q/DQ lint: {len(result.findings)} finding(s)" + (f", see {lint_md}" if result.findings else ""))
    return "\n".join(lines)
