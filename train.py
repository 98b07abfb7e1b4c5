"""Train a YOLOv9 / GELAN detector or segmentation model from scratch (--cfg) or from a checkpoint (--weights).

    python train.py --cfg gelan-s.yaml --data data/bccd.yaml --epochs 200 --batch-size 16 --device 0
    python train.py --cfg gelan-c-seg.yaml --data ../shared/datasets/coco128-seg/coco128-seg.yaml  # masks too
    python train.py --resume runs/train/exp/weights/last.pt        # continue an interrupted run
    torchrun --nproc_per_node 2 train.py --cfg gelan-c.yaml --data ... --batch-size 64 --device 0,1

Writes runs/train/<name>/: weights/last.pt and best.pt (upstream's checkpoint format),
results.csv, hyp.yaml, opt.yaml, and best.pt's validation report.
"""
from __future__ import annotations

import argparse
import logging
import os

from utils.errors import run_cli
from utils.options import AMP_MODES, OPTIMIZERS, parse_flags
from utils.training.defaults import DEFAULTS
from utils.training.inputs import check_inputs


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=d["weights"], help="initial weights (.pt); tensors that fit are transferred")
    p.add_argument("--cfg", default=d["cfg"], help="model yaml, e.g. gelan-s.yaml (a name in models/detect or a path)")
    p.add_argument("--data", default=d["data"], help="dataset yaml")
    p.add_argument("--hyp", default=d["hyp"], help="hyperparameter yaml")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="total batch over all GPUs")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=d["imgsz"], help="train and val size (pixels)")
    p.add_argument("--device", default=d["device"], help="cuda device, i.e. 0 or 0,1 or cpu")
    p.add_argument("--workers", type=int, default=d["workers"], help="dataloader workers (per process)")
    p.add_argument("--project", default=d["project"], help="save to project/name")
    p.add_argument("--name", default=d["name"], help="save to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    p.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue the given last.pt, or the most recent run under --project, with its own "
                        "options; a flag typed again replaces the saved value (the change is printed)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--close-mosaic", type=int, default=d["close_mosaic"], help="train the last N epochs without mosaic")
    p.add_argument("--optimizer", default=d["optimizer"], choices=OPTIMIZERS)
    p.add_argument("--cos-lr", action="store_true", help="cosine LR schedule (default linear)")
    p.add_argument("--hold-lr", type=int, default=d["hold_lr"],
                   help="reach the final LR N epochs early and hold it: flat val mAP there shows convergence")
    p.add_argument("--patience", type=int, default=d["patience"],
                   help="stop after N epochs without improvement (0: never)")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across GPUs (DDP only)")
    p.add_argument("--amp", default=d["amp"], choices=AMP_MODES, help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    p.add_argument("--noplots", dest="plots", action="store_false",
                   help="no PR curve or confusion matrix PNGs from the final validation")
    p.add_argument("--cache", nargs="?", const="ram", default=d["cache"], choices=("", "ram"),
                   metavar="ram", help="decode the images once and keep them in RAM")
    p.add_argument("--mask-ratio", type=int, default=d["mask_ratio"],
                   help="segmentation: input pixels per pixel of the true masks (4: the prototypes' resolution)")
    p.add_argument("--unsafe-load", action="store_true",
                   help="unpickle --weights without the class allowlist (trusted files only)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (CUDA; pays off after a minute of compiling)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the forward and backward passes from CUDA graphs (one GPU; not with --compile)")
    return parse_flags(p, argv)


def main(argv=None):
    main_process = int(os.environ.get("RANK", 0)) == 0  # under torchrun, only rank 0 narrates
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING, format="%(message)s")
    opt = parse_args(argv)
    check_inputs(opt)  # before torch loads
    from utils.training.trainer import train

    return train(opt)


if __name__ == "__main__":
    run_cli(main)
