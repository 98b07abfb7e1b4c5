"""yolov9-X -> gelan-X conversion keeps the main branch's predictions."""
from __future__ import annotations

import functools
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml

from models.config import SEGMENT_CONFIG_DIR
from models.experimental import attempt_load
from models.yolo import DetectionModel, DSegment, Model, SegmentationModel
from tests.model_builders import trained_looking_model
from tests.test_checkpoint import upstream_style_checkpoint
from tools.reparameterize import (
    default_gelan_cfg,
    layer_graph,
    main,
    main_branch_config,
    main_branch_layers,
    main_outputs,
    reparameterize,
)
from utils.checkpoint import load_checkpoint
from utils.errors import UserError

ASSETS = Path(__file__).parent / "assets"


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


@functools.lru_cache(maxsize=None)
def _untrained(name: str) -> DetectionModel:
    """An upstream-size model, built once for the tests that only read its graph."""
    return Model(name)


def test_main_branch_layers_match_upstream_notebook():
    # upstream's notebook copies yolov9-c layers 1..22 (to gelan-c 0..21) and the head 38 -> 22;
    # yolov9-e layers 0..28 as they are and 36..48 to 29..41, head 49 -> 42.
    assert main_branch_layers(_untrained("yolov9-c")) == list(range(0, 23))
    assert main_branch_layers(_untrained("yolov9-e")) == list(range(0, 29)) + list(range(36, 49))


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


SEG_DUAL = str(ASSETS / "yolov9-tiny-dseg.yaml")


@pytest.fixture(scope="module")
def dual_seg() -> DetectionModel:
    return _trained_looking(SEG_DUAL, nc=2)


def test_segmentation_converts_to_its_main_branch(dual_seg):
    # gelan-tiny-dseg's prototype block has one bottleneck where the main branch has two (as
    # upstream's gelan-c-dseg against yolov9-c-dseg): the default target is the main branch itself.
    cfg = default_gelan_cfg(dual_seg)
    assert isinstance(cfg, dict) and cfg["head"][-1][2] == "DSegment"
    single = reparameterize(dual_seg, cfg)
    assert type(single) is SegmentationModel and type(single.model[-1]) is DSegment and single.nc == 2
    x = torch.rand(2, 3, 64, 96)
    main_prediction, main_prototypes = main_outputs(dual_seg, x)
    prediction, prototypes = main_outputs(single, x)
    assert (prediction - main_prediction).abs().max() < 1e-4
    assert (prototypes - main_prototypes).abs().max() < 1e-4
    dual_seg.model[-1].training = True  # the auxiliary branch's output, from the same eval-mode layers
    with torch.no_grad():
        _, (aux_coefficients, _), (aux_prototypes, _) = dual_seg(x)
    dual_seg.model[-1].training = False
    assert (prediction[:, -32:] - aux_coefficients).abs().max() > 1e-3
    assert (prototypes - aux_prototypes).abs().max() > 1e-3


def test_segmentation_wrong_targets_are_user_errors(dual_seg):
    with pytest.raises(UserError, match="layer sizes differ"):
        reparameterize(dual_seg, ASSETS / "gelan-tiny-dseg.yaml")
    with pytest.raises(UserError, match="head DDetect is not the single-branch form of .* DualDSegment"):
        reparameterize(dual_seg, ASSETS / "gelan-tiny.yaml")
    with pytest.raises(UserError, match="not a dual-branch model"):
        reparameterize(DetectionModel(ASSETS / "gelan-tiny-dseg.yaml", nc=2), ASSETS / "gelan-tiny-dseg.yaml")


def test_main_branch_config_of_upstream_models():
    for name in ("yolov9-c", "yolov9-e"):  # equal to gelan-X up to Silence layers (gelan-e has one, gelan-c not)
        assert default_gelan_cfg(_untrained(name)) == name.replace("yolov9", "gelan") + ".yaml"
    derived, _, _, _ = layer_graph(main_branch_config(_untrained("yolov9-c-dseg")))
    gelan, _, _, _ = layer_graph(yaml.safe_load((SEGMENT_CONFIG_DIR / "gelan-c-dseg.yaml").read_text()))
    # the main branch is gelan-c-dseg but for the depth of its prototype block (layer 22)
    assert len(derived) == len(gelan) and [i for i, (a, b) in enumerate(zip(derived, gelan)) if a != b] == [22]
    assert derived[22] == ([15], 1, "RepNCSPELAN4", [256, 256, 128, 2]) and gelan[22][3] == [256, 256, 128, 1]
    assert derived[-1] == ([15, 18, 21, 24], 1, "DSegment", ["nc", 32, 256])


def test_cli_converts_a_segmentation_checkpoint(tmp_path, capsys, dual_seg):
    weights = tmp_path / "yolov9-tiny-dseg.pt"
    torch.save(upstream_style_checkpoint(dual_seg), weights)
    out = main(["--weights", str(weights)])
    assert "main branch of yolov9-tiny-dseg.yaml" in capsys.readouterr().out
    converted = attempt_load(out, fuse=False)
    assert type(converted) is SegmentationModel and type(converted.model[-1]) is DSegment
    x = torch.rand(1, 3, 64, 64)
    reference = deepcopy(dual_seg).half().float()
    for a, b in zip(main_outputs(converted, x), main_outputs(reference, x)):
        assert (a - b).abs().max() < 1e-4
