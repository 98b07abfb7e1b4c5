"""export_qat.py from checkpoint files: FP and QAT checkpoints, both formats, reports, bad input."""
from __future__ import annotations

import json

import onnx
import pytest
import torch

import export_qat
from models.quantize import calibrate, prepare
from models.yolo import DetectionModel
from tests.cli_helpers import run_script
from tests.export_helpers import lively_head
from utils.checkpoint import save_checkpoint
from utils.deployment.export import export_checkpoint
from utils.errors import UserError
from utils.paths import ROOT
from utils.quantization.checkpoint import make_checkpoint

TINY = ROOT / "tests" / "assets" / "gelan-tiny.yaml"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = lively_head(DetectionModel(TINY, nc=3))
    fp = save_checkpoint({"epoch": -1, "model": DetectionModel(TINY, nc=3).half(), "ema": None}, root / "fp.pt")
    prepare(model)
    calibrate(model, [torch.rand(2, 3, 64, 64)])
    qat = save_checkpoint(make_checkpoint(model), root / "qat.pt")
    return fp, qat


def test_qat_checkpoint_exports_both_formats_with_lint_reports(checkpoints, capsys):
    _, qat = checkpoints
    results = export_qat.main(["--weights", str(qat), "--include", "onnx", "onnx_end2end", "--imgsz", "64",
                               "--dynamic", "--postprocess", "none", "--topk-all", "50", "--conf-thres", "0.1"])
    assert [r.path.name for r in results] == ["qat.onnx", "qat-end2end-topk.onnx"]
    for r in results:
        model = onnx.load(str(r.path))
        onnx.checker.check_model(model)
        meta = {p.key: p.value for p in model.metadata_props}
        assert r.quantized and r.qdq_pairs > 20 and r.findings == []
        assert meta["quantized"] == "true" and meta["weights"] == "qat.pt" and meta["batch"] == "dynamic"
        lint_json = json.loads(r.path.with_suffix(".qdq_lint.json").read_text())
        assert lint_json["total"] == 0
    assert json.loads({p.key: p.value for p in onnx.load(str(results[1].path)).metadata_props}["max_det"]) == 50
    out = capsys.readouterr().out
    assert "INT8 Q/DQ" in out and "Q/DQ lint: 0 finding(s)" in out


def test_fp_checkpoint_exports_without_qdq(checkpoints):
    fp, _ = checkpoints
    (result,) = export_qat.main(["--weights", str(fp), "--include", "onnx_end2end", "--imgsz", "64", "--simplify"])
    assert result.path.name == "fp-end2end.onnx" and not result.quantized and result.qdq_pairs == 0
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert "EfficientNMS_TRT" in ops and "QuantizeLinear" not in ops


def test_bad_arguments(checkpoints, tmp_path, capsys, monkeypatch):
    fp, _ = checkpoints
    with pytest.raises(UserError, match="unknown format"):
        export_checkpoint(fp, include=("engine",))
    with pytest.raises(UserError, match="opset"):
        export_checkpoint(fp, imgsz=64, opset=12)
    code, err = run_script("export_qat.py", ["--weights", str(tmp_path / "missing.pt")], capsys, monkeypatch)
    assert code == 2 and "missing.pt" in err
