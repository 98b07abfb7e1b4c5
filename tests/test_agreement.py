"""Label-free agreement on COCO128 images: a model against itself agrees fully, a perturbed one less;
val_trt.py (ONNX Runtime) and qat.py eval score an INT8 model against its FP32 checkpoint."""
from __future__ import annotations

import json
from copy import deepcopy

import cv2
import pytest
import torch

import qat
import val_trt
from models.loading import attempt_load
from models.quantize import calibrate, prepare
from models.yolo import DetectionModel
from tests.export_helpers import lively_head
from tests.qat_helpers import one_thread, save_float_checkpoint
from utils.checkpoint import save_checkpoint
from utils.deployment.onnx_export import export_onnx
from utils.errors import UserError
from utils.evaluation.agreement import agreement, frames_of, match_to_reference
from utils.paths import ROOT
from utils.quantization.checkpoint import make_checkpoint

IMGSZ = 64
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def images(coco128_dir, tmp_path_factory):
    """A folder of 8 COCO128 images (links: the dataset is not copied)."""
    folder = tmp_path_factory.mktemp("unlabelled")
    for f in sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:8]:
        (folder / f.name).symlink_to(f)
    return folder


@pytest.fixture(scope="module")
def fp(tmp_path_factory):
    """A random-init gelan-tiny whose scores spread around 0.5 (plenty of boxes above conf 0.25), as
    the FP32 checkpoint a user would bring and as the model read back from it."""
    torch.manual_seed(0)
    weights = save_float_checkpoint(lively_head(DetectionModel(ROOT / "tests/assets/gelan-tiny.yaml", nc=3)),
                                    tmp_path_factory.mktemp("fp") / "fp.pt")
    return weights, attempt_load(weights, fuse=True).float().eval()


def _agree(candidate, reference, images, **kwargs):
    return agreement(candidate, reference, frames_of([images]), IMGSZ, ["a", "b", "c"], candidate_device=CPU,
                     batch_size=3, **kwargs)


def _perturbed(model, scale: float, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    noisy = deepcopy(model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return noisy


def test_a_model_against_itself_agrees_fully(fp, images):
    model = fp[1]
    result = _agree(model, model, images, resamples=100)
    assert result.images == 8 and result.reference_boxes > 50
    assert (result.map50_95, result.map50, result.matched, result.score_error) == (1.0, 1.0, 1.0, 0.0)
    assert result.matched_iou == pytest.approx(1.0)
    assert result.intervals["map50_95"] == {"value": 1.0, "ci95_low": 1.0, "ci95_high": 1.0}
    assert sum(c["reference_boxes"] for c in result.per_class) == result.reference_boxes
    assert all(c["map50_95"] == 1.0 for c in result.per_class)


def test_a_perturbed_model_agrees_less_the_more_it_is_perturbed(fp, images):
    model = fp[1]
    slight, strong = (_agree(_perturbed(model, s), model, images, resamples=200) for s in (0.02, 0.2))
    assert 1.0 > slight.map50_95 > strong.map50_95 > 0
    assert 1.0 > slight.matched_iou and slight.score_error > 0
    interval = slight.intervals["map50_95"]
    assert interval["ci95_low"] < interval["ci95_high"]  # the images differ, so the interval has width


def test_video_frames_are_scored_like_images(fp, images, tmp_path):
    frames = [cv2.resize(cv2.imread(str(f)), (96, 64)) for f in sorted(images.iterdir())[:3]]
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    for frame in frames:
        writer.write(frame)
    writer.release()
    assert [key for key, _ in frames_of([video])] == [f"{video}:0", f"{video}:1", f"{video}:2"]
    result = agreement(fp[1], fp[1], frames_of([video]), IMGSZ, ["a", "b", "c"], candidate_device=CPU,
                       resamples=50)
    assert result.images == 3 and result.map50_95 == 1.0


def test_matching_pairs_each_reference_box_once_within_its_class():
    reference = torch.tensor([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 1], [20, 20, 30, 30, 0.7, 0]])
    candidate = torch.tensor([[1, 0, 10, 10, 0.5, 0], [0, 0, 10, 10, 0.6, 1], [40, 40, 50, 50, 0.9, 0]])
    ref, cand, iou = match_to_reference(candidate, reference)
    assert ref.tolist() == [0, 1] and cand.tolist() == [0, 1]  # the far box (class 0) and reference 2 stay alone
    assert iou.tolist() == pytest.approx([0.9, 1.0])


def test_a_reference_that_detects_nothing_is_a_user_error(fp, images):
    blind = deepcopy(fp[1])
    head = blind.model[-1]
    for b in range(head.branches):
        for tower in head.branch(b)[1]:
            tower[-1].bias.data.fill_(-30.0)  # every class score ~0
    with pytest.raises(UserError, match="detects nothing"):
        _agree(fp[1], blind, images)


def test_val_trt_scores_an_onnx_export_against_its_fp32_checkpoint(fp, images, tmp_path):
    weights, model = fp
    onnx = export_onnx(model, tmp_path / "fp.onnx", IMGSZ, dynamic=True).path
    out = val_trt.main(["--onnx", str(onnx), "--reference", str(weights), "--source", str(images), "--imgsz",
                        str(IMGSZ), "--backend", "onnxruntime", "--device", "cpu", "--batch-size", "4",
                        "--project", str(tmp_path / "runs"), "--name", "a"])
    result = out["agreement"]
    assert result.images == 8 and result.map50_95 > 0.98  # the same network: only float noise differs
    saved = json.loads((tmp_path / "runs" / "a" / "agreement.json").read_text())
    assert saved["map50_95"] == result.map50_95 and saved["sources"] == [str(images)]
    assert "Agreement mAP50-95" in (tmp_path / "runs" / "a" / "agreement.md").read_text()
    with pytest.raises(UserError, match="go together"):
        val_trt.main(["--onnx", str(onnx), "--source", str(images), "--project", str(tmp_path / "runs")])


def test_qat_eval_scores_a_quantized_checkpoint_against_the_fp32_one(fp, images, tmp_path):
    weights, model = fp
    ptq = prepare(deepcopy(model))
    calibrate(ptq, [torch.rand(2, 3, IMGSZ, IMGSZ)])
    ptq_file = save_checkpoint(make_checkpoint(ptq), tmp_path / "ptq.pt")
    result = qat.main(["eval", "--weights", str(ptq_file), "--reference", str(weights), "--source", str(images),
                       "--imgsz", str(IMGSZ), "--device", "cpu", "--batch-size", "4",
                       "--project", str(tmp_path / "runs"), "--name", "a"])
    assert 0 < result.map50_95 < 1 and result.images == 8
    assert (tmp_path / "runs" / "a" / "agreement.json").is_file()
    with pytest.raises(UserError, match="--data"):
        qat.main(["eval", "--weights", str(ptq_file), "--project", str(tmp_path / "runs")])
