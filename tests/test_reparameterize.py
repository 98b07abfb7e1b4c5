"""yolov9-X -> gelan-X conversion keeps the main branch's predictions."""
from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from models.experimental import attempt_load
from models.yolo import DetectionModel
from tests.model_builders import trained_looking_model
from tests.test_checkpoint import upstream_style_checkpoint
from tools.reparameterize import main, main_branch_layers, reparameterize
from utils.checkpoint import load_checkpoint
from utils.errors import UserError


def _trained_looking(cfg: str, nc: int = 3) -> DetectionModel:
    return trained_looking_model(cfg, nc).eval()


@pytest.mark.parametrize("name", ["yolov9-t", "yolov9-s"])
def test_converted_model_equals_main_branch(name):
    dual = _trained_looking(name)
    gelan = reparameterize(dual, name.replace("yolov9", "gelan"))
    assert gelan.yaml_file == name.replace("yolov9", "gelan") + ".yaml" and gelan.nc == 3
    x = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        (aux, main_out), _ = dual(x)
        converted, _ = gelan(x)
    assert (converted - main_out).abs().max() < 1e-4
    assert (converted - aux).abs().max() > 1e-3  # the auxiliary head really is different


def test_main_branch_layers_match_upstream_notebook():
    # upstream's notebook copies yolov9-c layers 1..22 (to gelan-c 0..21) and the head 38 -> 22;
    # yolov9-e layers 0..28 as they are and 36..48 to 29..41, head 49 -> 42.
    assert main_branch_layers(DetectionModel("yolov9-c")) == list(range(0, 23))
    assert main_branch_layers(DetectionModel("yolov9-e")) == list(range(0, 29)) + list(range(36, 49))


def test_wrong_pairs_are_user_errors():
    dual = DetectionModel("yolov9-t", nc=2)
    with pytest.raises(UserError, match="do not match the main branch"):
        reparameterize(dual, "gelan-c")
    with pytest.raises(UserError, match="layer sizes differ"):
        reparameterize(dual, "gelan-s")
    with pytest.raises(UserError, match="not a dual-branch model"):
        reparameterize(DetectionModel("gelan-t", nc=2), "gelan-t")


def test_cli_writes_upstream_converted_checkpoint(tmp_path, capsys):
    dual = _trained_looking("yolov9-t")
    weights = tmp_path / "yolov9-t.pt"
    torch.save(upstream_style_checkpoint(dual), weights)
    out = main(["--weights", str(weights)])
    assert out == tmp_path / "yolov9-t-converted.pt"
    assert "gelan-t.yaml" in capsys.readouterr().out

    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == -1 and ckpt["ema"] is None and ckpt["optimizer"] is None
    assert next(ckpt["model"].parameters()).dtype == torch.float16

    x = torch.rand(1, 3, 96, 96)
    reference = deepcopy(dual).half().float().eval()  # the checkpoint stores fp16 weights
    with torch.no_grad():
        (_, main_out), _ = reference(x)
        converted, _ = attempt_load(out, fuse=False)(x)
    assert (converted - main_out).abs().max() < 1e-4
