"""Validate and time an exported model on TensorRT or ONNX Runtime: COCO mAP and a batch sweep.

    python val_trt.py --onnx runs/qat/exp/weights/qat_best.onnx --data data/bccd.yaml --imgsz 640
    python val_trt.py --engine qat_best.engine --benchmark --batch-sizes 1,4,8,12,16,32

``--backend auto`` takes TensorRT when it is installed (building and caching an engine beside an
``--onnx``), else ONNX Runtime. Raw outputs are decoded with ``--postprocess nms|none``; End2End
outputs are already detections. mAP goes through the same evaluator as val.py, on square
letterboxed images of ``--imgsz`` (the exported input size).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from utils.deployment.benchmark_report import BatchTiming, summarize, to_markdown, write_report
from utils.boxes import xyxy2xywh
from utils.errors import UserError, run_cli
from utils.evaluation.evaluator import EvalArtifacts, EvalResult, evaluate
from utils.paths import ROOT, existing_file, increment_path

BACKENDS = ("auto", "tensorrt", "onnxruntime")
END2END_KEYS = ("num_dets", "det_boxes", "det_scores", "det_classes")


def have_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def resolve_backend(backend: str, engine: str | Path | None) -> str:
    """'tensorrt' or 'onnxruntime'; asking for TensorRT where it is not installed is a user error."""
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = "tensorrt" if engine or have_tensorrt() else "onnxruntime"
    if backend == "tensorrt" and not have_tensorrt():
        raise UserError("--backend tensorrt: the tensorrt Python package is not installed "
                        "(pip install 'tensorrt>=10,<11'), or use --backend onnxruntime with --onnx")
    if backend == "onnxruntime" and engine:
        raise UserError(f"{engine}: a TensorRT engine runs only on TensorRT; pass the --onnx it was built from")
    return backend


def open_runner(onnx: Path | None, engine: Path | None, backend: str, device: str, imgsz: int, max_batch: int):
    """A callable ``images -> {output name: tensor}`` for the chosen backend."""
    if backend == "onnxruntime":
        from utils.deployment.ort_runtime import OrtRunner

        return OrtRunner(onnx, "cpu" if device in ("", "cpu") else "cuda")
    from utils.deployment.trt_runtime import TrtRunner, build_engine

    if engine is None:  # build once per ONNX; rebuilt when the ONNX is newer than the engine
        engine = onnx.with_suffix(".engine")
        if not engine.exists() or engine.stat().st_mtime < onnx.stat().st_mtime:
            build_engine(onnx, engine, batch=(1, max(1, max_batch // 2), max_batch), imgsz=imgsz,
                         timing_cache=onnx.with_suffix(".timing.cache"))
    return TrtRunner(engine, f"cuda:{device}" if device.isdigit() else (device or "cuda:0"))


def end2end_as_prediction(outputs: dict[str, torch.Tensor], nc: int) -> torch.Tensor:
    """End2End detections as a (B, 4 + nc, K) prediction: xywh boxes and a one-hot score per row.

    NMS-free decoding of this tensor returns exactly the End2End detections (each row's only
    non-zero score is its class), so the evaluator scores End2End and raw exports alike.
    """
    num, boxes, scores, classes = (outputs[k] for k in END2END_KEYS)
    b, k = scores.shape
    valid = torch.arange(k, device=scores.device)[None] < num.reshape(b, 1).to(scores.device)
    onehot = torch.zeros(b, k, nc, dtype=torch.float32, device=scores.device)
    onehot.scatter_(2, classes.long().clamp(0, nc - 1).unsqueeze(-1), (scores.float() * valid).unsqueeze(-1))
    return torch.cat((xyxy2xywh(boxes.float()), onehot), 2).transpose(1, 2)


class DetectionBackend:
    """Makes a runner look like a model to ``utils.evaluation.evaluator.evaluate``: images in, (B, 4+nc, N) out.

    A static-batch export is fed in chunks of its batch size, the last chunk padded; an engine in
    chunks of at most its profile's largest batch.
    """

    def __init__(self, runner, nc: int):
        self.runner, self.nc = runner, nc
        self.fixed_batch = getattr(runner, "fixed_batch", None)
        self.max_batch = getattr(runner, "max_batch", None)
        self.end2end = all(k in runner.output_names for k in END2END_KEYS)  # outputs are detections already

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        step = self.fixed_batch or min(images.shape[0], self.max_batch or images.shape[0])
        preds = []
        for start in range(0, images.shape[0], step):
            chunk = images[start:start + step]
            n = chunk.shape[0]
            if self.fixed_batch and n < step:
                chunk = torch.cat((chunk, chunk.new_zeros(step - n, *chunk.shape[1:])))
            preds.append(self._prediction(self.runner(chunk))[:n])
        return torch.cat(preds).to(images.device)

    def _prediction(self, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.end2end:
            return end2end_as_prediction(outputs, self.nc)
        pred = next(iter(outputs.values())).float()
        if pred.ndim != 3 or pred.shape[1] != 4 + self.nc:
            raise UserError(f"model output {tuple(pred.shape)} does not match (batch, 4 + {self.nc} classes, anchors);"
                            " is --data the dataset it was trained on?")
        return pred


def evaluate_exported(backend: DetectionBackend | torch.nn.Module, data: dict, imgsz: int, batch_size: int, task: str,
                      postprocess: str, conf_thres: float, iou_thres: float, max_det: int, workers: int,
                      device: torch.device, keep_boxes: bool = False) -> tuple[EvalResult, EvalArtifacts]:
    """COCO-style mAP of an exported model on square ``imgsz`` letterboxed images of ``data[task]``.

    A PyTorch model (in eval mode) is accepted too, so that it can be compared on the very same input.
    """
    from utils.data.config import require_split
    from utils.data.dataset import create_dataloader

    loader = create_dataloader(require_split(data, task), imgsz, batch_size, 32, rect=False, workers=workers,
                               prefix=f"{task}: ", nc=data["nc"])[0]
    return evaluate(backend, loader, list(data["names"]), device=device, conf_thres=conf_thres, iou_thres=iou_thres,
                    max_det=max_det, postprocess="none" if getattr(backend, "end2end", False) else postprocess,
                    keep_boxes=keep_boxes)


def benchmark(runner, batch_sizes: list[int], imgsz: int, device: torch.device, warmup: int = 10,
              iters: int = 50) -> list[BatchTiming]:
    """Latency of one call per batch size on a device-resident random batch (no host copies on GPU)."""
    from tqdm import tqdm

    fixed = getattr(runner, "fixed_batch", None)
    limit = getattr(runner, "max_batch", None)
    rows = []
    for b in tqdm(batch_sizes, desc="benchmark"):
        if (fixed and b != fixed) or (limit and b > limit):
            print(f"benchmark: batch {b} skipped (the model takes {'exactly ' + str(fixed) if fixed else f'<= {limit}'})")
            continue
        images = torch.rand(b, 3, imgsz, imgsz, device=device)
        times = []
        for i in range(warmup + iters):
            _sync(device)
            start = time.perf_counter()
            runner(images)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        rows.append(summarize(b, times))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(onnx: str | Path | None = None, engine: str | Path | None = None, data: str | Path | None = None,
        batch_size: int = 32, imgsz: int = 640, postprocess: str = "nms", backend: str = "auto",
        conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300, task: str = "val",
        device: str = "", workers: int = 8, benchmark_sweep: bool = False,
        batch_sizes: tuple[int, ...] = (1, 4, 8, 12, 16, 32), warmup: int = 10, iters: int = 50,
        project: str | Path = ROOT / "runs/val_trt", name: str = "exp", exist_ok: bool = False) -> dict:
    """Evaluate (when ``data`` is given) and/or benchmark; results go to a fresh project/name folder."""
    if (onnx is None) == (engine is None):
        raise UserError("val_trt.py: pass exactly one of --onnx and --engine")
    if data is None and not benchmark_sweep:
        raise UserError("val_trt.py: nothing to do; pass --data to evaluate and/or --benchmark to time")
    if postprocess not in ("nms", "none"):
        raise UserError(f"--postprocess {postprocess}: expected nms or none")
    onnx = existing_file(onnx, "ONNX file") if onnx else None
    engine = existing_file(engine, "TensorRT engine") if engine else None
    chosen = resolve_backend(backend, engine)
    runner = open_runner(onnx, engine, chosen, device, imgsz, max(batch_sizes + (batch_size,)))
    dev = torch.device("cuda", int(device) if device.isdigit() else 0) if chosen == "tensorrt" else torch.device("cpu")
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    out = {"backend": chosen, "model": str(onnx or engine), "save_dir": str(save_dir)}
    if data is not None:
        from utils.data.config import load_data_config

        cfg = load_data_config(data)
        result, _ = evaluate_exported(DetectionBackend(runner, cfg["nc"]), cfg, imgsz, batch_size, task, postprocess,
                                      conf_thres, iou_thres, max_det, workers, dev)
        print(result.table(per_class=len(cfg["names"]) < 50))
        (save_dir / "results.json").write_text(json.dumps({**out, **result.to_dict()}, indent=2) + "\n")
        (save_dir / "results.md").write_text(result.markdown())
        out["eval"] = result
    if benchmark_sweep:
        rows = benchmark(runner, list(batch_sizes), imgsz, dev, warmup, iters)
        title = f"{Path(onnx or engine).name} on {chosen} ({dev.type}), {imgsz}x{imgsz}"
        write_report(rows, save_dir, "benchmark", title, meta={"backend": chosen, "model": out["model"],
                                                                 "imgsz": imgsz, "warmup": warmup, "iters": iters})
        print(to_markdown(rows, title), end="")
        out["benchmark"] = rows
    print(f"Results saved to {save_dir}")
    return out


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--onnx", help="exported ONNX (raw or End2End)")
    src.add_argument("--engine", help="serialized TensorRT engine")
    p.add_argument("--data", help="dataset.yaml; evaluate mAP on its --task split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="the exported input size")
    p.add_argument("--postprocess", default="nms", choices=("nms", "none"), help="decoding of raw outputs")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.7)
    p.add_argument("--max-det", type=int, default=300)
    p.add_argument("--task", default="val", choices=("train", "val", "test"))
    p.add_argument("--device", default="", help="CUDA device index for TensorRT / ORT-CUDA; cpu for ORT on CPU")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--benchmark", action="store_true", help="latency/throughput sweep over --batch-sizes")
    p.add_argument("--batch-sizes", default="1,4,8,12,16,32", help="comma-separated, for --benchmark")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls per batch size")
    p.add_argument("--iters", type=int, default=50, help="timed calls per batch size")
    p.add_argument("--project", default=str(ROOT / "runs/val_trt"))
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true")
    opt = p.parse_args(argv)
    try:
        opt.batch_sizes = tuple(int(b) for b in opt.batch_sizes.split(",") if b.strip())
    except ValueError:
        p.error(f"--batch-sizes {opt.batch_sizes}: expected integers like 1,4,8")
    return opt


def main(argv: list[str] | None = None) -> dict:
    opt = vars(parse_opt(argv))
    opt["benchmark_sweep"] = opt.pop("benchmark")
    return run(**opt)


if __name__ == "__main__":
    run_cli(main)
