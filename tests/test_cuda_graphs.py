"""CUDA-graph training steps (``utils.training.cuda_graphs``) give the eager step's numbers.

The graphs exist on CUDA only: the comparisons are ``gpu`` tests (conftest skips them without a
GPU; the device runs them beside bench/bench_qat_step.py). On a CPU the wrappers hand back what they
were given, and the flags that ask for graphs are refused together with ``--compile``.
"""
from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from models.quantize import calibrate, prepare, set_trainable
from models.yolo import Model
from tests.qat_helpers import tiny_model
from utils.data.config import load_hyp
from utils.errors import UserError
from utils.options import check_flags
from utils.paths import ROOT
from utils.quantization.distill import FeatureDistillation, supervised_layers
from utils.quantization.options import quantize_options
from utils.training.acceleration import channels_last
from utils.training.cuda_graphs import (
    GraphedInference,
    GraphedTraining,
    graphs_wanted,
    maybe_graph,
    maybe_graph_inference,
    why_eager,
)
from utils.training.engine import make_precision, train_one_epoch
from utils.training.loss import build_loss
from utils.training.optim import build_optimizer

IMGSZ = 64
ASSETS = ROOT / "tests" / "assets"


def test_on_a_cpu_the_wrappers_return_what_they_were_given():
    model = tiny_model()
    assert maybe_graph(model, torch.device("cpu"), True) is model
    assert maybe_graph(model, torch.device("cpu"), False) is model
    fn = model.forward
    assert maybe_graph_inference(fn, torch.device("cpu"), True) is fn


def test_graphs_and_compile_are_refused_together():
    with pytest.raises(UserError, match="--compile and --cuda-graphs"):
        check_flags({"compile": True, "cuda_graphs": True})
    check_flags({"compile": False, "cuda_graphs": True})


def test_quantize_replays_from_graphs_unless_told_or_unable():
    """``qat.py quantize`` without the flag: graphs on one CUDA device, eager on a CPU, under DDP or
    with --compile (which then is no clash); a typed ``--cuda-graphs`` / ``--no-cuda-graphs`` wins."""
    base = ["--weights", "w.pt", "--data", "d.yaml"]
    default = quantize_options(base)
    assert default.cuda_graphs is None and "cuda_graphs" not in default.cli_flags
    check_flags(vars(quantize_options([*base, "--compile"])))
    off = quantize_options([*base, "--no-cuda-graphs"])
    assert off.cuda_graphs is False and "cuda_graphs" in off.cli_flags
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert graphs_wanted(None, cuda, compiled=False, distributed=False)
    assert not graphs_wanted(None, cpu, compiled=False, distributed=False)
    assert not graphs_wanted(None, cuda, compiled=True, distributed=False)
    assert not graphs_wanted(None, cuda, compiled=False, distributed=True)
    assert not graphs_wanted(False, cuda, compiled=False, distributed=False)
    assert graphs_wanted(True, cpu, compiled=False, distributed=False)  # maybe_graph then says why it cannot
    assert why_eager(cuda, False) is None and "CUDA devices only" in why_eager(cpu, False)
    assert "several GPUs" in why_eager(cuda, True)


def _batches(device: torch.device, sizes: list[int]) -> list[tuple]:
    """Upstream-style batches (uint8 images, targets (n, 6)) of the given batch sizes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in sizes:
        imgs = torch.randint(0, 256, (n, 3, IMGSZ, IMGSZ), generator=g, dtype=torch.uint8)
        rows = [[i, i % 3, 0.3 + 0.1 * (i % 4), 0.5, 0.25, 0.3] for i in range(n) for _ in range(2)]
        out.append((imgs, torch.tensor(rows), None, None))
    return out


def _train(model: torch.nn.Module, teacher: torch.nn.Module | None, graphs: bool, batches: list, device,
           accumulate: int) -> tuple:
    hyp = load_hyp(ROOT / "data/hyps/hyp.qat.yaml")
    distill = None
    if teacher is not None:
        distill = FeatureDistillation(model, teacher, supervised_layers(len(model.model), 1), graphs=graphs)
    forward = maybe_graph(model, device, graphs)
    stats = train_one_epoch(model, batches, build_loss(model, hyp), build_optimizer(model, "SGD", 0.01, 0.9, 5e-4),
                            device=device, precision=make_precision(device, "bf16"), accumulate=accumulate,
                            extra_loss_fn=distill, progress=False, forward=forward)
    if distill is not None:
        distill.remove()
    return stats, forward


def _close(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=2e-3, atol=2e-5, msg=name)
        else:
            assert torch.equal(x, y), name


def _teacher_and_student(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A fused float teacher and its calibrated, trainable fake-quantized student, channels-last."""
    teacher = channels_last(tiny_model().fuse().eval().to(device), device)
    student = prepare(deepcopy(teacher))
    calibrate(student, [torch.rand(2, 3, IMGSZ, IMGSZ, device=device)])
    return teacher, channels_last(set_trainable(student), device)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [1, 2])
def test_graphed_qat_steps_with_distillation_train_as_eager_ones(accumulate):
    device = torch.device("cuda:0")
    teacher, student = _teacher_and_student(device)
    twin = deepcopy(student)
    batches = _batches(device, [4, 4, 4, 4, 2])  # the last, smaller batch runs eagerly
    eager, _ = _train(student, teacher, False, batches, device, accumulate)
    graphed, forward = _train(twin, teacher, True, batches, device, accumulate)
    assert isinstance(forward, GraphedTraining) and forward.recording.shape == (4, 3, IMGSZ, IMGSZ)
    assert len(forward.recording.taps) == len(supervised_layers(len(twin.model), 1))
    assert graphed.optimizer_steps == eager.optimizer_steps
    torch.testing.assert_close(torch.tensor(graphed.loss), torch.tensor(eager.loss), rtol=2e-3, atol=1e-5)
    assert graphed.extra == pytest.approx(eager.extra, rel=2e-3)
    _close(twin, student)


@pytest.mark.gpu
def test_graphed_float_steps_keep_batchnorm_as_eager_ones():
    device = torch.device("cuda:0")
    model = channels_last(tiny_model().to(device).train(), device)
    twin = deepcopy(model)
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    batches = _batches(device, [4, 4, 4])
    forward = GraphedTraining(twin)
    with make_precision(device, "bf16").autocast(device):
        forward._record(torch.rand(4, 3, IMGSZ, IMGSZ, device=device).contiguous(memory_format=torch.channels_last))
    _close(twin, model)  # recording ran the model several times and put its running statistics back
    assert all(torch.equal(v, before[k]) for k, v in twin.state_dict().items())
    _train(model, None, False, batches, device, 1)
    _train(twin, None, True, batches, device, 1)
    _close(twin, model)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_a_teacher_started_beside_the_student_gives_the_inline_teachers_error(graphs):
    device = torch.device("cuda:0")
    teacher, student = _teacher_and_student(device)
    layers = supervised_layers(len(student.model), 1)
    beside = FeatureDistillation(student, teacher, layers, graphs=graphs)
    errors = []
    for imgs, *_ in _batches(device, [4, 4, 2]):  # the last shape is not the recorded one
        x = imgs.to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
        with make_precision(device, "bf16").autocast(device):
            beside.start(x)
            assert beside._started is not None
            errors.append(beside(x, student(x), None))
    beside.remove()
    inline = FeatureDistillation(student, teacher, layers, graphs=graphs)
    for (imgs, *_), started in zip(_batches(device, [4, 4, 2]), errors):
        x = imgs.to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
        with make_precision(device, "bf16").autocast(device):
            torch.testing.assert_close(inline(x, student(x), None), started, rtol=1e-5, atol=1e-7)
    inline.remove()


@pytest.mark.gpu
def test_graphed_inference_replays_the_function_and_runs_other_shapes_itself():
    device = torch.device("cuda:0")
    model = tiny_model().fuse().eval().to(device).requires_grad_(False)

    def features(x):
        return [t.float() for t in model(x)[1]]

    graphed = GraphedInference(features)
    for n in (2, 2, 3):
        x = torch.rand(n, 3, IMGSZ, IMGSZ, device=device)
        with torch.no_grad():
            for a, b in zip(graphed(x), features(x)):
                torch.testing.assert_close(a, b)
    assert graphed.recorded[0] == (2, 3, IMGSZ, IMGSZ)


def _pass_gradients(forward, model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Sum of squares of every output tensor, and the parameters' gradients, after one float32 pass."""
    model.zero_grad(set_to_none=True)
    with make_precision(x.device, "off").autocast(x.device):
        outs = forward(x)
    leaves = torch.utils._pytree.tree_leaves(outs)
    loss = sum(t.float().square().mean() for t in leaves if isinstance(t, torch.Tensor))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _largest_relative_difference(a: dict, b: dict) -> tuple[float, str]:
    """The parameter whose gradient differs most, relative to its own size."""
    assert a.keys() == b.keys()
    return max((float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-30)), k) for k in a)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ["gelan-tiny", "yolov9-tiny", "gelan-tiny-seg", "gelan-tiny-dseg", "yolov9-tiny-dseg"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("nc", [1, 2])
def test_every_head_gives_eager_gradients_when_graphed(cfg, quantized, nc):
    """Detection, dual, segmentation and dual segmentation heads, float and fake-quantized, one
    class and two, on a non-square input: whatever their outputs' nesting, the replayed pass gives every parameter its
    eager gradient. In float32: under bf16 autocast the recording may get other cuDNN backward
    algorithms than the eager pass (seen on an H200: the float segmentation models' early BatchNorm
    gradients moved by up to 8% in bf16 with channels-last tensors, 0 in float32)."""
    device = torch.device("cuda:0")
    torch.manual_seed(0)
    model = Model(ASSETS / f"{cfg}.yaml", nc=nc).to(device)
    if quantized:
        model = prepare(model.fuse())
        calibrate(model, [torch.rand(2, 3, IMGSZ, 96, device=device)])
        set_trainable(model)
    model = channels_last(model.train(), device)
    x = torch.rand(2, 3, IMGSZ, 96, device=device).contiguous(memory_format=torch.channels_last)
    eager = _pass_gradients(model, model, x)
    again = _pass_gradients(model, model, x)
    graphed = GraphedTraining(model)
    _pass_gradients(graphed, model, x)  # records, then replays
    replayed = _pass_gradients(graphed, model, x)
    assert graphed.recording is not None
    torch.testing.assert_close(replayed[0], eager[0], rtol=1e-4, atol=1e-6)
    difference, name = _largest_relative_difference(replayed[1], eager[1])
    floor, _ = _largest_relative_difference(again[1], eager[1])
    assert difference < 1e-2, f"{name}: graphed vs eager {difference:.2e} (eager vs eager {floor:.2e})"
