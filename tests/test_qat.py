"""QAT fine-tuning, distillation, and the qat.py commands end to end on a tiny model (CPU).

Under torchrun (2 processes, gloo), interrupted and resumed: tests/test_resume.py."""
from __future__ import annotations

import json
import math
from copy import deepcopy

import pytest
import torch
import yaml
from modelopt.torch.quantization.nn import TensorQuantizer

import qat
from models.loading import attempt_load
from models.quantize import calibrate, prepare, set_trainable
from tests.export_helpers import lively_head
from tests.qat_helpers import one_thread, save_float_checkpoint, tiny_model
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.data.config import load_data_config, load_hyp
from utils.data.synthetic import make_shapes_dataset
from utils.errors import UserError
from utils.loss_tal import build_loss
from utils.paths import ROOT
from utils.quantization import pipeline
from utils.quantization.checkpoint import load_quantized
from utils.quantization.distill import FeatureDistillation, relative_error, supervised_layers
from utils.quantization.pipeline import make_loader
from utils.quantization.sensitivity import quantizable_layers
from utils.training.engine import train_one_epoch
from utils.training.optim import build_optimizer

IMGSZ = 64
HYP = ROOT / "data/hyps/hyp.qat.yaml"


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, imgsz=IMGSZ)


def _student_and_teacher():
    fp = tiny_model().fuse().eval()
    q = prepare(deepcopy(fp))
    calibrate(q, [torch.rand(2, 3, IMGSZ, IMGSZ)])
    return set_trainable(q), fp


def _train(q, fp, shapes, iters: int, lr: float, batch: int = 4, weight: float = 1.0):
    """``iters`` QAT steps through the training engine; returns its stats and each step's
    distillation term (``weight`` x relative error)."""
    hyp = load_hyp(HYP)
    loader = make_loader(load_data_config(shapes), "train", IMGSZ, batch, 32, 0, hyp=hyp, shuffle=True)
    distill = FeatureDistillation(q, fp, supervised_layers(len(q.model), 1), weight)
    terms = []

    def extra(imgs, preds, targets):
        term = distill(imgs, preds, targets)
        terms.append(float(term.detach()))
        return term

    optimizer = build_optimizer(q, "SGD", lr, 0.9, 5e-4)
    stats = train_one_epoch(q, loader, build_loss(q, hyp), optimizer, device=torch.device("cpu"), max_iters=iters,
                            extra_loss_fn=extra, progress=False)
    distill.remove()
    return stats, terms


def test_one_qat_iteration_trains_weights_not_ranges(shapes):
    q, fp = _student_and_teacher()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    stats, terms = _train(q, fp, shapes, iters=1, lr=0.01)
    assert stats.iters == 1 and all(math.isfinite(v) for v in stats.loss) and math.isfinite(terms[0])
    after = q.state_dict()
    weights = [k for k in before if k.endswith("conv.weight") and ".dfl." not in k]
    assert sum(not torch.equal(before[k], after[k]) for k in weights) > len(weights) // 2
    ranges = [k for k in before if k.endswith("_amax")]
    assert ranges and all(torch.equal(before[k], after[k]) for k in ranges)  # ranges stay as calibrated


def test_distillation_stays_bounded(shapes):
    """The anchor's summed MSE follows feature magnitudes (users saw ~1e6 on t/s models); the
    relative error here starts where PTQ leaves it and stays there, even when fine-tuning at 100x
    the QAT learning rate."""
    q, fp = _student_and_teacher()
    _, errors = _train(q, fp, shapes, iters=4, lr=1e-4 * 100, batch=2)
    assert len(errors) == 4 and all(math.isfinite(e) for e in errors)
    assert 0 < max(errors) < 1e-2 and max(errors) < 10 * errors[0], errors


def test_qat_warmup_ramps_the_rate_only_when_the_hyp_asks():
    """hyp.qat.yaml has none; a recipe with warmup_epochs ramps every group from 0 to the rate."""
    q, _ = _student_and_teacher()
    hyp = load_hyp(HYP)
    optimizer = build_optimizer(q, "SGD", 1e-4, 0.9, 5e-4)
    assert hyp["warmup_epochs"] == 0 and pipeline._warmup(hyp, optimizer, 1e-4, 10) is None
    warmup = pipeline._warmup({**hyp, "warmup_epochs": 1.5}, optimizer, 1e-4, 10)
    assert warmup.iters == 15
    warmup.apply(optimizer, 0, 1.0)
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)  # warmup_bias_lr 0: biases start at 0 too
    warmup.apply(optimizer, 15, 0.5)
    assert all(g["lr"] == pytest.approx(0.5e-4) for g in optimizer.param_groups)


def test_relative_error_is_scale_free():
    t = torch.randn(2, 8, 4, 4)
    s = t + 0.01 * torch.randn_like(t)
    assert float(relative_error(s * 1e3, t * 1e3)) == pytest.approx(float(relative_error(s, t)), rel=1e-4)


def test_supervised_layers():
    assert supervised_layers(23, 1) == list(range(22))
    assert supervised_layers(23, 4) == [0, 4, 8, 12, 16, 20, 21]
    with pytest.raises(ValueError):
        supervised_layers(23, 0)


def _quantize(shapes, tmp_path, *extra, model=None):
    weights = save_float_checkpoint(model or tiny_model(), tmp_path / "fp.pt")
    args = ["quantize", "--weights", str(weights), "--data", str(shapes), "--imgsz", str(IMGSZ), "--batch-size", "4",
            "--device", "cpu", "--workers", "0", "--calib-batches", "2", "--iters", "1",
            "--project", str(tmp_path / "runs"), "--name", "q", *extra]
    return qat.main(args), weights


def test_quantize_then_eval_and_resume(shapes, tmp_path):
    run, _ = _quantize(shapes, tmp_path, "--epochs", "2", "--skip-layers", "22")
    w = run / "weights"
    assert all((w / f).is_file() for f in ("ptq.pt", "qat_last.pt", "qat_best.pt"))
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    # an untrained model scores 0 every epoch: none beats the start, which stays the best (epoch 0)
    assert "| Origin |" in md and "| PTQ (max) |" in md and "| QAT (best: the PTQ model, no epoch beat it) |" in md
    assert report["qat_best"]["epoch"] == 0
    assert report["skip_layers"] == [22] and [e["epoch"] for e in report["epochs"]] == [1, 2]
    assert report["reported_on"] == "val"  # the shapes yaml's test split is its val folder: nothing apart
    assert report["seconds_to_qat_best"] > 0 and report["seconds"]["ptq"] > 0 and "## Time" in md
    assert all(e["train_seconds"] > 0 and e["eval_seconds"] > 0 for e in report["epochs"])
    assert [e["train_images"] for e in report["epochs"]] == [4, 4]  # --iters 1 of batch 4
    assert "| distill error | images | s/iter |" in (run / "report.md").read_text()

    # the saved best evaluates exactly as it did during the run
    result = qat.main(["eval", "--weights", str(w / "qat_best.pt"), "--data", str(shapes), "--imgsz", str(IMGSZ),
                       "--batch-size", "4", "--device", "cpu", "--workers", "0",
                       "--project", str(tmp_path / "eval"), "--name", "e"])
    assert result.map50_95 == report["qat_best"]["map50_95"] and result.map50 == report["qat_best"]["map50"]

    # an interrupted run (stopped after epoch 0) resumes at epoch 1 with its history
    last = load_checkpoint(w / "qat_last.pt")
    last["epoch"], last["qat"]["epochs"] = 0, last["qat"]["epochs"][:1]
    save_checkpoint(last, w / "qat_last.pt")
    assert qat.main(["quantize", "--resume", str(w / "qat_last.pt"), "--device", "cpu", "--workers", "0"]) == run
    resumed = json.loads((run / "report.json").read_text())
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]


def _with_test_split(shapes, tmp_path):
    """The shapes yaml with a test split of its own (the 8 training images; val has 4)."""
    d = yaml.safe_load(shapes.read_text())
    d["test"] = "images/train"
    path = tmp_path / "shapes_test.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _labelled_by(weights, tmp_path, make=None):
    """A fresh shapes dataset (``make()``'s, under tmp_path/own; test split apart) whose labels are
    ``weights``' own confident boxes, so that an untrained model scores a real mAP there and
    quantization moves it."""
    from utils.deployment.predict import run as detect

    shapes = make() if make else make_shapes_dataset(tmp_path / "own", n_train=8, n_val=4, imgsz=IMGSZ)
    data = _with_test_split(shapes, tmp_path)
    model = attempt_load(weights, fuse=True).float()
    for split in ("train", "val"):
        out = detect(source=tmp_path / "own" / "images" / split, imgsz=IMGSZ, conf_thres=0.6, save_txt=True,
                     nosave=True, model=model, project=tmp_path / "detect", name=split)
        for f in (out / "labels").glob("*.txt"):
            f.replace(tmp_path / "own" / "labels" / split / f.name)
    return data


def test_one_class_non_square_val_with_a_warmup(tmp_path):
    """The edges a custom detector brings: one class, val images that are not square (rectangular
    batches), and a recipe with a warm-up; the best of the start and the epochs is still the one kept."""
    import cv2

    weights = save_float_checkpoint(lively_head(tiny_model(nc=1)), tmp_path / "one.pt")
    shapes = make_shapes_dataset(tmp_path / "own", n_train=8, n_val=4, imgsz=IMGSZ)
    for f in (tmp_path / "own" / "images" / "val").iterdir():  # 64x64 -> 64 wide, 40 high
        cv2.imwrite(str(f), cv2.resize(cv2.imread(str(f)), (IMGSZ, 40)))
    data = yaml.safe_load(shapes.read_text())
    shapes.write_text(yaml.safe_dump({**data, "names": data["names"][:1], "nc": 1}))
    data = _labelled_by(weights, tmp_path, make=lambda: shapes)
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(yaml.safe_dump({**load_hyp(HYP), "warmup_epochs": 1.0}))
    run, _ = _quantize(data, tmp_path, "--epochs", "2", "--control", "--hyp", str(hyp), model=attempt_load(weights))
    report = json.loads((run / "report.json").read_text())
    assert report["origin"]["map50_95"] > 0 and report["reported"]["images"] == 8
    for phase, start, history in (("qat_best", "ptq", "epochs"), ("control_best", "origin", "control_epochs")):
        best = max([{**report[start], "epoch": 0}, *report[history]], key=lambda e: e["map50_95"])
        assert report[phase]["epoch"] == best["epoch"]
    result = _eval(run / "weights" / "qat_best.pt", data, tmp_path, "val")
    assert result.map50_95 == report["qat_best"]["map50_95"]


def _eval(weights, data, tmp_path, task):
    return qat.main(["eval", "--weights", str(weights), "--data", str(data), "--imgsz", str(IMGSZ), "--batch-size",
                     "4", "--device", "cpu", "--workers", "0", "--task", task, "--project", str(tmp_path / "eval")])


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """A lively tiny detector's checkpoint and a shapes dataset its own confident boxes label."""
    tmp = tmp_path_factory.mktemp("lively")
    weights = save_float_checkpoint(lively_head(tiny_model()), tmp / "lively.pt")
    return weights, _labelled_by(weights, tmp)


def test_choices_on_val_rows_on_test_with_intervals_and_a_control(lively, tmp_path):
    weights, data = lively
    run, weights = _quantize(data, tmp_path, "--epochs", "2", "--control", model=attempt_load(weights))
    w = run / "weights"
    report = json.loads((run / "report.json").read_text())
    assert (report["selected_on"], report["reported_on"], report["reported"]["images"]) == ("val", "test", 8)

    # the best epochs are chosen on val, the model each fine-tune started from being its epoch 0 ...
    for phase, start, history in (("qat_best", "ptq", "epochs"), ("control_best", "origin", "control_epochs")):
        assert [e["epoch"] for e in report[history]] == [1, 2]
        candidates = [{**report[start], "epoch": 0}, *report[history]]
        best = max(candidates, key=lambda e: e["map50_95"])  # the first of equals, as the run keeps it
        assert report[phase]["epoch"] == best["epoch"] and report[phase]["map50_95"] == best["map50_95"]
    # ... and every row is the chosen model evaluated on test
    reported = report["reported"]
    assert _eval(w / "qat_best.pt", data, tmp_path, "test").map50_95 == reported["qat_best"]["map50_95"]
    assert _eval(w / "ptq.pt", data, tmp_path, "test").map50 == reported["ptq"]["map50"]
    assert reported["origin"]["map50_95"] > 0 and reported["qat_best"]["epoch"] == report["qat_best"]["epoch"]

    # the control: the FP32 model fine-tuned by the same recipe, no quantizers, no teacher
    control = load_checkpoint(w / "control_last.pt")["model"]
    assert not any(isinstance(m, TensorQuantizer) for m in control.modules())
    fp = attempt_load(weights, fuse=True).float()
    assert any(not torch.equal(a, b) for a, b in zip(control.state_dict().values(), fp.state_dict().values()))
    assert all(e["distill_error"] == 0 for e in report["control_epochs"])
    assert all(e["distill_error"] > 0 for e in report["epochs"])

    # a 95% paired interval around each delta, the delta being the rows' difference
    pairs = {"ptq_minus_origin": ("ptq", "origin"), "qat_minus_origin": ("qat_best", "origin"),
             "control_minus_origin": ("control_best", "origin"), "qat_minus_control": ("qat_best", "control_best")}
    assert set(report["intervals"]) == set(pairs) and report["bootstrap"]["resamples"] == 1000
    for name, (a, b) in pairs.items():
        for metric, iv in report["intervals"][name].items():
            assert iv["value"] == pytest.approx(reported[a][metric] - reported[b][metric], abs=1e-12)
            assert iv["ci95_low"] <= iv["value"] <= iv["ci95_high"]
    assert report["intervals"]["ptq_minus_origin"]["map50_95"]["ci95_low"] < \
        report["intervals"]["ptq_minus_origin"]["map50_95"]["ci95_high"]  # quantization moved mAP: a real spread
    md = (run / "report.md").read_text()
    assert "chosen on the **val** split, reported on the **test** split (8 images)" in md
    assert "QAT - control" in md and "| Control (best" in md


def _wrecking(train_one_epoch):
    """The training engine, each epoch ending with every weight zeroed: a fine-tune that only hurts."""
    def wrapped(model, *args, **kwargs):
        stats = train_one_epoch(model, *args, **kwargs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("weight"):
                    p.zero_()
        return stats
    return wrapped


def test_a_fine_tune_that_only_hurts_hands_back_its_start(lively, tmp_path, monkeypatch):
    """When no epoch beats the model the fine-tune started from, qat_best.pt is the PTQ model and
    control_best.pt the FP32 one, the rows are theirs and the report says so."""
    weights, data = lively
    monkeypatch.setattr(pipeline, "train_one_epoch", _wrecking(pipeline.train_one_epoch))
    run, weights = _quantize(data, tmp_path, "--epochs", "2", "--control", model=attempt_load(weights))
    w = run / "weights"
    report = json.loads((run / "report.json").read_text())
    assert report["ptq"]["map50_95"] > 0 and report["origin"]["map50_95"] > 0
    for phase, start, history in (("qat_best", "ptq", "epochs"), ("control_best", "origin", "control_epochs")):
        assert all(e["map50_95"] < report[start]["map50_95"] for e in report[history])
        assert report[phase] == {**{k: report[start][k] for k in report[phase] if k != "epoch"}, "epoch": 0}
    assert (w / "qat_best.pt").samefile(w / "ptq.pt")  # the PTQ checkpoint under a second name
    best, ptq = load_checkpoint(w / "qat_best.pt")["quant"], load_checkpoint(w / "ptq.pt")["quant"]
    assert best["state_dict"].keys() == ptq["state_dict"].keys()
    assert all(torch.equal(best["state_dict"][k], ptq["state_dict"][k]) for k in ptq["state_dict"])
    control = load_checkpoint(w / "control_best.pt")["model"].state_dict()
    fp = attempt_load(weights, fuse=True).float().state_dict()
    assert all(torch.equal(control[k], fp[k]) for k in fp)
    assert report["reported"]["qat_best"]["map50_95"] == report["reported"]["ptq"]["map50_95"]
    md = (run / "report.md").read_text()
    assert "| QAT (best: the PTQ model, no epoch beat it) |" in md
    assert "| Control (best: the FP32 model, no epoch beat it) |" in md


def test_report_task_none_reports_on_the_selection_split(shapes, tmp_path):
    run, _ = _quantize(_with_test_split(shapes, tmp_path), tmp_path, "--epochs", "0", "--report-task", "none")
    report = json.loads((run / "report.json").read_text())
    assert report["reported_on"] == report["selected_on"] == "val" and report["reported"]["images"] == 4
    assert report["reported"]["ptq"]["map50_95"] == report["ptq"]["map50_95"]  # same split, same model
    assert "chosen and reported on the same **val** split" in (run / "report.md").read_text()


@pytest.fixture(scope="module")
def ptq_only(shapes, tmp_path_factory):
    """A PTQ run without QAT epochs or evaluations: its ptq.pt."""
    run, _ = _quantize(shapes, tmp_path_factory.mktemp("ptq_only"), "--epochs", "0", "--no-eval-origin",
                       "--no-eval-ptq")
    return run / "weights" / "ptq.pt"


def test_val_py_evaluates_a_ptq_checkpoint_like_qat_eval(shapes, ptq_only, tmp_path):
    """val.py (and everything on models.loading.attempt_load) accepts PTQ/QAT checkpoints."""
    import val

    ptq = ptq_only
    ours = qat.main(["eval", "--weights", str(ptq), "--data", str(shapes), "--imgsz", str(IMGSZ), "--batch-size", "4",
                     "--device", "cpu", "--workers", "0", "--project", str(tmp_path / "eval"), "--name", "e"])
    theirs = val.run(shapes, weights=str(ptq), batch_size=8, imgsz=IMGSZ, device="cpu", workers=0,
                     project=tmp_path / "val", name="v", plots=False)
    assert theirs.map50_95 == pytest.approx(ours.map50_95, abs=1e-6)
    assert theirs.map50 == pytest.approx(ours.map50, abs=1e-6)
    # the same network, not merely the same score: attempt_load's model is load_quantized's, bit for bit
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        assert torch.equal(attempt_load(ptq)(x)[0], load_quantized(ptq)[0](x)[0])


def test_auto_calibration_reports_each_method(shapes, tmp_path):
    run, _ = _quantize(shapes, tmp_path, "--epochs", "0", "--calib-method", "auto", "--no-eval-origin")
    report = json.loads((run / "report.json").read_text())
    assert [c["method"] for c in report["calibration"]] == ["max", "percentile", "mse", "entropy"]
    assert sum(c["chosen"] for c in report["calibration"]) == 1
    chosen = next(c["method"] for c in report["calibration"] if c["chosen"])
    assert report["ptq"]["method"] == chosen and report["qat_best"] is None
    assert load_checkpoint(run / "weights" / "ptq.pt")["quant"]["calibration"]["method"] == chosen


def test_sensitivity_and_auto_skip(shapes, tmp_path):
    """``sensitive --layers`` measures the layers asked for (-1: the head); --auto-skip measures them all."""
    weights = save_float_checkpoint(tiny_model(), tmp_path / "fp.pt")
    args = ["sensitive", "--weights", str(weights), "--data", str(shapes), "--imgsz", str(IMGSZ), "--batch-size", "4",
            "--device", "cpu", "--workers", "0", "--calib-batches", "1", "--project", str(tmp_path / "sens")]
    run = qat.main([*args, "--layers", "0,1,2,-1"])
    table = json.loads((run / "sensitivity.json").read_text())
    gains = [r["gain_if_float"] for r in table["layers"]]
    assert gains == sorted(gains, reverse=True) and (run / "sensitivity.png").stat().st_size > 0
    assert sorted(r["layer"] for r in table["layers"]) == [0, 1, 2, 22]
    with pytest.raises(UserError, match=r"--layers 9,10: layer 10 holds no INT8 convolution \(these do: [\d,]*,9,12,"):
        qat.main([*args, "--layers", "9,10"])  # gelan-tiny's layer 10 is an Upsample

    run, _ = _quantize(shapes, tmp_path, "--epochs", "0", "--auto-skip", "2", "--no-eval-origin")
    report = json.loads((run / "report.json").read_text())
    assert len(report["skip_layers"]) == 2
    assert load_checkpoint(run / "weights" / "ptq.pt")["quant"]["skip_layers"] == report["skip_layers"]


def test_sensitive_measures_every_quantized_layer_unless_told():
    q = prepare(tiny_model().fuse().eval())
    assert pipeline._measured_layers("", q) == quantizable_layers(q) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 18,
                                                                            19, 21, 22]
    assert pipeline._measured_layers("22,-2", q) == [21, 22]


def test_quantize_refuses_a_quantized_checkpoint(shapes, ptq_only, tmp_path):
    with pytest.raises(SystemExit):
        from utils.errors import run_cli

        run_cli(lambda: qat.main(["quantize", "--weights", str(ptq_only), "--data", str(shapes),
                                  "--device", "cpu", "--project", str(tmp_path / "runs")]))
