"""QAT benchmark (GPU; the lead runs it on the device): PTQ per calibration method, QAT, step time.

One `qat.py quantize --calib-method auto` run on a trained FP32 checkpoint evaluates Origin, PTQ
with each calibration method and QAT every epoch; its report becomes the records. Then the
training step of the FP32 model (unfused, BatchNorm, as train.py runs it) and of the QAT model
(fake quantization plus the FP32 teacher's forward for distillation) are timed side by side on
one repeated batch. About 5 minutes on one H100 for gelan-s trained on BCCD at 640:

    python bench/bench_qat.py --weights runs/train/bccd-gelan-s/weights/best.pt \
        --data runs/data/bccd/data.yaml --model gelan-s --imgsz 640 --batch-size 16 \
        --epochs 10 --iters 200 --task test --device 0
    -> bench/results/ptq_delta_map50_95_gelan-s_{max,percentile,mse,entropy}.json,
       qat_delta_map50_95_gelan-s.json, qat_step_time_ratio_gelan-s.json,
       qat_time_to_best_gelan-s.json, and the run folder runs/qat/bench-gelan-s

The first CUDA fake-quantization may compile Model Optimizer's extension (~1-2 min once per
machine; scripts/device_setup.sh can do it ahead); the record says how long loading it took.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def load_cuda_extension() -> float:
    """Seconds spent loading (or building) Model Optimizer's fake-quantization kernels; 0 on CPU."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    from modelopt.torch.quantization.extensions import get_cuda_ext

    t = time.perf_counter()
    get_cuda_ext()
    return time.perf_counter() - t


def run_quantize(args: argparse.Namespace, name: str) -> tuple[Path, float]:
    """The real command, `qat.py quantize --calib-method auto ...`; returns its run folder and wall time."""
    import qat

    argv = ["quantize", "--weights", args.weights, "--data", args.data, "--imgsz", str(args.imgsz),
            "--batch-size", str(args.batch_size), "--device", args.device, "--workers", str(args.workers),
            "--epochs", str(args.epochs), "--iters", str(args.iters), "--task", args.task,
            "--calib-method", "auto", "--calib-batches", str(args.calib_batches),
            "--project", args.project, "--name", name, "--exist-ok"]
    t = time.perf_counter()
    run = qat.main(argv)
    return Path(run), time.perf_counter() - t


def step_seconds(args: argparse.Namespace, qat_weights: Path, repeats: int = 2) -> dict:
    """Seconds per training step, FP32 and QAT (best of ``repeats`` alternated rounds), same batch, GPU
    and autocast precision, and that precision."""
    import torch

    from models.loading import attempt_load
    from models.quantize import set_trainable
    from utils.data.config import load_data_config, load_hyp
    from utils.quantization.checkpoint import load_quantized
    from utils.quantization.distill import FeatureDistillation, supervised_layers
    from utils.quantization.pipeline import make_loader
    from utils.torch_utils import select_device
    from utils.training.engine import make_precision, train_one_epoch
    from utils.training.loss import build_loss
    from utils.training.optim import build_optimizer

    device = select_device(args.device)
    hyp = load_hyp(ROOT / "data/hyps/hyp.qat.yaml")
    fp = attempt_load(args.weights, device=device, fuse=False).train().requires_grad_(True)
    student = set_trainable(load_quantized(qat_weights, device)[0])
    teacher = attempt_load(args.weights, device=device, fuse=True)
    stride = max(int(fp.stride.max()), 32)
    loader = make_loader(load_data_config(args.data), "train", args.imgsz, args.batch_size, stride, args.workers,
                         hyp=hyp, shuffle=True)
    batch = next(iter(loader))
    precision = make_precision(device, "bf16")
    distill = FeatureDistillation(student, teacher, supervised_layers(len(student.model), 1))
    runs = {"fp32": (fp, None), "qat": (student, distill)}
    optimizers = {k: build_optimizer(m, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
                  for k, (m, _) in runs.items()}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats + 1):  # round 0 warms up cuDNN and the allocator
        for k, (model, extra) in runs.items():
            stats = train_one_epoch(model, [batch] * args.step_iters, build_loss(model, hyp), optimizers[k],
                                    device=device, precision=precision, extra_loss_fn=extra, progress=False)
            if r:
                seconds[k].append(stats.seconds / stats.iters)
    distill.remove()
    return {**{k: min(v) for k, v in seconds.items()}, "precision": str(precision.dtype or torch.float32)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="trained FP32 checkpoint")
    p.add_argument("--data", required=True, help="dataset yaml")
    p.add_argument("--model", required=True, help="model name used in the record names, e.g. gelan-s")
    p.add_argument("--dataset", default="BCCD", help="dataset name written into the records")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--task", default="test", choices=("val", "test"))
    p.add_argument("--device", default="0")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--step-iters", type=int, default=30, help="timed steps per model and round")
    p.add_argument("--project", default=str(ROOT / "runs/qat"))
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

    ext_seconds = load_cuda_extension()
    run, wall = run_quantize(args, f"bench-{args.model}")
    report = json.loads((run / "report.json").read_text())
    origin = report["origin"]["map50_95"]
    common = {"model": args.model, "dataset": args.dataset, "results_dir": args.results_dir}
    written = []
    for trial in report["calibration"]:
        written.append(write_record(
            f"ptq_delta_map50_95_{args.model}_{trial['method']}", trial["map50_95"] - origin, "mAP50-95",
            extra={"fp32_map50_95": origin, "ptq_map50_95": trial["map50_95"], "ptq_map50": trial["map50"],
                   "chosen_by_auto": trial["chosen"], "split": args.task, "imgsz": args.imgsz,
                   "calib_batches": args.calib_batches, "run": str(run)}, **common))
    best = report["qat_best"]
    written.append(write_record(
        f"qat_delta_map50_95_{args.model}", best["map50_95"] - origin, "mAP50-95",
        extra={"fp32_map50_95": origin, "qat_map50_95": best["map50_95"], "qat_map50": best["map50"],
               "best_epoch": best["epoch"], "epochs": args.epochs, "iters": args.iters,
               "calibration": report["ptq"]["method"], "split": args.task, "run": str(run)}, **common))
    written.append(write_record(
        f"qat_time_to_best_{args.model}", report["seconds_to_qat_best"], "s",
        extra={"command_seconds": wall, "cuda_extension_load_seconds": ext_seconds, "epochs": args.epochs,
               "iters": args.iters, "note": "from loading the FP32 checkpoint to writing qat_best.pt, "
                                            "including Origin / 4 PTQ / per-epoch evaluations"}, **common))
    steps = step_seconds(args, run / "weights" / "qat_best.pt")
    written.append(write_record(
        f"qat_step_time_ratio_{args.model}", steps["qat"] / steps["fp32"], "x",
        extra={"fp32_step_ms": 1e3 * steps["fp32"], "qat_step_ms": 1e3 * steps["qat"], "batch": args.batch_size,
               "imgsz": args.imgsz, "autocast": steps["precision"],
               "note": "same batch repeated, no EMA in either; FP32 = unfused model with BatchNorm as train.py "
                       "trains it; QAT = fused fake-quantized model plus the FP32 teacher forward and "
                       "distillation"}, **common))
    for path in written:
        print(f"wrote {path}")
    return {"run": str(run), "records": [str(p) for p in written]}


if __name__ == "__main__":
    run_cli(main)
