"""A run interrupted after epoch 1 and resumed is the uninterrupted run, bit for bit, on the CPU.

qat.py quantize in one process, and train.py and qat.py quantize under torchrun (2 processes, gloo):
every number the run logged (results.csv, report.json) and the final weights are compared exactly
(train.py in one process: tests/test_trainer.py). The interrupt (tests/interrupt_driver.py) is a
KeyboardInterrupt at the start of epoch 2 in every process, where a Ctrl-C between epochs lands;
one test sends a real SIGINT. The interrupted runs load with persistent workers and the resumed ones
with another worker count: the draws must depend on neither.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qat
from tests.interrupt_driver import _interrupting
from tests.qat_helpers import one_thread, save_float_checkpoint, tiny_model
from utils.checkpoint import load_checkpoint
from utils.data.synthetic import make_shapes_dataset
from utils.paths import ROOT
from utils.quantization import pipeline

IMGSZ = 64
TINY = str(ROOT / "tests" / "assets" / "gelan-tiny.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TIMING_KEYS = ("train_seconds", "eval_seconds", "seconds_per_iter")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("resume")
    data = make_shapes_dataset(tmp / "shapes", n_train=8, n_val=4, imgsz=IMGSZ, seed=1)
    return {"tmp": tmp, "data": data, "weights": save_float_checkpoint(tiny_model(), tmp / "fp.pt")}


def _quantize_args(inputs: dict, project: Path, name: str, workers: int, extra: tuple = ()) -> list[str]:
    return ["quantize", "--weights", str(inputs["weights"]), "--data", str(inputs["data"]), "--imgsz", str(IMGSZ),
            "--batch-size", "4", "--device", "cpu", "--workers", str(workers), "--calib-batches", "1",
            "--epochs", "2", "--iters", "2", "--no-eval-origin", "--project", str(project), "--name", name, *extra]


def _train_args(inputs: dict, project: Path, name: str, workers: int) -> list[str]:
    return ["--cfg", TINY, "--data", str(inputs["data"]), "--epochs", "2", "--batch-size", "4", "--imgsz", str(IMGSZ),
            "--device", "cpu", "--workers", str(workers), "--project", str(project), "--name", name, "--noplots"]


def _logged(report: dict) -> dict:
    """Every number a QAT report logged, without the clocks."""
    rows = [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in report["epochs"]]
    return {"epochs": rows, **{k: report[k] for k in ("origin", "ptq", "calibration", "qat_best", "skip_layers")}}


def _assert_same_quantized(a: Path, b: Path) -> None:
    for name in ("qat_best.pt", "ptq.pt", "qat_last.pt"):
        x, y = load_checkpoint(a / "weights" / name), load_checkpoint(b / "weights" / name)
        sx, sy = x["quant"]["state_dict"], y["quant"]["state_dict"]
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx), name
        assert x["epoch"] == y["epoch"] and x["best_fitness"] == y["best_fitness"], name
    lx, ly = x, y  # qat_last.pt: the training state too
    ox, oy = lx["optimizer"]["state"], ly["optimizer"]["state"]
    assert all(torch.equal(ox[i]["momentum_buffer"], oy[i]["momentum_buffer"]) for i in ox)
    assert (lx.get("student") is None) == (ly.get("student") is None) and lx["updates"] == ly["updates"]
    if lx.get("student") is not None:  # with --ema-decay: the trained weights beside their average
        assert all(torch.equal(v, ly["student"][k]) for k, v in lx["student"].items())


def _csv_rows(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_same_trained(a: Path, b: Path) -> None:
    assert _csv_rows(a) == _csv_rows(b)  # losses, metrics and learning rates, epoch by epoch
    for name in ("last.pt", "best.pt"):
        x = load_checkpoint(a / "weights" / name)["model"].state_dict()
        y = load_checkpoint(b / "weights" / name)["model"].state_dict()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_qat_resume_reproduces_the_uninterrupted_run(inputs, monkeypatch, caplog):
    """With --ema-decay, so the trained weights and their average both come back; the plain run's
    resume is the torchrun test's."""
    ema = ("--ema-decay", "0.9")
    project = inputs["tmp"] / "qat-ema"
    full = qat.main(_quantize_args(inputs, project, "full", workers=0, extra=ema))
    monkeypatch.setattr(pipeline, "train_one_epoch", _interrupting(pipeline.train_one_epoch, 1))
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        qat.main(_quantize_args(inputs, project, "cut", workers=2, extra=ema))
    monkeypatch.undo()
    last = project / "cut" / "weights" / "qat_last.pt"
    assert load_checkpoint(last)["epoch"] == 0  # the interrupt kept epoch 1

    with caplog.at_level("INFO", logger="yolov9"):
        resumed = qat.main(["quantize", "--resume", str(last), "--workers", "0"])
    assert resumed == project / "cut"
    assert "except --workers 2 -> 0" in caplog.text  # the one option typed again, and said so
    a, b = (json.loads((run / "report.json").read_text()) for run in (full, resumed))
    assert _logged(a) == _logged(b)
    _assert_same_quantized(full, resumed)

    # one numbering everywhere (the log's "QAT epoch 2/2"), and each process's time on its own
    assert [e["epoch"] for e in b["epochs"]] == [1, 2] and b["qat_best"]["epoch"] in (0, 1, 2)
    assert [s["first_epoch"] for s in b["sessions"]] == [1, 2]
    md = (resumed / "report.md").read_text()
    assert "ran in 2 processes" in md and "process 2: loading" in md and "QAT epochs 2-2" in md
    assert "ran in" not in (full / "report.md").read_text()
    # the shipped model is the average, which moved off the trained weights; best.pt ships it alone
    last = load_checkpoint(resumed / "weights" / "qat_last.pt")
    average, trained = last["quant"]["state_dict"], last["student"]
    assert last["updates"] > 0 and any(not torch.equal(average[k], trained[k]) for k in trained)
    assert load_checkpoint(resumed / "weights" / "qat_best.pt").get("student") is None


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)


def _launch_plan(runs: list[tuple[str, list[str], int | None]]) -> subprocess.CompletedProcess:
    plan = [{"script": script, "argv": argv, "stop_at": stop_at} for script, argv, stop_at in runs]
    return _torchrun("tests/interrupt_driver.py", json.dumps(plan))


@pytest.mark.slow
def test_torchrun_resume_reproduces_the_uninterrupted_run(inputs):
    """Two gloo processes, in one launch: for train.py then qat.py, the uninterrupted run, one
    interrupted at epoch 2 on both ranks, and its resume. A launch is mostly torch's and Model
    Optimizer's import in each process (tests/interrupt_driver.py), so the resumes share it; a
    resume in a fresh process is tests/test_trainer.py's."""
    projects = {tool: inputs["tmp"] / f"ddp_{tool}" for tool in ("train.py", "qat.py")}
    args = {"train.py": _train_args, "qat.py": _quantize_args}
    resume = {"train.py": ["--resume", str(projects["train.py"] / "cut" / "weights" / "last.pt")],
              "qat.py": ["quantize", "--resume", str(projects["qat.py"] / "cut" / "weights" / "qat_last.pt")]}
    launch = _launch_plan([run for tool in projects for run in (
        (tool, args[tool](inputs, projects[tool], "full", workers=0), None),
        (tool, args[tool](inputs, projects[tool], "cut", workers=1), 1),
        (tool, resume[tool], None))])
    log = launch.stdout + launch.stderr
    assert launch.returncode == 0, log[-3000:]
    for tool in projects:  # on each rank: the uninterrupted run and the resume finished, the cut one stopped
        assert log.count(f"driver: {tool} exited 0") == 4 and log.count(f"driver: {tool} exited 130") == 2, log[-3000:]
    assert "interrupted:" in launch.stderr and "--resume" in launch.stderr, log[-3000:]
    for project in projects.values():
        assert sorted(p.name for p in project.iterdir()) == ["cut", "full"]  # only rank 0 made run folders

    qat_runs = projects["qat.py"]
    assert log.count("quantizer ranges identical on all 2 ranks") == 3  # each run checked, the resume too
    a, b = (json.loads((qat_runs / run / "report.json").read_text()) for run in ("full", "cut"))
    assert _logged(a) == _logged(b) and [e["epoch"] for e in b["epochs"]] == [1, 2]
    assert [e["train_images"] for e in a["epochs"]] == [8, 8]  # both ranks: 2 iterations of 2 images each
    _assert_same_quantized(qat_runs / "full", qat_runs / "cut")

    train_runs = projects["train.py"]
    assert [r["epoch"] for r in _csv_rows(train_runs / "cut")] == ["1", "2"]
    _assert_same_trained(train_runs / "full", train_runs / "cut")
    for run in ("full", "cut"):  # --noplots, kept by the resume
        assert (train_runs / run / "best_val.json").is_file() and not list((train_runs / run).glob("*.png"))
    summary = json.loads((train_runs / "cut" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and [(s["first_epoch"], s["last_epoch"]) for s in summary["sessions"]] \
        == [(1, 1), (2, 2)]  # each session with its own time


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, as an interactive shell gives it. Started
    in the background by a shell without job control, pytest inherits SIGINT ignored and would pass that
    on; Python then installs no KeyboardInterrupt handler and the run would ignore the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_and_says_how_to_resume(inputs, tmp_path):
    """A real SIGINT once epoch 1's checkpoint exists: exit code 130, one line naming the resume command."""
    last = tmp_path / "sigint" / "weights" / "last.pt"
    cmd = [sys.executable, "train.py", *_train_args(inputs, tmp_path, "sigint", workers=0), "--epochs", "100"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 240
    while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # waiting for a file, not timing anything
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err  # all of it: a lost Ctrl-C shows near the start
    lines = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and f"python train.py --resume {last}" in lines[0], err
    assert "Traceback" not in err and "error:" not in err
