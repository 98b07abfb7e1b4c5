"""detect.py: boxes land on the original pixels; images, videos and labels are written."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

import detect
from models.yolo import DetectionModel
from utils.data import media
from utils.deployment import predict
from utils.errors import UserError


class _OneBox(nn.Module):
    """Stands in for a detector: always predicts one box given in letterboxed-input pixels."""

    def __init__(self, xywh, cls: int, nc: int = 3):
        super().__init__()
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.nc, self.names = nc, {i: f"c{i}" for i in range(nc)}
        self.w = nn.Parameter(torch.zeros(1))
        self.xywh, self.cls = xywh, cls

    def forward(self, x):
        y = torch.zeros(1, 4 + self.nc, 2)
        y[0, :4, 0] = torch.tensor(self.xywh, dtype=torch.float32)
        y[0, 4 + self.cls, 0] = 0.9
        return y, None


def test_boxes_map_back_to_original_pixels():
    image = np.zeros((100, 200, 3), np.uint8)  # letterboxed to 64 x 128 at imgsz=128 (gain 0.64)
    box_in_original = np.array([50, 20, 150, 60], dtype=np.float32)
    g = 128 / 200
    top = (64 - round(100 * g)) // 2  # 64 - 64 = 0 rows of padding here
    x1, y1, x2, y2 = box_in_original * g + np.array([0, top, 0, top])
    model = _OneBox(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), cls=2)
    det = predict.detect_image(model, image, imgsz=128)
    assert det.shape == (1, 6) and det[0, 5] == 2 and abs(det[0, 4] - 0.9) < 1e-6
    assert torch.allclose(det[0, :4], torch.tensor(box_in_original), atol=0.5)
    assert predict.label_lines(det, image.shape[:2], save_conf=True) == ["2 0.5 0.4 0.5 0.4 0.9"]


def test_run_on_folder_with_images_and_video(tmp_path):
    src = tmp_path / "media"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        cv2.imwrite(str(src / name), rng.integers(0, 255, (72, 96, 3), dtype=np.uint8))
    writer = cv2.VideoWriter(str(src / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for _ in range(3):
        writer.write(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    writer.release()
    (src / "notes.txt").write_text("ignored")

    torch.manual_seed(0)
    model = DetectionModel("gelan-t", nc=2).eval()
    head = model.model[-1]
    for cls_tower in head.cv3:  # make every class confident so that there is something to draw
        cls_tower[-1].bias.data[:] = 5.0
    out = predict.run(model=model, source=src, imgsz=64, max_det=5, save_txt=True, project=tmp_path / "runs")
    assert out == tmp_path / "runs" / "exp"
    for name in ("a.jpg", "b.png"):
        assert cv2.imread(str(out / name)).shape == (72, 96, 3)
    video = cv2.VideoCapture(str(out / "clip.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    video.release()
    labels = sorted(p.name for p in (out / "labels").iterdir())
    assert labels == ["a.txt", "b.txt", "clip_0.txt", "clip_1.txt", "clip_2.txt"]
    assert len((out / "labels" / "a.txt").read_text().splitlines()) == 5
    summary = json.loads((out / "summary.json").read_text())["detections"]
    assert summary == {"a.jpg": 5, "b.png": 5, "clip.avi": 15}
    assert predict.run(model=model, source=src / "a.jpg", imgsz=64, nosave=True, project=tmp_path / "runs") \
        == tmp_path / "runs" / "exp2"


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="source not found"):
        media.media_files(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(UserError, match="no images or videos"):
        media.media_files(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg: cannot read"):
        list(media.read_frames(tmp_path / "broken.jpg"))


def test_cli_flags_reach_run(tmp_path):
    from utils.checkpoint import save_checkpoint

    image = tmp_path / "im.jpg"
    cv2.imwrite(str(image), np.full((40, 50, 3), 90, np.uint8))
    weights = save_checkpoint({"model": DetectionModel("gelan-t", nc=2).half(), "ema": None}, tmp_path / "w.pt")
    out = detect.main(["--weights", str(weights), "--source", str(image), "--imgsz", "64", "--device", "cpu",
                       "--project", str(tmp_path / "p"), "--name", "n", "--save-txt", "--hide-conf"])
    assert out == tmp_path / "p" / "n" and (out / "im.jpg").is_file() and (out / "labels" / "im.txt").is_file()


class _OneMask(nn.Module):
    """Stands in for a segmentation model: one box, and a mask that is the box's left half
    (coefficient 1 on a prototype that is +10 left of input column 64, -10 right of it)."""

    def __init__(self, xyxy, nc: int = 2, nm: int = 2):
        super().__init__()
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.nc, self.names = nc, {i: f"c{i}" for i in range(nc)}
        self.w = nn.Parameter(torch.zeros(1))
        self.xyxy, self.nm = xyxy, nm

    def forward(self, x):
        h, w = x.shape[2:]
        x1, y1, x2, y2 = self.xyxy
        y = torch.zeros(1, 4 + self.nc + self.nm, 2)
        y[0, :4, 0] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        y[0, 4, 0], y[0, 4 + self.nc, 0] = 0.9, 1.0
        proto = torch.full((1, self.nm, h // 4, w // 4), -10.0)
        proto[0, 0, :, :16] = 10.0  # input columns < 64
        return y, proto


def test_masks_land_on_original_pixels_and_are_drawn(tmp_path):
    image = np.zeros((64, 128, 3), np.uint8)  # no letterbox scaling at imgsz=128
    model = _OneMask((32, 16, 96, 48)).eval()
    det, masks = predict.predict_image(model, image, imgsz=128, conf_thres=0.5)
    assert len(det) == 1 and len(masks) == 1
    full = masks[0].full(64, 128)
    assert full[16:48, 32:64].all() and not full[:, 64:].any() and not full[:16].any() and not full[48:].any()
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image)
    out = predict.run(model=model, source=tmp_path / "in", imgsz=128, project=tmp_path, name="o", hide_labels=True,
                      line_thickness=1)
    drawn = cv2.imread(str(out / "a.png"))
    assert drawn[30, 48].any() and not drawn[30, 80].any()  # the mask is tinted, the box's right half is not


def test_detect_draws_masks_from_a_segmentation_onnx(tmp_path):
    from models.yolo import Model
    from tests.export_helpers import lively_head, lively_masks
    from utils.deployment.onnx_export import export_onnx
    from utils.paths import ROOT

    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    model = lively_masks(lively_head(Model(ROOT / "tests/assets/gelan-tiny-seg.yaml", nc=2)), x).eval()
    onnx_file = export_onnx(model, tmp_path / "seg.onnx", 64).path
    image = (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)
    backend, size, _ = predict.load_exported(onnx_file)
    det, masks = predict.predict_image(backend, image, size, conf_thres=0.3)
    ref_det, ref_masks = predict.predict_image(model, image, size, conf_thres=0.3)
    assert len(det) > 0 and masks is not None and len(masks) == len(det)
    torch.testing.assert_close(det, ref_det, atol=1e-3, rtol=1e-4)  # a float export: the same detections
    assert all((m.full(48, 80) == r.full(48, 80)).mean() > 0.99 for m, r in zip(masks, ref_masks))
