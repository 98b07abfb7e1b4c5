"""Training benchmarks (GPU; the lead runs them on the device; every mode also runs on a CPU at toy size).

throughput (~2 min on one H100): images/s of the real training step (augmenting dataloader,
forward, TAL loss, backward, optimizer, EMA; channels-last on CUDA, as train.py) for a model built
from --cfg, after --warmup iterations, over --iters timed iterations; also the step alone on one
repeated batch. --cache decodes the images into RAM first and --compile compiles the step, as
train.py's flags of those names do; the record says which. On CUDA the end-to-end and repeated-batch
rates are also measured without models/fused_ops.py's kernels, after the others (``unfused_*``):

    python bench/bench_train.py throughput --cfg gelan-c.yaml --data data/coco128.yaml \
        --imgsz 640 --batch-size 32 --workers 16 --cache --compile
    -> bench/results/train_throughput_gelan-c.json

ddp (~4 min on two H100s): the same measurement with one GPU, then with torchrun on two
(the same batch per GPU), the ratio of total images/s and of images/s per GPU; --one-gpu-record
takes the one-GPU run from a throughput record of the same settings instead (bench/gpu_speed.sh):

    python bench/bench_train.py ddp --cfg gelan-c.yaml --data data/coco128.yaml --batch-size 32
    -> bench/results/ddp_speedup_2gpu.json, ddp_per_gpu_throughput_ratio_2gpu.json

overhead: what an epoch of train.py costs beyond its steps (loader start, validation,
checkpoints), from ``on_epoch_end`` timestamps and the repeated-batch step time:

    python bench/bench_train.py overhead --cfg tests/assets/gelan-tiny.yaml --data <BCCD yaml> \
        --dataset bccd --imgsz 64 --batch-size 32 --epochs 5 --workers 2 --device cpu --amp off
    -> bench/results/train_epoch_overhead_seconds_bccd.json

loader: the wait for data per epoch with a simulated GPU step (a sleep), a DataLoader iterated
anew each epoch against the EpochLoader stream:

    python bench/bench_train.py loader --data <BCCD yaml> --dataset bccd --imgsz 320 --batch-size 32 \
        --workers 2 --epochs 6 --step-ms 500 --cache --device cpu
    -> bench/results/loader_wait_per_epoch_ratio_bccd.json

bccd (~20 s): after `python train.py ... --data <bccd yaml>` finished, evaluate the run's
best.pt on the BCCD test split and record mAP50 and mAP50-95 with the run's train command:

    python bench/bench_train.py bccd --run runs/train/bccd --data runs/data/bccd/data.yaml
    -> bench/results/train_bccd_map50.json, train_bccd_map50_95.json

A CPU dry run of throughput / ddp: --cfg tests/assets/gelan-tiny.yaml --imgsz 64 --batch-size 4
--workers 1 --warmup 1 --iters 3 --device cpu --amp off --results-dir /tmp/x (with --compile,
add --backend aot_eager: the compile path is traced without generating code).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def measure_throughput(args: argparse.Namespace) -> dict:
    """images/s of training on this process's device (all ranks summed under torchrun)."""
    import torch
    import torch.distributed as dist

    from models import fused_ops
    from models.yolo import DetectionModel
    from utils.data.config import load_data_config, load_hyp, require_split
    from utils.data.dataset import create_dataloader
    from utils.torch_utils import select_device
    from utils.training.acceleration import channels_last, maybe_compile
    from utils.training.defaults import NOMINAL_BATCH
    from utils.training.distributed import process_group
    from utils.training.ema import ModelEMA
    from utils.training.engine import make_precision, train_one_epoch
    from utils.training.loss import build_loss
    from utils.training.optim import build_optimizer

    device = select_device(args.device)
    with process_group(device) as info:
        data = load_data_config(args.data)
        hyp = load_hyp(args.hyp)
        torch.manual_seed(0)
        model = channels_last(DetectionModel(args.cfg, nc=data["nc"]).to(device), device)  # as train.py does
        model.hyp = hyp
        loss_fn = build_loss(model)
        optimizer = build_optimizer(model, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
        ema = ModelEMA(model) if info.is_main else None
        precision = make_precision(device, args.amp)
        loader, dataset = create_dataloader(require_split(data, "train"), args.imgsz, args.batch_size, 32, hyp=hyp,
                                      augment=True, workers=args.workers, shuffle=True, rank=info.local_rank,
                                      nc=data["nc"], drop_last=args.compile)
        if args.cache:
            dataset.cache_images()
        if info.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.backends.cudnn.benchmark = True
        accumulate = max(round(NOMINAL_BATCH / (args.batch_size * info.world_size)), 1)  # as train.py steps
        step = dict(device=device, precision=precision, ema=ema, accumulate=accumulate, world_size=info.world_size,
                    progress=False, forward=maybe_compile(model, device, args.compile, backend=args.backend))

        def run(iters: int) -> tuple[int, float]:
            """Train ``iters`` batches across epoch boundaries; (images, seconds) on this rank."""
            images, start, epoch = 0, time.perf_counter(), 0
            while iters > 0:
                stats = train_one_epoch(model, loader, loss_fn, optimizer, epoch=epoch, max_iters=iters, **step)
                images, iters, epoch = images + stats.images, iters - stats.iters, epoch + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return images, time.perf_counter() - start

        run(args.warmup)
        images, seconds = run(args.iters)
        fixed = fixed_batch_rate(model, loader, loss_fn, optimizer, step, args) if not info.distributed else None
        unfused = {}
        if device.type == "cuda" and not info.distributed:  # the same, without models/fused_ops.py's kernels
            with fused_ops.enabled(False):
                n, t = run(args.iters)
                unfused = {"unfused_images_per_s": n / t,
                           "unfused_fixed_batch_images_per_s": fixed_batch_rate(model, loader, loss_fn, optimizer,
                                                                                step, args)}
        if info.distributed:
            totals = torch.tensor([float(images), seconds], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(totals[:1])
            dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
            images, seconds = int(totals[0].item()), float(totals[1].item())
        return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
                "fixed_batch_images_per_s": fixed, **unfused, "processes": info.world_size, "accumulate": accumulate,
                "memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0}


def fixed_batch_rate(model, loader, loss_fn, optimizer, step: dict, args) -> float:
    """images/s of the step alone: one batch repeated, so the dataloader cannot be the limit."""
    import torch

    from utils.training.engine import train_one_epoch

    repeated = [next(iter(loader))] * args.iters  # a list is a loader: sized and iterable
    start = time.perf_counter()
    stats = train_one_epoch(model, repeated, loss_fn, optimizer, **step)
    if step["device"].type == "cuda":
        torch.cuda.synchronize(step["device"])
    return stats.images / (time.perf_counter() - start)


def model_name(cfg: str) -> str:
    return Path(cfg).stem


def cmd_throughput(args: argparse.Namespace) -> None:
    result = measure_throughput(args)
    if args.worker_out:  # child of the ddp mode: hand the numbers back
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.worker_out).write_text(json.dumps(result))
        return
    path = write_record(f"train_throughput_{model_name(args.cfg)}", result["images_per_s"], "images/s",
                        model_name(args.cfg), Path(args.data).stem, extra={**result, **settings(args)},
                        results_dir=args.results_dir)
    print(f"{result['images_per_s']:.1f} images/s end-to-end, {result['fixed_batch_images_per_s']:.1f} images/s "
          f"on a repeated batch -> {path}")


def settings(args: argparse.Namespace) -> dict:
    import torch

    return {"imgsz": args.imgsz, "batch_size_per_gpu": args.batch_size, "amp": args.amp, "workers": args.workers,
            "warmup_iters": args.warmup, "timed_iters": args.iters, "cache": args.cache,
            "compile": f"torch.compile ({args.backend or 'inductor'})" if args.compile else "eager",
            "memory_format": "channels_last" if torch.cuda.is_available() else "contiguous",
            "torch": torch.__version__}


def cmd_ddp(args: argparse.Namespace) -> None:
    """One GPU, then two under torchrun, each in a fresh process with the same arguments."""
    common = [str(Path(__file__).resolve()), "throughput", "--cfg", args.cfg, "--data", args.data, "--hyp", args.hyp,
              "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
              "--warmup", str(args.warmup), "--iters", str(args.iters), "--amp", args.amp,
              *(["--cache"] if args.cache else []), *(["--compile"] if args.compile else []),
              *(["--backend", args.backend] if args.backend else [])]
    results = {1: one_gpu_result(args)} if args.one_gpu_record else {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (n for n in (1, 2) if n not in results):
            out = Path(tmp) / f"{n}.json"
            launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                          "--nproc_per_node", str(n)]
            device = "cpu" if args.device == "cpu" else ",".join(str(i) for i in range(n))  # cpu: a gloo dry run
            subprocess.run([*launcher, *common, "--device", device, "--worker-out", str(out)], check=True, cwd=ROOT)
            results[n] = json.loads(out.read_text())
    speedup = results[2]["images_per_s"] / results[1]["images_per_s"]
    per_gpu = {"one_gpu": results[1]["images_per_s"], "two_gpus": results[2]["images_per_s"] / 2}
    extra = {"one_gpu": results[1], "two_gpus": results[2], "images_per_s_per_gpu": per_gpu, **settings(args)}
    paths = [write_record(name, value, unit, model_name(args.cfg), Path(args.data).stem, extra=extra,
                          results_dir=args.results_dir)
             for name, value, unit in (
                 ("ddp_speedup_2gpu", speedup, "x"),
                 ("ddp_per_gpu_throughput_ratio_2gpu", per_gpu["two_gpus"] / per_gpu["one_gpu"],
                  "ratio (images/s per GPU with 2 GPUs / with 1 GPU)"))]
    print(f"1 GPU {results[1]['images_per_s']:.1f} images/s, 2 GPUs {results[2]['images_per_s']:.1f} images/s "
          f"({per_gpu['two_gpus']:.1f} per GPU): speed-up {speedup:.2f}x -> {', '.join(map(str, paths))}")


def one_gpu_result(args: argparse.Namespace) -> dict:
    """The one-GPU figures of a throughput record written earlier with these same settings (so that a
    script can measure one GPU while the other GPU does other work, and two GPUs after)."""
    from utils.data.config import read_yaml

    record = read_yaml(args.one_gpu_record, "throughput record")  # JSON is YAML
    extra = record.get("extra") or {}
    if record.get("model") != model_name(args.cfg) or extra.get("processes") != 1:
        raise UserError(f"{args.one_gpu_record}: not a one-GPU throughput record of {model_name(args.cfg)}")
    differ = {k: (extra.get(k), v) for k, v in settings(args).items() if extra.get(k) != v}
    if differ:
        raise UserError(f"{args.one_gpu_record}: measured with other settings (record, now): {differ}")
    kept = ("images_per_s", "images", "seconds", "fixed_batch_images_per_s", "processes", "accumulate", "memory_gb")
    return {**{k: extra[k] for k in kept if k in extra}, "from_record": str(args.one_gpu_record),
            "machine": record.get("machine")}


def cmd_overhead(args: argparse.Namespace) -> None:
    """Seconds an epoch of train.py costs beyond its training steps: waiting for the loader's first
    batches, validation, checkpoints. Epoch walls are read between ``on_epoch_end`` calls (the first
    epoch, which includes set-up, is left out); the steps' own time is the repeated-batch step time
    of bench_train's throughput mode times the batches per epoch."""
    import math

    from utils.data.config import load_data_config
    from utils.data.dataset import list_image_files
    from utils.training.trainer import train

    marks: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg=args.cfg, data=args.data, hyp=args.hyp, epochs=args.epochs, batch_size=args.batch_size,
              imgsz=args.imgsz, device=args.device, workers=args.workers, amp=args.amp,
              cache="ram" if args.cache else "", project=tmp, name="overhead", noval=False,
              on_epoch_end=lambda epoch, metrics: marks.append(time.perf_counter()))
    walls = [b - a for a, b in zip(marks, marks[1:])]
    images = len(list_image_files(load_data_config(args.data)["train"]))
    batches = math.ceil(images / args.batch_size)
    args.warmup, args.iters = 2, batches
    step = args.batch_size / measure_throughput(args)["fixed_batch_images_per_s"]
    overheads = [w - batches * step for w in walls]
    extra = {"epoch_wall_seconds": walls, "step_seconds": step, "batches_per_epoch": batches, "images": images,
             "overhead_per_epoch_seconds": overheads, "epochs": args.epochs, **settings(args)}
    dataset = args.dataset or Path(args.data).stem
    path = write_record(f"train_epoch_overhead_seconds_{dataset}", sum(overheads) / len(overheads), "s",
                        model_name(args.cfg), dataset, extra=extra, results_dir=args.results_dir)
    print(f"epoch {sum(walls) / len(walls):.2f} s for {batches} steps of {step:.3f} s: "
          f"{sum(overheads) / len(overheads):.2f} s beyond the steps -> {path}")


def cmd_loader(args: argparse.Namespace) -> None:
    """The loader's wait per epoch when the step itself leaves the CPU idle (a GPU step): batches are
    drawn epoch after epoch with a sleep of --step-ms per batch, once from a DataLoader iterated anew
    each epoch (persistent workers, as before EpochLoader) and once from the EpochLoader stream."""
    import torch
    from torch.utils.data import DataLoader

    from utils.data.config import load_data_config, load_hyp, require_split
    from utils.data.dataset import YoloDataset, create_dataloader, init_worker

    data, hyp = load_data_config(args.data), load_hyp(args.hyp)
    stream, dataset = create_dataloader(require_split(data, "train"), args.imgsz, args.batch_size, 32, hyp=hyp,
                                        augment=True, workers=args.workers, shuffle=True, nc=data["nc"])
    if args.cache:
        dataset.cache_images()
    per_epoch = DataLoader(dataset, batch_size=stream.sampler.batch_size, shuffle=True, num_workers=stream.num_workers,
                           persistent_workers=stream.num_workers > 0, pin_memory=torch.cuda.is_available(),
                           collate_fn=YoloDataset.collate_fn, worker_init_fn=init_worker)
    step, waits = args.step_ms / 1e3, {}
    for name, loader in (("per_epoch", per_epoch), ("stream", stream)):
        for _ in loader:  # one epoch to start the workers
            time.sleep(step)
        start, batches = time.perf_counter(), 0
        for _ in range(args.epochs):
            for _ in loader:
                time.sleep(step)
                batches += 1
        waits[name] = (time.perf_counter() - start - batches * step) / args.epochs
        print(f"{name}: {waits[name]:.3f} s of waiting for data per epoch of {len(loader)} batches", flush=True)
    dataset_name = args.dataset or Path(args.data).stem
    extra = {"wait_per_epoch_seconds": waits, "batches_per_epoch": len(stream), "step_ms": args.step_ms,
             "epochs": args.epochs, **settings(args)}
    path = write_record(f"loader_wait_per_epoch_ratio_{dataset_name}", waits["stream"] / max(waits["per_epoch"], 1e-9),
                        "ratio (EpochLoader / DataLoader iterated per epoch)", "data pipeline", dataset_name,
                        extra=extra, results_dir=args.results_dir)
    print(f"-> {path}")


def cmd_bccd(args: argparse.Namespace) -> None:
    """Record best.pt's mAP on the test split, with the train command and time from train_summary.json."""
    from utils.evaluation.validate import run as validate

    run = Path(args.run)
    best, summary_file = run / "weights" / "best.pt", run / "train_summary.json"
    if not best.is_file() or not summary_file.is_file():
        raise UserError(f"{run}: no weights/best.pt and train_summary.json; did train.py finish there?")
    summary = json.loads(summary_file.read_text())
    result = validate(args.data, weights=str(best), task="test", imgsz=args.imgsz, batch_size=32, device=args.device,
                     project=str(run), name="test", exist_ok=True)
    command = args.train_command or summary["command"]
    model = model_name(summary["cfg"])
    extra = {"split": "test", "images": result.images, "instances": result.instances, "imgsz": args.imgsz,
             "weights": str(best), "train": summary, "per_class": result.per_class}
    for name, value in (("train_bccd_map50", result.map50), ("train_bccd_map50_95", result.map50_95)):
        path = write_record(name, value, "mAP", model, "BCCD test", command=command, extra=extra,
                            results_dir=args.results_dir)
        print(f"{name}: {value:.4f} -> {path}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("throughput", "ddp", "overhead", "loader"):
        s = sub.add_parser(mode)
        s.add_argument("--cfg", default="gelan-c.yaml")
        s.add_argument("--data", default=str(ROOT / "data/coco128.yaml"))
        s.add_argument("--hyp", default=str(ROOT / "data/hyps/hyp.scratch-high.yaml"))
        s.add_argument("--imgsz", type=int, default=640)
        s.add_argument("--batch-size", type=int, default=32, help="per GPU")
        s.add_argument("--workers", type=int, default=16)
        s.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
        s.add_argument("--iters", type=int, default=50, help="timed iterations")
        s.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
        s.add_argument("--device", default="0")
        s.add_argument("--cache", action="store_true", help="decode the images into RAM first, as train.py --cache")
        s.add_argument("--compile", action="store_true", help="torch.compile the step, as train.py --compile")
        s.add_argument("--backend", default=None, help="torch.compile backend (aot_eager: a CPU dry run)")
        s.add_argument("--epochs", type=int, default=4, help="overhead mode: epochs of train.py to run")
        s.add_argument("--dataset", default="", help="overhead, loader: the record's dataset name (default: yaml stem)")
        s.add_argument("--step-ms", type=float, default=200.0, help="loader mode: simulated GPU step per batch")
        s.add_argument("--worker-out", default="", help=argparse.SUPPRESS)
        s.add_argument("--one-gpu-record", default="",
                       help="ddp mode: take the one-GPU figures from this train_throughput record (same settings)")
        s.add_argument("--results-dir", type=Path, default=None)
    s = sub.add_parser("bccd")
    s.add_argument("--run", required=True, help="the train.py run folder (runs/train/<name>)")
    s.add_argument("--data", required=True, help="BCCD data yaml written by tools/voc2yolo.py")
    s.add_argument("--imgsz", type=int, default=640)
    s.add_argument("--device", default="0")
    s.add_argument("--train-command", default="", help="record this instead of the command in train_summary.json")
    s.add_argument("--results-dir", type=Path, default=None)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    {"throughput": cmd_throughput, "ddp": cmd_ddp, "overhead": cmd_overhead, "loader": cmd_loader,
     "bccd": cmd_bccd}[args.mode](args)


if __name__ == "__main__":
    run_cli(main)
