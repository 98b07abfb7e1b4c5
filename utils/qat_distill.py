"""Feature distillation from the float model that cannot blow up, whatever the model size.

The anchor adds plain MSEs between layer outputs of the quantized and the float model. Their size
follows the feature magnitudes, which differ by orders of magnitude between layers and models: on
t/s models users saw that term reach ~1e6 and wreck the detector. Here each layer contributes its
*relative* error ||s - t||^2 / ||t||^2 (scale-free, about 1e-3..1e-1 for INT8), the layers are
averaged, and the term is rescaled every step to ``weight`` times the detection loss. Its value is
therefore bounded by the detection loss, and its gradient is that of ``weight * det * log(error)``:
it pulls every model towards its float teacher at the same relative pace.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from utils.torch_utils import de_parallel


def supervised_layers(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer and the last one before the head (the anchor's choice)."""
    if stride < 1:
        raise ValueError(f"supervision stride must be >= 1, got {stride}")
    return sorted(set(range(0, n_layers - 1, stride)) | {n_layers - 2})


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def relative_error(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 in float32 (autocast features are bf16/fp16)."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).mean() / (t.pow(2).mean() + eps)


class DetectionLossMemo:
    """Wraps a detection loss and remembers its last per-image value for the distillation scale."""

    def __init__(self, loss_fn: Callable):
        self.loss_fn = loss_fn
        self.last_per_image: torch.Tensor | None = None

    def __call__(self, preds, targets):
        loss, items = self.loss_fn(preds, targets)
        self.last_per_image = loss.detach().sum() / _tensors(preds)[0].shape[0]
        return loss, items


class FeatureDistillation:
    """``extra_loss_fn`` for ``utils.engine.train_one_epoch``: runs the teacher on the same images and
    returns the rescaled relative feature error of the student's last forward pass."""

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[int], detection: DetectionLossMemo,
                 weight: float = 1.0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.detection = detection
        self.weight = weight
        self.layers = layers
        self._student_out: dict[int, list[torch.Tensor]] = {}
        self._teacher_out: dict[int, list[torch.Tensor]] = {}
        s_layers, t_layers = de_parallel(student).model, self.teacher.model
        self._hooks = [s_layers[i].register_forward_hook(self._keep(self._student_out, i)) for i in layers]
        self._hooks += [t_layers[i].register_forward_hook(self._keep(self._teacher_out, i)) for i in layers]
        self.raw_sum, self.raw_count = 0.0, 0  # running mean of the unscaled error, for the log

    @staticmethod
    def _keep(store: dict, i: int):
        def hook(module, args, out):
            store[i] = _tensors(out)
        return hook

    def error(self) -> torch.Tensor:
        """Mean relative error over the supervised layers of the last student / teacher passes."""
        errs = [relative_error(s, t) for i in self.layers
                for s, t in zip(self._student_out.get(i, []), self._teacher_out.get(i, []))]
        if not errs:
            raise RuntimeError("distillation: no layer outputs captured (was the student run first?)")
        return torch.stack(errs).mean()

    def __call__(self, imgs: torch.Tensor, preds, targets) -> torch.Tensor:
        with torch.no_grad():
            self.teacher(imgs)
        err = self.error()
        self._student_out.clear()
        self._teacher_out.clear()
        self.raw_sum += float(err.detach())
        self.raw_count += 1
        if self.weight == 0 or self.detection.last_per_image is None:
            return err * 0.0
        scale = self.weight * self.detection.last_per_image / err.detach().clamp(min=1e-12)
        return err * scale

    def take_mean_error(self) -> float:
        """Mean unscaled error since the last call (one epoch), then reset."""
        mean = self.raw_sum / max(self.raw_count, 1)
        self.raw_sum, self.raw_count = 0.0, 0
        return mean

    def remove(self) -> None:
        """Detach the hooks (before saving or exporting the student)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
