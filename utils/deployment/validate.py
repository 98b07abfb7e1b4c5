"""Validate and time an exported model (ONNX or TensorRT engine): COCO mAP and a batch-size sweep.

val_trt.py is this module's command line. Evaluation goes through the same evaluator as val.py,
fed by ``utils.deployment.backends``, so PyTorch, ONNX Runtime and TensorRT are scored alike.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.deployment.backends import DetectionBackend, open_runner, resolve_backend
from utils.deployment.signature import InputGeometry
from utils.deployment.benchmark_report import (
    BatchTiming,
    summarize,
    to_markdown,
    write_report,
)
from utils.errors import UserError
from utils.evaluation.agreement import check_reference_task
from utils.evaluation.evaluator import EvalArtifacts, EvalResult, evaluate
from utils.options import REFERENCE_CONF, check_flags
from utils.paths import ROOT, existing_file, increment_path
from utils.torch_utils import select_device


def task_loader(backend: DetectionBackend | torch.nn.Module, data: dict, hw: tuple[int, int], batch_size: int,
                task: str, workers: int, model_name: str = "the model") -> DataLoader:
    """Batches of ``data[task]`` letterboxed to exactly ``hw`` (h, w), refused with one line naming both
    when the labels do not fit the model's task (polygons for a segmentation model, boxes for a detector).

    Separate from scoring so that val_trt.py checks the data before it makes a run folder.
    """
    from utils.data.config import require_split
    from utils.data.dataset import check_task, create_dataloader, model_task

    if isinstance(backend, DetectionBackend):
        kind = "segment" if backend.segment else "detect"
    else:
        kind = model_task(backend)
    loader, dataset = create_dataloader(require_split(data, task), max(hw), batch_size, 32, rect=False,
                                        workers=workers, prefix=f"{task}: ", nc=data["nc"], fixed_hw=hw, task=kind)
    check_task(dataset, model_name, kind)
    return loader


def evaluate_exported(backend: DetectionBackend | torch.nn.Module, data: dict, imgsz: int | tuple[int, int],
                      batch_size: int, task: str, postprocess: str, conf_thres: float, iou_thres: float, max_det: int,
                      workers: int, device: torch.device, keep_boxes: bool = False,
                      model_name: str = "the model", loader: DataLoader | None = None
                      ) -> tuple[EvalResult, EvalArtifacts]:
    """COCO-style mAP of an exported model on images of ``data[task]`` letterboxed to exactly ``imgsz``
    (an int: square; a pair: (h, w), the input of a non-square export).

    A PyTorch model (in eval mode) is accepted too, so that it can be compared on the very same input.
    A segmentation model or export is scored on boxes and masks (see ``task_loader``); ``loader``
    is that function's result when the caller has made it already.
    """
    hw = (imgsz, imgsz) if isinstance(imgsz, int) else tuple(imgsz)
    if loader is None:
        loader = task_loader(backend, data, hw, batch_size, task, workers, model_name)
    return evaluate(backend, loader, list(data["names"]), device=device, conf_thres=conf_thres, iou_thres=iou_thres,
                    max_det=max_det, postprocess="none" if getattr(backend, "end2end", False) else postprocess,
                    keep_boxes=keep_boxes)


def benchmark(runner, batch_sizes: list[int], hw: tuple[int, int], device: torch.device, warmup: int = 10,
              iters: int = 50) -> list[BatchTiming]:
    """Latency of one call per batch size on a device-resident random (h, w) batch (no host copies on GPU);
    batch sizes the runner does not accept are skipped with a note."""
    from tqdm import tqdm

    geometry = runner.geometry
    rows = []
    for b in tqdm(batch_sizes, desc="benchmark"):
        if not geometry.accepts(b):
            print(f"benchmark: batch {b} skipped (the model takes batches {_batch_range(geometry)})")
            continue
        images = torch.rand(b, 3, *hw, device=device)
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


def _batch_range(geometry: InputGeometry) -> str:
    if geometry.fixed_batch:
        return f"of exactly {geometry.fixed_batch}"
    return f"{geometry.min_batch} to {geometry.max_batch}" if geometry.max_batch else f">= {geometry.min_batch}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matching_data(data: str | Path, nc: int | None, model: Path) -> dict:
    """The dataset config, refused before any run folder is made when the model's class count differs."""
    from utils.data.config import load_data_config

    cfg = load_data_config(data)
    if nc is not None and nc != cfg["nc"]:
        raise UserError(f"{model}: the model predicts {nc} classes but {data} has nc={cfg['nc']}; "
                        "is --data the dataset it was trained on?")
    return cfg


def _reference_model(reference: str | Path, device: str, nc: int | None, segment: bool, model: Path
                     ) -> torch.nn.Module:
    """The FP32 model whose detections are the ground truth of agreement (boxes, for a segmentation
    model too), refused before any run folder is made when its class count or task differs from
    the exported model's: it cannot be the model the file was exported from."""
    from models.loading import attempt_load

    ref = attempt_load(existing_file(reference, "FP32 checkpoint"), device=select_device(device), fuse=True)
    if nc is not None and nc != int(ref.nc):
        raise UserError(f"{model}: the model predicts {nc} classes but the reference {reference} has {int(ref.nc)}")
    check_reference_task("segment" if segment else "detect", ref, model, reference)
    return ref.float().eval()


def run(onnx: str | Path | None = None, engine: str | Path | None = None, data: str | Path | None = None,
        batch_size: int = 32, imgsz: int | None = None, postprocess: str = "nms", backend: str = "auto",
        conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300, task: str = "val",
        device: str = "", workers: int = 8, benchmark_sweep: bool = False,
        batch_sizes: tuple[int, ...] = (1, 4, 8, 12, 16, 32), warmup: int = 10, iters: int = 50,
        project: str | Path = ROOT / "runs/val_trt", name: str = "exp", exist_ok: bool = False,
        reference: str | Path | None = None, source: list[str] | None = None,
        reference_conf: float = REFERENCE_CONF) -> dict:
    """Evaluate (when ``data`` is given), score agreement with an FP32 ``reference`` on unlabelled
    ``source`` images, and/or benchmark; results go to a fresh project/name folder.

    The input size is the model's own (read from the ONNX or engine, non-square too); ``imgsz``
    only sizes a model whose image size is dynamic, and is otherwise ignored with a note.
    """
    check_flags(locals())  # the parameters are val_trt.py's flags
    if (onnx is None) == (engine is None):
        raise UserError("val_trt.py: pass exactly one of --onnx and --engine")
    if (reference is None) != (source is None):
        raise UserError("val_trt.py: --reference (the FP32 checkpoint) and --source (images or videos) go together")
    if data is None and source is None and not benchmark_sweep:
        raise UserError("val_trt.py: nothing to do; pass --data to evaluate, --reference with --source to score "
                        "agreement, and/or --benchmark to time")
    if postprocess not in ("nms", "none"):
        raise UserError(f"--postprocess {postprocess}: expected nms or none")
    onnx = existing_file(onnx, "ONNX file") if onnx else None
    engine = existing_file(engine, "TensorRT engine") if engine else None
    chosen = resolve_backend(backend, engine)
    runner = open_runner(onnx, engine, chosen, device, imgsz, max(batch_sizes + (batch_size,)))
    hw = runner.geometry.input_hw(imgsz, onnx or engine)
    dev = torch.device("cuda", int(device) if device.isdigit() else 0) if chosen == "tensorrt" else torch.device("cpu")
    cfg = _matching_data(data, runner.signature.nc, onnx or engine) if data is not None else None
    ref_model = (_reference_model(reference, device, runner.signature.nc, runner.signature.segment, onnx or engine)
                 if source else None)
    if cfg is not None:
        scored = DetectionBackend(runner, cfg["nc"])
        loader = task_loader(scored, cfg, hw, batch_size, task, workers, str(onnx or engine))
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    out = {"backend": chosen, "model": str(onnx or engine), "save_dir": str(save_dir)}
    if cfg is not None:
        result, _ = evaluate_exported(scored, cfg, hw, batch_size, task, postprocess, conf_thres, iou_thres,
                                      max_det, workers, dev, loader=loader)
        print(result.table(per_class=len(cfg["names"]) < 50))
        (save_dir / "results.json").write_text(json.dumps({**out, **result.to_dict()}, indent=2) + "\n")
        (save_dir / "results.md").write_text(result.markdown())
        out["eval"] = result
    if ref_model is not None:
        from utils.evaluation.agreement import run_agreement

        backend_model = DetectionBackend(runner, int(ref_model.nc))
        out["agreement"] = run_agreement(
            backend_model, ref_model, source, hw, save_dir, f"Agreement of {Path(onnx or engine).name} ({chosen}) "
            f"with {Path(reference).name}", candidate_device=dev, batch_size=batch_size,
            postprocess="none" if backend_model.end2end else postprocess, reference_conf=reference_conf,
            conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    if benchmark_sweep:
        rows = benchmark(runner, list(batch_sizes), hw, dev, warmup, iters)
        title = f"{Path(onnx or engine).name} on {chosen} ({dev.type}), {hw[0]}x{hw[1]}"
        write_report(rows, save_dir, "benchmark", title, meta={"backend": chosen, "model": out["model"],
                                                                 "imgsz": list(hw), "warmup": warmup, "iters": iters})
        print(to_markdown(rows, title), end="")
        out["benchmark"] = rows
    print(f"Results saved to {save_dir}")
    return out
