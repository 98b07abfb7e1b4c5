"""Exported models in the tools users run: val_trt.py and detect.py take the input size and batch
range from the file (a non-square 64x96 export here), detect.py on an ONNX or engine draws the
PyTorch QAT model's detections on real COCO128 images, and a file that is not a detector export
stops with one line before anything is written."""
from __future__ import annotations

import shutil
import sys
from types import SimpleNamespace

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import TensorProto, helper

import detect
from models.experimental_trt import End2End
from models.quantize import calibrate, float_conv_names, prepare
from models.yolo import DetectionModel
from tests.cli_helpers import run_script
from tests.data_builders import build_dataset, coco128_pairs
from tests.export_helpers import assert_matching_detections, hand_built_model, lively_head
from utils.boxes import xywhn2xyxy
from utils.data.augment import letterbox
from utils.data.config import load_data_config
from utils.data.dataset import create_dataloader
from utils.deployment import backends, predict, validate
from utils.deployment.onnx_export import export_onnx, tail_for, trace_prediction
from utils.deployment.ort_runtime import OrtRunner
from utils.deployment.signature import END2END_KEYS, InputGeometry, Signature
from utils.errors import UserError
from utils.evaluation.evaluator import evaluate
from utils.paths import ROOT

HW = (64, 96)  # (h, w): non-square on purpose
NAMES = ["person", "bicycle", "car"]
CONF, IOU, TOPK = 0.25, 0.45, 300  # the End2End tails' settings; TopK is clipped to the 126 anchors of 64x96
# ONNX Runtime's integer kernels and PyTorch's fake quantization round to the same INT8 grid and differ
# only where a value sits on a rounding tie (measured on these images: 0.003 input px, 7e-5 score).
# One input pixel is ~7 original pixels of a 640-px COCO image, so 1 px still catches any letterbox slip.
BOX_ATOL_PX, SCORE_ATOL = 1.0, 1e-3


def _letterboxed(files, hw) -> torch.Tensor:
    ims = [letterbox(cv2.imread(str(f)), hw, auto=False)[0] for f in files]
    return torch.from_numpy(np.ascontiguousarray(np.stack(ims)[..., ::-1].transpose(0, 3, 1, 2))).float() / 255


@pytest.fixture(scope="module")
def exported(tmp_path_factory, coco128_dir):
    """A calibrated QAT-prepared gelan-tiny (3 COCO classes; head scores spread out so detections exist),
    its 64x96 raw / NMS-free / EfficientNMS exports, a dataset and a folder of full-size COCO128 images."""
    root = tmp_path_factory.mktemp("exported")
    build_dataset(root / "coco", coco128_dir, n=8, split="val")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root / "coco"), "train": "images/val", "val": "images/val",
                                    "nc": 3, "names": NAMES}))
    source = root / "source"
    source.mkdir()
    for image, _ in coco128_pairs(coco128_dir, 4, split="val2017"):
        shutil.copy(image, source)
    torch.manual_seed(0)
    model = lively_head(DetectionModel(ROOT / "tests" / "assets" / "gelan-tiny.yaml", nc=3))
    model.names = NAMES
    prepare(model)
    calibrate(model, [_letterboxed(sorted(source.iterdir()), HW)])
    model.eval()
    pred = trace_prediction(model, HW, dynamic=True)
    files = {kind: export_onnx(model, root / f"qat-{kind}.onnx", postprocess=kind, max_det=TOPK, iou_thres=IOU,
                               conf_thres=CONF, float_convs=float_conv_names(model), prediction=pred).path
             for kind in ("raw", "topk", "nms")}
    return SimpleNamespace(model=model, files=files, data=data, source=source, root=root,
                           anchors=pred.example.shape[-1])


class TorchRunner:
    """A PyTorch module behind the runner interface: the reference for an End2End file is the
    PyTorch QAT model with the same tail, decoded by the very path the file's outputs take."""

    def __init__(self, module: torch.nn.Module, output_names):
        self.module, self.output_names = module.eval(), list(output_names)
        self.geometry = InputGeometry(HW)
        self.signature = Signature({"images": (None, 3, *HW)}, {n: () for n in self.output_names})

    def __call__(self, images):
        with torch.no_grad():
            return dict(zip(self.output_names, self.module(images)))


def reference(exported, kind: str):
    """What detect_image runs for the PyTorch QAT model, decoded as the ``kind`` export's outputs are."""
    if kind == "raw":
        return exported.model
    tail = tail_for(kind, exported.anchors, TOPK, IOU, CONF)
    return backends.DetectionBackend(TorchRunner(End2End(exported.model, tail), END2END_KEYS), nc=3)


def test_fixed_hw_loader_letterboxes_exactly_and_labels_map_back(exported):
    """Every batch is (h, w) = the export's input; each image is fitted inside it and its labels come
    back to the original pixels through the evaluator's mapping."""
    from utils.evaluation.evaluator import _labels_in_original_pixels

    cfg = load_data_config(exported.data)
    loader, dataset = create_dataloader(cfg["val"], max(HW), 4, 32, workers=0, nc=3, fixed_hw=HW)
    checked = 0
    for imgs, targets, paths, shapes in loader:
        assert imgs.shape[1:] == (3, *HW)
        for i, (path, shape) in enumerate(zip(paths, shapes)):
            (h0, w0), ((gain_h, gain_w), (pad_w, pad_h)) = shape
            assert min(HW[0] / h0, HW[1] / w0) == pytest.approx(gain_h, rel=0.02)
            assert pad_w == 0 or pad_h == 0  # fitted: one side touches the border
            expected = dataset.labels[dataset.im_files.index(path)]
            expected = expected[expected[:, 0] < 3]
            got = _labels_in_original_pixels(targets, i, HW, shape)
            np.testing.assert_allclose(got[:, 1:].numpy(), xywhn2xyxy(expected[:, 1:], w0, h0), atol=1.0)
            checked += len(got)
    assert checked > 0
    with pytest.raises(ValueError, match="validation"):
        create_dataloader(cfg["val"], 96, 4, 32, augment=True, workers=0, fixed_hw=HW)


def test_val_trt_takes_the_non_square_size_from_the_file(exported, capsys):
    """ONNX Runtime on the 64x96 file and the PyTorch QAT model on the same input: the same
    detections and metrics; val_trt.py reads that size from the file and ignores a different --imgsz."""
    runner = OrtRunner(exported.files["raw"])
    assert runner.geometry == InputGeometry(HW, 1, None) and runner.signature.names == NAMES
    cfg = load_data_config(exported.data)
    # NMS-free decoding: with ~100 overlapping random boxes per image NMS could flip a pair whose IoU
    # sits within rounding noise of the threshold; the input pipeline under test is the same either way.
    got, got_art = validate.evaluate_exported(backends.DetectionBackend(runner, 3), cfg, runner.geometry.hw, 4, "val",
                                              "none", 0.001, 0.7, 300, 0, torch.device("cpu"), keep_boxes=True)
    loader = create_dataloader(cfg["val"], max(HW), 4, 32, workers=0, nc=3, fixed_hw=HW)[0]
    expected, exp_art = evaluate(exported.model, loader, NAMES, device=torch.device("cpu"), postprocess="none",
                                 keep_boxes=True)
    assert got.images == expected.images == 8 and got.instances == expected.instances > 0
    assert sum(len(d) for d in exp_art.detections) > 500
    for g, e in zip(got_art.detections, exp_art.detections):
        assert_matching_detections(torch.from_numpy(g), torch.from_numpy(e), BOX_ATOL_PX, SCORE_ATOL, 0.001)
    for field in ("map50", "map50_95", "precision", "recall"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field), abs=1e-3), field

    out = validate.run(onnx=exported.files["raw"], data=exported.data, imgsz=64, batch_size=4, postprocess="none",
                       backend="onnxruntime", workers=0, project=exported.root / "runs", name="val")
    assert "takes 64x96 (height x width) images; --imgsz 64 ignored" in capsys.readouterr().out
    assert out["eval"].map50_95 == pytest.approx(got.map50_95, abs=1e-9)
    bench = validate.run(onnx=exported.files["topk"], benchmark_sweep=True, batch_sizes=(1, 3), warmup=0, iters=1,
                         backend="onnxruntime", project=exported.root / "runs", name="bench")
    assert [r.batch for r in bench["benchmark"]] == [1, 3]
    assert "qat-topk.onnx on onnxruntime (cpu), 64x96" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["raw", "topk"])
def test_detect_on_the_onnx_draws_the_pytorch_qat_detections(exported, kind, tmp_path):
    """Raw (NMS as in PyTorch) and NMS-free End2End files on ONNX Runtime, full-size COCO128 images."""
    model, hw, names = predict.load_exported(exported.files[kind])
    assert hw == HW and names == dict(enumerate(NAMES)) and model.end2end == (kind == "topk")
    ref = reference(exported, kind)
    images = sorted(exported.source.iterdir())
    drawn = {}
    for path in images:
        image = cv2.imread(str(path))
        got = predict.detect_image(model, image, hw, CONF, IOU)
        expected = predict.detect_image(ref, image, HW, CONF, IOU)
        assert_matching_detections(got, expected, BOX_ATOL_PX, SCORE_ATOL, CONF)
        drawn[path.name] = len(got)
    assert sum(drawn.values()) >= 2 * len(images)

    out = detect.main(["--weights", str(exported.files[kind]), "--source", str(exported.source), "--imgsz", "640",
                       "--device", "cpu", "--save-txt", "--project", str(tmp_path), "--name", "d"])
    for path in images:
        assert cv2.imread(str(out / path.name)).shape == cv2.imread(str(path)).shape
        assert len((out / "labels" / f"{path.stem}.txt").read_text().splitlines()) == drawn[path.name]


def _foreign_onnx(path, inputs, outputs) -> None:
    """A one-node ONNX (Identity / Flatten) with the given (name, shape) inputs and outputs."""
    (in_name, in_shape), (out_name, out_shape) = inputs, outputs
    op = "Identity" if len(in_shape) == len(out_shape) else "Flatten"
    graph = helper.make_graph([helper.make_node(op, [in_name], [out_name])], "foreign",
                              [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)])
    onnx.save(hand_built_model(graph, 17), str(path))


@pytest.mark.parametrize("inputs,outputs,found", [
    (("x", [1, 10]), ("y", [1, 10]), "found inputs x(1, 10); outputs y(1, 10)"),
    (("images", [1, 3, 8, 8]), ("logits", [1, 192]), "found inputs images(1, 3, 8, 8); outputs logits(1, 192)"),
], ids=["no-images-input", "classifier-output"])
def test_an_onnx_that_is_not_a_detector_export_is_one_line(exported, tmp_path, inputs, outputs, found):
    bad = tmp_path / "foreign.onnx"
    _foreign_onnx(bad, inputs, outputs)
    runs = tmp_path / "runs"
    for call in (lambda: detect.main(["--weights", str(bad), "--source", str(exported.source), "--project", str(runs)]),
                 lambda: validate.run(onnx=bad, data=exported.data, backend="onnxruntime", project=runs)):
        with pytest.raises(UserError) as caught:
            call()
        message = str(caught.value)
        assert message.startswith(f"{bad}: not a detector export: expected one input 'images'") and found in message
        assert "\n" not in message
    assert not runs.exists()


def test_val_trt_cli_exits_2_on_a_foreign_onnx(exported, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "foreign.onnx"
    _foreign_onnx(bad, ("input", [1, 3, 64, 64]), ("output", [1, 3, 64, 64]))
    code, err = run_script("val_trt.py", ["--onnx", str(bad), "--data", str(exported.data), "--backend", "onnxruntime",
                                          "--project", str(tmp_path / "runs")], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "expected one input 'images'" in errors[0], err
    assert not (tmp_path / "runs").exists()


def test_exported_file_requests_that_cannot_run_are_user_errors(exported, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(UserError, match="EfficientNMS_TRT"):  # ONNX Runtime cannot run the TensorRT plugin
        detect.main(["--weights", str(exported.files["nms"]), "--source", str(exported.source),
                     "--backend", "onnxruntime", "--project", str(runs)])
    (tmp_path / "w.pt").write_bytes(b"")  # present: a missing file is refused first, before torch loads
    with pytest.raises(UserError, match="--backend onnxruntime: only for .onnx / .engine weights"):
        detect.main(["--weights", str(tmp_path / "w.pt"), "--source", str(exported.source),
                     "--backend", "onnxruntime", "--project", str(runs)])
    data80 = tmp_path / "coco80.yaml"
    data80.write_text(yaml.safe_dump({**yaml.safe_load(exported.data.read_text()), "nc": 80,
                                      "names": [str(i) for i in range(80)]}))
    with pytest.raises(UserError, match="the model predicts 3 classes but .*coco80.yaml has nc=80"):
        validate.run(onnx=exported.files["topk"], data=data80, backend="onnxruntime", project=runs)
    assert not runs.exists()


def test_input_size_comes_from_the_file_unless_it_is_dynamic(capsys):
    assert InputGeometry.of_shape((None, 3, 64, 96)) == InputGeometry((64, 96), 1, None)
    assert InputGeometry.of_shape((2, 3, None, None)) == InputGeometry(None, 2, 2)
    assert InputGeometry(None).input_hw(None, "m.onnx") == (640, 640)
    assert InputGeometry(None).input_hw(320, "m.onnx") == (320, 320)
    assert InputGeometry((64, 96)).input_hw(None, "m.onnx") == (64, 96) and capsys.readouterr().out == ""
    assert InputGeometry((64, 96)).input_hw(640, "m.onnx") == (64, 96)
    assert "m.onnx: the model takes 64x96 (height x width) images; --imgsz 640 ignored" in capsys.readouterr().out
    assert InputGeometry((64, 96), 1, 8).accepts(8) and not InputGeometry((64, 96), 1, 8).accepts(9)
    assert InputGeometry((64, 96), 2, 2).fixed_batch == 2 and not InputGeometry((64, 96), 2, 2).accepts(1)


def test_a_short_chunk_is_padded_up_to_the_smallest_batch():
    class EngineLike:  # an engine whose profile takes batches of 2 to 4
        geometry, calls = InputGeometry(HW, 2, 4), []
        signature = Signature({"images": (None, 3, *HW)}, {"output0": (None, 7, 5)})

        def __call__(self, images):
            self.calls.append(images.shape[0])
            return {"output0": images.mean((2, 3))[..., None].expand(-1, -1, 5)}

    runner = EngineLike()
    x = torch.rand(5, 7, *HW)
    out = backends.DetectionBackend(runner)(x)
    assert runner.calls == [4, 2] and out.shape == (5, 7, 5)
    torch.testing.assert_close(out[:, :, 0], x.mean((2, 3)))


def test_tensorrt_stubs_folder_is_not_tensorrt(tmp_path, monkeypatch):
    """The tensorrt-stubs wheel leaves a ``tensorrt`` folder of .pyi files: an empty namespace package."""
    import importlib

    stubs, real = tmp_path / "stubs", tmp_path / "real"
    (stubs / "tensorrt").mkdir(parents=True)
    (stubs / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    (real / "tensorrt").mkdir(parents=True)
    (real / "tensorrt" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.syspath_prepend(str(stubs))
    importlib.invalidate_caches()
    assert not backends.have_tensorrt()
    monkeypatch.syspath_prepend(str(real))
    importlib.invalidate_caches()
    assert backends.have_tensorrt()


@pytest.mark.tensorrt
@pytest.mark.parametrize("kind", ["raw", "topk", "nms"])
def test_detect_on_a_tensorrt_engine_draws_the_pytorch_qat_detections(exported, kind, tmp_path):
    """An engine built from each export: its input geometry from the engine, no class names (engines
    carry no metadata), and the PyTorch QAT model's detections within FP16-kernel tolerance."""
    from utils.deployment.trt_runtime import build_engine

    engine = build_engine(exported.files[kind], tmp_path / f"qat-{kind}.engine", batch=(1, 2, 4))
    model, hw, names = predict.load_exported(engine, device="0")
    assert hw == HW and model.geometry == InputGeometry(HW, 1, 4) and model.end2end == (kind != "raw")
    ref = reference(exported, kind)
    for path in sorted(exported.source.iterdir()):
        image = cv2.imread(str(path))
        expected = predict.detect_image(ref, image, HW, CONF, IOU)
        got = predict.detect_image(model, image, hw, CONF, IOU)
        assert_matching_detections(got, expected, box_atol=8.0, score_atol=0.02, conf_thres=CONF)
    out = detect.main(["--weights", str(engine), "--source", str(exported.source), "--device", "0", "--project",
                       str(tmp_path / "runs")])
    assert len(list(out.glob("*.jpg"))) == len(list(exported.source.iterdir()))


@pytest.mark.tensorrt
def test_val_trt_on_a_non_square_engine_scores_like_onnxruntime(exported, tmp_path):
    from utils.deployment.trt_runtime import build_engine

    engine = build_engine(exported.files["topk"], tmp_path / "qat-topk.engine", batch=(1, 2, 4))
    trt = validate.run(engine=engine, data=exported.data, batch_size=3, backend="tensorrt", device="0", workers=0,
                       project=tmp_path / "runs", name="trt")["eval"]
    ort_result = validate.run(onnx=exported.files["topk"], data=exported.data, batch_size=3, backend="onnxruntime",
                              workers=0, project=tmp_path / "runs", name="ort")["eval"]
    assert trt.images == ort_result.images == 8
    assert trt.map50_95 == pytest.approx(ort_result.map50_95, abs=0.01)
