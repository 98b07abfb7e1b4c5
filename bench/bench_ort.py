"""ONNX Runtime benchmarks of the Q/DQ export.

latency (CPU, ~5-15 min on 2 cores): ONNX Runtime CPU latency of the INT8 Q/DQ model divided by the
FP32 model's, same architecture, both sessions in one process, calls interleaved so that CPU load
hits both alike. Random-init weights (calibrated on random images) unless --weights is given:
latency does not depend on the weight values.

    python bench/bench_ort.py latency --cfg gelan-s --imgsz 640 --batch-sizes 1,8
    -> bench/results/ort_int8_fp32_latency_ratio_bs1.json, ..._bs8.json

map (CPU or GPU for the PyTorch side): mAP50-95 of the exported Q/DQ ONNX on ONNX Runtime minus
the PyTorch PTQ/QAT model's, same square letterboxed images, plus the largest raw-output difference.

    python bench/bench_ort.py map --weights runs/qat/bccd/weights/qat_best.pt --data data/bccd.yaml \
        --task test --imgsz 640
    -> bench/results/ort_int8_minus_qat_map50_95_<weights stem>.json

threads (CPU, ~1 min): CPU seconds of ONNX Runtime calls in the sessions the tools open (as many
threads as PyTorch has; one, as in the test suite) over those of ORT's own default pool (one
thread a core), while another process keeps a core busy as a second test worker does. The two
sessions run the same file in alternating blocks.

    python bench/bench_ort.py threads
    -> bench/results/ort_threads_cpu_ratio.json
"""
from __future__ import annotations

import argparse
import copy
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.record import machine_name, write_record  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.paths import ROOT  # noqa: E402


def _fp_and_int8(cfg: str, imgsz: int, calib_batches: int, seed: int):
    """A fused FP32 model and its QAT-prepared, calibrated twin (random init, random calibration images)."""
    from models.quantize import calibrate, float_conv_names, prepare
    from models.yolo import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(f"{cfg}.yaml" if not cfg.endswith(".yaml") else cfg).eval()
    fp = copy.deepcopy(model).fuse().eval()
    prepare(model)
    gen = torch.Generator().manual_seed(seed)
    calibrate(model, [torch.rand(1, 3, imgsz, imgsz, generator=gen) for _ in range(calib_batches)])
    return fp, model.eval(), float_conv_names(model)


def _ort_conv_kernels(onnx_file: Path) -> dict[str, int]:
    """Convolution kernels ONNX Runtime's CPU graph optimizer actually chose for a model: it runs
    a Conv in INT8 (QLinearConv) only for DQ -> Conv -> Q, i.e. when no activation follows."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return {op: ops.count(op) for op in ("Conv", "QLinearConv", "ConvInteger", "FusedConv", "NchwcConv") if op in ops}


def bench_latency(opt: argparse.Namespace) -> list[Path]:
    from utils.deployment.onnx_export import export_onnx
    from utils.deployment.ort_runtime import OrtRunner

    fp, q, floats = _fp_and_int8(opt.cfg, opt.imgsz, opt.calib_batches, opt.seed)
    out_dir = Path(opt.out or tempfile.mkdtemp(prefix="bench_ort_"))
    fp_file = export_onnx(fp, out_dir / f"{opt.cfg}-fp32.onnx", opt.imgsz, dynamic=True).path
    q_result = export_onnx(q, out_dir / f"{opt.cfg}-int8-qdq.onnx", opt.imgsz, dynamic=True, float_convs=floats)
    runners = {"fp32": OrtRunner(fp_file, threads=opt.threads),
               "int8": OrtRunner(q_result.path, threads=opt.threads)}
    kernels = {"fp32": _ort_conv_kernels(fp_file), "int8": _ort_conv_kernels(q_result.path)}
    paths = []
    for b in opt.batch_sizes:
        x = torch.rand(b, 3, opt.imgsz, opt.imgsz)
        times = {k: [] for k in runners}
        for i in range(opt.warmup + opt.iters):
            order = list(runners) if i % 2 == 0 else list(reversed(runners))  # neither always runs first
            for k in order:
                start = time.perf_counter()
                runners[k](x)
                if i >= opt.warmup:
                    times[k].append((time.perf_counter() - start) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["int8"] / med["fp32"]
        print(f"batch {b}: FP32 median {med['fp32']:.1f} ms, INT8 Q/DQ median {med['int8']:.1f} ms, ratio {ratio:.3f}")
        paths.append(write_record(
            f"ort_int8_fp32_latency_ratio_bs{b}", ratio, "ratio (INT8 / FP32 median latency)", opt.cfg,
            "random input", machine=machine_name(),
            extra={"imgsz": opt.imgsz, "batch": b, "iters": opt.iters, "warmup": opt.warmup,
                   "threads": opt.threads or f"PyTorch's ({torch.get_num_threads()})",
                   "onnxruntime": __import__("onnxruntime").__version__,
                   "median_ms": med, "mean_ms": {k: statistics.fmean(v) for k, v in times.items()},
                   "qdq_pairs": q_result.qdq_pairs, "qdq_lint_findings": len(q_result.findings),
                   "ort_cpu_conv_kernels": kernels,
                   "weights": "random init; INT8 scales calibrated on random images (latency only)"},
            results_dir=opt.results_dir))
    return paths


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_threads(opt: argparse.Namespace) -> Path:
    import onnxruntime as ort

    from models.yolo import DetectionModel
    from utils.deployment.onnx_export import export_onnx
    from utils.deployment.ort_runtime import ORT_ERROR, session_options

    torch.set_num_threads(opt.torch_threads)
    torch.manual_seed(opt.seed)
    model = DetectionModel(opt.cfg, nc=3).fuse().eval()
    out_dir = Path(opt.out or tempfile.mkdtemp(prefix="bench_ort_threads_"))
    path = str(export_onnx(model, out_dir / "model.onnx", opt.imgsz, dynamic=True).path)
    own = ort.SessionOptions()
    own.log_severity_level = ORT_ERROR
    sessions = {"ours": ort.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"]),
                "ort_default": ort.InferenceSession(path, own, providers=["CPUExecutionProvider"])}
    x = {"images": torch.rand(1, 3, opt.imgsz, opt.imgsz).numpy()}
    cpu, wall = dict.fromkeys(sessions, 0.0), dict.fromkeys(sessions, 0.0)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opt.busy_cores)]
    try:
        for block in range(2 * opt.blocks):
            name = list(sessions)[block % 2]
            sessions[name].run(None, x)  # a session's first call after the other's warms its pool again
            c0, t0 = _cpu_seconds(), time.perf_counter()
            for _ in range(opt.runs):
                sessions[name].run(None, x)
            cpu[name] += _cpu_seconds() - c0
            wall[name] += time.perf_counter() - t0
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    ratio = cpu["ours"] / cpu["ort_default"]
    threads = {k: s.get_session_options().intra_op_num_threads for k, s in sessions.items()}
    print(f"CPU {cpu['ours']:.2f} s (ours, {threads['ours']} thread(s)) vs {cpu['ort_default']:.2f} s (ORT's "
          f"default pool), ratio {ratio:.3f}; wall {wall['ours']:.2f} vs {wall['ort_default']:.2f} s")
    return write_record(
        "ort_threads_cpu_ratio", ratio, "ratio (CPU seconds: PyTorch's thread count / ORT's default pool)",
        Path(opt.cfg).name, "random input", machine=machine_name(),
        extra={"imgsz": opt.imgsz, "runs": 2 * opt.blocks * opt.runs, "busy_cores": opt.busy_cores,
               "torch_threads": opt.torch_threads, "cpu_seconds": cpu, "wall_seconds": wall,
               "wall_ratio": wall["ours"] / wall["ort_default"],
               "intra_op_threads": {"ours": threads["ours"], "ort_default": "0 (one a core)"},
               "onnxruntime": ort.__version__},
        results_dir=opt.results_dir)


def bench_map(opt: argparse.Namespace) -> Path:
    from models.experimental_trt import Prediction
    from models.quantize import float_conv_names
    from utils.data.config import load_data_config, require_split
    from utils.data.dataset import create_dataloader
    from utils.deployment.backends import DetectionBackend
    from utils.deployment.onnx_export import export_onnx
    from utils.deployment.ort_runtime import OrtRunner
    from utils.deployment.validate import evaluate_exported
    from utils.quantization.checkpoint import load_quantized
    from utils.torch_utils import select_device

    device = select_device(opt.device)
    model = load_quantized(opt.weights, device)[0]  # an FP checkpoint is a user error here
    floats = float_conv_names(model)
    data = load_data_config(opt.data)
    out_dir = Path(opt.out or tempfile.mkdtemp(prefix="bench_ort_map_"))
    result = export_onnx(model, out_dir / f"{Path(opt.weights).stem}.onnx", opt.imgsz, dynamic=True,
                         float_convs=floats)
    runner = OrtRunner(result.path)
    backend = DetectionBackend(runner, data["nc"])
    kwargs = dict(conf_thres=0.001, iou_thres=0.7, max_det=300)
    ort_eval, _ = evaluate_exported(backend, data, opt.imgsz, opt.batch_size, opt.task, "nms",
                                            workers=opt.workers, device=torch.device("cpu"), **kwargs)
    torch_eval, _ = evaluate_exported(model, data, opt.imgsz, opt.batch_size, opt.task, "nms",
                                              workers=opt.workers, device=device, **kwargs)
    loader = create_dataloader(require_split(data, opt.task), opt.imgsz, opt.batch_size, 32, rect=False,
                               workers=opt.workers, nc=data["nc"])[0]
    max_box = max_score = 0.0
    with torch.no_grad():
        for i, (imgs, *_rest) in enumerate(loader):
            if i >= opt.diff_batches:
                break
            x = imgs.float() / 255
            ref = Prediction(model)(x.to(device)).cpu()
            got = backend(x)
            max_box = max(max_box, float((got[:, :4] - ref[:, :4]).abs().max()))
            max_score = max(max_score, float((got[:, 4:] - ref[:, 4:]).abs().max()))
    delta = ort_eval.map50_95 - torch_eval.map50_95
    print(f"ORT INT8 mAP50-95 {ort_eval.map50_95:.4f} vs PyTorch {torch_eval.map50_95:.4f}: {delta:+.4f}; "
          f"max raw diff boxes {max_box:.4g} px, scores {max_score:.4g}")
    return write_record(
        f"ort_int8_minus_qat_map50_95_{Path(opt.weights).stem}", delta, "mAP50-95 (ORT INT8 - PyTorch)",
        Path(opt.weights).name, f"{Path(opt.data).name}:{opt.task}", machine=machine_name(),
        extra={"ort_map50_95": ort_eval.map50_95, "pytorch_map50_95": torch_eval.map50_95,
               "ort_map50": ort_eval.map50, "pytorch_map50": torch_eval.map50, "images": ort_eval.images,
               "imgsz": opt.imgsz, "letterbox": "square (the exported input size)",
               "max_raw_output_diff": {"boxes_px": max_box, "scores": max_score, "batches": opt.diff_batches},
               "qdq_lint_findings": len(result.findings), "pytorch_device": str(device)},
        results_dir=opt.results_dir)


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    lat = sub.add_parser("latency", help="INT8 Q/DQ / FP32 latency ratio on ONNX Runtime CPU")
    lat.add_argument("--cfg", default="gelan-s")
    lat.add_argument("--imgsz", type=int, default=640)
    lat.add_argument("--batch-sizes", default="1,8")
    lat.add_argument("--iters", type=int, default=10)
    lat.add_argument("--warmup", type=int, default=2)
    lat.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: as many as PyTorch)")
    lat.add_argument("--calib-batches", type=int, default=2)
    lat.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("map", help="ORT INT8 mAP minus PyTorch PTQ/QAT mAP")
    m.add_argument("--weights", required=True, help="PTQ/QAT checkpoint")
    m.add_argument("--data", required=True)
    m.add_argument("--task", default="val", choices=("train", "val", "test"))
    m.add_argument("--imgsz", type=int, default=640)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--workers", type=int, default=4)
    m.add_argument("--device", default="cpu", help="device of the PyTorch evaluation")
    m.add_argument("--diff-batches", type=int, default=4, help="batches compared raw, output by output")
    th = sub.add_parser("threads", help="CPU of ORT calls: PyTorch's thread count against ORT's own pool")
    th.add_argument("--cfg", default=str(ROOT / "tests" / "assets" / "gelan-tiny.yaml"), help="model yaml")
    th.add_argument("--imgsz", type=int, default=64)
    th.add_argument("--runs", type=int, default=150, help="calls per block")
    th.add_argument("--blocks", type=int, default=2, help="blocks per session, alternating")
    th.add_argument("--busy-cores", type=int, default=1, help="processes spinning beside the benchmark")
    th.add_argument("--torch-threads", type=int, default=1, help="PyTorch's threads (the test suite's: 1)")
    th.add_argument("--seed", type=int, default=0)
    for sp in (lat, m, th):
        sp.add_argument("--out", help="folder for the exported ONNX files (default: a temporary folder)")
        sp.add_argument("--results-dir", type=Path, default=None, help="default: bench/results")
    opt = p.parse_args(argv)
    if opt.mode == "latency":
        opt.batch_sizes = [int(b) for b in opt.batch_sizes.split(",") if b.strip()]
    return opt


def main(argv: list[str] | None = None):
    opt = parse_opt(argv)
    return {"latency": bench_latency, "map": bench_map, "threads": bench_threads}[opt.mode](opt)


if __name__ == "__main__":
    run_cli(main)
