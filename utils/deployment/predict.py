"""Detect objects in images and videos with a loaded model and save annotated copies and label files.

detect.py is this module's command line. The model is a PyTorch checkpoint or an exported file
(ONNX on ONNX Runtime or TensorRT, a TensorRT engine) behind ``utils.deployment.backends``: raw
outputs go through the same NMS as PyTorch's, End2End outputs are detections already. A
segmentation model's (or export's) masks are drawn under its boxes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from models.loading import attempt_load
from utils.boxes import scale_boxes, xyxy2xywhn
from utils.data.augment import letterbox
from utils.data.polygons import mask_to_polygon
from utils.data.media import VideoSink, media_files, read_frames
from utils.deployment.backends import DetectionBackend, open_runner, resolve_backend
from utils.deployment.signature import DEFAULT_IMGSZ
from utils.errors import UserError
from utils.evaluation.masks import BoxMask, mask_probabilities, masks_in_original, segmentation_output
from utils.evaluation.postprocess import postprocess
from utils.options import check_flags, check_imgsz
from utils.paths import ROOT, existing_file, increment_path
from utils.torch_utils import select_device

EXPORTED_SUFFIXES = (".onnx", ".engine")

# Box colours (BGR), cycled by class index.
PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
           (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203)]


def detect_image(model: nn.Module | DetectionBackend, image: np.ndarray, imgsz: int | tuple[int, int] = 640,
                 conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                 classes: Sequence[int] | None = None, agnostic: bool = False, half: bool = False) -> torch.Tensor:
    """(n, 6) detections [x1, y1, x2, y2, conf, cls] in ``image``'s pixels (BGR uint8 input).

    ``imgsz`` an int: the longest side, the other padded only up to the stride (PyTorch takes any
    stride multiple); an (h, w) pair: letterboxed to exactly that size, as a fixed-size export needs.
    """
    return predict_image(model, image, imgsz, conf_thres, iou_thres, max_det, classes, agnostic, half)[0]


def predict_image(model: nn.Module | DetectionBackend, image: np.ndarray, imgsz: int | tuple[int, int] = 640,
                  conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000,
                  classes: Sequence[int] | None = None, agnostic: bool = False,
                  half: bool = False) -> tuple[torch.Tensor, list[BoxMask] | None]:
    """``detect_image``'s detections and, for a segmentation model, each one's mask in ``image``'s
    pixels (None for a detector), thresholded as the evaluator does."""
    if isinstance(imgsz, int):
        stride = int(max(model.stride.max(), 32))
        padded, (gain_w, gain_h), (left, top) = letterbox(image, imgsz, stride=stride, auto=True)
    else:
        padded, (gain_w, gain_h), (left, top) = letterbox(image, imgsz, auto=False)
    x = torch.from_numpy(np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1)))[None]
    if isinstance(model, nn.Module):
        x = x.to(next(model.parameters()).device)
    x = (x.half() if half else x.float()) / 255
    with torch.no_grad():
        kind = "none" if getattr(model, "end2end", False) else "nms"
        out = model(x)
        seg = segmentation_output(out)
        pred, prototypes = seg if seg is not None else (out, None)
        nm = prototypes.shape[1] if prototypes is not None else 0
        det = postprocess(pred, kind, conf_thres, iou_thres, max_det, classes, agnostic, nm=nm)[0]
    ratio_pad = ((gain_h, gain_w), (left, top))
    det[:, :4] = scale_boxes(x.shape[2:], det[:, :4].float(), image.shape[:2], ratio_pad)
    masks = None
    if prototypes is not None:
        masks = masks_in_original(mask_probabilities(det[:, 6:], prototypes[0]), tuple(x.shape[2:]), image.shape[:2],
                                  ratio_pad, det[:, :4])
    return det[:, :6].float().cpu(), masks


def load_exported(weights: str | Path, backend: str = "auto", device: str = "",
                  imgsz: int | None = None) -> tuple[DetectionBackend, tuple[int, int], dict[int, str]]:
    """An exported model ready for ``detect_image``, the (h, w) it takes, and its class names (from
    the ONNX metadata; numbers where the file has none, as engines do)."""
    path = existing_file(weights, "model file")
    onnx, engine = (None, path) if path.suffix == ".engine" else (path, None)
    runner = open_runner(onnx, engine, resolve_backend(backend, engine), device, imgsz, max_batch=1)
    signature = runner.signature
    names = dict(enumerate(signature.names or [str(i) for i in range(signature.nc or 0)]))
    return DetectionBackend(runner, signature.nc), runner.geometry.input_hw(imgsz, path), names


def draw_detections(image: np.ndarray, det: torch.Tensor, names: Mapping[int, str], line_width: int = 3,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """``image`` with a box and a 'name conf' tag per detection (drawn in place, also returned); a class
    without a name is shown by its number."""
    for *xyxy, conf, cls in det.tolist():
        c = int(cls)
        color = PALETTE[c % len(PALETTE)]
        p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
        cv2.rectangle(image, p1, p2, color, line_width, cv2.LINE_AA)
        if hide_labels:
            continue
        name = names.get(c, str(c))
        label = name if hide_conf else f"{name} {conf:.2f}"
        font_scale, thickness = line_width / 3, max(line_width - 1, 1)
        (w, h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        above = p1[1] - h - 3 >= 0
        corner = (p1[0] + w, p1[1] - h - 3 if above else p1[1] + h + 3)
        cv2.rectangle(image, p1, corner, color, -1, cv2.LINE_AA)
        text_y = p1[1] - 2 if above else p1[1] + h + 2
        cv2.putText(image, label, (p1[0], text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return image


def draw_masks(image: np.ndarray, masks: list[BoxMask], classes: Sequence[float], alpha: float = 0.5) -> np.ndarray:
    """``image`` with each mask blended in its class's colour (in place, also returned)."""
    for mask, cls in zip(masks, classes):
        h, w = mask.pixels.shape
        region = image[mask.y0:mask.y0 + h, mask.x0:mask.x0 + w]
        color = np.array(PALETTE[int(cls) % len(PALETTE)], dtype=np.float32)
        region[mask.pixels] = (region[mask.pixels] * (1 - alpha) + color * alpha).astype(np.uint8)
    return image


def _label_line(cls: float, values: Sequence[float], conf: float | None) -> str:
    return " ".join([str(int(cls)), *(f"{v:.6g}" for v in [*values, *([] if conf is None else [conf])])])


def label_lines(det: torch.Tensor, shape: tuple[int, int], save_conf: bool = False) -> list[str]:
    """YOLO label lines 'cls x y w h [conf]' (normalised to the image) for ``det``."""
    xywhn = xyxy2xywhn(det[:, :4], w=shape[1], h=shape[0])
    return [_label_line(cls, xywh, conf if save_conf else None)
            for xywh, conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist())]


def polygon_label_lines(det: torch.Tensor, masks: Sequence[BoxMask], shape: tuple[int, int],
                        save_conf: bool = False) -> list[str]:
    """YOLO polygon label lines 'cls x1 y1 ... xn yn [conf]' (normalised to the image), one per mask.

    Each line is the outline of the mask along pixel edges, so it reads back (``utils.data``) as
    exactly the mask's pixels, holes filled. A mask in several parts is one row with its parts joined
    by zero-width bridges (as the converters write them), where upstream's predict keeps only the
    largest part and loses the rest. A mask with no pixel gets no line; an outline already written
    for the class (two boxes around one blob) is written once, as the label loader would drop the repeat.
    """
    h, w = shape
    lines, written = [], set()
    for mask, conf, cls in zip(masks, det[:, 4].tolist(), det[:, 5].tolist()):
        outline, _ = mask_to_polygon(mask.pixels)
        if outline is None:
            continue
        xy = ((outline + (mask.x0, mask.y0)) / (w, h)).ravel().tolist()
        row = _label_line(cls, xy, None)
        if row not in written:
            written.add(row)
            lines.append(_label_line(cls, xy, conf) if save_conf else row)
    return lines


def run(weights: str | Path | None = None, source: str | Path = "", imgsz: int | None = None,
        conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000, device: str = "",
        save_txt: bool = False, save_conf: bool = False, nosave: bool = False, classes: Sequence[int] | None = None,
        agnostic_nms: bool = False, project: str | Path = ROOT / "runs/detect", name: str = "exp",
        exist_ok: bool = False, line_thickness: int = 3, hide_labels: bool = False, hide_conf: bool = False,
        half: bool = False, vid_stride: int = 1, unsafe_load: bool = False, cfg: str | Path | None = None,
        backend: str = "auto", model: nn.Module | None = None) -> Path:
    """Detect on every file of ``source``; returns the run folder. ``model`` skips loading ``weights``.

    ``weights`` ending in .onnx / .engine run through ``backend`` at the file's own input size
    (``imgsz`` only sizes a dynamic-size export); anything else is a PyTorch checkpoint.
    """
    check_flags(locals())  # the parameters are detect.py's flags
    files = media_files(source)
    exported = model is None and weights is not None and Path(weights).suffix.lower() in EXPORTED_SUFFIXES
    if backend != "auto" and not exported:
        raise UserError(f"--backend {backend}: only for .onnx / .engine weights; a checkpoint runs on PyTorch")
    if exported:
        model, size, names = load_exported(weights, backend, device, imgsz)
        half = False  # the exported file's own precision decides
    else:
        dev = select_device(device)
        half = half and dev.type == "cuda"  # CPU convolutions have no fp16 kernels
        if model is None:
            if weights is None:
                raise UserError("detect: give --weights")
            model = attempt_load(weights, device=dev, unsafe=unsafe_load, cfg=cfg)
        check_imgsz(imgsz or DEFAULT_IMGSZ, max(int(model.stride.max()), 32))
        model = (model.half() if half else model.float()).eval()
        names = getattr(model, "names", None) or [str(i) for i in range(int(model.nc))]
        names = names if isinstance(names, dict) else dict(enumerate(names))
        size = imgsz or DEFAULT_IMGSZ
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    if save_txt:
        (save_dir / "labels").mkdir(exist_ok=True)

    summary = {}
    for path in tqdm(files, desc="detect", unit="file"):
        sink, count = None, 0
        for frame in read_frames(path, vid_stride):
            det, masks = predict_image(model, frame.image, size, conf_thres, iou_thres, max_det, classes, agnostic_nms,
                                       half)
            count += len(det)
            stem = path.stem if frame.index is None else f"{path.stem}_{frame.index}"
            if save_txt:
                lines = (label_lines(det, frame.image.shape[:2], save_conf) if masks is None else
                         polygon_label_lines(det, masks, frame.image.shape[:2], save_conf))
                (save_dir / "labels" / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
            if nosave:
                continue
            if masks is not None:
                draw_masks(frame.image, masks, det[:, 5].tolist())
            annotated = draw_detections(frame.image, det, names, line_thickness, hide_labels, hide_conf)
            if frame.index is None:
                cv2.imwrite(str(save_dir / path.name), annotated)
            else:
                if sink is None:
                    h, w = annotated.shape[:2]
                    sink = VideoSink(save_dir / f"{path.stem}.mp4", path, (w, h))
                sink.write(annotated)
        if sink is not None:
            sink.close()
        summary[path.name] = count
    (save_dir / "summary.json").write_text(json.dumps({"source": str(source), "detections": summary}, indent=2))
    print(f"{sum(summary.values())} detections in {len(files)} file(s); results saved to {save_dir}")
    return save_dir
