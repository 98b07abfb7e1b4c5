"""A full training run: model, data, optimizer, epochs, validation, checkpoints, resume.

``train.py`` only parses flags and calls ``train``; tests and benchmarks call it directly. The
epoch itself lives in ``utils.training.engine.train_one_epoch`` so that QAT reuses exactly the same step.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import shlex
import sys
import time
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import yaml

from utils.errors import UserError
from utils.evaluation.cached_batches import CachedBatches
from utils.options import CLI_FLAGS, check_flags, check_imgsz, resume_options, run_options, typed_flags
from utils.paths import increment_path
from utils.seeding import epoch_seed, seed_everything
from utils.torch_utils import LOGGER, de_parallel, select_device
from utils.training.acceleration import channels_last, cpu_bf16, maybe_compile, multi_tensor_step
from utils.training.cuda_graphs import maybe_graph
from utils.training.defaults import DEFAULTS
from utils.training.distributed import DistInfo, broadcast_object, process_group
from utils.training.ema import ModelEMA
from utils.training.engine import make_precision, train_one_epoch
from utils.training.inputs import NO_MODEL
from utils.training.loss import build_loss
from utils.training.optim import Warmup, build_optimizer, lr_lambda

# What a resume cannot change: the model and its optimizer state come from the checkpoint.
FIXED_ON_RESUME = ("cfg", "weights", "optimizer")

RESULTS_COLUMNS = ("epoch", "train/box_loss", "train/cls_loss", "train/dfl_loss", "metrics/precision",
                   "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/cls_loss",
                   "val/dfl_loss", "x/lr0", "x/lr1", "x/lr2")
# Segmentation runs: upstream's segment/train.py columns, box (B) and mask (M) metrics.
SEGMENT_RESULTS_COLUMNS = ("epoch", "train/box_loss", "train/seg_loss", "train/cls_loss", "train/dfl_loss",
                           "metrics/precision(B)", "metrics/recall(B)", "metrics/mAP_0.5(B)", "metrics/mAP_0.5:0.95(B)",
                           "metrics/precision(M)", "metrics/recall(M)", "metrics/mAP_0.5(M)",
                           "metrics/mAP_0.5:0.95(M)", "val/box_loss", "val/seg_loss", "val/cls_loss", "val/dfl_loss",
                           "x/lr0", "x/lr1", "x/lr2")
METRIC_KEYS = ("precision", "recall", "map50", "map50_95")


def make_options(opt: argparse.Namespace | dict | None = None, **overrides) -> argparse.Namespace:
    """Defaults, then ``opt``, then keyword overrides; unknown keys are a user error (typos).

    ``cli_flags`` (utils.options) records what was given on purpose: the typed flags of a command
    line, or every key a Python caller passed.
    """
    merged = dict(DEFAULTS)
    given = {**(vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})), **overrides}
    typed = typed_flags(given) if CLI_FLAGS not in given else set(given[CLI_FLAGS]) | set(overrides)
    given.pop(CLI_FLAGS, None)
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise UserError(f"train: unknown option(s) {', '.join(unknown)}")
    merged.update(given)
    return argparse.Namespace(**merged, **{CLI_FLAGS: tuple(sorted(typed))})


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a resume restores besides weights and optimizer."""

    start_epoch: int = 0
    best_fitness: float = 0.0
    best_epoch: int = -1


def plain_options(opt: argparse.Namespace) -> dict:
    """``opt`` as plain values (paths as str) so the checkpoint loads with ``weights_only=True``."""
    return run_options(vars(opt))


def make_checkpoint(model: nn.Module, ema: ModelEMA, optimizer, scaler, epoch: int, best_fitness: float,
                    best_epoch: int, opt: argparse.Namespace) -> dict:
    """Upstream's checkpoint dict, plus 'scaler' (fp16 loss scale) and 'best_epoch'.

    Modules stay FP32 while the run goes on so that ``--resume`` continues from the exact weights
    (upstream stores them half and resumes from rounded ones); ``finalize_checkpoint`` halves them.
    """
    # The raw weights go into a copy of the EMA module so that a SyncBatchNorm / DDP wrapper never
    # reaches the file: the safe loader only knows the plain model classes.
    raw = deepcopy(ema.ema).to(memory_format=torch.contiguous_format)  # files as without channels_last
    raw.load_state_dict(de_parallel(model).state_dict())
    for saved, live in zip(raw.parameters(), de_parallel(model).parameters()):
        saved.requires_grad_(live.requires_grad)  # resume rebuilds the same optimizer groups from these
    return {
        "epoch": epoch,
        "best_fitness": best_fitness,
        "model": raw,
        "ema": deepcopy(ema.ema).to(memory_format=torch.contiguous_format),
        "updates": ema.updates,
        "optimizer": deepcopy(optimizer.state_dict()),  # a copy: the file may be written while training goes on
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "best_epoch": best_epoch,
        "opt": plain_options(opt),
        "git": None,
        "date": _dt.datetime.now().isoformat(),
    }


def finalize_checkpoint(path: Path, written: dict | None = None) -> dict:
    """Strip training state from a finished run's file: the EMA becomes 'model', as upstream ships it.
    ``written``: what the file was written from (``kept_for_finalizing``), when this process wrote it;
    reading it back is a safe load of two pickled models. Returns what was written, so the final
    validation need not read the file again."""
    from utils.checkpoint import load_checkpoint, save_checkpoint

    ckpt = dict(load_checkpoint(path) if written is None else written)
    ckpt["model"] = (ckpt.get("ema") or ckpt["model"]).cpu().half()  # a file that loads where no GPU is
    for k in ("optimizer", "ema", "updates", "scaler"):
        ckpt[k] = None
    ckpt["epoch"] = -1
    save_checkpoint(ckpt, path)
    return ckpt


def kept_for_finalizing(ckpt: dict) -> dict:
    """What ``finalize_checkpoint`` needs of a checkpoint dict: all but the optimizer state, and but
    the raw weights when an EMA replaces them, so that a run holds one model copy per file it keeps."""
    return {**ckpt, "optimizer": None, "model": None if ckpt.get("ema") is not None else ckpt["model"]}


def restore_training_state(ckpt: dict, optimizer, ema: ModelEMA | None, scaler) -> RunState:
    """Load optimizer, EMA and loss-scaler state from a checkpoint; return where the run stands."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ema is not None and ckpt.get("ema") is not None:
        ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
        ema.updates = ckpt["updates"]
    if ckpt.get("scaler") and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    return RunState(ckpt["epoch"] + 1, float(ckpt["best_fitness"]), int(ckpt.get("best_epoch", -1)))


def find_resume_checkpoint(resume: str | bool, project: str | Path) -> Path:
    """``--resume path/to/last.pt``, or the most recent ``last.pt`` under ``project`` for a bare ``--resume``."""
    if isinstance(resume, (str, Path)) and str(resume) not in ("", "True"):
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {resume}: checkpoint not found")
        return path
    found = sorted(Path(project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"--resume: no */weights/last.pt under {project} to resume")
    return found[-1]


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

def build_model(opt: argparse.Namespace, nc: int, resume_ckpt: dict | None) -> nn.Module:
    """From a resumed checkpoint, from ``--weights`` (matching tensors transferred), or from ``--cfg``.

    The YAML's head decides the class (``Model``): a segmentation head gives a ``SegmentationModel``.
    """
    from models.yolo import Model
    from utils.checkpoint import load_checkpoint

    if resume_ckpt is not None:
        return resume_ckpt["model"].float()
    if opt.weights:
        ckpt = load_checkpoint(opt.weights, unsafe=opt.unsafe_load)
        src = ckpt.get("ema") or ckpt.get("model")
        if not isinstance(src, nn.Module):
            raise UserError(f"{opt.weights}: holds no model object to train from" +
                            ("; it is a PTQ/QAT checkpoint (qat.py), pass the FP32 weights it came from"
                             if ckpt.get("quant") is not None else ""))
        src = src.float()
        model = Model(opt.cfg or src.yaml, ch=3, nc=nc)
        theirs, ours = src.state_dict(), model.state_dict()
        match = {k: v for k, v in theirs.items() if k in ours and v.shape == ours[k].shape}
        model.load_state_dict(match, strict=False)
        LOGGER.info(f"Transferred {len(match)}/{len(ours)} tensors from {opt.weights}")
        return model
    if not opt.cfg:
        raise UserError(NO_MODEL)
    return Model(opt.cfg, ch=3, nc=nc)


def cache_images(dataset, split: str) -> None:
    """--cache ram: decode every image once; small sets (BCCD) then train at GPU speed, not JPEG speed."""
    nbytes = dataset.cache_images()
    LOGGER.info(f"{split}: cached {len(dataset)} images in RAM ({nbytes / 1e9:.2f} GB)")


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

class ResultsCSV:
    """Upstream's results.csv: one row per finished epoch, appended so a resumed run continues it."""

    def __init__(self, path: Path, columns: tuple[str, ...] = RESULTS_COLUMNS):
        self.path = path
        self.columns = columns

    def append(self, values: list[float]) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(self.columns)
            writer.writerow([values[0]] + [f"{v:.5g}" for v in values[1:]])

    def truncate_after(self, epoch: int) -> None:
        """Drop rows beyond epoch number ``epoch`` (written after the checkpoint a resume starts from)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.reader(f))
        kept = rows[:1] + [r for r in rows[1:] if int(r[0]) <= epoch]
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerows(kept)


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------

def train(opt: argparse.Namespace | dict | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None, **overrides) -> Path:
    """Train as ``train.py`` does; return the run folder (``weights/last.pt``, ``best.pt``, ``results.csv``).

    ``on_epoch_end(epoch, metrics)`` runs on the main process after each epoch's checkpoint is written.
    """
    opt = make_options(opt, **overrides)
    # Inputs are checked and loaded before the run folder exists: a failed start leaves nothing behind.
    check_flags(vars(opt))
    ckpt = save_dir = None
    if opt.resume:  # before the device is chosen: a resume keeps the run's own --device unless typed again
        opt, ckpt, save_dir = _resume(opt)
        check_flags(vars(opt))
    device = select_device(opt.device)
    run: dict = {}  # _train puts the path of last.pt and its writer here, for the message of an interrupt
    with process_group(device) as info:
        try:
            return _train(opt, ckpt, save_dir, device, info, on_epoch_end, run)
        except KeyboardInterrupt:
            if "writer" in run:
                run["writer"].wait()  # the checkpoint of the last finished epoch may still be on its way
            last = run.get("last")
            if info.is_main and last is not None and last.is_file():
                raise KeyboardInterrupt(f"{last} holds the last finished epoch; continue with "
                                        f"python train.py --resume {last}") from None
            raise


def _resume(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict, Path]:
    """The interrupted run's options (with the flags typed again), its checkpoint and its folder."""
    from utils.checkpoint import load_checkpoint

    last = find_resume_checkpoint(opt.resume, opt.project)
    ckpt = load_checkpoint(last)
    if ckpt.get("quant") is not None:
        raise UserError(f"{last}: a PTQ/QAT checkpoint of qat.py; continue it with qat.py quantize --resume {last}")
    if not isinstance(ckpt.get("model"), nn.Module) or not isinstance(ckpt.get("opt"), dict):
        raise UserError(f"{last}: not a train.py checkpoint (no model and options to resume)")
    if ckpt.get("optimizer") is None or ckpt.get("epoch", -1) < 0:
        raise UserError(f"{last}: this run finished (training state was stripped); nothing to resume")
    saved = {k: v for k, v in ckpt["opt"].items() if k in DEFAULTS}
    merged = resume_options(saved, vars(opt), typed_flags(opt), FIXED_ON_RESUME, f"--resume {last}")
    restored = make_options({**merged, "resume": str(last)})
    return restored, ckpt, last.parent.parent


def _train(opt: argparse.Namespace, ckpt: dict | None, save_dir: Path | None, device: torch.device, info: DistInfo,
           on_epoch_end: Callable[[int, dict], None] | None, run: dict) -> Path:
    from utils.checkpoint import CheckpointWriter
    from utils.data.config import load_data_config, load_hyp, require_split
    from utils.data.dataset import check_task, create_dataloader, model_task, set_epoch

    t_start = time.perf_counter()
    hyp = dict(opt.hyp) if isinstance(opt.hyp, dict) else load_hyp(opt.hyp)
    opt.hyp = hyp  # the checkpoint carries the values, not a path that may change
    data = load_data_config(opt.data)
    nc, names = data["nc"], data["names"]
    if opt.batch_size % info.world_size:
        raise UserError(f"--batch-size {opt.batch_size}: must be a multiple of the {info.world_size} processes")
    if opt.hold_lr >= opt.epochs:
        raise UserError(f"--hold-lr {opt.hold_lr}: must be below --epochs {opt.epochs}, or no epoch anneals the LR")

    seed_everything(epoch_seed(opt.seed, -1, info.rank))
    model = channels_last(build_model(opt, nc, ckpt).to(device), device, cpu=opt.cpu_speedups)
    model.nc, model.names, model.hyp = nc, names, hyp
    task = model_task(model)
    model_name = opt.resume or opt.weights or opt.cfg
    stride = max(int(model.stride.max()), 32)
    check_imgsz(opt.imgsz, stride)
    imgsz = opt.imgsz

    accumulate = max(round(opt.nominal_batch / opt.batch_size), 1)
    weight_decay = hyp["weight_decay"] * opt.batch_size * accumulate / opt.nominal_batch
    optimizer = build_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], weight_decay)
    if opt.cpu_speedups:
        multi_tensor_step(optimizer)
    for g in optimizer.param_groups:
        g["initial_lr"] = g["lr"]
    lf = lr_lambda(opt.epochs, hyp["lrf"], opt.cos_lr, opt.hold_lr)
    precision = make_precision(device, opt.amp, cpu_bf16=cpu_bf16(device, opt.cpu_speedups))
    ema = ModelEMA(model) if info.is_main else None

    state = RunState()
    if ckpt is not None:
        state = restore_training_state(ckpt, optimizer, ema, precision.scaler)
        if state.start_epoch >= opt.epochs:
            raise UserError(f"{opt.resume}: already trained {opt.epochs} epochs; nothing to resume")
        LOGGER.info(f"Resuming {save_dir} at epoch {state.start_epoch + 1} of {opt.epochs}")
        del ckpt

    if opt.sync_bn and info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    batch_per_rank = opt.batch_size // info.world_size
    train_loader, dataset = create_dataloader(
        require_split(data, "train"), imgsz, batch_per_rank, stride, hyp=hyp, augment=True, workers=opt.workers,
        shuffle=True, prefix="train: ", seed=opt.seed, close_mosaic=opt.close_mosaic > 0,
        rank=info.local_rank, nc=nc, drop_last=opt.compile, task=task, mask_ratio=opt.mask_ratio)
    check_task(dataset, str(model_name), task)
    loss_fn = build_loss(model)
    evaluator = None
    if info.is_main:
        val_loader, val_dataset = create_dataloader(require_split(data, "val"), imgsz, batch_per_rank * 2, stride,
                                                    hyp=hyp, rect=True, pad=0.5, workers=opt.workers,
                                                    prefix="val: ", nc=nc, task=task, mask_ratio=opt.mask_ratio)
        check_task(val_dataset, str(model_name), task)
        evaluator = Evaluator(data, imgsz, batch_per_rank * 2, CachedBatches(val_loader), loss_fn, opt.epochs,
                              opt.noval)
        if opt.cache:
            cache_images(val_dataset, "val")
    if opt.cache:
        cache_images(dataset, "train")
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = maybe_graph(maybe_compile(model, device, opt.compile), device, opt.cuda_graphs)

    if save_dir is None:
        made = increment_path(Path(opt.project) / opt.name, opt.exist_ok) if info.is_main else None
        save_dir = Path(broadcast_object(str(made) if made else None, info))
    weights_dir = save_dir / "weights"
    last, best = weights_dir / "last.pt", weights_dir / "best.pt"
    if info.is_main:
        weights_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "hyp.yaml").write_text(yaml.safe_dump(hyp, sort_keys=False))
        (save_dir / "opt.yaml").write_text(yaml.safe_dump(plain_options(opt), sort_keys=False))

    nb = len(train_loader)
    warmup = Warmup(max(round(hyp["warmup_epochs"] * nb), opt.min_warmup_iters), hyp["warmup_bias_lr"],
                    hyp["warmup_momentum"], hyp["momentum"], accumulate)
    results = ResultsCSV(save_dir / "results.csv", SEGMENT_RESULTS_COLUMNS if task == "segment" else RESULTS_COLUMNS)
    if info.is_main:
        results.truncate_after(state.start_epoch)
        LOGGER.info(f"Training {opt.epochs} epochs, batch {opt.batch_size} (x{accumulate} accumulation), "
                    f"imgsz {imgsz}, {info.world_size} process(es), results to {save_dir}")
    torch.backends.cudnn.benchmark = True

    best_fitness, best_epoch = state.best_fitness, state.best_epoch
    # Each process of a resumed run keeps its own clock: the pause between them is not training time.
    session = {"first_epoch": state.start_epoch + 1}
    sessions = (previous_sessions(save_dir / "train_summary.json") if state.start_epoch else []) + [session]
    run["last"] = last
    writer = run["writer"] = CheckpointWriter()
    written: dict[Path, dict] = {}  # what this process wrote to last.pt and best.pt, for finalize_checkpoint
    if opt.close_mosaic:  # for the epochs, not from an epoch on: the loader prepares batches ahead
        dataset.close_mosaic(from_epoch=opt.epochs - opt.close_mosaic)
    for epoch in range(state.start_epoch, opt.epochs):
        seed_everything(epoch_seed(opt.seed, epoch, info.rank))
        set_epoch(train_loader, epoch)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * lf(epoch)
        stats = train_one_epoch(model, train_loader, loss_fn, optimizer, device=device, epoch=epoch,
                                epochs=opt.epochs, precision=precision, ema=ema, accumulate=accumulate,
                                warmup=warmup, lr_factor=lf(epoch), world_size=info.world_size,
                                progress=info.is_main, forward=forward)
        stop = False
        if info.is_main:
            ema.update_attr(model)
            metrics, fitness = evaluator.epoch(ema.ema, epoch)
            masks = (f", mask mAP50 {metrics['mask']['map50']:.4f}, mask mAP50-95 {metrics['mask']['map50_95']:.4f}"
                     if metrics.get("mask") else "")
            LOGGER.info(f"epoch {epoch + 1}/{opt.epochs}: train loss {sum(stats.loss):.4f} "
                        f"({stats.images / max(stats.seconds, 1e-9):.1f} img/s), mAP50 {metrics['map50']:.4f}, "
                        f"mAP50-95 {metrics['map50_95']:.4f}{masks}")
            if fitness > best_fitness or best_epoch < 0:
                best_fitness, best_epoch = fitness, epoch
            lrs = [g["lr"] for g in optimizer.param_groups]
            mask_values = [metrics["mask"][k] for k in METRIC_KEYS] if task == "segment" else []
            results.append([epoch + 1, *stats.loss, *(metrics[k] for k in METRIC_KEYS), *mask_values,
                            *metrics["val_loss"], *(lrs + [0.0] * 3)[:3]])
            stop = opt.patience > 0 and not opt.noval and epoch - best_epoch >= opt.patience
            if opt.save_every_epoch or best_epoch == epoch or stop or epoch == opt.epochs - 1:
                ckpt = make_checkpoint(model, ema, optimizer, precision.scaler, epoch, best_fitness, best_epoch, opt)
                paths = [last, best] if best_epoch == epoch else [last]
                writer.submit(ckpt, paths)
                if info.distributed:  # torchrun ends every rank as soon as one stops: the file must be on disk
                    writer.wait()
                written.update(dict.fromkeys(paths, kept_for_finalizing(ckpt)))
                del ckpt
            session.update(last_epoch=epoch + 1, seconds=round(time.perf_counter() - t_start, 1))
            write_summary(save_dir / "train_summary.json", opt, sessions, best_epoch, best_fitness, info.world_size,
                          device)
            if stop:
                LOGGER.info(f"Stopping early: no improvement for {opt.patience} epochs (best epoch {best_epoch + 1})")
            if on_epoch_end is not None:
                writer.wait()  # the callback may read the files
                on_epoch_end(epoch, {**metrics, "fitness": fitness, "train_loss": stats.loss})
        if broadcast_object(stop, info):
            break
    writer.wait()

    if info.is_main:
        finalized = {f: finalize_checkpoint(f, written.get(f)) for f in (last, best) if f.exists()}
        if best in finalized:
            evaluator.final(finalized[best]["model"], best, device, save_dir, plots=opt.plots)
    return save_dir


def previous_sessions(path: Path) -> list[dict]:
    """The processes an interrupted run already ran in, from its train_summary.json (written every epoch)."""
    try:
        return list(json.loads(path.read_text()).get("sessions", []))
    except (OSError, ValueError):
        return []


def write_summary(path: Path, opt: argparse.Namespace, sessions: list[dict], best_epoch: int, best_fitness: float,
                  world_size: int, device: torch.device) -> None:
    """How the run went, for benchmark records: the command, epochs (numbered from 1), wall time per process.

    ``sessions`` lists the processes a resumed run ran in; ``train_seconds`` is the last one's.
    """
    summary = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "cfg": opt.cfg, "data": opt.data, "epochs": opt.epochs, "start_epoch": sessions[-1]["first_epoch"],
        "last_epoch": sessions[-1]["last_epoch"], "best_epoch": best_epoch + 1, "best_fitness": best_fitness,
        "train_seconds": sessions[-1]["seconds"], "sessions": sessions, "processes": world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


@dataclass
class Evaluator:
    """Validation on the main process: the EMA weights each epoch, best.pt with plots at the end."""

    data: dict
    imgsz: int
    batch_size: int
    loader: object
    loss_fn: Callable
    epochs: int
    noval: bool = False

    def epoch(self, model: nn.Module, epoch: int) -> tuple[dict, float]:
        """Metrics and fitness ('mask' holds the mask metrics of a segmentation model); with --noval only
        the final epoch is measured (others report zeros)."""
        from utils.data.dataset import model_task
        from utils.evaluation.validate import run as validate

        zero_loss = (0.0,) * len(self.loss_fn.item_names)
        if self.noval and epoch != self.epochs - 1:
            zeros = dict.fromkeys(METRIC_KEYS, 0.0)
            return {**zeros, "val_loss": zero_loss, "mask": zeros if model_task(model) == "segment" else None}, 0.0
        # half=False: a half/float round trip would truncate the EMA weights themselves.
        r = validate(self.data, batch_size=self.batch_size, imgsz=self.imgsz, model=model, dataloader=self.loader,
                    half=False, plots=False, compute_loss=self.loss_fn)
        val_loss = tuple(float(x) for x in r.loss) if r.loss is not None else zero_loss
        metrics = {"precision": r.precision, "recall": r.recall, "map50": r.map50, "map50_95": r.map50_95,
                   "val_loss": val_loss, "mask": r.mask}
        return metrics, float(r.fitness)

    def final(self, model: nn.Module, best: Path, device: torch.device, save_dir: Path, plots: bool = True) -> None:
        """best.pt's ``model`` (as written there) on the validation split with per-class table,
        best_val.json and (``plots``) plots."""
        from utils.evaluation.validate import run as validate

        model = model.float().to(device)
        LOGGER.info(f"Validating {best}")
        r = validate(self.data, batch_size=self.batch_size, imgsz=self.imgsz, model=model, dataloader=self.loader,
                    save_dir=save_dir, plots=plots, verbose=True)
        (save_dir / "best_val.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n")
