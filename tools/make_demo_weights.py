"""Train the FP32 model ``python qat.py demo`` starts from, and write it to models/demo/<cfg>.pt.

The demo is about quantizing; training its model from scratch takes minutes more than everything
else on a 2-core CPU without bf16, so the repo ships one trained here (``qat.py demo --train`` still
trains it where the user runs it). The images are drawn from ``--seed``, a seed the demo's own
data never uses by default, so the demo's validation images are new to the shipped model. Object
sizes vary more than in the demo's own training (``--scale``) so that one model serves the demo's
other ``--imgsz`` values too.

The checkpoint is a finished run's ``best.pt`` (the EMA in half precision, no optimizer), plus
``made_by``: the command, the commit, the machine and the validation score of this run.

Usage:  python tools/make_demo_weights.py --task detect --device 0
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.record import machine_name  # noqa: E402  (the machine as every benchmark record names it)
from utils.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from utils.demo import CFGS, RECIPES, SHIPPED_DATA_SEED, SHIPPED_WEIGHTS, train_fp32  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.options import parse_flags  # noqa: E402
from utils.paths import increment_path  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(CFGS), default="detect")
    p.add_argument("--images", type=int, default=3000, help="training images to draw (a tenth as many for val)")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr0", type=float, default=0.006, help="AdamW's learning rate")
    p.add_argument("--scale", type=float, default=0.5, help="random object scale, +/- this fraction")
    p.add_argument("--imgsz", type=int, default=128, help="training size, the demo's default")
    p.add_argument("--seed", type=int, default=SHIPPED_DATA_SEED,
                   help="draws the images and seeds the training (the demo warns when its own --seed is this)")
    p.add_argument("--device", default="0", help="cpu, or a cuda device")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--project", default=str(ROOT / "runs/demo-weights"))
    p.add_argument("--output", default=None, help="where to write the checkpoint (default: models/demo/<cfg>.pt)")
    return parse_flags(p, argv)


def _commit() -> str | None:
    """HEAD, with ``+changes`` when the working tree differs from it (the weights then came from code no
    commit holds)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> Path:
    from utils.data.synthetic import make_shapes_dataset

    opt = parse_args(argv)
    save_dir = increment_path(Path(opt.project) / opt.task)
    data = make_shapes_dataset(save_dir / "data", n_train=opt.images, n_val=max(opt.images // 10, 1),
                               imgsz=opt.imgsz, seed=opt.seed, masks=opt.task == "segment")
    # quick: one validation at the end, no plots, no checkpoints between (the cosine schedule's last EMA is kept)
    recipe = dataclasses.replace(RECIPES[opt.task], lr0=opt.lr0, quick=True)
    train_dir = train_fp32(CFGS[opt.task], data, opt, save_dir, recipe=recipe, hyp_changes={"scale": opt.scale})
    with open(train_dir / "results.csv", newline="") as f:
        last_epoch = [{k.strip(): float(v) for k, v in row.items()} for row in csv.DictReader(f)][-1]
    ckpt = load_checkpoint(train_dir / "weights" / "best.pt")
    ckpt["git"] = _commit()
    ckpt["made_by"] = {"command": "python tools/make_demo_weights.py " + shlex.join(argv or sys.argv[1:]),
                       "machine": machine_name(), "date": ckpt["date"], "data_seed": opt.seed,
                       "images": opt.images, "last_epoch_results": last_epoch}
    output = Path(opt.output) if opt.output else SHIPPED_WEIGHTS[opt.task]
    save_checkpoint(ckpt, output)
    print(json.dumps({"output": str(output), **ckpt["made_by"]}, indent=2))
    return output


if __name__ == "__main__":
    run_cli(main)
