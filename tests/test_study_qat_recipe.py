"""bench/study_qat_recipe.py: variants parsed strictly, and one variant end to end on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.qat_cost_split import main as cost_split
from bench.study_qat_recipe import main, parse_variants, variant_name
from tests.qat_helpers import one_thread, save_float_checkpoint, tiny_model
from utils.data.synthetic import make_shapes_dataset
from utils.errors import UserError


def test_variants_are_parsed_strictly():
    assert parse_variants("1e-4:1:3, 1e-3:0:10:0.5, 1e-4:1:3:0:0.9") == [
        (1e-4, 1.0, 3, 0.0, 0.0), (1e-3, 0.0, 10, 0.5, 0.0), (1e-4, 1.0, 3, 0.0, 0.9)]
    assert variant_name(1e-4, 0.0, 3) == "lr0.0001-dw0-ep3" and variant_name(1e-4, 1, 3, 1) == "lr0.0001-dw1-ep3-wu1"
    assert variant_name(1e-4, 1, 3, 0, 0.9) == "lr0.0001-dw1-ep3-ema0.9"
    for bad in ("", "1e-4:1", "0:1:3", "1e-4:-1:3", "1e-4:1:0", "x:1:3", "1e-4:1:3:-1", "1e-4:1:3:1:1",
                "1e-4:1:3:0:-0.1", "1e-4:1:3:0:0.9:1"):
        with pytest.raises(UserError, match="--variants"):
            parse_variants(bad)


def one_class(data: Path) -> Path:
    """The shapes dataset with every shape one class."""
    for labels in (data.parent / "labels").rglob("*.txt"):
        labels.write_text("".join("0" + line[line.index(" "):] + "\n" for line in labels.read_text().splitlines()))
    spec = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**spec, "names": spec["names"][:1], "nc": 1}))
    return data


def test_one_variant_end_to_end(tmp_path):
    data = one_class(make_shapes_dataset(tmp_path / "shapes", n_train=8, n_val=4, n_test=4, imgsz=64))
    weights = save_float_checkpoint(tiny_model(nc=1), tmp_path / "tiny.pt")  # the common custom detector
    with one_thread():
        rows = main(["--weights", str(weights), "--data", str(data), "--imgsz", "64", "--batch-size", "4",
                     "--variants", "1e-4:1:1:1", "--iters", "1", "--calib-method", "max", "--calib-batches", "1",
                     "--workers", "0", "--auto-skip", "1", "--project", str(tmp_path / "runs"),
                     "--results-dir", str(tmp_path / "out")])
    (row,) = rows
    assert row["auto_skip"] == 1 and len(row["skip_layers"]) == 1  # the most sensitive layer stayed float
    hyp = yaml.safe_load((tmp_path / "runs" / "hyp.qat.warmup1.yaml").read_text())
    assert hyp["warmup_epochs"] == 1 and hyp["lr0"] == 1e-4  # the recipe's own file, warm-up added
    assert (row["selected_on"], row["reported_on"], row["test_images"]) == ("val", "test", 4)
    assert len(row["val_qat_epochs"]) == len(row["val_control_epochs"]) == 1
    assert set(row["test"]) == {"ptq_minus_origin", "qat_minus_origin", "control_minus_origin", "qat_minus_control"}
    record = json.loads((tmp_path / "out" / "qat_recipe_delta_map50_95_tiny_lr0.0001-dw1-ep1-wu1.json").read_text())
    assert record["value"] == row["test"]["qat_minus_origin"]["value"] and record["extra"]["chosen_on_val"]
    assert "| lr0.0001-dw1-ep1-wu1 |" in (tmp_path / "out" / "tiny.md").read_text()
    with one_thread():  # where the run's cost comes from, on the same run folder
        split = cost_split(["--run", row["run"], "--workers", "0", "--out", str(tmp_path / "split")])
    assert set(split) == {"FP32", "PTQ", "control", "control, then PTQ", "QAT (best epoch)"}
    assert set(split["PTQ"]) == {"all", "weights", "none"} and split["PTQ"]["none"] == split["FP32"]["none"]
    assert "| PTQ |" in (tmp_path / "split" / "cost_split.md").read_text()
    with pytest.raises(UserError, match="name the data"):
        main(["--weights", str(weights), "--results-dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match="not a qat.py quantize run folder"):
        cost_split(["--run", str(tmp_path / "out")])
