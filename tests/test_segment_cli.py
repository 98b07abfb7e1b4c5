"""Segmentation through the command lines a user types: detect.py --save-txt writes polygon labels
that read back as the predicted masks, and a model whose task does not fit the data (or a split
that mixes polygon and box label files) stops with one line before any run folder is made.

The CLIs run in this process (runpy: what ``python script.py`` executes, without a torch start
per case), on random-weight tiny models whose heads are scaled to give boxes and masks.
"""
from __future__ import annotations

import json
import logging
import runpy
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_fill_holes

from models.yolo import Model
from tests.export_helpers import lively_head, lively_masks
from tests.qat_helpers import SHAPES, one_thread
from utils.checkpoint import save_checkpoint
from utils.data.dataset import YoloDataset
from utils.data.polygons import rasterize
from utils.data.synthetic import make_shapes_dataset
from utils.deployment.onnx_export import export_onnx
from utils.paths import ROOT

ASSETS = ROOT / "tests" / "assets"
IMGSZ = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Polygon and box datasets of the 3 shape classes, a segmentation and a detection checkpoint for
    them, and each one's raw ONNX export."""
    tmp = tmp_path_factory.mktemp("seg_cli")
    out = {"seg_data": make_shapes_dataset(tmp / "polygons", n_train=2, n_val=2, imgsz=IMGSZ, seed=7, masks=True),
           "box_data": make_shapes_dataset(tmp / "boxes", n_train=2, n_val=2, imgsz=IMGSZ, seed=7)}
    with one_thread():
        for kind, cfg in (("seg", "gelan-tiny-seg.yaml"), ("det", "gelan-tiny.yaml")):
            torch.manual_seed(0)
            model = lively_head(Model(ASSETS / cfg, nc=len(SHAPES)))
            if kind == "seg":
                lively_masks(model, torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0)))
            model.names = list(SHAPES)
            out[kind] = save_checkpoint({"epoch": -1, "model": model.half(), "ema": None}, tmp / f"{kind}.pt")
            out[f"{kind}_onnx"] = export_onnx(model.float().eval(), tmp / f"{kind}.onnx", IMGSZ).path
    return out


def run_cli(script: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run ``script`` as ``__main__`` with ``argv``; its exit code and stderr."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *map(str, argv)])
    capsys.readouterr()
    code = 0
    try:
        with one_thread():
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


# --- detect.py --save-txt -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source(files, tmp_path_factory) -> Path:
    """The polygon dataset's validation images plus a non-square one and a blank one."""
    folder = tmp_path_factory.mktemp("source")
    for image in (files["seg_data"].parent / "images" / "val").iterdir():
        shutil.copy(image, folder / image.name)
    first = cv2.imread(str(next(folder.iterdir())))
    cv2.imwrite(str(folder / "wide.png"), cv2.resize(first, (96, 48)))
    cv2.imwrite(str(folder / "blank.png"), np.full((IMGSZ, IMGSZ, 3), 114, np.uint8))
    return folder


def _read_back(source: Path, labels: Path, root: Path) -> YoloDataset:
    """``labels`` beside the images they describe, read by our loader as a segmentation dataset."""
    shutil.copytree(source, root / "images")
    shutil.copytree(labels, root / "labels")
    return YoloDataset(root / "images", IMGSZ, nc=len(SHAPES), task="segment")


@pytest.mark.parametrize("weights", ["seg", "seg_onnx"])
def test_save_txt_polygons_read_back_as_the_predicted_masks(files, source, weights, tmp_path, capsys, monkeypatch):
    from models.loading import attempt_load
    from utils.deployment.predict import load_exported, predict_image

    code, err = run_cli("detect.py", ["--weights", files[weights], "--source", source, "--imgsz", IMGSZ,
                                      "--device", "cpu", "--save-txt", "--nosave", "--project", tmp_path,
                                      "--name", "run"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    written = {f.stem: len(f.read_text().splitlines()) for f in (tmp_path / "run" / "labels").glob("*.txt")}
    dataset = _read_back(source, tmp_path / "run" / "labels", tmp_path / "data")
    assert dataset.label_kind == "polygons" and dataset.scan.repaired == dataset.scan.dropped == 0

    if weights == "seg":
        model, hw = attempt_load(files["seg"], device=torch.device("cpu")).float().eval(), IMGSZ
    else:
        model, hw, _ = load_exported(files["seg_onnx"])
    instances = 0
    for im_file, labels, polygons in zip(dataset.im_files, dataset.labels, dataset.segments):
        image = cv2.imread(im_file)
        h, w = image.shape[:2]
        assert len(polygons) == written[Path(im_file).stem]  # every written row read back as one instance
        det, masks = predict_image(model, image, hw)
        # a YOLO polygon has no holes: the written outline covers each mask with its holes filled
        predicted = [(cls, binary_fill_holes(m.full(h, w))) for cls, m in zip(det[:, 5].tolist(), masks) if m.area]
        read = list(zip(labels[:, 0].tolist(), rasterize([p * (w, h) for p in polygons], h, w).astype(bool)))
        iou = np.array([[(a & b).sum() / (a | b).sum() if ca == cb else 0.0 for cb, b in read]
                        for ca, a in predicted]).reshape(len(predicted), len(read))
        # the same instances both ways: each predicted mask was written (repeats of one outline once)
        # and each row read back is a predicted mask
        assert (iou.max(1, initial=0) > 0.99).all() and (iou.max(0, initial=0) > 0.99).all(), Path(im_file).name
        instances += len(read)
    assert instances > 0


def test_no_detection_writes_an_empty_label_file_read_as_background(files, source, tmp_path, capsys, monkeypatch):
    code, err = run_cli("detect.py", ["--weights", files["seg"], "--source", source, "--imgsz", IMGSZ, "--device",
                                      "cpu", "--save-txt", "--nosave", "--conf-thres", "1.0", "--project", tmp_path,
                                      "--name", "run"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    labels = sorted((tmp_path / "run" / "labels").glob("*.txt"))
    assert len(labels) == len(list(source.iterdir())) and all(f.read_text() == "" for f in labels)
    dataset = _read_back(source, tmp_path / "run" / "labels", tmp_path / "data")
    assert dataset.scan.empty == len(labels) and not any(len(lb) for lb in dataset.labels)


def test_save_conf_appends_the_confidence_to_each_polygon_row(files, source, tmp_path, capsys, monkeypatch):
    code, err = run_cli("detect.py", ["--weights", files["seg"], "--source", source / "wide.png", "--imgsz", IMGSZ,
                                      "--device", "cpu", "--save-txt", "--save-conf", "--nosave", "--project",
                                      tmp_path, "--name", "run"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    rows = [line.split() for line in (tmp_path / "run" / "labels" / "wide.txt").read_text().splitlines()]
    assert rows and all(len(r) % 2 == 0 and len(r) >= 8 for r in rows)  # cls, >= 3 points, conf
    assert all(0 < float(r[-1]) <= 1 for r in rows)


# --- a model that does not fit the data -----------------------------------------------------------

MISMATCHES = [
    ("train.py", "det", "seg_data", ["--epochs", "1", "--batch-size", "2"], "is a detection model but"),
    ("train.py", "seg", "box_data", ["--epochs", "1", "--batch-size", "2"], "is a segmentation model but"),
    ("qat.py", "det", "seg_data", ["--epochs", "1"], "is a detection model but"),
    ("qat.py", "seg", "box_data", ["--epochs", "1"], "is a segmentation model but"),
    ("val_trt.py", "det_onnx", "seg_data", [], "is a detection model but"),
    ("val_trt.py", "seg_onnx", "box_data", [], "is a segmentation model but"),
]


def _argv(script: str, weights: Path, data: Path, project: Path, extra: list[str]) -> list:
    if script == "val_trt.py":
        return ["--onnx", weights, "--data", data, "--backend", "onnxruntime", "--workers", "0", "--project", project,
                *extra]
    common = ["--weights", weights, "--data", data, "--imgsz", IMGSZ, "--device", "cpu", "--workers", "0",
              "--project", project, *extra]
    return ["quantize", *common] if script == "qat.py" else common


@pytest.mark.parametrize("script, weights, data, extra, words", MISMATCHES,
                         ids=[f"{s}-{w}-on-{d}" for s, w, d, _, _ in MISMATCHES])
def test_a_model_of_the_other_task_stops_with_one_line_and_writes_nothing(files, script, weights, data, extra, words,
                                                                          tmp_path, capsys, monkeypatch):
    project = tmp_path / "runs"  # does not exist yet: a failed start must not make it
    code, err = run_cli(script, _argv(script, files[weights], files[data], project, extra), capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert errors[0].startswith(f"error: {files[weights]} {words}")
    assert str(files[data].parent / "images") in errors[0]  # names the data too
    assert "Traceback" not in err and not project.exists()


@pytest.mark.parametrize("onnx, reference", [("seg_onnx", "det"), ("det_onnx", "seg")])
def test_agreement_refuses_a_reference_of_the_other_task(files, onnx, reference, tmp_path, capsys, monkeypatch):
    project = tmp_path / "runs"
    code, err = run_cli("val_trt.py", ["--onnx", files[onnx], "--reference", files[reference], "--source",
                                       files["seg_data"].parent / "images" / "val", "--backend", "onnxruntime",
                                       "--project", project], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert f"{files[onnx]} is a" in errors[0] and f"the reference {files[reference]} is a" in errors[0]
    assert not project.exists()


def test_qat_eval_agreement_refuses_a_reference_of_the_other_task(files, tmp_path, capsys, monkeypatch):
    from models.loading import attempt_load
    from models.quantize import calibrate, prepare
    from utils.quantization.checkpoint import make_checkpoint
    from utils.quantization.report import new_report

    quantized = prepare(attempt_load(files["det"], device=torch.device("cpu")).float().eval())
    calibrate(quantized, [torch.rand(1, 3, IMGSZ, IMGSZ)])
    ptq = save_checkpoint(make_checkpoint(quantized, report=new_report("det.pt", str(files["box_data"]), "val")),
                          tmp_path / "ptq.pt")
    project = tmp_path / "runs"
    code, err = run_cli("qat.py", ["eval", "--weights", ptq, "--reference", files["seg"], "--source",
                                   files["seg_data"].parent / "images" / "val", "--imgsz", IMGSZ, "--device", "cpu",
                                   "--project", project], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert f"{ptq} is a detection model but the reference {files['seg']} is a segmentation model" in errors[0]
    assert not project.exists()


def test_agreement_of_a_segmentation_export_scores_its_boxes(files, tmp_path, capsys, monkeypatch):
    """The float export against the checkpoint it came from: the same boxes (agreement 1)."""
    code, err = run_cli("val_trt.py", ["--onnx", files["seg_onnx"], "--reference", files["seg"], "--source",
                                       files["seg_data"].parent / "images" / "val", "--backend", "onnxruntime",
                                       "--project", tmp_path, "--name", "a"], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    result = json.loads((tmp_path / "a" / "agreement.json").read_text())
    assert result["reference_boxes"] > 0 and result["map50_95"] > 0.99
    assert {c["class"] for c in result["per_class"]} <= set(range(len(SHAPES)))


@pytest.fixture(scope="module")
def mixed_data(files, tmp_path_factory) -> Path:
    """The polygon dataset with one validation label file rewritten as boxes."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(files["seg_data"].parent, root, dirs_exist_ok=True)
    for cache in root.rglob("*.cache"):
        cache.unlink()
    labels = sorted((root / "labels" / "val").glob("*.txt"))
    labels[-1].write_text("0 0.5 0.5 0.25 0.25\n")
    data = root / "mixed.yaml"
    data.write_text(files["seg_data"].read_text().replace(str(files["seg_data"].parent), str(root)))
    return data


@pytest.mark.parametrize("script, weights", [("val.py", "seg"), ("val_trt.py", "seg_onnx")])
def test_polygon_and_box_files_in_one_split_are_refused_for_segmentation_naming_files_and_counts(
        files, mixed_data, script, weights, tmp_path, capsys, monkeypatch):
    project = tmp_path / "runs"
    code, err = run_cli(script, _argv(script, files[weights], mixed_data, project, []), capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    labels = mixed_data.parent / "labels" / "val"
    assert (f"1 label file holds polygons (e.g. {labels / 'val_00000.txt'}) and 1 holds boxes "
            f"(e.g. {labels / 'val_00001.txt'})") in errors[0]
    assert not project.exists()


def test_polygon_and_box_files_in_one_split_are_reported_for_detection(files, mixed_data, tmp_path, capsys,
                                                                       monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="yolov9.data"):
        code, err = run_cli("val.py", _argv("val.py", files["det"], mixed_data, tmp_path / "runs", []), capsys,
                            monkeypatch)
    assert code == 0, err[-2000:]
    assert "1 label file holds polygons" in caplog.text and "each polygon's bounding box" in caplog.text


def test_a_run_that_fails_after_making_its_project_folder_removes_it_too(tmp_path):
    from utils.paths import empty_run_dirs_removed, increment_path

    with pytest.raises(RuntimeError), empty_run_dirs_removed():
        increment_path(tmp_path / "new_project" / "runs" / "exp")
        raise RuntimeError("failed in the first batch")
    assert not (tmp_path / "new_project").exists()
