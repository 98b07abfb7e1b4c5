"""Every command-line tool answers bad input with one ``error: ...`` line and exit code 2.

Most cases run the script's ``__main__`` block in this process (runpy), which is exactly what a
user's ``python script.py`` executes, minus a 3-5 s interpreter + torch start per case; a few
cases run as real subprocesses to prove the exit code reaches the shell.

The contract of issue 16 besides resuming (tests/test_resume.py): every common flag means the same
in every tool and a bad value is refused before any work or run folder; a tool given another tool's
artifact stops with one line before writing anything; nothing is half-made or silently replaced;
messages name what to do (no bare error codes, no torch advice, YAML line numbers, no warnings the
user did not cause).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from copy import deepcopy
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import run_script
from utils.data.synthetic import make_shapes_dataset
from utils.deployment.backends import have_tensorrt
from utils.paths import ROOT

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny files for every kind of bad input, plus a good dataset and a 3-class checkpoint."""
    from models.yolo import DetectionModel
    from utils.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("cli")
    data3 = make_shapes_dataset(tmp / "shapes", n_train=2, n_val=2, imgsz=64, seed=3)
    cfg = yaml.safe_load(data3.read_text())
    data80 = tmp / "coco80.yaml"
    data80.write_text(yaml.safe_dump({**cfg, "nc": 80, "names": [f"c{i}" for i in range(80)]}))
    (tmp / "empty" / "images" / "val").mkdir(parents=True)
    empty = tmp / "empty.yaml"
    empty.write_text(yaml.safe_dump({"path": str(tmp / "empty"), "train": "images/val", "val": "images/val",
                                     "names": ["a", "b", "c"], "nc": 3}))
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("names: [square, disc\nnc: {\n")
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    (tmp / "folder.pt").mkdir()  # stands in for an unreadable file: tests run as root, chmod 000 does not bite
    model = DetectionModel(ROOT / "models/demo/gelan-demo.yaml", nc=3)
    weights3 = save_checkpoint({"epoch": -1, "best_fitness": 0.0, "model": deepcopy(model).half(), "ema": None,
                                "updates": 0, "optimizer": None, "opt": {}, "git": None, "date": ""}, tmp / "nc3.pt")
    (tmp / "text.pt").write_text("hello, not a checkpoint\n")  # garbage that fails as KeyError(101)
    torch.save({"model": Fraction(1, 2)}, tmp / "foreign.pt")  # a class outside the allowlist
    (tmp / "model.onnx").write_bytes(b"\x08\x07")
    return {"tmp": tmp, "data3": data3, "data80": data80, "empty": empty, "bad_yaml": bad_yaml,
            "missing": tmp / "missing.pt", "missing_yaml": tmp / "missing.yaml", "garbage": garbage,
            "folder": tmp / "folder.pt", "w3": weights3, "garbage_onnx": tmp / "garbage.onnx",
            "text": tmp / "text.pt", "foreign": tmp / "foreign.pt", "onnx": tmp / "model.onnx",
            **_unfinished_runs(tmp, model, data3)}


def _unfinished_runs(tmp: Path, model, data: Path) -> dict[str, Path]:
    """The files an interrupted train.py and qat.py run leave (last.pt, qat_last.pt, ptq.pt), made
    directly rather than trained: only their kind matters here."""
    from models.quantize import calibrate, prepare
    from utils.checkpoint import save_checkpoint
    from utils.quantization.checkpoint import make_checkpoint as quantized_checkpoint
    from utils.quantization.report import new_report
    from utils.training.ema import ModelEMA
    from utils.training.trainer import make_checkpoint, make_options

    opt = make_options(cfg=str(ROOT / "models/demo/gelan-demo.yaml"), data=str(data), imgsz=64, epochs=2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    last = save_checkpoint(make_checkpoint(model, ModelEMA(model), sgd, torch.amp.GradScaler("cuda", enabled=False),
                                           0, 0.0, 0, opt), tmp / "train_run" / "weights" / "last.pt")
    q = prepare(deepcopy(model).eval())
    calibrate(q, [torch.rand(1, 3, 64, 64)])
    report = new_report("fp.pt", str(data), "val")
    qat_last = save_checkpoint(quantized_checkpoint(q, epoch=0, optimizer=torch.optim.SGD(q.parameters(), lr=0.01),
                                                    opt={"epochs": 2}, report=report),
                               tmp / "qat_run" / "weights" / "qat_last.pt")
    ptq = save_checkpoint(quantized_checkpoint(q, report=report), tmp / "qat_run" / "weights" / "ptq.pt")
    return {"train_last": last, "qat_last": qat_last, "ptq": ptq}


def _write_garbage_onnx(path: Path) -> None:
    path.write_bytes(b"this is not protobuf" * 5)


# (script, argv with {placeholders} from `inputs`, words the error line must contain)
CASES = [
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {missing_yaml} --epochs 1", "missing.yaml"),
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {bad_yaml} --epochs 1", "bad.yaml"),
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {empty} --epochs 1 --imgsz 64 --workers 0", "images"),
    ("train.py", "--weights {garbage} --data {data3} --epochs 1", "garbage.pt"),
    ("train.py", "--data {data3} --epochs 1", "pass --cfg"),
    ("train.py", "--cfg {data3} --data {data3} --epochs 1", "not a model config"),
    ("val.py", "--weights {missing} --data {data3}", "missing.pt"),
    ("val.py", "--weights {folder} --data {data3}", "folder.pt"),
    ("val.py", "--weights {w3} --data {data80} --imgsz 64", "classes"),
    ("val.py", "--weights {w3} --data {empty} --imgsz 64 --workers 0", "images"),
    ("val.py", "--weights {w3} --data {bad_yaml}", "bad.yaml"),
    ("qat.py", "quantize --weights {w3} --data {data80} --imgsz 64 --workers 0", "classes"),
    ("qat.py", "quantize --weights {garbage} --data {data3}", "garbage.pt"),
    ("qat.py", "quantize --weights {w3} --data {data3} --compile --cuda-graphs", "--compile and --cuda-graphs"),
    ("qat.py", "quantize --weights {w3} --data {data3} --ema-decay 1", "--ema-decay 1.0: must be at least 0"),
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {data3} --compile --cuda-graphs", "--cuda-graphs"),
    ("qat.py", "sensitive --weights {w3} --data {data80} --imgsz 64", "classes"),
    ("qat.py", "eval --weights {missing} --data {data3}", "missing.pt"),
    ("qat.py", "eval --weights {w3} --data {data3}", "nc3.pt"),
    ("export_qat.py", "--weights {missing} --imgsz 64", "missing.pt"),
    ("export_qat.py", "--weights {garbage} --imgsz 64", "garbage.pt"),
    ("val_trt.py", "--onnx {missing} --data {data3}", "missing.pt"),
    ("val_trt.py", "--onnx {garbage_onnx} --data {data3} --imgsz 64 --backend onnxruntime", "garbage.onnx"),
    ("detect.py", "--weights {w3} --source {missing_yaml}", "missing.yaml"),
    ("detect.py", "--weights {folder} --source {tmp}/shapes/images/val", "folder.pt"),
    ("tools/voc2yolo.py", "--voc {missing} --out {tmp}/voc_out", "missing.pt"),
    ("tools/coco2yolo.py", "--split val {missing_yaml} {tmp} --out {tmp}/coco_out", "missing.yaml"),
    ("tools/reparameterize.py", "--weights {garbage}", "garbage.pt"),
    ("tools/qdq_lint.py", "{missing}", "missing.pt"),
    ("tools/qdq_lint.py", "{garbage_onnx}", "garbage.onnx"),
    # another tool's artifact: one line saying which tool takes it
    ("train.py", "--resume {qat_last} --device cpu", "qat.py quantize --resume"),
    ("train.py", "--weights {qat_last} --data {data3} --imgsz 64", "PTQ/QAT checkpoint"),
    ("qat.py", "quantize --resume {train_last} --device cpu", "train.py --resume"),
    ("qat.py", "quantize --resume {ptq} --device cpu", "resume from a qat_last.pt"),
    ("export_qat.py", "--weights {onnx} --imgsz 64", "an ONNX model"),
    ("val.py", "--weights {onnx} --data {data3} --imgsz 64", "an ONNX model"),
    ("val_trt.py", "--onnx {w3} --data {data3} --imgsz 64 --backend onnxruntime", "export it with export_qat.py"),
    ("train.py", "--resume {train_last} --optimizer Adam --device cpu", "--optimizer cannot change"),
    # messages that say what to do
    ("val.py", "--weights {text} --data {data3}", "truncated or another format"),
    ("val.py", "--weights {foreign} --data {data3}", "--unsafe-load only if you trust"),
    ("val.py", "--weights {w3} --data {bad_yaml}", "line 2, column"),
]
if NO_GPU:
    CASES += [(s, a + " --device 0", "cuda") for s, a in (
        ("train.py", "--cfg models/demo/gelan-demo.yaml --data {data3} --epochs 1"),
        ("val.py", "--weights {w3} --data {data3}"),
        ("qat.py", "quantize --weights {w3} --data {data3}"),
        ("export_qat.py", "--weights {w3}"),
        ("detect.py", "--weights {w3} --source {tmp}/shapes/images/val"))]
if not have_tensorrt():
    CASES.append(("val_trt.py", "--onnx {garbage_onnx} --data {data3} --backend tensorrt", "tensorrt"))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("script,args,words", CASES, ids=[f"{s}:{a.split()[0]}-{w}" for s, a, w in CASES])
def test_bad_input_is_one_error_line(script, args, words, inputs, capsys, monkeypatch):
    _write_garbage_onnx(inputs["garbage_onnx"])
    argv = args.format(**inputs).split()
    code, err = run_script(script, argv, capsys, monkeypatch)
    errors = _error_lines(err)
    assert code == 2, f"{script} {args}: exit {code}\n{err[-2000:]}"
    assert len(errors) == 1, f"{script} {args}: expected one error line\n{err[-2000:]}"
    assert words.lower() in errors[0].lower(), errors[0]
    assert "Traceback" not in err


def test_failed_run_keeps_earlier_results_and_runs_increment(inputs, capsys, monkeypatch):
    project = inputs["tmp"] / "runs_val"
    marker = project / "exp" / "results.json"
    marker.parent.mkdir(parents=True)
    marker.write_text('{"kept": true}')
    common = ["--weights", str(inputs["w3"]), "--imgsz", "64", "--workers", "0", "--project", str(project),
              "--name", "exp"]
    code, err = run_script("val.py", common + ["--data", str(inputs["data80"])], capsys, monkeypatch)
    assert code == 2 and len(_error_lines(err)) == 1
    code, err = run_script("val.py", common + ["--data", str(inputs["data3"])], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert marker.read_text() == '{"kept": true}'
    assert (project / "exp2").is_dir() and any((project / "exp2").iterdir())


@pytest.mark.parametrize("command, what", [("qat.py quantize --weights {missing} --data {data3}", "checkpoint"),
                                           ("export_qat.py --weights {missing}", "checkpoint"),
                                           ("val.py --weights {missing} --data {data3}", "checkpoint"),
                                           ("detect.py --weights {missing} --source {tmp}", "model file"),
                                           ("val_trt.py --onnx {missing} --data {data3}", "ONNX file"),
                                           ("val_trt.py --engine {missing} --data {data3}", "TensorRT engine"),
                                           ("train.py --weights {missing} --data {data3}", "checkpoint"),
                                           ("train.py --cfg {missing} --data {data3}", "model config")])
def test_exit_code_reaches_the_shell(inputs, command, what):
    """Real processes: every tool's exit code comes from the same ``run_cli``, which the cases above
    run in this process (val_trt.py without TensorRT among them). A mistyped model path is refused
    before torch is imported (-X importtime lists every import on stderr): each in 0.15-0.4 s on the
    2-core machine, against 4-9 s (train.py, qat.py, val.py, detect.py, val_trt.py) and 15 s
    (export_qat.py, which also imported Model Optimizer) when they imported first."""
    argv = command.format(**inputs).split()
    proc = subprocess.run([sys.executable, "-X", "importtime", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = _error_lines(proc.stderr)
    expected = f"error: {inputs['missing']}: {what} not found"
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "utils.errors" in imported and "torch" not in imported


# Every tool with the smallest arguments that would run, then every common flag it has with a bad value
# (argparse keeps the last of a repeated flag). The same value is refused by every tool with the same words.
TOOLS = {
    "train.py": "train.py --cfg models/demo/gelan-demo.yaml --data {data3} --imgsz 64 --epochs 1 --workers 0 "
                "--device cpu",
    "val.py": "val.py --weights {w3} --data {data3} --imgsz 64 --workers 0 --device cpu",
    "quantize": "qat.py quantize --weights {w3} --data {data3} --imgsz 64 --workers 0 --device cpu",
    "sensitive": "qat.py sensitive --weights {w3} --data {data3} --imgsz 64 --workers 0 --device cpu",
    "eval": "qat.py eval --weights {ptq} --data {data3} --imgsz 64 --workers 0 --device cpu",
    "demo": "qat.py demo --imgsz 64 --device cpu",
    "export_qat.py": "export_qat.py --weights {w3} --imgsz 64",
    "val_trt.py": "val_trt.py --onnx {garbage_onnx} --data {data3} --imgsz 64 --backend onnxruntime",
    "detect.py": "detect.py --weights {w3} --source {tmp}/shapes/images/val --imgsz 64 --device cpu",
}
BAD_VALUES = {
    "train.py": ["--batch-size 0", "--workers -1", "--epochs 0", "--imgsz 100", "--seed -1", "--patience -1",
                 "--close-mosaic -1", "--hold-lr -1", "--hold-lr 1"],
    "val.py": ["--batch-size 0", "--workers -1", "--imgsz 100", "--conf-thres 1.5", "--iou-thres -0.1", "--max-det 0"],
    "quantize": ["--batch-size 0", "--workers -1", "--epochs -1", "--imgsz 100", "--calib-batches 0", "--iters 0",
                 "--percentile 0", "--lr 0", "--distill-weight -1", "--supervision-stride -1", "--auto-skip -1",
                 "--auto-skip 999", "--skip-layers 999", "--skip-layers x", "--conf-thres 2", "--seed -1",
                 "--calib-method auto --no-eval-ptq", "--auto-skip 2 --no-eval-ptq"],
    "sensitive": ["--batch-size 0", "--calib-batches 0", "--imgsz 100", "--percentile 101", "--layers 999"],
    "eval": ["--batch-size 0", "--imgsz 100", "--iou-thres 2"],
    "demo": ["--imgsz 100", "--imgsz 32", "--epochs 0", "--qat-epochs -1", "--images 0", "--batch-size 0",
             "--threads 0", "--workers -1"],
    "export_qat.py": ["--batch-size 0", "--imgsz 100", "--imgsz 64 100", "--topk-all 0", "--conf-thres 2",
                      "--opset 12"],
    "val_trt.py": ["--batch-size 0", "--imgsz 100", "--batch-sizes 0,4", "--iters 0", "--warmup -1", "--max-det 0",
                   "--workers -1"],
    "detect.py": ["--imgsz 100", "--max-det 0", "--vid-stride 0", "--line-thickness 0", "--classes -1",
                  "--conf-thres 2"],
}
BAD_CASES = [(tool, bad) for tool, values in BAD_VALUES.items() for bad in values]


@pytest.mark.parametrize("tool,bad", BAD_CASES, ids=[f"{t}:{b}" for t, b in BAD_CASES])
def test_every_tool_refuses_every_bad_value_before_any_work(tool, bad, inputs, capsys, monkeypatch):
    script, *argv = TOOLS[tool].format(**inputs).split()
    project = inputs["tmp"] / "projects" / f"{tool}{bad}".replace(" ", "").replace("-", "_")
    if "--project" in (ROOT / script).read_text() or script == "qat.py":
        argv += ["--project", str(project)]
    onnx_before = sorted(inputs["tmp"].glob("*.onnx"))
    code, err = run_script(script, argv + bad.split(), capsys, monkeypatch)
    errors = _error_lines(err)
    assert code == 2 and len(errors) == 1, f"{tool} {bad}: exit {code}\n{err[-2000:]}"
    flag = bad.split()[-1] if bad.endswith("--no-eval-ptq") else bad.split()[0]
    assert flag in errors[0] and "Traceback" not in err, errors[0]
    assert not project.exists(), f"{tool} {bad} left {project}"
    assert sorted(inputs["tmp"].glob("*.onnx")) == onnx_before  # export_qat.py wrote nothing


def test_one_size_rule_for_every_tool(inputs, capsys, monkeypatch):
    """--imgsz 100 is refused with the same sentence everywhere (train.py used to round it up,
    export_qat.py to write a 100x100 model)."""
    sentences = set()
    for tool in TOOLS:
        script, *argv = TOOLS[tool].format(**inputs).split()
        _, err = run_script(script, argv + ["--imgsz", "100"], capsys, monkeypatch)
        sentences.add(_error_lines(err)[0])
    assert sentences == {"error: --imgsz 100: every side must be a multiple of the model stride 32 (e.g. 96)"}


def test_train_resume_of_a_qat_checkpoint_writes_nothing(inputs, capsys, monkeypatch):
    run = inputs["qat_last"].parents[1]
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, err = run_script("train.py", ["--resume", str(inputs["qat_last"]), "--device", "cpu"], capsys, monkeypatch)
    assert code == 2 and len(_error_lines(err)) == 1
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # no hyp.yaml / opt.yaml written into it


def test_checkpoint_errors_say_what_to_do(inputs):
    from utils.checkpoint import load_checkpoint
    from utils.errors import UserError

    for key in ("text", "garbage", "foreign"):
        with pytest.raises(UserError) as err:
            load_checkpoint(inputs[key])
        message = str(err.value)
        assert not re.search(r"\(\d+\)", message), message  # no bare error code such as "(101)"
        assert "weights_only" not in message and "torch.load" not in message, message  # not torch's advice
    assert "--unsafe-load only if you trust the file" in message


def test_export_replaces_an_onnx_only_with_exist_ok(inputs, tmp_path, capfd, monkeypatch):
    weights = tmp_path / "w.pt"
    weights.write_bytes(inputs["w3"].read_bytes())
    onnx = tmp_path / "w-end2end.onnx"
    onnx.write_text("an earlier export")
    argv = ["--weights", str(weights), "--imgsz", "64", "--include", "onnx", "onnx_end2end"]
    code, err = run_script("export_qat.py", argv, capfd, monkeypatch)  # capfd: the exporter's C++ warnings too
    assert code == 2 and "--exist-ok" in _error_lines(err)[0]
    assert onnx.read_text() == "an earlier export" and not (tmp_path / "w.onnx").exists()  # neither file written
    code, err = run_script("export_qat.py", argv + ["--exist-ok"], capfd, monkeypatch)
    assert code == 0 and onnx.stat().st_size > 1000 and (tmp_path / "w.onnx").is_file()
    assert "Warning" not in err  # the exporter said nothing about the EfficientNMS outputs


def test_a_failed_run_leaves_no_empty_folder_and_keeps_results(tmp_path):
    from utils.paths import empty_run_dirs_removed, increment_path

    with pytest.raises(RuntimeError), empty_run_dirs_removed():
        increment_path(tmp_path / "runs" / "exp")
        raise RuntimeError("failed in the first batch")
    assert not (tmp_path / "runs" / "exp").exists()
    with pytest.raises(KeyboardInterrupt), empty_run_dirs_removed():
        kept = increment_path(tmp_path / "runs" / "exp")
        (kept / "weights").mkdir()
        (kept / "weights" / "last.pt").write_text("a checkpoint")
        raise KeyboardInterrupt
    assert (kept / "weights" / "last.pt").is_file()


def test_interrupt_exits_130_with_one_line(capsys):
    from utils.errors import run_cli

    def interrupted():
        raise KeyboardInterrupt("runs/train/exp/weights/last.pt holds the last finished epoch")

    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted)
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted: runs/train/exp/weights/last.pt holds the last finished epoch\n"


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler, as a run from a terminal has it. pytest started in the background by a
    shell without job control (``(pytest &)``, as bench/bench_suite.py was started) inherits SIGINT
    ignored, and a SIGINT sent to the process then never arrives: the test below failed that way."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_swallowed_by_a_finalizer_stops_training_at_the_next_batch(capsys, monkeypatch, python_sigint_handler):
    """Python prints a KeyboardInterrupt raised in a ``__del__`` as "Exception ignored" and goes on; a
    SIGINT landing there was lost and the run trained to its last epoch (seen once in CI)."""
    from utils.errors import run_cli
    from utils.training.engine import train_one_epoch

    class SigintWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before kill returns: in here

    seen = []

    class Batches:
        def __len__(self):
            return 4

        def __iter__(self):
            for i in range(4):
                seen.append(i)
                if i == 1:
                    SigintWhileCollected()  # collected at once, so its finalizer runs here
                yield torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, 6), None, None

    model = torch.nn.Conv2d(3, 3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def loss_fn(preds, targets):
        return preds.sum(), torch.zeros(3)

    swallowed = []  # what Python would print as "Exception ignored in ... __del__"
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: train_one_epoch(model, Batches(), loss_fn, optimizer, device=torch.device("cpu"),
                                        progress=False))
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert swallowed == [KeyboardInterrupt]
    assert seen == [0, 1]  # stopped before training the batch whose loading was interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # and left as it was


def test_resume_keeps_the_saved_options_and_names_each_change(caplog):
    from utils.errors import UserError
    from utils.options import resume_options

    saved = {"epochs": 10, "workers": 8, "data": "a.yaml", "unsafe_load": True}
    new = {"epochs": 20, "workers": 8, "data": "b.yaml", "unsafe_load": False, "resume": "last.pt"}
    with caplog.at_level("INFO", logger="yolov9"):
        merged = resume_options(saved, new, typed=["epochs", "workers", "resume"], fixed=["data"])
    assert merged == {"epochs": 20, "workers": 8, "data": "a.yaml", "unsafe_load": False,  # trust is per command
                      "resume": "last.pt"}
    assert "except --epochs 10 -> 20" in caplog.text and "--workers" not in caplog.text  # typed, but unchanged
    with pytest.raises(UserError, match="--data cannot change"):
        resume_options(saved, new, typed=["data"], fixed=["data"])


def test_model_optimizer_imports_without_notices_or_other_libraries_plugins(tmp_path):
    """Importing our adapter prints nothing the user did not cause (without CUDA, torch and modelopt
    print two notices) and loads none of the libraries Model Optimizer has plugins for: an installed
    transformers cost seconds a start (bench/bench_import.py) and an "untested version" warning. Nor
    does it load modelopt's other techniques or TorchInductor, and torch.compile is torch's again
    afterwards. scipy.stats, which modelopt's histogram calibrator imports a function from, loads on that
    function's first call. A user's own imports of scipy.stats, modelopt's sparsity and transformers
    still work. A stand-in transformers package here says when it is imported."""
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("import sys\n__version__ = '5.17.0'\n"
                                      "print('transformers imported', file=sys.stderr)\n")
    code = ("import sys\nimport torch\ncompile_before = torch.compile\nimport models.quantize\n"
            "assert 'transformers' not in sys.modules\nassert torch.compile is compile_before\n"
            "loaded = [m for m in ('torch._inductor', 'modelopt.torch.nas', 'modelopt.torch.sparsity',\n"
            "                      'modelopt.torch.speculative') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "assert 'scipy.stats' not in sys.modules\n"
            "import scipy.stats\nfrom modelopt.torch.quantization.calib import histogram\n"
            "assert histogram.entropy([0.5, 0.25, 0.25]) == scipy.stats.entropy([0.5, 0.25, 0.25]) > 1\n"
            "assert scipy.stats.norm.cdf(0) == 0.5\n"
            "import modelopt.torch.sparsity\nimport transformers\nprint(transformers.__version__)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "5.17.0\n" and proc.stderr == "transformers imported\n", proc.stderr


BUNDLED_CONFIGS = sorted(p.name for folder in ("detect", "segment") for p in (ROOT / "models" / folder).glob("*.yaml"))


@pytest.mark.parametrize("cfg", BUNDLED_CONFIGS)
def test_every_bundled_config_passes_train_checks_by_name(cfg):
    """train.py now reads --cfg before torch loads: each shipped config, detection and segmentation, named as a
    user types it (with and without .yaml), passes those checks, and so does a path to it."""
    import train
    from utils.training.inputs import check_inputs

    data = str(ROOT / "data" / "coco128.yaml")
    folder = "segment" if (ROOT / "models" / "segment" / cfg).is_file() else "detect"
    for name in (cfg, cfg.removesuffix(".yaml"), str(ROOT / "models" / folder / cfg)):
        check_inputs(train.parse_args(["--cfg", name, "--data", data]))
