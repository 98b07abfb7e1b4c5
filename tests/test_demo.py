"""``python qat.py demo`` runs the whole pipeline and reports every step; here at a toy size."""
from __future__ import annotations

import json
import warnings

import onnx
import pytest

import qat
from models.quantize import CALIB_METHODS
from utils.errors import UserError

ROWS = ("Origin (FP32)", "PTQ (max)", "QAT (best)", "QAT in PyTorch, 64x64 input",
        "ONNX INT8 (onnxruntime), 64x64 input")


def test_demo_end_to_end_at_toy_size(tmp_path, capfd):
    """Every row, every file, and nothing on the console a user did not cause: no Python warning
    and no ONNX Runtime log line (it goes to the file descriptor, hence capfd)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # what a user's `python qat.py demo` would print, once each
        save_dir = qat.main(["demo", "--project", str(tmp_path), "--name", "d", "--epochs", "1", "--qat-epochs", "1",
                             "--images", "8", "--imgsz", "64", "--batch-size", "8", "--workers", "0"])
    out, err = capfd.readouterr()
    assert not [f"{w.category.__name__}: {w.message}" for w in caught]
    assert "onnxruntime" not in err
    assert save_dir == tmp_path / "d"
    summary = json.loads((save_dir / "demo.json").read_text())
    report = json.loads((save_dir / "qat" / "report.json").read_text())
    assert {t["method"] for t in report["calibration"]} == set(CALIB_METHODS)  # auto: each method evaluated
    rows = [row.replace("PTQ (max)", f"PTQ ({report['ptq']['method']})") for row in ROWS]
    assert list(summary["rows"]) == rows
    table = out[out.index("| Model | AP50-95 | AP50 | P | R |"):]
    for row in rows:
        cells = next(line for line in table.splitlines() if line.startswith(f"| {row} |")).split("|")[2:-1]
        assert len(cells) == 4 and all(0.0 <= float(c) <= 1.0 for c in cells), row
    # the QAT row may be the PTQ model itself (no epoch beat it on val), and then the table says so
    assert ("QAT (best) is the PTQ model itself" in out) == (report["qat_best"]["epoch"] == 0)

    files = summary["files"]
    for key in ("data", "fp32_weights", "ptq_weights", "qat_weights", "qat_report", "onnx", "onnx_eval"):
        assert key in files and files[key] in out, key
    graph = onnx.load(files["onnx"]).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 50  # really the INT8 Q/DQ export
    assert (save_dir / "data" / "images" / "train").is_dir() and len(list((save_dir / "data" / "images" /
                                                                           "train").iterdir())) == 8
    assert not list((save_dir / "train").glob("*.png"))  # the quick training draws no plots


def test_demo_recipes_per_task():
    """--epochs left out takes the task's recipe; detection trains quick (bf16 / channels-last on
    the CPU, one validation) and calibrates with auto, segmentation as before."""
    from utils.demo import QUICK_TRAINING, RECIPES
    from utils.training.trainer import DEFAULTS

    assert set(QUICK_TRAINING) <= set(DEFAULTS)  # each is a trainer option
    assert RECIPES["detect"].quick and not RECIPES["segment"].quick
    assert RECIPES["detect"].epochs < RECIPES["segment"].epochs
    assert (RECIPES["detect"].calib_method, RECIPES["segment"].calib_method) == ("auto", "max")
    # detection trains batch 32 at twice batch 16's rate; segmentation keeps batch 16 and its rate
    assert (RECIPES["detect"].batch_size, RECIPES["segment"].batch_size) == (32, 16)
    assert RECIPES["detect"].lr0 == pytest.approx(2 * RECIPES["segment"].lr0)
    opt = qat.parse_args(["demo"])
    assert opt.epochs is None and opt.batch_size is None and opt.task == "detect"


def test_demo_rejects_a_bad_size_before_writing(tmp_path):
    with pytest.raises(UserError, match="--imgsz 50"):
        qat.main(["demo", "--project", str(tmp_path), "--imgsz", "50"])
    assert not any(tmp_path.iterdir())


def test_segmentation_demo_end_to_end_at_toy_size(tmp_path, capsys):
    save_dir = qat.main(["demo", "--task", "segment", "--project", str(tmp_path), "--name", "s", "--epochs", "1",
                         "--qat-epochs", "1", "--qat-iters", "2", "--images", "8", "--imgsz", "64",
                         "--batch-size", "8", "--workers", "0"])
    out = capsys.readouterr().out
    table = out[out.index("| Model | AP50-95 | AP50 | P | R |"):]
    for row in ROWS:
        for part in ("boxes", "masks"):
            cells = next(line for line in table.splitlines() if line.startswith(f"| {row}, {part} |")).split("|")[2:-1]
            assert len(cells) == 4 and all(0.0 <= float(c) <= 1.0 for c in cells), (row, part)
    summary = json.loads((save_dir / "demo.json").read_text())
    assert summary["task"] == "segment" and all("mask_map50_95" in m for m in summary["rows"].values())
    outputs = [o.name for o in onnx.load(summary["files"]["onnx"]).graph.output]
    assert outputs == ["output0", "output1"]  # prediction with mask coefficients, prototypes
    assert any((save_dir / "data" / "masks" / "train").iterdir())  # the shapes' exact masks were drawn
