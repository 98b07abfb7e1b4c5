"""Validate and time an exported model on TensorRT or ONNX Runtime: COCO mAP and a batch sweep.

    python val_trt.py --onnx runs/qat/exp/weights/qat_best.onnx --data data/bccd.yaml --imgsz 640
    python val_trt.py --engine qat_best.engine --benchmark --batch-sizes 1,4,8,12,16,32
    python val_trt.py --onnx qat_best.onnx --reference best.pt --source deployment_images/ clip.mp4

``--backend auto`` takes TensorRT when it is installed (building and caching an engine beside an
``--onnx``), else ONNX Runtime. Raw outputs are decoded with ``--postprocess nms|none``; End2End
outputs are already detections. mAP goes through the same evaluator as val.py, on images
letterboxed to the input size the ONNX file or engine declares (non-square too); the batch range
comes from the file (a static batch, an engine profile's maximum) as well. ``--reference`` with
``--source`` scores, without labels, how closely the exported model reproduces the FP32 model's
own detections.
"""
from __future__ import annotations

import argparse

from utils.errors import run_cli
from utils.options import BACKENDS, EVAL_SPLITS, REFERENCE_CONF
from utils.paths import ROOT, existing_file


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="exported ONNX (raw or End2End)")
    src.add_argument("--engine", help="serialized TensorRT engine")
    p.add_argument("--data", help="dataset.yaml; evaluate mAP on its --task split")
    p.add_argument("--reference", help="FP32 checkpoint whose own detections are the ground truth on --source")
    p.add_argument("--source", nargs="+", help="unlabelled images, videos or folders of them, for agreement")
    p.add_argument("--reference-conf", type=float, default=REFERENCE_CONF,
                   help="confidence at which the reference's detections count as ground truth")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=None,
                   help="only for a model whose image size is dynamic (default 640); a fixed-size model uses its own "
                        "size, a different --imgsz is ignored with a note")
    p.add_argument("--postprocess", default="nms", choices=("nms", "none"), help="decoding of raw outputs")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.7)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--task", default="val", choices=EVAL_SPLITS)
    p.add_argument("--device", default="", help="CUDA device index for TensorRT / ORT-CUDA; cpu for ORT on CPU")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--benchmark", action="store_true", help="latency/throughput sweep over --batch-sizes")
    p.add_argument("--batch-sizes", default="1,4,8,12,16,32", help="comma-separated, for --benchmark")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per batch size")
    p.add_argument("--iters", type=int, default=50, help="timed calls per batch size")
    p.add_argument("--project", default=str(ROOT / "runs/val_trt"))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    opt = p.parse_args(argv)
    try:
        opt.batch_sizes = tuple(int(b) for b in opt.batch_sizes.split(",") if b.strip())
    except ValueError:
        p.error(f"--batch-sizes {opt.batch_sizes}: expected integers like 1,4,8")
    return opt


def main(argv: list[str] | None = None) -> dict:
    opt = vars(parse_opt(argv))
    if opt["onnx"]:  # a mistyped path is told before torch loads
        existing_file(opt["onnx"], "ONNX file")
    else:
        existing_file(opt["engine"], "TensorRT engine")
    from utils.deployment.validate import run

    opt["benchmark_sweep"] = opt.pop("benchmark")
    return run(**opt)


if __name__ == "__main__":
    run_cli(main)
