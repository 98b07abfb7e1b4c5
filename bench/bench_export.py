"""Time to trace a QAT model to ONNX, with the quantizers' arithmetic left out of the trace against
traced as before.

    python bench/bench_export.py --cfg gelan-c --imgsz 640
    -> bench/results/qat_trace_time_ratio_gelan-c.json

The exporter writes each fake-quantization node as the Q/DQ pair of its symbolic, whatever the
node's forward computed, so while an export traces them our quantizers apply
``models.fake_quant.exported_fake_quant_int8``, whose forward returns a copy of its input. The
baseline gives that node the computing forward back, for the same model. The two ways alternate
(so that machine load hits both alike); the record's value is our median time over the baseline's,
and its extra says whether the two ONNX graphs are equal byte for byte. The model is the config at
random init, QAT-prepared and calibrated on random images (``bench.conformance.quantized_model``):
tracing time does not depend on the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import write_record  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

WAYS = ("ours", "traced_arithmetic")


@contextlib.contextmanager
def traced_arithmetic() -> Iterator[None]:
    """The export traces the computing fake quantization, as before the change."""
    from models import fake_quant

    exported = fake_quant._ExportedFakeQuantInt8
    ours = exported.__dict__["forward"]
    exported.forward = fake_quant._FakeQuantInt8.__dict__["forward"]
    try:
        yield
    finally:
        exported.forward = ours


def timed_trace(model: torch.nn.Module, imgsz: int | tuple[int, int], dynamic: bool) -> tuple[float, str]:
    """Seconds of ``trace_prediction`` and the SHA-1 of the graph it gave."""
    from utils.deployment.onnx_export import trace_prediction

    start = time.perf_counter()
    graph = trace_prediction(model, imgsz, dynamic=dynamic).model
    return time.perf_counter() - start, hashlib.sha1(graph.SerializeToString()).hexdigest()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default="gelan-c", help="model config name (models/detect) or path without .yaml")
    p.add_argument("--nc", type=int, default=80)
    p.add_argument("--imgsz", type=int, nargs="+", default=[640], help="size, or height and width")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch axis, as qat.py export --dynamic")
    p.add_argument("--repeats", type=int, default=3, help="traces per way, alternating")
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: its own choice)")
    p.add_argument("--results-dir", type=Path, default=None)
    opt = p.parse_args(argv)
    if len(opt.imgsz) > 2:
        raise UserError(f"--imgsz {' '.join(map(str, opt.imgsz))}: give a size, or a height and a width")
    imgsz = opt.imgsz[0] if len(opt.imgsz) == 1 else tuple(opt.imgsz)
    h, w = opt.imgsz * 2 if len(opt.imgsz) == 1 else opt.imgsz
    if opt.repeats < 1:
        raise UserError(f"--repeats {opt.repeats}: must be at least 1")
    if opt.threads:
        torch.set_num_threads(opt.threads)
    from bench.conformance import quantized_model

    model = quantized_model(opt.cfg, opt.nc)
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    digests: dict[str, set[str]] = {way: set() for way in WAYS}
    for i in range(opt.repeats):
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):  # neither way always goes first
            with traced_arithmetic() if way == "traced_arithmetic" else contextlib.nullcontext():
                t, digest = timed_trace(model, imgsz, opt.dynamic)
            seconds[way].append(round(t, 3))
            digests[way].add(digest)
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    ratio = medians["ours"] / medians["traced_arithmetic"]
    same = len(digests["ours"] | digests["traced_arithmetic"]) == 1
    name = Path(opt.cfg).name
    path = write_record(f"qat_trace_time_ratio_{name}", ratio, "ratio (ours / traced arithmetic, median seconds)",
                        name, f"random init, {opt.nc} classes, {h}x{w}",
                        extra={"seconds": seconds, "median_seconds": medians, "dynamic": opt.dynamic,
                               "threads": torch.get_num_threads(),
                               "same_graph_bytes": same},
                        results_dir=opt.results_dir)
    print(f"{name}: trace {medians['ours']:.2f} s against {medians['traced_arithmetic']:.2f} s "
          f"(ratio {ratio:.3f}); same graph bytes: {same}")
    return path


if __name__ == "__main__":
    run_cli(main)
