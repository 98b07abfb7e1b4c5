"""val.py end to end on real COCO128 images with a tiny GELAN, at 128 px."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import val
from models.yolo import DetectionModel
from tests.data_builders import build_dataset
from utils.checkpoint import save_checkpoint
from utils.errors import run_cli
from utils.evaluation.coco import COCO_NAMES
from utils.paths import ROOT

TINY_CFG = ROOT / "tests" / "assets" / "gelan-tiny.yaml"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, coco128_dir):
    root = tmp_path_factory.mktemp("coco8")
    build_dataset(root, coco128_dir, n=8, split="val")
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(root), "val": "images/val", "names": list(COCO_NAMES)}))
    return path


def lively_tiny_model() -> DetectionModel:
    """An untrained tiny GELAN whose BatchNorm statistics come from one batch, so its outputs
    vary with the input (fresh running stats make a deep random net nearly constant) and its
    scores spread over (0, 1], ties at 1.0 included."""
    torch.manual_seed(0)
    model = DetectionModel(TINY_CFG, nc=80)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.rand(4, 3, 128, 128))
    return model


def test_run_in_memory_model_on_real_images(tiny_data, tmp_path):
    model = lively_tiny_model()
    result = val.run(tiny_data, model=model, imgsz=128, batch_size=4, workers=0, save_dir=tmp_path, save_json=True)
    assert model.training
    assert result.images == 8 and result.instances > 0 and result.map50 > 0
    assert result.coco is not None
    assert abs(result.coco["map50_95"] - result.map50_95) < 1e-3 and abs(result.coco["map50"] - result.map50) < 1e-3
    preds = json.loads((tmp_path / "model_predictions.json").read_text())
    assert len(preds) > 8 and {p["category_id"] for p in preds} <= set(range(1, 91))


def test_cli_on_a_checkpoint_writes_the_run_folder(tiny_data, tmp_path, capsys):
    model = lively_tiny_model().eval()
    weights = save_checkpoint({"epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": 0,
                               "optimizer": None, "opt": {}, "git": None, "date": None}, tmp_path / "tiny.pt")
    result = val.main(["--data", str(tiny_data), "--weights", str(weights), "--imgsz", "128", "--batch-size", "4",
                       "--device", "cpu", "--workers", "0", "--project", str(tmp_path), "--name", "exp",
                       "--postprocess", "none", "--max-det", "100"])
    run_dir = tmp_path / "exp"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["map50_95"] == pytest.approx(result.map50_95) and saved["images"] == 8
    assert all(row["name"] == COCO_NAMES[row["class"]] for row in saved["per_class"])  # the yaml's names
    assert (run_dir / "results.md").read_text().startswith("| Class | Images | Instances | P | R | mAP50 | mAP50-95 |")
    assert (run_dir / "PR_curve.png").is_file() and (run_dir / "confusion_matrix.png").is_file()
    out = capsys.readouterr().out
    assert "mAP50-95" in out and "Speed:" in out and "all" in out


def test_cli_reports_bad_input_in_one_line(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: val.main(["--data", str(tiny_data), "--weights", str(tmp_path / "missing.pt"),
                                  "--device", "cpu", "--project", str(tmp_path)]))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
    with pytest.raises(SystemExit):
        val.parse_args(["--data", str(tiny_data), "--weights", "x.pt", "--postprocess", "soft"])
