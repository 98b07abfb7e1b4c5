"""QAT training step time / FP32 training step time, measured side by side in one process (GPU; the
lead runs it on the device):

    python bench/bench_qat_step.py --cfg gelan-s.yaml --data .data/bccd/bccd_device.yaml \\
        --batch-size 16 --imgsz 640 --device 0
    -> bench/results/qat_step_time_ratio_gelan-s.json

Both steps are the ones train.py and qat.py take: ``utils.training.engine.train_one_epoch`` on one
repeated real batch, bf16 autocast, channels-last tensors on CUDA, cuDNN's autotuner on, no EMA.
FP32 is the unfused model with BatchNorm, as train.py trains it; QAT is the fused, max-calibrated,
fake-quantized student plus the FP32 teacher's forward pass for feature distillation of every
layer (qat.py's defaults); the same student's step without the teacher and the distillation
(``--distill-weight 0``) is timed alongside, to show what the teacher costs. Each pair is timed
eagerly, with CUDA graphs (on a GPU: what ``--cuda-graphs`` runs) and compiled (``torch.compile``,
what ``--compile`` runs), alternating FP32 and QAT rounds and keeping each one's best round. The
record's value is the CUDA-graph ratio where it was measured, else the compiled one, else the eager
one; every pair of step times is in its ``extra``, with the relative difference of a graphed step's
loss and gradients from an eager step's (beside two eager steps' difference, the noise floor) and a
check that compiled fake quantization gives the eager values bit for bit. On CUDA the eager pair is also timed without
models/fused_ops.py's kernels (``eager_unfused_*``, alternating with the fused rounds), and the
kernels are checked against the PyTorch ops they replace, values and gradients
(``eager_fused_mismatches_vs_pytorch_ops``). The models are randomly initialised: a step's time does
not depend on the values of the weights. The record is written after each mode, so a run stopped
while compiling (it never finished on an H200 in 480 s) still leaves the figures before it.

Toy run on a CPU (tracing only: ``aot_eager`` runs the compiled graphs without generating code):

    python bench/bench_qat_step.py --cfg gelan-t.yaml --data <BCCD yaml> --imgsz 64 --batch-size 2 \\
        --device cpu --backend aot_eager --iters 2 --repeats 1 --results-dir /tmp/step_dry
"""
from __future__ import annotations

import argparse
import sys
from copy import deepcopy
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402

QAT_LR = 1e-4  # hyp.qat.yaml's scale; the value does not change a step's time


def add_build_arguments(p: argparse.ArgumentParser, cfg: str = "gelan-s.yaml") -> None:
    """The options ``build_models`` reads (this bench's, bench/profile_step.py's, bench/profile_teacher.py's)."""
    p.add_argument("--cfg", default=cfg)
    p.add_argument("--data", required=True, help="dataset yaml (one training batch is read)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=4)


def build_models(cfg: str, data_yaml: str, imgsz: int, batch_size: int, workers: int, device: torch.device) -> dict:
    """FP32 model (train mode), a max-calibrated trainable QAT student, its fused FP32 teacher, one real
    training batch and the QAT hyp, laid out as train.py / qat.py lay them out on ``device``."""
    from models.quantize import calibrate, prepare, set_trainable
    from models.yolo import DetectionModel
    from utils.data.config import load_data_config, load_hyp
    from utils.quantization.pipeline import make_loader
    from utils.training.acceleration import channels_last

    hyp = load_hyp(ROOT / "data/hyps/hyp.qat.yaml")
    data = load_data_config(data_yaml)
    torch.manual_seed(0)
    fp = DetectionModel(cfg, nc=data["nc"]).to(device)
    loader = make_loader(data, "train", imgsz, batch_size, 32, workers, hyp=hyp, shuffle=True)
    batch = next(iter(loader))
    teacher = deepcopy(fp).eval().fuse()
    student = prepare(deepcopy(fp))
    calibrate(student, [batch[0].to(device).float() / 255])
    channels_last(set_trainable(student), device)
    return {"fp32": channels_last(fp.train(), device), "student": student, "teacher": teacher, "batch": batch,
            "hyp": hyp}


def make_steps(built: dict, device: torch.device, mode: str, backend: str | None = None) -> dict:
    """name -> (model, forward, loss, optimizer, extra loss) for the FP32 and the QAT step, run ``mode``
    ("eager", "graphed": CUDA graphs, "compiled": torch.compile), as train.py and qat.py run them."""
    from utils.quantization.distill import FeatureDistillation, supervised_layers
    from utils.training.acceleration import maybe_compile
    from utils.training.cuda_graphs import maybe_graph
    from utils.training.loss import build_loss
    from utils.training.optim import build_optimizer

    hyp, fp, student = built["hyp"], built["fp32"], built["student"]
    compile, graphs = mode == "compiled", mode == "graphed"
    alone = deepcopy(student)  # before the distillation hooks the student: the QAT step without a teacher
    distill = FeatureDistillation(student, built["teacher"], supervised_layers(len(student.model), 1),
                                  compile=compile, backend=backend, graphs=graphs)

    def forward(model):
        return maybe_graph(maybe_compile(model, device, compile, backend=backend), device, graphs)

    return {
        "fp32": (fp, forward(fp), build_loss(fp, hyp),
                 build_optimizer(fp, "SGD", hyp["lr0"], hyp["momentum"], hyp["weight_decay"]), None),
        "qat": (student, forward(student), build_loss(student, hyp),
                build_optimizer(student, "SGD", QAT_LR, hyp["momentum"], hyp["weight_decay"]), distill),
        "qat_without_teacher": (alone, forward(alone), build_loss(alone, hyp),
                                build_optimizer(alone, "SGD", QAT_LR, hyp["momentum"], hyp["weight_decay"]), None),
    }


def time_steps(steps: dict, batch: tuple, device: torch.device, iters: int, repeats: int, both_ways: bool = False
               ) -> dict:
    """Best-of-``repeats`` seconds per step of each entry, rounds alternating; the first (untimed) round
    warms up cuDNN's autotuner and compiles. Also the warm-up round's seconds (compilation).
    ``both_ways`` also times each entry without the fused kernels (models/fused_ops.py), as "<name>_unfused"."""
    from models import fused_ops
    from utils.training.engine import make_precision, train_one_epoch

    precision = make_precision(device, "bf16")
    runs = [(name, name, True) for name in steps] + ([(f"{n}_unfused", n, False) for n in steps] if both_ways else [])
    best = {name: float("inf") for name, _, _ in runs}
    warmup = {}
    for r in range(repeats + 1):
        for name, step, fused in runs:
            model, forward, loss_fn, optimizer, extra = steps[step]
            with fused_ops.enabled(fused):
                stats = train_one_epoch(model, [batch] * iters, loss_fn, optimizer, device=device,
                                        precision=precision, extra_loss_fn=extra, progress=False, forward=forward)
            if r == 0:
                warmup[name] = stats.seconds
            else:
                best[name] = min(best[name], stats.seconds / stats.iters)
    return {"step_seconds": best, "warmup_seconds": warmup, "autocast": str(precision.dtype or torch.float32)}


def compiled_fake_quant_mismatches(device: torch.device, backend: str | None) -> dict:
    """Elements where compiled fake quantization differs from eager, per dtype and granularity."""
    from models.fake_quant import fake_quant_int8

    compiled = torch.compile(fake_quant_int8, backend=backend or "inductor")
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(16, 64, 40, 40, generator=g) * 4).to(device, dtype)
        for name, amax in (("per_tensor", x.float().abs().amax() * 0.7),
                           ("per_channel", x.float().abs().amax(dim=(1, 2, 3), keepdim=True) * 0.7)):
            out[f"{name}_{str(dtype).split('.')[-1]}"] = int((compiled(x, amax) != fake_quant_int8(x, amax)).sum())
    return out


def _both_ways(fn, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, gradient of ``x``) of ``fn`` with the fused kernels, then without them."""
    from models import fused_ops

    results = []
    for fused in (True, False):
        leaf = x.detach().clone().requires_grad_()
        with fused_ops.enabled(fused):
            y = fn(leaf)
            y.backward(torch.ones_like(y) * 0.37)
        results.append((y.detach(), leaf.grad))
    return results


def fused_mismatches(device: torch.device) -> dict:
    """Elements where the fused kernels differ from the PyTorch ops they replace (values, gradients),
    per op, dtype and layout, and the distillation error's largest relative difference (its sums are
    taken in another order, so float32 rounding is expected); the kernels are used on CUDA only, so
    on a CPU there is nothing to check."""
    from models import fused_ops
    from models.fake_quant import fake_quant_int8
    from utils.quantization.distill import relative_error

    if device.type != "cuda" or not fused_ops.usable(torch.zeros(1, device=device)):
        return {}
    g = torch.Generator(device="cpu").manual_seed(0)
    out = {}

    def bits(t: torch.Tensor) -> torch.Tensor:  # -0.0 and 0.0 differ, NaNs compare
        return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)

    def differing(fn, x) -> int:
        (y1, g1), (y2, g2) = _both_ways(fn, x)
        return int((bits(y1) != bits(y2)).sum() + (bits(g1) != bits(g2)).sum())

    def relative_difference(fn, x) -> float:
        (y1, g1), (y2, g2) = _both_ways(fn, x)
        return max(float((y1 - y2).abs() / y2.abs()), float((g1.float() - g2.float()).abs().max() / g2.abs().max()))

    for dtype in (torch.float32, torch.bfloat16):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = (torch.randn(16, 64, 40, 40, generator=g) * 4).to(device, dtype).contiguous(memory_format=layout)
            tag = f"{str(dtype).split('.')[-1]}_{'nhwc' if layout == torch.channels_last else 'nchw'}"
            amax_t = x.float().abs().amax().detach() * 0.7
            amax_c = x.float().abs().amax(dim=(1, 2, 3), keepdim=True).detach() * 0.7
            out[f"fake_quant_per_tensor_{tag}"] = differing(lambda t: fake_quant_int8(t, amax_t), x)
            out[f"fake_quant_per_channel_{tag}"] = differing(lambda t: fake_quant_int8(t, amax_c), x)
            out[f"fake_quant_of_a_slice_{tag}"] = differing(lambda t: fake_quant_int8(t[:, 8:40], amax_t), x)
            out[f"average_blur_{tag}"] = differing(fused_ops.average_blur, x)
            # cat's backward hands the quantizer a channel slice of the (random) gradient: the strided kernel
            r = torch.randn((16, 128, 40, 40), generator=g).to(device, dtype).contiguous(memory_format=layout)
            out[f"straight_through_of_a_slice_{tag}"] = differing(
                lambda t: torch.cat([fake_quant_int8(t, amax_t), t], 1) * r, x)
            if layout == torch.channels_last:  # the bias and SiLU of a fused convolution (NCHW: PyTorch's ops)
                bias = torch.randn(x.shape[1], generator=g).to(device)
                out[f"bias_silu_{tag}"] = differing(lambda t: fused_ops.biased_silu(t, bias), x)
            teacher = (x.float() + 0.1 * torch.randn(x.shape, generator=g).to(device)).to(dtype)
            teacher = teacher.contiguous(memory_format=layout)
            out[f"distillation_max_relative_difference_{tag}"] = relative_difference(
                lambda s: relative_error(s, teacher), x)
    return out


def _step_gradients(steps: dict, name: str, batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and every parameter's gradient (one flat float32 vector) of one step of ``steps[name]``,
    without the optimizer step, so that the weights stay as they were."""
    from utils.training.acceleration import memory_format
    from utils.training.engine import make_precision

    model, forward, loss_fn, _, extra = steps[name]
    precision = make_precision(device, "bf16")
    imgs = batch[0].to(device).contiguous(memory_format=memory_format(model)).float().div_(255)
    targets = batch[1].to(device)
    model.train().zero_grad(set_to_none=True)
    with precision.autocast(device):
        preds = forward(imgs)
        loss, _ = loss_fn(preds, targets)
        if extra is not None:
            loss = loss + extra(imgs, preds, targets) * imgs.shape[0]
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return loss.detach().float(), grads


def graphed_vs_eager(built: dict, device: torch.device) -> dict:
    """Relative differences of a graphed step's loss and gradients from an eager step's, same weights and
    batch, beside two eager steps' (cuDNN's backward kernels are not bit-reproducible: that is the floor).
    The graphed step is the second replay, after the recording."""
    def difference(a: tuple, b: tuple) -> dict:
        return {"loss": float((a[0] - b[0]).abs() / b[0].abs()),
                "gradients": float((a[1] - b[1]).norm() / b[1].norm())}

    out = {}
    for name in ("fp32", "qat"):
        runs = {}
        for mode in ("eager", "graphed"):
            steps = make_steps(built, device, mode)
            first = _step_gradients(steps, name, built["batch"], device)
            runs[mode] = _step_gradients(steps, name, built["batch"], device)
            if mode == "eager":
                runs["eager_first"] = first
            steps["qat"][4].remove()
        out[f"{name}_graphed_vs_eager"] = difference(runs["graphed"], runs["eager"])
        out[f"{name}_eager_vs_eager"] = difference(runs["eager_first"], runs["eager"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(p)
    p.add_argument("--model", default="", help="name in the record (default: the cfg's stem)")
    p.add_argument("--dataset", default="BCCD", help="dataset name written into the record")
    p.add_argument("--iters", type=int, default=30, help="timed steps per model and round")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds per model (after one warm-up round)")
    p.add_argument("--device", default="0")
    p.add_argument("--no-compile", action="store_true", help="no compiled steps")
    p.add_argument("--no-graphs", action="store_true", help="no CUDA-graph steps (on a GPU they are timed by default)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor; aot_eager: a CPU dry run)")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

    from utils.torch_utils import select_device

    device = select_device(args.device)
    torch.backends.cudnn.benchmark = True
    model = args.model or Path(args.cfg).stem
    built = build_models(args.cfg, args.data, args.imgsz, args.batch_size, args.workers, device)
    results: dict = {}
    graphs = device.type == "cuda" and not args.no_graphs
    modes = ["eager"] + ["graphed"] * graphs + ["compiled"] * (not args.no_compile)
    for mode in modes:
        steps = make_steps(built, device, mode, args.backend)
        results[mode] = time_steps(steps, built["batch"], device, args.iters, args.repeats,
                                   both_ways=mode == "eager" and device.type == "cuda")
        steps["qat"][4].remove()
        ms = {k: 1e3 * v for k, v in results[mode]["step_seconds"].items()}
        for suffix in ("", "_unfused") if "fp32_unfused" in ms else ("",):
            print(f"{mode}{suffix}: FP32 {ms['fp32' + suffix]:.1f} ms, QAT {ms['qat' + suffix]:.1f} ms per step, "
                  f"ratio {ms['qat' + suffix] / ms['fp32' + suffix]:.3f}; QAT without the teacher "
                  f"{ms['qat_without_teacher' + suffix]:.1f} ms", flush=True)
        if mode == "eager":
            results[mode]["fused_mismatches"] = fused_mismatches(device)
            print(f"fused kernels vs PyTorch ops, differing elements: {results[mode]['fused_mismatches']}", flush=True)
        if mode == "graphed":
            results[mode]["graph_differences"] = graphed_vs_eager(built, device)
            print(f"graphed vs eager step, relative differences: {results[mode]['graph_differences']}", flush=True)
        if mode == "compiled":
            results[mode]["fake_quant_mismatches"] = compiled_fake_quant_mismatches(device, args.backend)
        # written after each mode, so a run stopped while compiling still leaves the figures before it
        head = headline(results)
        seconds = results[head]["step_seconds"]
        path = write_record(f"qat_step_time_ratio_{model}", seconds["qat"] / seconds["fp32"], "x", model,
                            args.dataset, extra=record_extra(args, device, results), results_dir=args.results_dir)
        print(f"wrote {path}", flush=True)
    return results


def headline(results: dict) -> str:
    """The mode the record's value is: CUDA graphs where measured (the fastest way that finishes), else
    the compiled steps, else the eager ones."""
    return next(m for m in ("graphed", "compiled", "eager") if m in results)


def record_extra(args: argparse.Namespace, device: torch.device, results: dict) -> dict:
    """Both step times of the headline mode, and every mode's figures."""
    mode = headline(results)
    names = {"compiled": f"compiled (torch.compile, {args.backend or 'inductor'})",
             "graphed": "CUDA graphs (forward and backward; teacher forward)", "eager": "eager"}
    extra = {"batch": args.batch_size, "imgsz": args.imgsz, "autocast": results[mode]["autocast"],
             "timing": f"best of {args.repeats} rounds of {args.iters} steps, FP32 and QAT alternating",
             "step": names[mode],
             "fp32_step_ms": 1e3 * results[mode]["step_seconds"]["fp32"],
             "qat_step_ms": 1e3 * results[mode]["step_seconds"]["qat"],
             "memory_format": "channels_last" if device.type == "cuda" else "contiguous", "torch": torch.__version__,
             "note": "random-init models, one repeated real batch, no EMA; FP32 = unfused model with BatchNorm "
                     "as train.py trains it; QAT = fused fake-quantized student plus the FP32 teacher forward "
                     "and the distillation of every layer"}
    for name, r in results.items():
        seconds = r["step_seconds"]
        extra.update({f"{name}_fp32_step_ms": 1e3 * seconds["fp32"], f"{name}_qat_step_ms": 1e3 * seconds["qat"],
                      f"{name}_ratio": seconds["qat"] / seconds["fp32"],
                      f"{name}_qat_without_teacher_step_ms": 1e3 * seconds["qat_without_teacher"],
                      f"{name}_first_round_seconds": r["warmup_seconds"]})
        if "fp32_unfused" in seconds:  # the same steps without models/fused_ops.py's kernels, timed alongside
            extra.update({f"{name}_unfused_fp32_step_ms": 1e3 * seconds["fp32_unfused"],
                          f"{name}_unfused_qat_step_ms": 1e3 * seconds["qat_unfused"],
                          f"{name}_unfused_ratio": seconds["qat_unfused"] / seconds["fp32_unfused"],
                          f"{name}_fused_mismatches_vs_pytorch_ops": r.get("fused_mismatches", {})})
        if "graph_differences" in r:
            extra[f"{name}_relative_differences"] = r["graph_differences"]
        if "fake_quant_mismatches" in r:
            extra[f"{name}_fake_quant_mismatches_vs_eager"] = r["fake_quant_mismatches"]
    return extra


if __name__ == "__main__":
    run_cli(main)
