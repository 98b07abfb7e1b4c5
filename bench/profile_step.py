"""Where a training step's time goes on the GPU, FP32 (as train.py trains) and QAT (the fake-quantized
student plus the FP32 teacher's forward for distillation), on one repeated real batch, bf16 autocast.

    python bench/profile_step.py --cfg gelan-s.yaml --data .data/bccd/bccd_device.yaml \
        --batch-size 16 --imgsz 640 --out runs/profile

Each variant (FP32 / QAT, with cuDNN's autotuner off and on) is timed phase by phase with the GPU
synchronised between phases: forward, loss (plus distillation), backward, optimizer. Then
torch.profiler lists the top operators of one variant of each kind. The models and steps are
bench/bench_qat_step.py's (channels-last on CUDA; ``--compile`` for the compiled steps,
``--cuda-graphs`` for the replayed ones: the profiler lists the kernels inside the graphs). A
diagnosis tool: the models are randomly initialised and it writes no record, only
``<out>/profile.md``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_qat_step import add_build_arguments  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402
from utils.training.engine import MAX_GRAD_NORM  # noqa: E402

PHASES = ("forward", "loss", "backward", "optimizer")


def build_runs(args: argparse.Namespace, device: torch.device) -> dict:
    """bench_qat_step's FP32 model and QAT student (with its teacher), as that benchmark times them."""
    from bench.bench_qat_step import build_models, make_steps
    from utils.training.acceleration import memory_format

    built = build_models(args.cfg, args.data, args.imgsz, args.batch_size, args.workers, device)
    imgs, targets, *_ = built["batch"]
    imgs = imgs.to(device).contiguous(memory_format=memory_format(built["fp32"])).float() / 255
    runs = make_steps(built, device, "compiled" if args.compile else "graphed" if args.cuda_graphs else "eager")
    return {"batch": (imgs, targets.to(device)), "runs": runs}


def step(run: tuple, batch: tuple, device: torch.device, clock: dict | None) -> None:
    """One training step as ``utils.training.engine.train_one_epoch`` takes it; ``clock`` collects phase seconds."""
    model, forward, loss_fn, optimizer, distill = run
    imgs, targets = batch
    model.train()  # as train_one_epoch does: a CUDA graph is recorded for a training pass only
    marks = [time.perf_counter()]

    def mark():
        if clock is not None:
            torch.cuda.synchronize(device)
            marks.append(time.perf_counter())

    with torch.autocast("cuda", dtype=torch.bfloat16):
        if distill is not None:
            distill.start(imgs)  # the teacher beside the forward pass, as the engine runs it
        preds = forward(imgs)
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
    add_build_arguments(p)
    p.add_argument("--iters", type=int, default=20, help="timed steps per variant")
    p.add_argument("--rows", type=int, default=25, help="operators per profiler table")
    p.add_argument("--device", default="0")
    p.add_argument("--compile", action="store_true", help="profile the torch.compile'd steps")
    p.add_argument("--cuda-graphs", action="store_true", help="profile the steps replayed from CUDA graphs")
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
