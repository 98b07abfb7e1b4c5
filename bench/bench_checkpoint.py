"""What an improving epoch's checkpoints cost: best.pt written as a second copy of last.pt (before)
against best.pt made a hard link to it (``utils.checkpoint.CheckpointWriter`` now), side by side:

    python bench/bench_checkpoint.py --cfg gelan-e.yaml --repeats 3
    -> bench/results/checkpoint_best_write_time_ratio.json

The checkpoint is the trainer's: the model and its EMA in float32 and an AdamW state (two tensors a
parameter), each file fsync'ed and renamed into place (``save_checkpoint``). The two ways alternate,
``--repeats`` times each, in ``--dir`` (default runs/bench_checkpoint: the disk runs are written to,
not a RAM-backed /tmp); the record's value is the median time with a link over the median with two
writes. The page cache is not dropped between writes.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from copy import deepcopy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def training_checkpoint(cfg: str, nc: int) -> dict:
    """A checkpoint shaped as train.py writes one mid-run: model, EMA and a filled AdamW state."""
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(cfg, nc=nc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"epoch": 0, "best_fitness": 0.0, "model": model, "ema": deepcopy(model), "updates": 1,
            "optimizer": optimizer.state_dict(), "scaler": None, "best_epoch": 0, "opt": {}, "git": None, "date": ""}


def time_ways(ckpt: dict, folder: Path, repeats: int) -> dict[str, list[float]]:
    """Seconds to put an improving epoch on disk as last.pt and best.pt, both ways, alternating."""
    from utils.checkpoint import link_checkpoint, save_checkpoint

    last, best = folder / "last.pt", folder / "best.pt"
    seconds: dict[str, list[float]] = {"two_writes": [], "write_and_link": []}
    for _ in range(repeats):
        for way in seconds:
            for f in (last, best):
                f.unlink(missing_ok=True)
            start = time.perf_counter()
            save_checkpoint(ckpt, last)
            if way == "two_writes":
                save_checkpoint(ckpt, best)
            else:
                link_checkpoint(last, best)
            seconds[way].append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="gelan-e.yaml")
    p.add_argument("--nc", type=int, default=3, help="classes (BCCD's 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of each way")
    p.add_argument("--dir", default=str(ROOT / "runs/bench_checkpoint"), help="where the files are written")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

    ckpt = training_checkpoint(args.cfg, args.nc)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        seconds = time_ways(ckpt, folder, args.repeats)
        size = (folder / "last.pt").stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    median = {way: statistics.median(s) for way, s in seconds.items()}
    ratio = median["write_and_link"] / median["two_writes"]
    model = Path(args.cfg).stem
    path = write_record("checkpoint_best_write_time_ratio", ratio, "x (write + link / two writes)", model, "-",
                        extra={"seconds": seconds, "median_seconds": median, "file_bytes": size,
                               "repeats": args.repeats, "folder": str(folder)}, results_dir=args.results_dir)
    print(f"{model} checkpoint {size / 2 ** 20:.0f} MiB: two writes {median['two_writes']:.2f} s, write + link "
          f"{median['write_and_link']:.2f} s (ratio {ratio:.2f}) -> {path}")
    return path


if __name__ == "__main__":
    run_cli(main)
