"""The flags every tool shares, checked alike and before any work: one table, one size rule, one resume rule.

A flag means the same thing in every tool: ``--batch-size 0`` is refused by train.py, val.py, qat.py,
export_qat.py, val_trt.py and detect.py with the same line, before a model is loaded or a run folder
made. Sizes follow one rule: every image side is a multiple of the model's largest stride (32 for
every YOLOv9 / GELAN config), and a size that is not is refused, never rounded, because a rounded
size would train, export or score another model than the one asked for.

A resumed run keeps the options it was started with; a flag typed again on the ``--resume`` command
replaces the saved value and is reported, and flags the checkpoint has already fixed (the model,
the calibration...) are refused rather than silently ignored.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from utils.errors import UserError
from utils.logs import LOGGER

MIN_STRIDE = 32  # the largest stride of every detection config; a model's own may be larger
# Choices and defaults of flags that several tools share, kept in this torch-free module so that a
# parser builds, and a bad flag or a mistyped path is refused, before torch loads (seconds on a small CPU).
OPTIMIZERS = ("SGD", "Adam", "AdamW")
AMP_MODES = ("bf16", "fp16", "off")
REFERENCE_CONF = 0.25  # a deployment threshold: what an application shows of the FP32 model
BACKENDS = ("auto", "tensorrt", "onnxruntime")  # who runs an exported .onnx (detect.py, val_trt.py)
EVAL_SPLITS = ("train", "val", "test")  # val.py --task: the data yaml split it scores

# flag (argparse dest) -> (lowest value, what the number counts). None values mean "not given".
COUNTS: dict[str, tuple[int, str]] = {
    "batch_size": (1, "images per batch"),
    "workers": (0, "dataloader workers; 0 loads in the main process"),
    "epochs": (1, "epochs"),
    "iters": (1, "iterations"),
    "calib_batches": (1, "calibration batches"),
    "max_det": (1, "detections kept per image"),
    "topk_all": (1, "detections kept per image"),
    "patience": (0, "epochs without improvement; 0 never stops"),
    "close_mosaic": (0, "final epochs without mosaic"),
    "hold_lr": (0, "final epochs at the final LR"),
    "warmup": (0, "untimed calls"),
    "auto_skip": (0, "layers kept in floating point"),
    "supervision_stride": (0, "layer stride of the distillation; 0 turns it off"),
    "qat_epochs": (0, "QAT epochs; 0 stops after PTQ"),
    "images": (1, "images"),
    "threads": (1, "threads"),
    "vid_stride": (1, "video frame step"),
    "line_thickness": (1, "pixels"),
    "seed": (0, "random seed"),
    "mask_ratio": (1, "input pixels per mask pixel"),
}
# flag -> (the test a value must pass, what the test says)
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "conf_thres": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "iou_thres": (lambda v: 0 <= v <= 1, "between 0 and 1"),
    "percentile": (lambda v: 0 < v <= 100, "above 0 and at most 100"),
    "distill_weight": (lambda v: v >= 0, "at least 0"),
    "lr": (lambda v: v > 0, "above 0"),
    "ema_decay": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "reference_conf": (lambda v: 0 <= v <= 1, "between 0 and 1"),
}
# pairs of switches that cannot be on together -> why
EXCLUSIVE: dict[tuple[str, str], str] = {
    ("compile", "cuda_graphs"): "choose one: each takes over the training step",
}


def flag(dest: str) -> str:
    """The command-line spelling of an option: batch_size -> --batch-size."""
    return "--" + dest.replace("_", "-")


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def check_flags(values: Mapping, minimums: Mapping[str, int] | None = None) -> None:
    """Refuse the first out-of-range common flag in ``values`` (argparse dests -> values).

    Keys this module has no rule for are ignored, so a tool passes all its options. ``minimums``
    lowers or raises a count's bound where a tool gives a value a documented meaning (``qat.py
    quantize --epochs 0``: PTQ only).
    """
    bounds = {k: lowest for k, (lowest, _) in COUNTS.items()} | dict(minimums or {})
    for key, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        if key in bounds:
            if not isinstance(value, int) or value < bounds[key]:
                raise UserError(f"{flag(key)} {value}: must be at least {bounds[key]} ({COUNTS[key][1]})")
        elif key in RANGES and not RANGES[key][0](value):
            raise UserError(f"{flag(key)} {value}: must be {RANGES[key][1]}")
    if values.get("imgsz") is not None:
        check_imgsz(values["imgsz"])
    for (a, b), why in EXCLUSIVE.items():
        if values.get(a) and values.get(b):
            raise UserError(f"{flag(a)} and {flag(b)}: {why}")
    for key in ("batch_sizes", "classes"):
        items = values.get(key)
        lowest = 1 if key == "batch_sizes" else 0
        if items is not None and any(not isinstance(v, int) or v < lowest for v in items):
            raise UserError(f"{flag(key)} {_show(items)}: every value must be at least {lowest}")


def check_imgsz(imgsz: int | Sequence[int], stride: int = MIN_STRIDE) -> None:
    """Refuse an image size whose sides are not positive multiples of ``stride`` (the model's largest).

    Rounding instead would hand the user a model of another input size than they asked for.
    """
    sides = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    stride = max(int(stride), MIN_STRIDE)
    bad = [s for s in sides if s < stride or s % stride]
    if bad:
        nearest = max(stride, round(bad[0] / stride) * stride)
        raise UserError(f"--imgsz {_show(imgsz)}: every side must be a multiple of the model stride {stride} "
                        f"(e.g. {nearest})")


# ------------------------------------------------------------------------------------------------
# Which flags were typed, and what a resume keeps
# ------------------------------------------------------------------------------------------------

CLI_FLAGS = "cli_flags"  # the option recording which flags were typed
# Options of one command, never of the run: what was typed, and trust in a file (--unsafe-load).
PER_COMMAND = (CLI_FLAGS, "unsafe_load")


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, plus ``cli_flags``: the dests typed on the command line.

    A resume needs to tell "--workers 8 typed again" from "8 is the default": only the first
    replaces the saved run's value. The parse is repeated on a copy whose defaults are all
    suppressed, so exactly the typed options come back.
    """
    opt = parser.parse_args(argv)
    probe = copy.deepcopy(parser)
    _suppress_defaults(probe)
    setattr(opt, CLI_FLAGS, tuple(sorted(vars(probe.parse_args(argv)))))
    return opt


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        else:
            action.default = argparse.SUPPRESS


def typed_flags(opt: argparse.Namespace | Mapping) -> set[str]:
    """The options given on purpose: ``cli_flags`` from the command line, else every key of a dict."""
    values = vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt)
    given = values.get(CLI_FLAGS)
    return set(values) - {CLI_FLAGS} if given is None else set(given)


def run_options(values: Mapping) -> dict:
    """The options a run saves with itself (opt.yaml, checkpoints): plain values (paths as str, so the
    checkpoint loads with ``weights_only=True``), without the per-command ones."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k not in PER_COMMAND}


# Flags that find or name the run folder, which a resume reuses: never a change of the run.
LOCATING = ("resume", "project", "name", "exist_ok", *PER_COMMAND)


def resume_options(saved: Mapping, new: Mapping, typed: Iterable[str], fixed: Iterable[str] = (),
                   source: str = "--resume") -> dict:
    """The saved run's options, with each flag typed again on the resume command in its place.

    A typed flag in ``fixed`` (what the checkpoint already decided: the model, the calibration)
    that differs from the saved value is refused; every replaced value is logged. The per-command
    options, and options newer than the checkpoint, come from the new command.
    """
    merged = {**new, **run_options(saved), **{k: new[k] for k in PER_COMMAND if k in new}}
    changes = []
    for key in sorted(set(typed) - set(LOCATING)):
        old, value = saved.get(key), new.get(key)
        if old == value:
            continue
        if key in fixed:
            raise UserError(f"{source}: {flag(key)} cannot change on a resume (the run was started with "
                            f"{flag(key)} {_show(old)}); start a new run instead")
        merged[key] = value
        changes.append(f"{flag(key)} {_show(old)} -> {_show(value)}")
    LOGGER.info("Resuming with the run's own options" + (f", except {', '.join(changes)}" if changes else ""))
    return merged
