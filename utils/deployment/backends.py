"""One way to run a model whatever holds it: PyTorch, ONNX Runtime or TensorRT.

Every tool that runs a model (val_trt.py, detect.py, the demo, bench) opens it here and gets a
*runner*: a callable ``images -> {output name: tensor}`` with the file's checked ``signature``
(``utils.deployment.signature``) and the ``geometry`` of the images it accepts (size, batch
range). ``DetectionBackend`` turns any runner into what the evaluator and detect.py expect of a
model, so raw and End2End exports are decoded alike: a detector's (B, 4 + nc, N) prediction, and
for a segmentation export the pair a segmentation head returns in export mode, that prediction
with ``nm`` mask coefficients appended and the (B, nm, h, w) prototypes.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from utils.boxes import xyxy2xywh
from utils.deployment.signature import DEFAULT_IMGSZ, END2END_KEYS, MASK_OUTPUT, onnx_signature
from utils.errors import UserError
from utils.options import BACKENDS


def have_tensorrt() -> bool:
    """Whether a real TensorRT is importable: a ``tensorrt`` folder of .pyi stubs only (what the
    tensorrt-stubs wheel leaves in site-packages) imports as an empty namespace package."""
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


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


def open_runner(onnx: Path | None, engine: Path | None, backend: str, device: str, imgsz: int | None,
                max_batch: int):
    """A runner for the chosen backend. Its file's signature is checked before anything else, so a
    file that is not a detector export stops with one line (and no engine is built from it).
    ``imgsz`` (default 640) pins a dynamic image size when an engine is built; ``max_batch`` bounds its profile."""
    if backend == "onnxruntime":
        from utils.deployment.ort_runtime import OrtRunner

        return OrtRunner(onnx, "cpu" if device in ("", "cpu") else "cuda")
    from utils.deployment.trt_runtime import TrtRunner, build_engine

    if engine is None:  # build once per ONNX; rebuilt when the ONNX is newer than the engine
        onnx_signature(onnx).check(onnx)
        engine = onnx.with_suffix(".engine")
        if not engine.exists() or engine.stat().st_mtime < onnx.stat().st_mtime:
            build_engine(onnx, engine, batch=(1, max(1, max_batch // 2), max_batch), imgsz=imgsz or DEFAULT_IMGSZ,
                         timing_cache=onnx.with_suffix(".timing.cache"))
    return TrtRunner(engine, f"cuda:{device}" if device.isdigit() else (device or "cuda:0"))


def end2end_as_prediction(outputs: dict[str, torch.Tensor], nc: int | None) -> torch.Tensor:
    """End2End detections as a (B, 4 + nc, K) prediction: xywh boxes and a one-hot score per row.

    NMS-free decoding of this tensor returns exactly the End2End detections (each row's only
    non-zero score is its class), so End2End and raw exports are decoded alike. ``nc`` None
    (a file that does not say): just wide enough for the largest class present.
    """
    num, boxes, scores, classes = (outputs[k] for k in END2END_KEYS)
    b, k = scores.shape
    if nc is None:
        nc = int(classes.max()) + 1 if classes.numel() else 1
    valid = torch.arange(k, device=scores.device)[None] < num.reshape(b, 1).to(scores.device)
    onehot = torch.zeros(b, k, nc, dtype=torch.float32, device=scores.device)
    onehot.scatter_(2, classes.long().clamp(0, nc - 1).unsqueeze(-1), (scores.float() * valid).unsqueeze(-1))
    return torch.cat((xyxy2xywh(boxes.float()), onehot), 2).transpose(1, 2)


# Mask probabilities are clamped this far from 0 and 1 before their logit, which then stays finite.
MASK_PROBABILITY_EPS = 1e-6


def end2end_masks_as_prototypes(prediction: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """End2End masks (B, K, h, w) as mask coefficients and prototypes of the (B, 4 + nc, K) prediction
    from ``end2end_as_prediction``: row k's coefficients are the k-th unit vector and prototype k is
    the logit of its mask, so sigmoid(coefficients . prototypes) gives each row its own mask back
    and End2End and raw segmentation exports are decoded alike."""
    b, k = masks.shape[:2]
    unit = torch.eye(k, device=prediction.device).expand(b, k, k)
    logits = torch.logit(masks.float().clamp(MASK_PROBABILITY_EPS, 1 - MASK_PROBABILITY_EPS)).to(prediction.device)
    return torch.cat((prediction, unit), 1), logits


class DetectionBackend:
    """Makes a runner look like a model to the evaluator and detect.py: images in, (B, 4+nc, N) out
    (for a segmentation export, that prediction with mask coefficients, and the prototypes).

    Batches are fed in chunks the runner accepts: at most its largest batch (an engine profile's
    maximum, a static export's batch), a short chunk padded up to its smallest. ``nc`` None skips
    the check that a raw output has the dataset's class count (detect.py has no dataset).
    """

    def __init__(self, runner, nc: int | None = None):
        self.runner, self.nc = runner, nc
        self.geometry = runner.geometry
        self.end2end = runner.signature.end2end  # outputs are detections already
        self.segment = runner.signature.segment
        self.nm = runner.signature.nm

    def __call__(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        step = min(images.shape[0], self.geometry.max_batch or images.shape[0])
        chunks = []
        for start in range(0, images.shape[0], step):
            chunk = images[start:start + step]
            n = chunk.shape[0]
            if n < self.geometry.min_batch:
                chunk = torch.cat((chunk, chunk.new_zeros(self.geometry.min_batch - n, *chunk.shape[1:])))
            chunks.append([t[:n] for t in self._prediction(self.runner(chunk))])
        out = tuple(torch.cat(parts).to(images.device) for parts in zip(*chunks))
        return out if self.segment else out[0]

    def _prediction(self, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.end2end:
            pred = end2end_as_prediction(outputs, self.nc)
            return end2end_masks_as_prototypes(pred, outputs[MASK_OUTPUT]) if self.segment else (pred,)
        pred, *prototypes = (t.float() for t in outputs.values())
        masks = prototypes[0].shape[1] if prototypes else 0
        if self.nc is not None and (pred.ndim != 3 or pred.shape[1] != 4 + self.nc + masks):
            expected = f"4 + {self.nc} classes" + (f" + {masks} mask coefficients" if masks else "")
            raise UserError(f"model output {tuple(pred.shape)} does not match (batch, {expected}, anchors);"
                            " is --data the dataset it was trained on?")
        return (pred, *prototypes)
