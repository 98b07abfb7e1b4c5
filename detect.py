"""Run a detector on an image, a folder of images and videos, or a video; save annotated copies.

    python detect.py --weights gelan-c.pt --source data/images --imgsz 640 --conf-thres 0.25

Results go to runs/detect/exp (exp2, exp3... when it exists): annotated images / videos, with
--save-txt one YOLO label file per image or video frame, and summary.json with detection counts.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from models.experimental import attempt_load
from utils.data.augment import letterbox
from utils.boxes import scale_boxes, xyxy2xywhn
from utils.errors import UserError, run_cli
from utils.data.label_check import IMG_FORMATS
from utils.paths import ROOT, increment_path
from utils.evaluation.postprocess import non_max_suppression
from utils.torch_utils import select_device

VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm")

# Box colours (BGR), cycled by class index.
PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
           (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203)]


@dataclass
class Frame:
    """One picture to run on: an image file, or frame ``index`` of a video file."""

    path: Path
    image: np.ndarray  # BGR, as OpenCV reads it
    index: int | None = None  # frame number for videos


def media_files(source: str | Path) -> list[Path]:
    """The image and video files of ``source`` (a file, or a folder, not searched recursively)."""
    p = Path(source)
    if not p.exists():
        raise UserError(f"{p}: source not found (give an image, a video or a folder)")
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    known = [f for f in files if f.suffix[1:].lower() in IMG_FORMATS + VID_FORMATS]
    if not known:
        raise UserError(f"{p}: no images or videos (formats: {', '.join(IMG_FORMATS + VID_FORMATS)})")
    return known


def is_video(path: Path) -> bool:
    return path.suffix[1:].lower() in VID_FORMATS


def read_frames(path: Path, vid_stride: int = 1) -> Iterator[Frame]:
    """The image, or every ``vid_stride``-th frame of the video, at ``path``."""
    if not is_video(path):
        image = cv2.imread(str(path))
        if image is None:
            raise UserError(f"{path}: cannot read this image")
        yield Frame(path, image)
        return
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"{path}: cannot open this video")
    try:
        index = 0
        while True:
            ok, image = capture.read()
            if not ok:
                break
            if index % vid_stride == 0:
                yield Frame(path, image, index)
            index += 1
    finally:
        capture.release()


def detect_image(model: nn.Module, image: np.ndarray, imgsz: int = 640, conf_thres: float = 0.25,
                 iou_thres: float = 0.45, max_det: int = 1000, classes: Sequence[int] | None = None,
                 agnostic: bool = False, half: bool = False) -> torch.Tensor:
    """(n, 6) detections [x1, y1, x2, y2, conf, cls] in ``image``'s pixels (BGR uint8 input)."""
    stride = int(max(model.stride.max(), 32))
    padded, (gain_w, gain_h), (left, top) = letterbox(image, imgsz, stride=stride, auto=True)
    p = next(model.parameters())
    x = torch.from_numpy(np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1))).to(p.device)
    x = (x.half() if half else x.float())[None] / 255
    with torch.no_grad():
        det = non_max_suppression(model(x), conf_thres, iou_thres, classes, agnostic, max_det=max_det)[0]
    det[:, :4] = scale_boxes(x.shape[2:], det[:, :4].float(), image.shape[:2], ((gain_h, gain_w), (left, top)))
    return det.float().cpu()


def draw_detections(image: np.ndarray, det: torch.Tensor, names: dict | Sequence[str], line_width: int = 3,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """``image`` with a box and a 'name conf' tag per detection (drawn in place, also returned)."""
    for *xyxy, conf, cls in det.tolist():
        c = int(cls)
        color = PALETTE[c % len(PALETTE)]
        p1, p2 = (int(xyxy[0]), int(xyxy[1])), (int(xyxy[2]), int(xyxy[3]))
        cv2.rectangle(image, p1, p2, color, line_width, cv2.LINE_AA)
        if hide_labels:
            continue
        label = str(names[c]) if hide_conf else f"{names[c]} {conf:.2f}"
        font_scale, thickness = line_width / 3, max(line_width - 1, 1)
        (w, h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        above = p1[1] - h - 3 >= 0
        corner = (p1[0] + w, p1[1] - h - 3 if above else p1[1] + h + 3)
        cv2.rectangle(image, p1, corner, color, -1, cv2.LINE_AA)
        text_y = p1[1] - 2 if above else p1[1] + h + 2
        cv2.putText(image, label, (p1[0], text_y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    thickness, cv2.LINE_AA)
    return image


def label_lines(det: torch.Tensor, shape: tuple[int, int], save_conf: bool = False) -> list[str]:
    """YOLO label lines 'cls x y w h [conf]' (normalised to the image) for ``det``."""
    xywhn = xyxy2xywhn(det[:, :4], w=shape[1], h=shape[0])
    lines = []
    for (x, y, w, h), conf, cls in zip(xywhn.tolist(), det[:, 4].tolist(), det[:, 5].tolist()):
        fields = [int(cls), x, y, w, h] + ([conf] if save_conf else [])
        lines.append(" ".join(str(fields[0]) if i == 0 else f"{v:.6g}" for i, v in enumerate(fields)))
    return lines


class _VideoSink:
    """Writes annotated frames of one video to an .mp4 next to the annotated images."""

    def __init__(self, path: Path, source: Path, size: tuple[int, int]):
        capture = cv2.VideoCapture(str(source))
        fps = capture.get(cv2.CAP_PROP_FPS) or 30
        capture.release()
        self.writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)

    def write(self, image: np.ndarray) -> None:
        self.writer.write(image)

    def close(self) -> None:
        self.writer.release()


def run(weights: str | Path | None = None, source: str | Path = "", imgsz: int = 640,
        conf_thres: float = 0.25, iou_thres: float = 0.45, max_det: int = 1000, device: str = "",
        save_txt: bool = False, save_conf: bool = False, nosave: bool = False, classes: Sequence[int] | None = None,
        agnostic_nms: bool = False, project: str | Path = ROOT / "runs/detect", name: str = "exp",
        exist_ok: bool = False, line_thickness: int = 3, hide_labels: bool = False, hide_conf: bool = False,
        half: bool = False, vid_stride: int = 1, unsafe_load: bool = False, cfg: str | Path | None = None,
        model: nn.Module | None = None) -> Path:
    """Detect on every file of ``source``; returns the run folder. ``model`` skips loading ``weights``."""
    files = media_files(source)
    dev = select_device(device)
    half = half and dev.type == "cuda"  # CPU convolutions have no fp16 kernels
    if model is None:
        if weights is None:
            raise UserError("detect: give --weights")
        model = attempt_load(weights, device=dev, unsafe=unsafe_load, cfg=cfg)
    model = (model.half() if half else model.float()).eval()
    names = getattr(model, "names", None) or {i: str(i) for i in range(int(model.nc))}
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    if save_txt:
        (save_dir / "labels").mkdir(exist_ok=True)

    summary = {}
    for path in tqdm(files, desc="detect", unit="file"):
        sink, count = None, 0
        for frame in read_frames(path, vid_stride):
            det = detect_image(model, frame.image, imgsz, conf_thres, iou_thres, max_det, classes, agnostic_nms, half)
            count += len(det)
            stem = path.stem if frame.index is None else f"{path.stem}_{frame.index}"
            if save_txt:
                lines = label_lines(det, frame.image.shape[:2], save_conf)
                (save_dir / "labels" / f"{stem}.txt").write_text("".join(f"{line}\n" for line in lines))
            if nosave:
                continue
            annotated = draw_detections(frame.image, det, names, line_thickness, hide_labels, hide_conf)
            if frame.index is None:
                cv2.imwrite(str(save_dir / path.name), annotated)
            else:
                if sink is None:
                    h, w = annotated.shape[:2]
                    sink = _VideoSink(save_dir / f"{path.stem}.mp4", path, (w, h))
                sink.write(annotated)
        if sink is not None:
            sink.close()
        summary[path.name] = count
    (save_dir / "summary.json").write_text(json.dumps({"source": str(source), "detections": summary}, indent=2))
    print(f"{sum(summary.values())} detections in {len(files)} file(s); results saved to {save_dir}")
    return save_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Detect objects in images and videos; save annotated copies.")
    parser.add_argument("--weights", type=str, required=True, help="model checkpoint (.pt)")
    parser.add_argument("--source", type=str, required=True, help="image, video or folder of them")
    parser.add_argument("--cfg", type=str, default=None, help="model YAML, only for plain state-dict weights")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or cpu")
    parser.add_argument("--save-txt", action="store_true", help="save YOLO label files")
    parser.add_argument("--save-conf", action="store_true", help="add the confidence to --save-txt labels")
    parser.add_argument("--nosave", action="store_true", help="do not save annotated images / videos")
    parser.add_argument("--classes", nargs="+", type=int, help="keep only these class indices")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--project", default=str(ROOT / "runs/detect"), help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of numbering a new one")
    parser.add_argument("--line-thickness", type=int, default=3, help="box line width (pixels)")
    parser.add_argument("--hide-labels", action="store_true", help="draw boxes only")
    parser.add_argument("--hide-conf", action="store_true", help="draw class names without confidences")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    parser.add_argument("--vid-stride", type=int, default=1, help="use every n-th video frame")
    parser.add_argument("--unsafe-load", action="store_true",
                        help="unpickle the checkpoint without the class allowlist (trusted files only)")
    return parser


def main(argv: list[str] | None = None) -> Path:
    return run(**vars(build_parser().parse_args(argv)))


if __name__ == "__main__":
    run_cli(main)
