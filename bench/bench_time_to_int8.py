"""Time from process start to a validated INT8 model, as a user on a fresh machine meets it (GPU;
the lead runs it on the device):

    python bench/bench_time_to_int8.py --weights runs/train/bccd-gelan-s/weights/best.pt \\
        --data .data/bccd/bccd_device.yaml --model gelan-s --device 0
    -> bench/results/qat_time_to_best_fresh_gelan-s.json

It runs the real command, ``python qat.py quantize --calib-method auto ...``, as a child process
and times it from the child's start (Python start-up and every import included) to the last
write of ``qat_best.pt``. Fresh: the child gets empty folders for every kernel cache (torch
extensions, Triton, Inductor, CUDA's PTX cache) and a copy of the dataset without label caches. The record says
whether Model Optimizer's CUDA extension was built (it must not be: its 45-56 s build is what this
figure used to include) and gives seconds per stage: start-up (before the pipeline's clock
starts), loading + the Origin evaluation, calibration, the range searches of the four methods,
their four PTQ evaluations, and each QAT epoch up to the best one (training, evaluation).

``--also-eager`` also runs the same command with ``--no-cuda-graphs`` (the steps launched from
Python, as before CUDA graphs became the default on one GPU), each fresh, and writes their ratio:
``qat_time_to_best_fresh_ratio_to_eager_<model>``; ``--rounds N`` repeats both, alternating which goes
first, and records means. Before timing, one untimed child imports the libraries, as a fresh
``pip install`` leaves them in the OS file cache.

Toy run on a CPU (a few minutes; untrained random weights, so the mAPs mean nothing):

    python bench/bench_time_to_int8.py --dry-run --data <BCCD yaml> --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

SPLITS = ("train", "val", "test")
CACHE_VARIABLES = ("TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH")


def fresh_dataset(data: str, folder: Path) -> Path:
    """A copy of the dataset (files, not links; no ``*.cache``) and a yaml pointing at it."""
    from utils.data.config import load_data_config, read_yaml

    raw, resolved = read_yaml(data, "data yaml"), load_data_config(data)
    root = Path(resolved["path"])
    for split in SPLITS:
        for entry in (raw.get(split) or []) if isinstance(raw.get(split), list) else [raw.get(split)]:
            if entry and Path(str(entry)).is_absolute() and not Path(str(entry)).is_relative_to(root):
                raise UserError(f"{data}: {split} entry {entry} lies outside path {root}; cannot copy it fresh")
    shutil.copytree(root, folder / "data", symlinks=False, ignore=shutil.ignore_patterns("*.cache"))
    copy = {**raw, "path": str(folder / "data")}
    out = folder / "data.yaml"
    out.write_text(yaml.safe_dump(copy, sort_keys=False))
    return out


def toy_weights(folder: Path, nc: int, names: list[str]) -> Path:
    """A random-weight gelan-t checkpoint for the CPU dry run."""
    import torch

    from models.yolo import DetectionModel
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = DetectionModel("gelan-t.yaml", nc=nc)
    model.names = names
    return save_checkpoint({"epoch": -1, "best_fitness": 0.0, "model": model.half(), "ema": None, "updates": 0,
                            "optimizer": None, "opt": {}, "git": None, "date": ""}, folder / "toy.pt")


def quantize_command(args: argparse.Namespace, weights: Path, data: Path, project: Path, name: str) -> list[str]:
    return [sys.executable, str(ROOT / "qat.py"), "quantize", "--weights", str(weights), "--data", str(data),
            "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size), "--device", args.device,
            "--workers", str(args.workers), "--epochs", str(args.epochs), "--iters", str(args.iters),
            "--task", args.task, "--calib-method", "auto", "--calib-batches", str(args.calib_batches),
            "--project", str(project), "--name", name, "--exist-ok"]


def stages(report: dict, startup: float) -> dict:
    """Seconds per stage up to qat_best.pt, from the run's report."""
    seconds = report.get("seconds", {})
    out = {"startup": startup, "load_and_origin": seconds.get("load_and_origin")}
    out.update({k: seconds.get(k) for k in ("calibration", "range_search", "ptq_evaluation", "ptq")})
    best = (report.get("qat_best") or {}).get("epoch", -1)
    for e in report.get("epochs", []):
        if e["epoch"] <= best:
            out[f"epoch_{e['epoch']}_train"] = e.get("train_seconds")
            out[f"epoch_{e['epoch']}_eval"] = e.get("eval_seconds")
    return out


def extension_built(folder: Path) -> bool:
    """Whether anything compiled a torch extension (Model Optimizer's modelopt_cuda_ext) into ``folder``."""
    return any(p.suffix == ".so" for p in folder.rglob("*"))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="", help="trained FP32 checkpoint (not needed with --dry-run)")
    p.add_argument("--data", required=True, help="dataset yaml (BCCD converted by tools/voc2yolo.py)")
    p.add_argument("--model", default="gelan-s", help="model name in the record name")
    p.add_argument("--dataset", default="BCCD", help="dataset name written into the record")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--task", default="test", choices=("val", "test"))
    p.add_argument("--device", default="0")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--keep", default="", help="keep the run folder here (default: a temporary folder, removed)")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    p.add_argument("--also-eager", action="store_true",
                   help="also run the same command with --no-cuda-graphs: a side-by-side ratio record")
    p.add_argument("--rounds", type=int, default=1, help="fresh runs of each way; the record is their mean")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU toy run: random gelan-t weights, 64 px, 1 epoch of 2 batches; record in a temp folder")
    args = p.parse_args(argv)
    if args.dry_run:
        args.imgsz, args.batch_size, args.epochs, args.iters, args.calib_batches = 64, 4, 1, 2, 2
        args.device, args.workers, args.model = "cpu", 2, "toy-gelan-t"
        args.results_dir = args.results_dir or tempfile.mkdtemp(prefix="bench_time_to_int8_")
    elif not args.weights:
        raise UserError("--weights: a trained FP32 checkpoint is needed (or --dry-run)")

    warm_file_cache()
    defaults, eagers = [], []
    for i in range(args.rounds):  # with --also-eager the order alternates, so neither way always goes first
        order = ("eager", "run") if i % 2 == 0 else ("run", "eager")
        for name in order if args.also_eager else ("run",):
            (eagers if name == "eager" else defaults).append(
                fresh_run(args, ["--no-cuda-graphs"] if name == "eager" else [], name))
    run, seconds = defaults[-1], statistics.mean(r["seconds"] for r in defaults)
    extra = {"stages_seconds": run["stages"], "command_seconds": run["wall"],
             "seconds_each_round": [r["seconds"] for r in defaults],
             "pipeline_seconds_to_qat_best": run["report"]["seconds_to_qat_best"],
             "cuda_extension_built": any(r["built"] for r in defaults),
             "best_epoch": (run["report"].get("qat_best") or {}).get("epoch"),
             "chosen_calibration": run["report"]["ptq"]["method"],
             "qat_best_map50_95": (run["report"].get("qat_best") or {}).get("map50_95"),
             "origin_map50_95": (run["report"].get("origin") or {}).get("map50_95"),
             "command": " ".join(run["command"][1:]), "epochs": args.epochs, "iters": args.iters,
             "imgsz": args.imgsz, "batch_size": args.batch_size, "split": args.task,
             "note": "mean over rounds, each from the child process's start (imports included) to the last write of "
                     "qat_best.pt; empty kernel caches and a fresh copy of the data each; the OS file cache warmed "
                     "once by importing the libraries (as a pip install leaves it), not dropped; stages: the last "
                     "round"}
    path = write_record(f"qat_time_to_best_fresh_{args.model}", seconds, "s", args.model, args.dataset,
                        extra=extra, results_dir=args.results_dir)
    print(json.dumps(run["stages"], indent=1))
    print(f"qat_best.pt {seconds:.1f} s after start (mean of {len(defaults)}; CUDA extension built: "
          f"{extra['cuda_extension_built']}) -> {path}")
    out = {"record": str(path), "seconds": seconds, "extension_built": extra["cuda_extension_built"]}
    if eagers:
        eager_seconds = statistics.mean(r["seconds"] for r in eagers)
        side = {"default_seconds": seconds, "eager_seconds": eager_seconds,
                "default_each_round": [r["seconds"] for r in defaults],
                "eager_each_round": [r["seconds"] for r in eagers],
                "default_stages_seconds": run["stages"], "eager_stages_seconds": eagers[-1]["stages"],
                "default_best_epoch": extra["best_epoch"],
                "eager_best_epoch": (eagers[-1]["report"].get("qat_best") or {}).get("epoch"),
                "eager_command": " ".join(eagers[-1]["command"][1:]),
                "note": "means over rounds of the same fresh command, eager (--no-cuda-graphs) and the default, the "
                        "order alternating by round"}
        ratio_path = write_record(f"qat_time_to_best_fresh_ratio_to_eager_{args.model}", seconds / eager_seconds,
                                  "ratio", args.model, args.dataset, extra=side, results_dir=args.results_dir)
        print(f"default / eager: {seconds:.1f} s / {eager_seconds:.1f} s = {seconds / eager_seconds:.2f} "
              f"-> {ratio_path}")
        out.update(eager_seconds=eager_seconds, ratio_record=str(ratio_path))
    return out


def warm_file_cache() -> None:
    """Import the libraries once, untimed: a machine that just ran ``pip install`` holds their files in its
    OS file cache, and without this the first timed child alone would read them from disk."""
    subprocess.run([sys.executable, "-c", "import torch, cv2, models.quant_modules"], cwd=ROOT, check=True)


def fresh_run(args: argparse.Namespace, flags: list[str], name: str) -> dict:
    """One ``qat.py quantize`` child with empty kernel caches and a fresh copy of the data: its seconds to
    qat_best.pt (from the child's start), wall time, report, stages and whether an extension was built."""
    with tempfile.TemporaryDirectory(prefix="fresh_") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, **{v: str(tmp / "caches" / v.lower()) for v in CACHE_VARIABLES}}
        data = fresh_dataset(args.data, tmp)
        if args.dry_run:
            from utils.data.config import load_data_config

            config = load_data_config(data)
            weights = toy_weights(tmp, config["nc"], config["names"])
        else:
            weights = Path(args.weights).resolve()
        project = Path(args.keep).resolve() if args.keep else tmp / "runs"
        command = quantize_command(args, weights, data, project, name) + flags
        started = time.time()
        subprocess.run(command, env=env, cwd=ROOT, check=True)
        wall = time.time() - started
        run = project / name
        report = json.loads((run / "report.json").read_text())
        best_file = run / "weights" / "qat_best.pt"
        if not best_file.is_file():
            raise RuntimeError(f"{run}: the run wrote no qat_best.pt")
        to_best = best_file.stat().st_mtime - started
        built = extension_built(tmp / "caches" / "torch_extensions_dir")
    return {"seconds": to_best, "wall": wall, "report": report, "built": built, "command": command,
            "stages": stages(report, to_best - report["seconds_to_qat_best"])}


if __name__ == "__main__":
    run_cli(main)
