"""Images and videos a user points a tool at: list them, read them frame by frame, write annotated videos."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from utils.data.label_check import IMG_FORMATS
from utils.errors import UserError

VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv", "webm")

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


class VideoSink:
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
