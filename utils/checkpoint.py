"""Reading and writing checkpoints without running code from the file.

Upstream YOLOv9 checkpoints are pickles of whole modules, and plain ``torch.load`` on a pickle
can execute anything. Here they are read with ``torch.load(weights_only=True)`` plus an
allowlist: our model classes, the ``torch.nn`` layers they contain, and the numpy types
upstream's training loop stores (``best_fitness`` is a numpy array). Anything else named in the
pickle is refused with one line naming the file, unless the user explicitly asks for
``unsafe=True`` (``--unsafe-load``).

The checkpoint dict is upstream's: {'epoch', 'best_fitness', 'model', 'ema', 'updates',
'optimizer', 'opt', 'git', 'date'} with 'model' / 'ema' half-precision modules.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from utils.errors import UserError
from utils.paths import existing_file

_TORCH_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.Sequential, nn.ModuleList, nn.Upsample, nn.MaxPool2d, nn.Identity,
                 nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Mish, nn.GELU, nn.Sigmoid, nn.Tanh)


def _numpy_globals() -> list:
    """numpy's array/scalar rebuilders under both module names: numpy 1.x pickles say ``numpy.core``,
    numpy 2.x ``numpy._core``; released upstream checkpoints were written with 1.x."""
    core = np._core if hasattr(np, "_core") else np.core
    rebuild, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [np.ndarray, np.dtype, rebuild, scalar, *dtypes,
            (rebuild, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar"),
            (rebuild, "numpy._core.multiarray._reconstruct"), (scalar, "numpy._core.multiarray.scalar")]


_extra_globals: list = []


def register_safe_globals(*objs: Any) -> None:
    """Allow more classes in checkpoints (e.g. quantized layers); call before ``load_checkpoint``."""
    _extra_globals.extend(objs)


def _model_classes() -> list[type]:
    from models import common, yolo  # late: models import utils, never the other way at import time

    # Classes are found by scanning both modules, not from our layer registry, so that the QAT layer
    # copied into an upstream checkout allowlists upstream's classes there.
    ours = {obj for module in (common, yolo) for obj in vars(module).values()
            if isinstance(obj, type) and obj.__module__ == module.__name__}
    return sorted(ours, key=lambda c: c.__name__)


def _forward_of(cls: Any, name: str) -> Any:
    """Stands in for ``builtins.getattr``, which pickles of upstream's segmentation heads call:
    they keep their detection forward as an attribute (``self.detect = DDetect.forward``), stored
    as ``getattr(DDetect, 'forward')``. Only that lookup is allowed; the real getattr would let a
    file reach anything."""
    if name == "forward" and cls in _model_classes():
        return cls.forward
    raise pickle.UnpicklingError(f"GLOBAL builtins.getattr for {getattr(cls, '__name__', type(cls).__name__)}.{name}")


def safe_globals() -> list:
    """Everything a checkpoint may name: our model classes, their torch layers, numpy arrays."""
    return [*_model_classes(), *_TORCH_LAYERS, (_forward_of, "builtins.getattr"), *_numpy_globals(),
            *_extra_globals]


# Exported models users mix up with checkpoints; the tools that take them.
EXPORTED_SUFFIXES = {".onnx": "an ONNX model", ".engine": "a TensorRT engine", ".plan": "a TensorRT engine"}


def _reason(exc: BaseException) -> str:
    """The first sentence of a loader's complaint, or '' when it says nothing a user can read
    (garbage bytes fail with bare numbers such as KeyError(101))."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours some messages
    text = re.sub(r"^\[[^\]]*\][\s.]*", "", text)  # c10's "[enforce fail at file.cc:180] ." prefix
    first = re.split(r"(?<=[.:])\s", (text.splitlines() or [""])[0])[0].rstrip(".:")
    return first if re.search(r"[A-Za-z]{3}", first) else ""


@contextlib.contextmanager
def _only_these_globals(allowed: list) -> Iterator[None]:
    """torch's allowlist is one per process, libraries add to it when imported (Model Optimizer: 83
    entries), and the unpickler scans all of it for every object it rebuilds. While a checkpoint is
    read it holds ours alone: stricter, and a pickled module loads faster (the demo model, with Model
    Optimizer imported: 0.38-0.46 s against 0.53-0.60 s on one EPYC thread)."""
    others = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(others)


def load_checkpoint(path: str | Path, unsafe: bool = False) -> dict:
    """The checkpoint dict at ``path`` (a bare pickled module comes back as ``{'model': module}``).

    Raises ``UserError("<path>: ...")`` for a missing file, a file that is not a PyTorch checkpoint
    (or is truncated), and a pickle naming a global outside the allowlist.
    """
    path = existing_file(path, "checkpoint")
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        raise UserError(f"{path}: {EXPORTED_SUFFIXES[path.suffix.lower()]}, not a PyTorch checkpoint; "
                        "val_trt.py and detect.py run exported models, this tool needs the .pt it came from")
    try:
        if unsafe:
            print(f"warning: {path}: --unsafe-load: unpickling without restrictions; "
                  "this can run code from the file, use it only for files you trust", file=sys.stderr)
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            with _only_these_globals(safe_globals()):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises turning weights_only off; ours names the flag and the condition.
        name = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"refuses to unpickle {name.group(1)} (not an allowed model class)" if name else \
            "refuses to unpickle objects other than weights"
        if "Weights only load failed" in str(exc) or name:
            raise UserError(f"{path}: {what}; load it with --unsafe-load only if you trust the file") from None
        raise UserError(f"{path}: not a PyTorch checkpoint" + (f" ({_reason(exc)})" if _reason(exc) else "")) \
            from None
    except Exception as exc:  # garbage bytes make the unpickler fail in many ways (IndexError, KeyError...)
        reason = _reason(exc)
        raise UserError(f"{path}: not a readable PyTorch checkpoint, truncated or another format"
                        + (f" ({reason})" if reason else "")) from None
    if isinstance(obj, nn.Module):
        return {"model": obj}
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict or model")
    return obj


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write ``obj`` so that ``path`` is either the old file or the complete new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_checkpoint(source: Path, path: Path) -> Path:
    """``path`` made a second name of the finished file ``source`` (a copy where the file system has
    no hard links), atomically as ``save_checkpoint``: best.pt costs no second write of the same bytes.
    A later ``save_checkpoint`` to either name replaces that name alone; a write into the file itself
    (``torch.save(obj, path)``) would change both names."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class CheckpointWriter:
    """Writes checkpoints on a background thread, one write at a time and in order, so the next
    epoch trains while a file (a fsync'ed copy of the model, its EMA and the optimizer) reaches the
    disk; the first path is written, the others become links to it. ``obj`` must not change after
    ``submit``: hand over copies. ``wait`` returns once everything submitted is on disk and raises
    what a write raised."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj: dict, paths: list[Path]) -> None:
        self.wait()
        # not a daemon: a run that stops on an exception still finishes the file it was writing
        self._thread = threading.Thread(target=self._write, args=(obj, paths), name="checkpoint-writer")
        self._thread.start()

    def _write(self, obj: dict, paths: list[Path]) -> None:
        try:
            first, *others = paths
            save_checkpoint(obj, first)
            for path in others:
                link_checkpoint(first, path)
        except BaseException as exc:  # raised again in the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
