"""QAT benchmark (GPU; the lead runs it on the device): PTQ per calibration method, QAT, time to qat_best.pt.

One `qat.py quantize --calib-method auto` run on a trained FP32 checkpoint evaluates Origin, PTQ
with each calibration method and QAT every epoch; its report becomes the records. About 3 minutes
on one H100 for gelan-s trained on BCCD at 640:

    python bench/bench_qat.py --weights runs/train/bccd-gelan-s/weights/best.pt \
        --data runs/data/bccd/data.yaml --model gelan-s --imgsz 640 --batch-size 16 \
        --epochs 10 --iters 200 --task test --device 0
    -> bench/results/ptq_delta_map50_95_gelan-s_{max,percentile,mse,entropy}.json,
       qat_delta_map50_95_gelan-s.json, qat_time_to_best_gelan-s.json, and the run folder
       runs/qat/bench-gelan-s

The step-time ratio is bench/bench_qat_step.py's record; the time from a fresh process start is
bench/bench_time_to_int8.py's.
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
    p.add_argument("--project", default=str(ROOT / "runs/qat"))
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

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
        extra={"command_seconds": wall, "epochs": args.epochs,
               "iters": args.iters, "note": "from loading the FP32 checkpoint to writing qat_best.pt, "
                                            "including Origin / 4 PTQ / per-epoch evaluations"}, **common))
    for path in written:
        print(f"wrote {path}")
    return {"run": str(run), "records": [str(p) for p in written]}


if __name__ == "__main__":
    run_cli(main)
