"""val_trt.py on ONNX Runtime (TensorRT paths skip without TensorRT): mAP of exported models equals
the PyTorch evaluator's, End2End outputs score like raw ones, static batches, the benchmark sweep."""
from __future__ import annotations

import json

import pytest
import torch

from models.experimental_trt import decode_end2end
from models.yolo import DetectionModel
from tests.cli_helpers import run_script
from tests.export_helpers import assert_same_detections, lively_head
from utils.data.config import load_data_config
from utils.data.dataset import create_dataloader
from utils.data.synthetic import make_shapes_dataset
from utils.deployment import backends, validate
from utils.deployment.onnx_export import export_onnx, trace_prediction
from utils.deployment.ort_runtime import OrtRunner
from utils.deployment.signature import InputGeometry, Signature
from utils.errors import UserError
from utils.evaluation.evaluator import evaluate
from utils.evaluation.postprocess import no_max_suppression
from utils.paths import ROOT

IMGSZ = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init gelan-tiny (class scores lifted so detections exist), its exports, a 6-image dataset."""
    root = tmp_path_factory.mktemp("valtrt")
    data = make_shapes_dataset(root / "shapes", n_train=0, n_val=6, imgsz=IMGSZ)
    torch.manual_seed(0)
    model = lively_head(DetectionModel(ROOT / "tests" / "assets" / "gelan-tiny.yaml", nc=3)).fuse().eval()
    pred = trace_prediction(model, IMGSZ, dynamic=True)
    files = {kind: export_onnx(model, root / f"m-{kind}.onnx", postprocess=kind, max_det=300, conf_thres=0.001,
                               prediction=pred).path for kind in ("raw", "topk")}
    files["static2"] = export_onnx(model, root / "m-static2.onnx", IMGSZ, batch_size=2).path
    return model, files, data, root


def test_onnx_runtime_takes_pytorchs_thread_count_unless_told(setup):
    """One knob for both runtimes (OMP_NUM_THREADS / torch.set_num_threads): ONNX Runtime's own default
    sizes its pool by the cores whatever PyTorch was given, and its idle threads spin."""
    _, files, _, _ = setup
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert OrtRunner(files["raw"]).session.get_session_options().intra_op_num_threads == threads + 1
    finally:
        torch.set_num_threads(threads)
    assert OrtRunner(files["raw"], threads=3).session.get_session_options().intra_op_num_threads == 3


def test_raw_onnx_evaluates_like_the_pytorch_model(setup):
    """Same loader, same postprocessing: the ORT backend yields the PyTorch model's detections (in
    original-image pixels) and metrics; then the CLI-level run writes its results."""
    model, files, data, root = setup
    cfg = load_data_config(data)
    backend = backends.DetectionBackend(OrtRunner(files["raw"]), 3)
    # NMS-free decoding: with ~250 overlapping random boxes per image, NMS could flip a pair whose
    # IoU sits within float noise of the threshold; the pipeline under test is the same either way.
    got, got_art = validate.evaluate_exported(backend, cfg, IMGSZ, 4, "val", "none", 0.001, 0.7, 300, 0,
                                             torch.device("cpu"), keep_boxes=True)
    loader = create_dataloader(cfg["val"], IMGSZ, 4, 32, rect=False, workers=0, nc=3)[0]
    expected, exp_art = evaluate(model, loader, cfg["names"], device=torch.device("cpu"), postprocess="none",
                                 keep_boxes=True)
    assert got.images == expected.images == 6 and got.instances == expected.instances > 0
    assert sum(len(d) for d in exp_art.detections) > 50
    for g, e in zip(got_art.detections, exp_art.detections):
        assert_same_detections(torch.from_numpy(g), torch.from_numpy(e))
    for field in ("map50", "map50_95", "precision", "recall"):
        assert getattr(got, field) == pytest.approx(getattr(expected, field), abs=1e-6), field
    out = validate.run(onnx=files["raw"], data=data, batch_size=4, imgsz=IMGSZ, backend="onnxruntime", workers=0,
                      project=root / "runs", name="raw")
    saved = json.loads((root / "runs" / "raw" / "results.json").read_text())
    assert saved["backend"] == "onnxruntime" and saved["map50_95"] == pytest.approx(out["eval"].map50_95)


def test_end2end_onnx_scores_like_the_raw_export(setup):
    _, files, data, root = setup
    raw = validate.run(onnx=files["raw"], data=data, batch_size=4, imgsz=IMGSZ, backend="onnxruntime",
                      postprocess="none", workers=0, project=root / "runs", name="raw-none")["eval"]
    e2e = validate.run(onnx=files["topk"], data=data, batch_size=4, imgsz=IMGSZ, backend="onnxruntime",
                      workers=0, project=root / "runs", name="e2e")["eval"]
    assert e2e.images == raw.images == 6
    for field in ("map50", "map50_95", "precision", "recall"):
        assert getattr(e2e, field) == pytest.approx(getattr(raw, field), abs=1e-6), field


def test_end2end_as_prediction_round_trips_through_nms_free_decoding(setup):
    _, files, _, _ = setup
    runner = OrtRunner(files["topk"])
    x = torch.rand(3, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(3))
    outputs = runner(x)
    dets = decode_end2end(*(outputs[k] for k in backends.END2END_KEYS))
    again = no_max_suppression(backends.end2end_as_prediction(outputs, 3), conf_thres=0.0, max_det=1000)
    for d, a in zip(dets, again):
        torch.testing.assert_close(a, d, atol=1e-4, rtol=1e-5)


def test_static_batch_export_is_fed_in_padded_chunks(setup):
    _, files, _, _ = setup
    x = torch.rand(5, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(4))
    static = backends.DetectionBackend(OrtRunner(files["static2"]), 3)
    assert static.geometry.fixed_batch == 2 and static.geometry.hw == (IMGSZ, IMGSZ)
    dynamic = backends.DetectionBackend(OrtRunner(files["raw"]), 3)
    torch.testing.assert_close(static(x), dynamic(x), atol=1e-4, rtol=1e-5)


def test_benchmark_sweep_writes_table_json_plot(setup):
    _, files, _, root = setup
    out = validate.run(onnx=files["raw"], benchmark_sweep=True, batch_sizes=(1, 2), warmup=1, iters=3, imgsz=IMGSZ,
                      backend="onnxruntime", project=root / "runs", name="bench")
    assert [r.batch for r in out["benchmark"]] == [1, 2]
    assert all(r.latency_p99_ms >= r.latency_median_ms > 0 for r in out["benchmark"])
    bench_dir = root / "runs" / "bench"
    rows = json.loads((bench_dir / "benchmark.json").read_text())["rows"]
    assert rows[1]["images_per_s"] == pytest.approx(2 * rows[1]["qps"])
    assert (bench_dir / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 |" in (bench_dir / "benchmark.md").read_text()
    skipped = validate.run(onnx=files["static2"], benchmark_sweep=True, batch_sizes=(1, 2), warmup=0, iters=1,
                          imgsz=IMGSZ, backend="onnxruntime", project=root / "runs", name="bench-static")
    assert [r.batch for r in skipped["benchmark"]] == [2]


def test_bad_requests_are_user_errors(setup, monkeypatch):
    _, files, data, root = setup
    monkeypatch.setattr(backends, "have_tensorrt", lambda: False)
    with pytest.raises(UserError, match="tensorrt Python package is not installed"):
        validate.run(onnx=files["raw"], data=data, backend="tensorrt", project=root / "runs")
    with pytest.raises(UserError, match="exactly one"):
        validate.run(data=data, project=root / "runs")
    with pytest.raises(UserError, match="runs only on TensorRT"):
        backends.resolve_backend("onnxruntime", root / "m.engine")
    assert backends.resolve_backend("auto", None) == "onnxruntime"
    nms = export_onnx(setup[0], root / "m-nms.onnx", IMGSZ, postprocess="nms").path
    with pytest.raises(UserError, match="EfficientNMS_TRT"):
        OrtRunner(nms)


@pytest.mark.skipif(backends.have_tensorrt(), reason="checks the message shown where TensorRT is missing")
def test_cli_exit_code_2_when_tensorrt_is_missing(setup, capsys, monkeypatch):
    _, files, data, root = setup
    code, err = run_script("val_trt.py", ["--onnx", str(files["raw"]), "--data", str(data), "--backend", "tensorrt",
                                          "--project", str(root / "runs")], capsys, monkeypatch)
    assert code == 2 and "error: --backend tensorrt" in err


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(setup):
    from utils.deployment.trt_runtime import TrtRunner, build_engine

    _, files, _, root = setup
    engine = build_engine(files["raw"], root / "m.engine", batch=(1, 2, 4), timing_cache=root / "m.timing.cache")
    assert (root / "m.timing.cache").stat().st_size > 0
    runner = TrtRunner(engine)
    assert runner.geometry == InputGeometry((IMGSZ, IMGSZ), 1, 4) and runner.input_names == ["images"]
    x = torch.rand(3, 3, IMGSZ, IMGSZ)
    got = runner(x.cuda())["output0"].cpu()
    ref = OrtRunner(files["raw"])(x)["output0"]
    torch.testing.assert_close(got, ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)  # FP16 kernels allowed


@pytest.mark.tensorrt
def test_val_trt_on_tensorrt_scores_like_onnxruntime(setup):
    _, files, data, root = setup
    trt = validate.run(onnx=files["topk"], data=data, batch_size=4, imgsz=IMGSZ, backend="tensorrt", workers=0,
                      project=root / "runs", name="trt")["eval"]
    ort_result = validate.run(onnx=files["topk"], data=data, batch_size=4, imgsz=IMGSZ, backend="onnxruntime",
                             workers=0, project=root / "runs", name="ort")["eval"]
    assert trt.map50_95 == pytest.approx(ort_result.map50_95, abs=0.01)


def test_engine_batches_are_split_at_the_profile_maximum():
    class EngineLike:  # what DetectionBackend reads from a TrtRunner
        geometry, calls = InputGeometry(None, 1, 2), []
        signature = Signature({"images": (None, 3, None, None)}, {"output0": (None, 7, None)})

        def __call__(self, images):
            self.calls.append(images.shape[0])
            return {"output0": images.mean((2, 3))[..., None].expand(-1, -1, 5)}

    runner = EngineLike()
    x = torch.rand(5, 7, 4, 4)
    out = backends.DetectionBackend(runner, nc=3)(x)
    assert runner.calls == [2, 2, 1] and out.shape == (5, 7, 5)
    torch.testing.assert_close(out[:, :, 0], x.mean((2, 3)))
