"""Shared by the export and val_trt tests: a random-init head whose outputs look like a detector's,
and ONNX Runtime sessions opened once per exported file."""
from __future__ import annotations

import functools
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from onnx import helper

from utils.deployment.ort_runtime import session_options

GAIN = 2.0
# The conformance CI slice (tests/test_conformance.py): (config, nc) -> the one (batch mode, shape) traced
# for it. tests/test_export.py exports the two detection models again through the session fixture
# ``conformance_model``, which quantizes and traces each once. The segmentation model is gelan-c-seg's
# layout at test width (tests/assets): tracing a full-width model costs the same at any input size, and
# gelan-c-seg's three cases took 19 s on the 2-core machine against 4 s; bench/bench_conformance.py runs
# the shipped segmentation configs.
SLICE_SEGMENT_CFG = str(Path(__file__).resolve().parent / "assets" / "gelan-tiny-seg")
CONFORMANCE_SLICE = {("gelan-t", 1): ("dynamic", "non-square"), ("yolov9-t", 80): ("dynamic", "square"),
                     (SLICE_SEGMENT_CFG, 2): ("static", "non-square")}

# onnx.helper.make_model stamps the installed onnx's newest IR version (14 for onnx 1.23), which older ONNX
# Runtimes refuse: on the GPU machine's 1.30, "Unsupported model IR version: 14, max supported IR version: 13"
# failed two tests there. Hand-built test graphs (opsets 13-17) take IR 8, which every ONNX Runtime the
# requirements admit (>= 1.17) reads.
HAND_BUILT_IR_VERSION = 8


def hand_built_model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    """A model around a hand-made graph, at an IR version any supported ONNX Runtime loads."""
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=HAND_BUILT_IR_VERSION)


def lively_head(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Scale up every convolution and give the head's last box/class convolutions random weights.

    A freshly initialised model predicts near-identical boxes and tiny, tied class scores (its
    activations fade with depth), which makes every detection comparison trivial (0 == 0) or
    order-ambiguous (ties). This gives distinct boxes and scores spread around 0.5.
    """
    gen = torch.Generator().manual_seed(seed)
    for conv in model.modules():  # default init shrinks activations layer by layer: keep their scale
        if isinstance(conv, torch.nn.Conv2d) and conv.weight.requires_grad:
            conv.weight.data *= GAIN
    head = model.model[-1]
    for b in range(head.branches):
        boxes, classes, _ = head.branch(b)
        for tower in (*boxes, *classes):
            last = tower[-1]
            fan_in = last.weight[0].numel()
            last.weight.data = torch.randn(last.weight.shape, generator=gen) * (20.0 / fan_in ** 0.5)
            last.bias.data = torch.randn(last.bias.shape, generator=gen) * 0.5
    return model


def lively_masks(model: torch.nn.Module, images: torch.Tensor, coefficient_std: float = 0.3,
                 prototype_std: float = 2.0) -> torch.nn.Module:
    """Rescale a segmentation head's last mask-coefficient convolutions and prototype convolutions so
    that, on ``images``, their outputs spread with the given standard deviations.

    A fresh model's prototypes come out near 0 (its features fade with depth), so every mask would
    be 0.5 everywhere; with these spreads a mask logit (32 coefficients times prototypes) varies by
    a few units across the image, and masks have clear inside and outside pixels and a boundary.
    """
    head = model.model[-1]
    convs = []
    for b in range(head.branches):
        towers, proto = head.mask_branch(b)
        convs += [(tower[-1], coefficient_std) for tower in towers]
        convs.append(((proto.cv3 if hasattr(proto, "cv3") else proto).conv, prototype_std))
    was_training = model.training
    model.eval()
    for conv, std in convs:
        seen = []
        hook = conv.register_forward_hook(lambda module, args, out: seen.append(out))
        with torch.no_grad():
            model(images)
        hook.remove()
        conv.weight.data *= std / float(seen[0].std())
        if conv.bias is not None:
            conv.bias.data *= std / float(seen[0].std())
    return model.train(was_training)


def assert_same_detections(got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-3) -> None:
    """Equal (n, 6) detection sets up to row order: rows whose scores differ only by float noise
    may sort either way between two runtimes."""
    assert got.shape == expected.shape, (got.shape, expected.shape)
    if len(got):
        dist = (got[:, None, :] - expected[None, :, :]).abs().amax(-1)  # (n, n) worst element difference
        assert float(dist.amin(1).max()) <= atol and float(dist.amin(0).max()) <= atol


def assert_matching_detections(got: torch.Tensor, expected: torch.Tensor, box_atol: float, score_atol: float,
                               conf_thres: float) -> None:
    """Two runtimes' (n, 6) detections agree: each detection scoring clearly above ``conf_thres`` on
    either side has a partner on the other side with the same class, a box within ``box_atol`` and
    a score within ``score_atol``. A detection within ``score_atol`` of the threshold may fall on
    either side of it (a rounding tie in one runtime moves its score that much)."""
    for side, other in ((got, expected), (expected, got)):
        sure = side[side[:, 4] > conf_thres + score_atol]
        if not len(sure):
            continue
        box_close = (sure[:, None, :4] - other[None, :, :4]).abs().amax(-1) <= box_atol
        score_close = (sure[:, None, 4] - other[None, :, 4]).abs() <= score_atol
        partnered = (box_close & score_close & (sure[:, None, 5] == other[None, :, 5])).any(1)
        assert bool(partnered.all()), (f"{int((~partnered).sum())} of {len(sure)} detections have no partner, "
                                       f"e.g. {sure[~partnered][:3].tolist()}")


@functools.lru_cache(maxsize=64)
def _session(path: str, mtime_ns: int, size: int) -> ort.InferenceSession:
    """One CPU session per file version: opening one optimises the graph (~0.4 s for a tiny Q/DQ
    model on 2 cores), and the batch tests run a file once per image."""
    return cpu_session(path)


def cpu_session(source: str | bytes) -> ort.InferenceSession:
    """An ONNX Runtime CPU session (a file or a serialized model) with the options the tools use:
    as many threads as PyTorch has, one in the tests."""
    return ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])


def run_ort(path: str | Path, x: torch.Tensor, outputs: list[str] | None = None) -> list[torch.Tensor]:
    """ONNX Runtime's outputs for the input batch ``x`` (all of them, or the named ``outputs``)."""
    stat = Path(path).stat()
    session = _session(str(path), stat.st_mtime_ns, stat.st_size)
    return [torch.from_numpy(o) for o in session.run(outputs, {"images": x.numpy()})]
