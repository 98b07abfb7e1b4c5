"""Where a training step's time goes on the GPU, FP32 (as train.py trains) and QAT (the fake-quantized
student plus the FP32 teacher's forward for distillation), on one repeated real batch, bf16 autocast.

    python bench/profile_step.py --cfg gelan-s.yaml --data .data/bccd/bccd_device.yaml \
        --batch-size 16 --imgsz 640 --out runs/profile

Each variant (FP32 / QAT, with cuDNN's autotuner off and on) is timed phase by phase with the GPU
synchronised between phases: forward, loss (plus distillation), backward, optimizer. Then
torch.profiler lists the top operators of one variant of each kind. A diagnosis tool: the models
are randomly initialised and it writes no record, only ``<out>/profile.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from copy import deepcopy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402
from utils.training.engine import MAX_GRAD_NORM  # noqa: E402

PHASES = ("forward", "loss", "backward", "optimizer")


def build_runs(args: argparse.Namespace, device: torch.device) -> dict:
    """FP32 model, and a max-calibrated QAT student with its fused FP32 teacher, on ``device``."""
    from models.quantize import calibrate, prepare, set_trainable
    from models.yolo import DetectionModel
    from utils.data.config import load_data_config, load_hyp
    from utils.quantization.distill import FeatureDistillation, supervised_layers
    from utils.quantization.pipeline import make_loader
    from utils.training.loss import build_loss
    from utils.training.optim import build_optimizer

    hyp = load_hyp(ROOT / "data/hyps/hyp.qat.yaml")
    data = load_data_config(args.data)
    torch.manual_seed(0)
    fp = DetectionModel(args.cfg, nc=data["nc"]).to(device)
    loader = make_loader(data, "train", args.imgsz, args.batch_size, 32, args.workers, hyp=hyp, shuffle=True)
    imgs, targets, *_ = next(iter(loader))
    imgs, targets = imgs.to(device).float() / 255, targets.to(device)
    teacher = deepcopy(fp).eval().fuse()
    student = prepare(deepcopy(fp))
    calibrate(student, [imgs])
    set_trainable(student)
    distill = FeatureDistillation(student, teacher, supervised_layers(len(student.model), 1))
    fp.train()
    return {"batch": (imgs, targets), "runs": {
        "fp32": (fp, build_loss(fp, hyp), None, build_optimizer(fp, "SGD", 0.01, 0.937, 5e-4)),
        "qat": (student, build_loss(student, hyp), distill, build_optimizer(student, "SGD", 1e-4, 0.937, 5e-4))}}


def step(run: tuple, batch: tuple, device: torch.device, clock: dict | None) -> None:
    """One training step as ``utils.training.engine.train_one_epoch`` takes it; ``clock`` collects phase seconds."""
    model, loss_fn, distill, optimizer = run
    imgs, targets = batch
    marks = [time.perf_counter()]

    def mark():
        if clock is not None:
            torch.cuda.synchronize(device)
            marks.append(time.perf_counter())

    with torch.autocast("cuda", dtype=torch.bfloat16):
        preds = model(imgs)
        mark()
        loss, _ = loss_fn(preds, targets)
        if distill is not None:
            loss = loss + distill(imgs, preds, targets) * imgs.shape[0]
        mark()
    loss.backward()
    mark()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    mark()
    if clock is not None:
        for name, a, b in zip(PHASES, marks, marks[1:]):
            clock[name] += b - a


def time_variant(run: tuple, batch: tuple, device: torch.device, iters: int) -> dict:
    """Milliseconds per step: phase by phase (synchronised) and whole steps back to back."""
    for _ in range(3):
        step(run, batch, device, None)
    clock: dict = defaultdict(float)
    for _ in range(iters):
        step(run, batch, device, clock)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        step(run, batch, device, None)
    torch.cuda.synchronize(device)
    whole = (time.perf_counter() - t) / iters
    return {**{k: 1e3 * v / iters for k, v in clock.items()}, "step": 1e3 * whole}


def profile_table(run: tuple, batch: tuple, device: torch.device, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(run, batch, device, None)
        torch.cuda.synchronize(device)
    averages = prof.key_averages()
    return "\n\n".join(f"```\n{averages.table(sort_by=key, row_limit=rows)}\n```"
                       for key in ("self_cpu_time_total", "self_cuda_time_total"))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="gelan-s.yaml")
    p.add_argument("--data", required=True, help="dataset yaml (one training batch is read)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant")
    p.add_argument("--rows", type=int, default=25, help="operators per profiler table")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="0")
    p.add_argument("--out", default=str(ROOT / "runs/profile"))
    args = p.parse_args(argv)

    from utils.torch_utils import select_device

    device = select_device(args.device)
    built = build_runs(args, device)
    lines = [f"# Training step profile: {args.cfg}, batch {args.batch_size}, {args.imgsz} px, bf16, "
             f"{torch.cuda.get_device_name(device)}\n",
             "| variant | " + " | ".join(PHASES) + " | whole step (unsynchronised) |",
             "|---" * (len(PHASES) + 2) + "|"]
    for bench in (False, True):
        torch.backends.cudnn.benchmark = bench
        for name, run in built["runs"].items():
            ms = time_variant(run, built["batch"], device, args.iters)
            lines.append(f"| {name}, cudnn.benchmark={bench} | " + " | ".join(f"{ms[k]:.1f}" for k in PHASES)
                         + f" | {ms['step']:.1f} ms |")
            print(lines[-1], flush=True)
    for name, run in built["runs"].items():
        lines += [f"\n## {name} (cudnn.benchmark=True): top operators\n",
                  profile_table(run, built["batch"], device, args.rows)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'profile.md'}")
    return out


if __name__ == "__main__":
    run_cli(main)
