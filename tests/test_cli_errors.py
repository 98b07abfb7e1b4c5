"""Every command-line tool answers bad input with one ``error: ...`` line and exit code 2.

Most cases run the script's ``__main__`` block in this process (runpy), which is exactly what a
user's ``python script.py`` executes, minus a 3-5 s interpreter + torch start per case; a few
cases run as real subprocesses to prove the exit code reaches the shell.
"""
from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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
    weights3 = save_checkpoint({"epoch": -1, "best_fitness": 0.0, "model": model.half(), "ema": None, "updates": 0,
                                "optimizer": None, "opt": {}, "git": None, "date": ""}, tmp / "nc3.pt")
    return {"tmp": tmp, "data3": data3, "data80": data80, "empty": empty, "bad_yaml": bad_yaml,
            "missing": tmp / "missing.pt", "missing_yaml": tmp / "missing.yaml", "garbage": garbage,
            "folder": tmp / "folder.pt", "w3": weights3, "garbage_onnx": tmp / "garbage.onnx"}


def _write_garbage_onnx(path: Path) -> None:
    path.write_bytes(b"this is not protobuf" * 5)


# (script, argv with {placeholders} from `inputs`, words the error line must contain)
CASES = [
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {missing_yaml} --epochs 1", "missing.yaml"),
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {bad_yaml} --epochs 1", "bad.yaml"),
    ("train.py", "--cfg models/demo/gelan-demo.yaml --data {empty} --epochs 1 --imgsz 64 --workers 0", "images"),
    ("train.py", "--weights {garbage} --data {data3} --epochs 1", "garbage.pt"),
    ("val.py", "--weights {missing} --data {data3}", "missing.pt"),
    ("val.py", "--weights {folder} --data {data3}", "folder.pt"),
    ("val.py", "--weights {w3} --data {data80} --imgsz 64", "classes"),
    ("val.py", "--weights {w3} --data {empty} --imgsz 64 --workers 0", "images"),
    ("val.py", "--weights {w3} --data {bad_yaml}", "bad.yaml"),
    ("qat.py", "quantize --weights {w3} --data {data80} --imgsz 64 --workers 0", "classes"),
    ("qat.py", "quantize --weights {garbage} --data {data3}", "garbage.pt"),
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


def _run_main(script: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run ``script`` as ``__main__`` with ``argv``; return its exit code and stderr."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("script,args,words", CASES, ids=[f"{s}:{a.split()[0]}-{w}" for s, a, w in CASES])
def test_bad_input_is_one_error_line(script, args, words, inputs, capsys, monkeypatch):
    _write_garbage_onnx(inputs["garbage_onnx"])
    argv = args.format(**inputs).split()
    code, err = _run_main(script, argv, capsys, monkeypatch)
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
    code, err = _run_main("val.py", common + ["--data", str(inputs["data80"])], capsys, monkeypatch)
    assert code == 2 and len(_error_lines(err)) == 1
    code, err = _run_main("val.py", common + ["--data", str(inputs["data3"])], capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert marker.read_text() == '{"kept": true}'
    assert (project / "exp2").is_dir() and any((project / "exp2").iterdir())


@pytest.mark.parametrize("argv", [
    ["qat.py", "quantize", "--weights", "{missing}", "--data", "{data3}"],
    ["val_trt.py", "--onnx", "{garbage_onnx}", "--data", "{data3}", "--backend", "tensorrt"],
], ids=["qat-missing-weights", "val_trt-tensorrt"])
def test_exit_code_reaches_the_shell(argv, inputs):
    _write_garbage_onnx(inputs["garbage_onnx"])
    if "tensorrt" in argv and have_tensorrt():
        pytest.skip("TensorRT is installed here")
    argv = [a.format(**inputs) for a in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(_error_lines(proc.stderr)) == 1, proc.stderr[-2000:]
