"""Our fake quantization against Model Optimizer's: time of a forward + backward pass, and equality.

    python bench/bench_fake_quant.py --device cpu
    -> bench/results/fake_quant_time_ratio_cpu.json

On a CPU, Model Optimizer's path is its PyTorch fallback (``_tensor_quant``); on CUDA it is its
compiled extension, which this script builds first only with ``--with-extension`` (45-56 s on a
fresh machine; the build time goes into the record). Tensors are a gelan-s activation at 640
(16 x 128 x 80 x 80, per tensor) and a 3x3 convolution's weight (256 x 256 x 3 x 3, per output
channel), in float32 and bfloat16; every pair of outputs and input gradients is compared bit for
bit. The record's value is our time over Model Optimizer's, summed over the cases.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402

CASES = {"activation_per_tensor": ((16, 128, 80, 80), False), "weight_per_channel": ((256, 256, 3, 3), True)}


def _theirs(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    from modelopt.torch.quantization.tensor_quant import fake_tensor_quant

    return fake_tensor_quant(x, amax, None, 8, False, False)


def _ours(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    from models.fake_quant import fake_quant_int8

    return fake_quant_int8(x, amax)


def timed(fn, x: torch.Tensor, amax: torch.Tensor, grad: torch.Tensor, repeats: int) -> tuple[float, tuple]:
    """Median seconds of forward + backward, and the last output and input gradient."""
    times = []
    for _ in range(repeats + 1):
        leaf = x.detach().requires_grad_(True)
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        y = fn(leaf, amax)
        y.backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2], (y.detach(), leaf.grad)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--with-extension", action="store_true", help="CUDA: build Model Optimizer's extension first")
    p.add_argument("--results-dir", default=None, help="default bench/results")
    args = p.parse_args(argv)

    from utils.torch_utils import select_device

    device = select_device(args.device)
    build_seconds = None
    if device.type == "cuda":
        if not args.with_extension:
            raise SystemExit("on CUDA Model Optimizer's side is its extension: pass --with-extension to build it")
        from modelopt.torch.quantization.extensions import get_cuda_ext

        t = time.perf_counter()
        get_cuda_ext(raise_if_failed=True)
        build_seconds = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    rows, totals = {}, {"ours": 0.0, "theirs": 0.0}
    for name, (shape, per_channel) in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
            grad = torch.randn(shape, generator=g).to(device, dtype)
            amax = (x.float().abs().amax(dim=(1, 2, 3), keepdim=True) if per_channel else x.float().abs().amax()) * 0.8
            ours, (y1, g1) = timed(_ours, x, amax, grad, args.repeats)
            theirs, (y2, g2) = timed(_theirs, x, amax, grad, args.repeats)
            key = f"{name}_{str(dtype).split('.')[-1]}"
            rows[key] = {"ours_ms": 1e3 * ours, "model_optimizer_ms": 1e3 * theirs,
                         "values_equal": bool(torch.equal(y1, y2)), "gradients_equal": bool(torch.equal(g1, g2))}
            totals["ours"] += ours
            totals["theirs"] += theirs
            print(f"{key}: ours {1e3 * ours:.2f} ms, Model Optimizer {1e3 * theirs:.2f} ms, "
                  f"equal {rows[key]['values_equal']} / {rows[key]['gradients_equal']}")
    ratio = totals["ours"] / totals["theirs"]
    tag = "cpu" if device.type == "cpu" else "cuda"
    path = write_record(f"fake_quant_time_ratio_{tag}", ratio, "ratio (ours / Model Optimizer's, forward + backward)",
                        "fake quantization", "random tensors", results_dir=args.results_dir,
                        extra={"cases": rows, "repeats": args.repeats, "extension_build_seconds": build_seconds,
                               "model_optimizer_path": "compiled CUDA extension" if tag == "cuda"
                               else "its PyTorch fallback (_tensor_quant)"})
    print(f"ours / Model Optimizer's: {ratio:.3f} -> {path}")
    return rows


if __name__ == "__main__":
    run_cli(main)
