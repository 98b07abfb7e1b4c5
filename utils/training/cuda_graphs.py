"""CUDA graphs of a training pass: one launch for the forward and one for the backward kernels.

At batch 16 a YOLO step on an H200 is paced by the CPU launching kernels, not by the GPU
(BENCHMARKS.md's profiles), and the QAT student launches more of them than its FP32 model (a fake
quantization for every input and weight). A CUDA graph records the kernels of a pass once and
replays them with one launch, so that pass no longer waits on Python (an H200 ran gelan-s's QAT
step in 55 ms instead of 217 ms). What a graph cannot do, and what is done about it here:

- Shapes are fixed: the graph is recorded for the first batch; a batch of another shape (the
  last, smaller one; multi-scale training) runs eagerly, so the data, and the numbers, are those of
  an eager run.
- Python in the pass runs only while recording: the forward hooks of submodules (the
  distillation's taps) would keep stale tensors. So the output of every submodule hooked when
  the graph is recorded (the first call) is also an output of the graphed pass, and its hooks are
  called again after each replay with those outputs, which carry gradients as in eager mode.
- Recording runs the pass a few times: buffers it updates (BatchNorm's running statistics) are
  put back afterwards, so the model is as it was before.
- Gradients come out of the backward graph in static buffers; they are handed to autograd as
  tensors this object keeps, so autograd copies them into ``.grad`` instead of adopting the
  buffer, and accumulating over several batches adds as in eager mode.

Autocast is recorded as it is in force at the first call, with its weight cache off (a cached
cast would be freed when the autocast block ends while the graph still reads it). Passes are
recorded inside ``models.fused_ops.graph_recording``, so the kernels that pay off only where
launches are free (the bias and SiLU of fused convolutions) go into the graphs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from models import fused_ops
from utils.logs import LOGGER

WARMUP_PASSES = 3  # eager passes on a side stream before recording (cuDNN's autotuner, Triton's compiles)
# only this thread's CUDA calls are checked while recording: the data loader's pin-memory thread keeps working
CAPTURE_MODE = "thread_local"


def _recording_autocast(device: torch.device) -> torch.autocast:
    """The caller's autocast, with the weight cache off (required while recording)."""
    enabled = torch.is_autocast_enabled(device.type)
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), enabled=enabled,
                          cache_enabled=False)


def _on_side_stream(device: torch.device, fn: Callable[[], None]) -> None:
    """Run ``fn`` on a fresh stream that waits for, and is waited for by, the current one (how
    warm-up passes must run before a capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


@dataclass
class _Recording:
    """One shape's graphs and their static tensors."""

    shape: tuple[int, ...]
    layout: torch.memory_format
    inputs: torch.Tensor
    params: list[torch.Tensor]  # the trainable parameters the graphs read and differentiate, in order
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    leaves: list[Any]  # the module's output leaves, then every tapped submodule's (non-tensors as recorded)
    outputs: list[torch.Tensor]  # the tensor leaves, in order
    output_spec: Any
    n_module_leaves: int
    taps: list[tuple[nn.Module, Any, int]]  # (submodule, its output's structure, number of leaves)
    output_grads: list[torch.Tensor | None]  # static gradient of each output that needs one
    param_grads: tuple[torch.Tensor | None, ...]

    def rebuild(self, tensors: tuple[torch.Tensor, ...]) -> tuple[Any, list[tuple[nn.Module, Any]]]:
        """The module's output and each tap's, with ``tensors`` in the tensor leaves."""
        replayed = iter(tensors)
        leaves = [next(replayed) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        start, taps = self.n_module_leaves, []
        for sub, spec, n in self.taps:
            taps.append((sub, tree_unflatten(leaves[start:start + n], spec)))
            start += n
        return tree_unflatten(leaves[:self.n_module_leaves], self.output_spec), taps


class _Replay(torch.autograd.Function):
    """Autograd's view of a recorded pass: inputs are the images and the parameters."""

    @staticmethod
    def forward(ctx, rec: _Recording, x: torch.Tensor, *params: torch.Tensor):
        rec.inputs.copy_(x)
        rec.forward.replay()
        ctx.rec = rec
        outs = tuple(o.detach() for o in rec.outputs)
        ctx.mark_non_differentiable(*(o for o, g in zip(outs, rec.output_grads) if g is None))
        return outs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        rec = ctx.rec
        for buffer, grad in zip(rec.output_grads, grads):
            if buffer is not None:
                buffer.copy_(grad) if grad is not None else buffer.zero_()
        rec.backward.replay()
        return (None, None, *rec.param_grads)


def _hooked_submodules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if m is not module and m._forward_hooks]


def _remember(seen: dict, module: nn.Module, args, out) -> None:
    seen[id(module)] = out


class GraphedTraining:
    """``module``'s training forward pass, and its backward, replayed from CUDA graphs.

    Call it where the module would be called (``train_one_epoch``'s ``forward``); the module itself is
    unchanged, so evaluation, checkpoints and export use it as before. Parameters are read in place,
    so optimizer steps between replays are seen; replacing a parameter tensor is not.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.recording: _Recording | None = None

    def __call__(self, x: torch.Tensor):
        if self.recording is None and self.module.training:
            self.recording = self._record(x)
        rec = self.recording
        if rec is None or tuple(x.shape) != rec.shape or not x.is_contiguous(memory_format=rec.layout):
            return self.module(x)
        out, taps = rec.rebuild(_Replay.apply(rec, x, *rec.params))
        for sub, tap_out in taps:  # the taps' hooks see this replay's outputs
            for hook in list(sub._forward_hooks.values()):
                hook(sub, (), tap_out)
        return out

    def _record(self, sample: torch.Tensor) -> _Recording:
        module, device = self.module, sample.device
        layout = torch.channels_last if sample.dim() == 4 and not sample.is_contiguous() else torch.contiguous_format
        params = [p for p in module.parameters() if p.requires_grad]
        taps = _hooked_submodules(module)
        saved = [(b, b.detach().clone()) for b in module.buffers()]
        inputs = sample.detach().clone(memory_format=layout)
        autocast = _recording_autocast(device)

        def run() -> tuple[list[Any], Any, int, list[tuple[nn.Module, Any, int]]]:
            seen: dict[int, Any] = {}
            handles = [m.register_forward_hook(partial(_remember, seen)) for m in taps]
            try:
                with autocast:
                    out = module(inputs)
            finally:
                for h in handles:
                    h.remove()
            leaves, spec = tree_flatten(out)
            n_module, tapped = len(leaves), []
            for m in taps:
                tap_leaves, tap_spec = tree_flatten(seen[id(m)])
                leaves += tap_leaves
                tapped.append((m, tap_spec, len(tap_leaves)))
            return leaves, spec, n_module, tapped

        def differentiate(outs: list[torch.Tensor], grads: list[torch.Tensor | None]) -> tuple:
            wanted = [(o, g) for o, g in zip(outs, grads) if o.requires_grad]
            return torch.autograd.grad([o for o, _ in wanted], params, [g for _, g in wanted], allow_unused=True)

        def tensors(leaves: list[Any]) -> list[torch.Tensor]:
            return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

        def warm_up() -> None:
            for _ in range(WARMUP_PASSES):
                outs = tensors(run()[0])
                differentiate(outs, [torch.ones_like(o) for o in outs])

        # the taps' own hooks see real passes only: one that kept a recording pass's tensors would keep
        # its autograd graph alive, and with it gradient accumulators that belong to the recording stream
        suspended = [(m, m._forward_hooks) for m in taps]
        for m in taps:
            m._forward_hooks = OrderedDict()
        try:
            with fused_ops.graph_recording():
                _on_side_stream(device, warm_up)
                torch.cuda.synchronize(device)
                pool = torch.cuda.graph_pool_handle()
                forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(forward, pool=pool, capture_error_mode=CAPTURE_MODE):
                    leaves, spec, n_module, tapped = run()
                outputs = tensors(leaves)
                output_grads = [torch.empty_like(o) if o.requires_grad else None for o in outputs]
                with torch.cuda.graph(backward, pool=pool, capture_error_mode=CAPTURE_MODE):
                    param_grads = differentiate(outputs, output_grads)
        finally:
            for m, hooks in suspended:
                m._forward_hooks = hooks
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        # keep the static tensors, not the recorded autograd graph: its nodes (a parameter's gradient
        # accumulator among them) belong to the recording stream, and autograd would sync on them later
        leaves = [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        outputs = tensors(leaves)
        LOGGER.info(f"CUDA graphs recorded for batches of shape {tuple(sample.shape)} "
                    f"({len(outputs)} outputs, {len(tapped)} hooked layers)")
        return _Recording(tuple(sample.shape), layout, inputs, params, forward, backward, leaves, outputs, spec,
                          n_module, tapped, output_grads, tuple(param_grads))


class GraphedInference:
    """``fn(x)`` without autograd (the distillation teacher's pass and its reference terms) replayed
    from one CUDA graph for inputs of the first call's shape; other shapes run ``fn`` itself."""

    def __init__(self, fn: Callable[[torch.Tensor], Any]):
        self.fn = fn
        self.recorded: tuple[tuple[int, ...], torch.Tensor, torch.cuda.CUDAGraph, Any] | None = None

    def __call__(self, x: torch.Tensor):
        if self.recorded is None:
            self.recorded = self._record(x)
        shape, inputs, graph, out = self.recorded
        if tuple(x.shape) != shape:
            return self.fn(x)
        inputs.copy_(x)
        graph.replay()
        return out

    def _record(self, sample: torch.Tensor):
        device = sample.device
        inputs = sample.detach().clone()
        autocast = _recording_autocast(device)

        def run():
            with torch.no_grad(), autocast:
                return self.fn(inputs)

        graph = torch.cuda.CUDAGraph()
        with fused_ops.graph_recording():
            _on_side_stream(device, lambda: [run() for _ in range(WARMUP_PASSES)])
            with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
                out = run()
        return tuple(sample.shape), inputs, graph, out


def maybe_graph_inference(fn: Callable[[torch.Tensor], Any], device: torch.device, enabled: bool) -> Callable:
    """A ``GraphedInference`` of ``fn`` when asked for and on CUDA, else ``fn``."""
    return GraphedInference(fn) if enabled and device.type == "cuda" else fn


def why_eager(device: torch.device, distributed: bool) -> str | None:
    """Why a training step on ``device`` cannot be replayed from CUDA graphs, or None where it can."""
    if device.type != "cuda":
        return f"CUDA graphs exist on CUDA devices only; running eagerly on {device}"
    if distributed:
        return "not with several GPUs (DDP's gradient hooks cannot be replayed); running eagerly"
    return None


def graphs_wanted(requested: bool | None, device: torch.device, *, compiled: bool, distributed: bool) -> bool:
    """``--cuda-graphs``'s value: what the user typed, or (not typed: None) on wherever graphs can replay
    the step (one process on a CUDA device, no ``torch.compile``), where they take most of the CPU's
    launching off each step (gelan-s's eager QAT step took 269 ms on an H200, its replay 51 ms:
    BENCHMARKS.md)."""
    if requested is not None:
        return requested
    return not compiled and why_eager(device, distributed) is None


def maybe_graph(module: nn.Module, device: torch.device, enabled: bool) -> Callable:
    """A ``GraphedTraining`` of ``module`` when asked for and possible (CUDA, one process), else ``module``."""
    if not enabled:
        return module
    reason = why_eager(device, isinstance(module, nn.parallel.DistributedDataParallel))
    if reason is not None:
        log = LOGGER.info if device.type != "cuda" else LOGGER.warning
        log(f"--cuda-graphs: {reason}")
        return module
    return GraphedTraining(module)
