"""Feature distillation from the float model that stays bounded, whatever the model size.

The anchor adds plain MSEs between layer outputs of the quantized and the float model. Their size
follows the feature magnitudes, which differ by orders of magnitude between layers and models: on
t/s models users saw that term reach ~1e6 and wreck the detector. Here each layer contributes its
*relative* error ||s - t||^2 / ||t||^2 (scale-free: about 1e-5..1e-2 for INT8 against its own
float model), the layers are averaged, and the term enters the loss as ``weight`` times that mean,
next to the detection loss (per image, like it). Its gradient is proportional to the error, so it
is small where quantization already matches the float model and nothing drifts; an error that
feeds on itself, as an error normalised by its own value would, cannot build up (the tests train
a tiny model at 100x the QAT learning rate and the error stays where PTQ left it).
"""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn as nn

from models import fused_ops
from models.quantize_rules import flat_tensors
from utils.torch_utils import de_parallel
from utils.training.acceleration import channels_last, maybe_compile, memory_format
from utils.training.cuda_graphs import maybe_graph_inference

EPS = 1e-8


def supervised_layers(n_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer and the last one before the head (the anchor's choice)."""
    if stride < 1:
        raise ValueError(f"supervision stride must be >= 1, got {stride}")
    return sorted(set(range(0, n_layers - 1, stride)) | {n_layers - 2})


def relative_error(student: torch.Tensor, teacher: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """||s - t||^2 / ||t||^2 in float32 (autocast features are bf16/fp16)."""
    return _relative_error(student, *_reference(teacher, eps))


def _reference(teacher: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """What a student feature is compared with: the teacher's feature and its energy (+ eps), in
    float32 (a CUDA feature stays as it is: models/fused_ops.py reads it in float32 where it is used)."""
    energy = fused_ops.mean_square(teacher)
    if energy is not None:
        return teacher, energy + eps
    t = teacher.float()
    return t, t.square().mean() + eps


def _relative_error(student: torch.Tensor, teacher: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    fused = fused_ops.mean_squared_error(student, teacher)
    if fused is not None:
        return fused / energy
    # one kernel for student.float() - teacher: the subtraction promotes bf16 exactly
    return torch.sub(student, teacher.float()).square().mean() / energy


def _mean_relative_error(students: list[torch.Tensor], references: list[tuple[torch.Tensor, torch.Tensor]]):
    return torch.stack([_relative_error(s, t, e) for s, (t, e) in zip(students, references)]).mean()


def mask_outputs(model: nn.Module) -> list[str]:
    """Names of the modules whose outputs are a segmentation head's mask coefficients (one tower
    per level) and prototypes, every branch; empty for a detector."""
    layers = de_parallel(model).model
    head = layers[-1]
    if not hasattr(head, "mask_branch"):
        return []
    name_of = {id(m): f"model.{len(layers) - 1}.{n}" for n, m in head.named_modules()}
    return [name_of[id(m)] for b in range(head.branches) for towers, proto in [head.mask_branch(b)]
            for m in (*towers, proto)]


def _truncated(model: nn.Module, last: int, device: torch.device) -> nn.Module:
    """A frozen copy of ``model`` that stops after layer ``last``: a detector's teacher never needs
    its head, which is a good part of its compute."""
    copy = deepcopy(model)
    copy.model = copy.model[: last + 1]
    return channels_last(copy.eval().requires_grad_(False), device)


class FeatureDistillation:
    """``extra_loss_fn`` for ``utils.training.engine.train_one_epoch``: runs the teacher on the same images and
    returns ``weight`` x the mean relative feature error of the student's last forward pass (the
    supervised layers' outputs and, for a segmentation model, its mask coefficients and prototypes).

    The teacher runs without autograd, in the caller's autocast precision; its side of every error
    (the float32 feature and its energy) is computed there too. With ``compile`` (CUDA) the teacher
    pass and the error terms are each compiled into a few fused kernels; with ``graphs`` (CUDA) the
    teacher's pass is replayed from a CUDA graph (``utils.training.cuda_graphs``). The engine calls
    ``start`` before the student's forward pass, so that on CUDA the teacher runs beside it.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layers: list[int], weight: float = 1.0,
                 compile: bool = False, backend: str | None = None, graphs: bool = False):
        device = next(teacher.parameters()).device
        masks = mask_outputs(student)
        self.teacher = _truncated(teacher, len(teacher.model) - 1 if masks else max(layers), device)
        self.weight = weight
        self.sites = [f"model.{i}" for i in layers] + masks
        self._student_out: dict[str, list[torch.Tensor]] = {}
        self._teacher_out: dict[str, list[torch.Tensor]] = {}
        s_model = de_parallel(student)
        self._hooks = [s_model.get_submodule(n).register_forward_hook(self._keep(self._student_out, n))
                       for n in self.sites]
        self._hooks += [self.teacher.get_submodule(n).register_forward_hook(self._keep(self._teacher_out, n))
                        for n in self.sites]
        self._layout = memory_format(self.teacher)
        self._references = maybe_graph_inference(
            maybe_compile(self._teacher_references, device, compile, backend=backend), device, graphs)
        self._error = maybe_compile(_mean_relative_error, device, compile, backend=backend)
        self._err_sum: torch.Tensor | float = 0.0  # summed on the device: no host sync per step
        self._err_count = 0
        self._side_stream: torch.cuda.Stream | None = None
        self._started: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(module, args, out):
            store[name] = flat_tensors(out)
        return hook

    def _teacher_references(self, imgs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.teacher(imgs.contiguous(memory_format=self._layout))
        refs = [_reference(t) for n in self.sites for t in self._teacher_out.get(n, [])]
        self._teacher_out.clear()
        return refs

    def start(self, imgs: torch.Tensor) -> None:
        """Launch the teacher's pass on ``imgs`` on a side CUDA stream, before the engine launches the
        student's forward pass, so that the two run side by side where the GPU has room (gelan-c on
        an H200: about 2 ms a step of 80); the call for these images waits for it. A no-op off CUDA:
        the call then runs the teacher itself."""
        if not imgs.is_cuda:
            return
        main = torch.cuda.current_stream(imgs.device)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(imgs.device)
        self._side_stream.wait_stream(main)  # the images, and the last step's reads of a replayed graph's outputs
        with torch.cuda.stream(self._side_stream), torch.no_grad():
            references = self._references(imgs)
        for pair in references:
            for t in pair:
                t.record_stream(main)  # made on the side stream, read on the main one: not reused before that
        self._started = references

    def __call__(self, imgs: torch.Tensor, preds, targets) -> torch.Tensor:
        if self._started is not None:
            torch.cuda.current_stream(imgs.device).wait_stream(self._side_stream)
            references, self._started = self._started, None
        else:
            with torch.no_grad():
                references = self._references(imgs)
        students = [s for n in self.sites for s in self._student_out.get(n, [])]
        self._student_out.clear()
        if not students or len(students) != len(references):
            raise RuntimeError("distillation: no layer outputs captured (was the student run first?)")
        err = self._error(students, references)
        self._err_sum = self._err_sum + err.detach()
        self._err_count += 1
        return err * self.weight

    def take_mean_error(self) -> float:
        """Mean error since the last call (one epoch), then reset."""
        mean = float(self._err_sum) / max(self._err_count, 1)
        self._err_sum, self._err_count = 0.0, 0
        return mean

    def remove(self) -> None:
        """Detach the hooks (before saving or exporting the student)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
