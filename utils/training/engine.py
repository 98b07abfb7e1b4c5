"""One training epoch: forward, loss, backward, accumulated optimizer steps, EMA.

This is the part of training that QAT fine-tuning reuses unchanged: ``qat.py`` passes its
quantized model, its own optimizer and a distillation term through ``extra_loss_fn``, and stops
after ``max_iters`` batches.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Sized

import torch
import torch.nn as nn
from tqdm import tqdm

from utils.errors import raise_if_interrupted
from utils.training.acceleration import memory_format
from utils.training.ema import ModelEMA
from utils.training.optim import Warmup

MAX_GRAD_NORM = 10.0  # upstream's clip; keeps one bad mosaic from blowing up a from-scratch run


@dataclass
class Precision:
    """Autocast dtype (None = full precision) and the gradient scaler fp16 needs against underflow."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)


def make_precision(device: torch.device, mode: str = "bf16", cpu_bf16: bool = False) -> Precision:
    """Mixed precision on CUDA, and on the CPU only with ``cpu_bf16`` (``acceleration.cpu_bf16``).
    bf16 needs no loss scaling; fp16 (GPUs without bf16) gets a GradScaler."""
    if cpu_bf16 and device.type == "cpu" and mode == "bf16":
        return Precision(torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False))
    if device.type != "cuda" or mode == "off":
        return Precision(None, torch.amp.GradScaler("cuda", enabled=False))
    if mode == "bf16" and torch.cuda.is_bf16_supported():
        return Precision(torch.bfloat16, torch.amp.GradScaler("cuda", enabled=False))
    return Precision(torch.float16, torch.amp.GradScaler("cuda", enabled=True))


@dataclass
class EpochStats:
    """What one call of ``train_one_epoch`` did."""

    loss: tuple[float, ...]  # mean loss items over the batches: the loss's item_names (box, cls, dfl[, seg])
    extra: float  # mean of extra_loss_fn's value (0 without it)
    iters: int
    images: int
    seconds: float
    optimizer_steps: int


def train_one_epoch(model: nn.Module, loader: Sized, loss_fn: Callable, optimizer: torch.optim.Optimizer, *,
                    device: torch.device, epoch: int = 0, epochs: int = 1, precision: Precision | None = None,
                    ema: ModelEMA | None = None, accumulate: int = 1, warmup: Warmup | None = None,
                    lr_factor: float = 1.0, max_iters: int | None = None,
                    extra_loss_fn: Callable[[torch.Tensor, object, torch.Tensor], torch.Tensor] | None = None,
                    world_size: int = 1, progress: bool = True, forward: Callable | None = None) -> EpochStats:
    """Train ``model`` over ``loader`` once (or for ``max_iters`` batches).

    Batches are upstream's ``(imgs uint8, targets (n, 6), paths, shapes)``. ``loss_fn(preds, targets)``
    returns ``(loss * batch, items)`` as ``ComputeLoss`` does; segmentation batches add
    ``(masks, polygons)`` and their loss is called as ``loss_fn(preds, targets, masks)``.
    ``extra_loss_fn(imgs, preds, targets)``
    returns a batch-mean scalar that is added with the same batch scaling (e.g. a distillation term
    whose teacher runs under ``torch.no_grad`` inside it); where it has a ``start(imgs)`` method, that is
    called just before the forward pass (the teacher then runs beside it). Gradients are accumulated over
    ``accumulate`` batches (the warm-up may lower that early on); each epoch ends with a step so that
    epochs are self-contained and a resumed run repeats the same sequence of steps. ``forward`` runs
    the model's forward pass in its place (a compiled ``model``: ``utils.training.acceleration``).
    """
    precision = precision or make_precision(device, "off")
    forward = model if forward is None else forward
    start_extra = getattr(extra_loss_fn, "start", None)
    layout = memory_format(model)
    model.train()
    nb = len(loader)
    n = nb if max_iters is None else min(nb, max_iters)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    mloss = None  # running mean of the loss items, as many as the loss reports
    mextra = torch.zeros((), device=device)
    done, images, steps, pending = 0, 0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False, unit="batch")
    try:  # an interrupt closes the bar too, so that what is printed next starts on a line of its own
        optimizer.zero_grad(set_to_none=True)
        for i, (imgs, targets, _, _, *segmentation) in zip(range(n), loader):  # range first: none past n
            raise_if_interrupted()
            ni = i + nb * epoch
            if warmup is not None and warmup.active(ni):
                accumulate_now = warmup.apply(optimizer, ni, lr_factor)
            else:
                accumulate_now = accumulate
            pending += 1
            will_step = pending >= accumulate_now or i == n - 1
            imgs = imgs.to(device, non_blocking=True).contiguous(memory_format=layout).float().div_(255)
            targets = targets.to(device, non_blocking=True)
            masks = [segmentation[0].to(device, non_blocking=True)] if segmentation else []
            # DDP all-reduces gradients on every backward; skip that on batches that only accumulate.
            sync = contextlib.nullcontext() if (will_step or not ddp) else model.no_sync()
            with sync:
                with precision.autocast(device):
                    if start_extra is not None:
                        start_extra(imgs)
                    preds = forward(imgs)
                    loss, items = loss_fn(preds, targets, *masks)
                    if extra_loss_fn is not None:
                        extra = extra_loss_fn(imgs, preds, targets)
                        loss = loss + extra * imgs.shape[0]
                        mextra += (extra.detach() - mextra) / (done + 1)
                precision.scaler.scale(loss * world_size).backward()  # DDP averages over ranks; upstream sums
            if will_step:
                precision.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=MAX_GRAD_NORM)
                precision.scaler.step(optimizer)
                precision.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                steps += 1
                pending = 0
            done += 1
            mloss = torch.zeros(items.shape, device=device) if mloss is None else mloss
            mloss += (items.to(device) - mloss) / done
            images += imgs.shape[0]
            bar.update()
            if progress and (i % 10 == 0 or i == n - 1):
                mem = torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0
                names = getattr(loss_fn, "item_names", [f"loss{k}" for k in range(len(mloss))])
                items_text = " ".join(f"{name} {v:.3f}" for name, v in zip(names, mloss.tolist()))
                bar.set_postfix_str(f"mem {mem:.1f}G {items_text} inst {targets.shape[0]} size {imgs.shape[-1]}")
    finally:
        bar.close()
    items = tuple(mloss.tolist()) if mloss is not None else ()
    return EpochStats(items, float(mextra), done, images, time.perf_counter() - t0, steps)
