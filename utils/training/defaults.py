"""Every option of a training run with its default, in a module without torch: train.py builds its
parser from this table, and refuses a bad flag, before torch loads (seconds on a small CPU)."""
from __future__ import annotations

from utils.paths import ROOT

NOMINAL_BATCH = 64  # upstream's nbs: gradients are accumulated to about this many images per step
MIN_WARMUP_ITERS = 100

# Every option of a run with upstream's defaults; train.py's flags and train(**kwargs) share this table.
DEFAULTS: dict = dict(
    weights="", cfg="", data=str(ROOT / "data/coco.yaml"), hyp=str(ROOT / "data/hyps/hyp.scratch-high.yaml"),
    epochs=100, batch_size=16, imgsz=640, device="", workers=8, project=str(ROOT / "runs/train"), name="exp",
    exist_ok=False, resume=False, seed=0, close_mosaic=0, optimizer="SGD", cos_lr=False, hold_lr=0, patience=100,
    sync_bn=False, amp="bf16", noval=False, cache="", compile=False, cuda_graphs=False,
    mask_ratio=4,
    # Library-only knobs (no CLI flag): a run of a few hundred small batches, like the CPU demo,
    # needs every batch to be a step and a short warm-up, or it barely leaves the warm-up.
    nominal_batch=NOMINAL_BATCH, min_warmup_iters=MIN_WARMUP_ITERS,
    # The demo's CPU training: bf16 autocast, channels-last, multi-tensor optimizer (acceleration.py);
    # plots: the final validation's PR curve and confusion matrix. save_every_epoch=False writes last.pt
    # only at an improvement, an early stop and the last epoch (a resume then restarts from the latest of
    # those): each checkpoint costs the CPU demo model 0.6 s of copying and pickling, 10% of its epoch.
    cpu_speedups=False, plots=True, save_every_epoch=True,
    unsafe_load=False,
)
