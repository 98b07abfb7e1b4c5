"""YOLOv9 / GELAN segmentation models: upstream's sizes, state-dict keys and output structure."""
from __future__ import annotations

import functools
import gzip
import json
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from models.common import Conv, Proto
from models.config import SEGMENT_CONFIG_DIR
from models.yolo import (
    DDetect,
    Detect,
    DetectionModel,
    DSegment,
    DualDDetect,
    DualDetect,
    DualDSegment,
    Model,
    Segment,
    SegmentationModel,
)
from tests.model_builders import randomize_statistics
from tests.test_models import n_params
from utils.errors import UserError
from utils.torch_utils import count_gflops

GOLDEN = Path(__file__).parent / "golden"
ASSETS = Path(__file__).parent / "assets"

# At nc=80, as upstream YOLOv9's own code reports them (tests/golden/ holds its state-dict manifests):
# training-form parameters and GFLOPs at 640, then parameters and GFLOPs after fuse().
UPSTREAM = {
    "gelan-c-seg": (27_634_720, 146.0, 27_423_808, 144.6),
    "gelan-c-dseg": (27_668_256, 147.1, 27_447_616, 145.5),
    "yolov9-c-dseg": (57_991_744, 372.6, 57_651_072, 369.6),
}
HEAD_TYPE = {"gelan-c-seg": Segment, "gelan-c-dseg": DSegment, "yolov9-c-dseg": DualDSegment}


@pytest.fixture(scope="module")
def models() -> dict[str, DetectionModel]:
    torch.manual_seed(0)
    return {name: Model(name) for name in UPSTREAM}


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_sizes_match_upstream(models, name):
    model = models[name]
    params, gflops, fused_params, fused_gflops = UPSTREAM[name]
    assert type(model) is SegmentationModel and model.yaml_file == f"{name}.yaml"
    assert (n_params(model), round(count_gflops(model), 1)) == (params, gflops)
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    head = model.model[-1]
    assert type(head) is HEAD_TYPE[name] and (head.nc, head.nm, head.npr, head.nl) == (80, 32, 256, 3)
    fused = deepcopy(model).eval().fuse()
    assert (n_params(fused), round(count_gflops(fused), 1)) == (fused_params, fused_gflops)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_state_dict_matches_upstream_manifest(models, name):
    with gzip.open(GOLDEN / f"{name}.json.gz", "rt") as f:
        golden = list(json.load(f).items())
    assert [(k, list(v.shape)) for k, v in models[name].state_dict().items()] == golden


def test_every_bundled_segment_config_is_tested():
    assert sorted(p.stem for p in SEGMENT_CONFIG_DIR.glob("*.yaml")) == sorted(UPSTREAM)


def test_head_parts_carry_upstream_names(models):
    seg, dseg, dual = (models[n].model[-1] for n in UPSTREAM)
    assert isinstance(seg.proto, Proto) and seg.proto.cv3.conv.out_channels == 32 and len(seg.cv4) == 3
    assert isinstance(dseg.proto, Conv) and dseg.proto.conv.kernel_size == (1, 1) and len(dseg.cv4) == 3
    assert isinstance(dual.proto, Conv) and isinstance(dual.proto2, Conv) and len(dual.cv6) == len(dual.cv7) == 3
    assert not hasattr(dual, "cv8") and all(t[-1].out_channels == 32 for t in (*dual.cv6, *dual.cv7))
    # upstream's hierarchy: each segmentation head is its detection head plus masks
    assert isinstance(seg, Detect) and isinstance(dseg, DDetect) and isinstance(dual, DualDDetect)
    # upstream code runs our pickles: it calls the head's detection forward through ``detect``
    assert seg.detect is Detect.forward and dseg.detect is Detect.forward and dual.detect is DualDetect.forward


@functools.lru_cache(maxsize=None)
def _built(name: str, nc: int) -> SegmentationModel:
    torch.manual_seed(0)
    return Model(ASSETS / f"{name}.yaml", nc=nc)


def _tiny(name: str, nc: int) -> SegmentationModel:
    """A fresh copy of a tiny segmentation model (each is built once: building costs seconds on 2 cores)."""
    return deepcopy(_built(name, nc))


def test_model_builds_the_class_the_head_asks_for():
    assert type(_tiny("gelan-tiny-seg", nc=1)) is SegmentationModel
    assert type(Model(ASSETS / "gelan-tiny.yaml", nc=2)) is DetectionModel
    cfg = yaml.safe_load((ASSETS / "gelan-tiny-dseg.yaml").read_text())
    assert type(Model(cfg)) is SegmentationModel  # a dict, as stored in checkpoints
    with pytest.raises(UserError, match=r"gelan-tiny.yaml: head is DDetect, not a segmentation head"):
        SegmentationModel(ASSETS / "gelan-tiny.yaml")


def _anchors(h: int, w: int) -> int:
    return sum((h // s) * (w // s) for s in (8, 16, 32))


@pytest.mark.parametrize("name", ["gelan-tiny-seg", "gelan-tiny-dseg"])
def test_single_branch_output_structure(name):
    model = _tiny(name, nc=1)
    x = torch.rand(2, 3, 96, 64)  # non-square
    levels = [(2, 64 + 1, 96 // s, 64 // s) for s in (8, 16, 32)]
    a = _anchors(96, 64)

    feats, coefficients, prototypes = model(x)  # training
    assert [f.shape for f in feats] == levels
    assert coefficients.shape == (2, 32, a) and prototypes.shape == (2, 32, 96 // 4, 64 // 4)

    model.eval()
    prediction, (feats_e, coefficients_e, prototypes_e) = model(x)
    assert prediction.shape == (2, 4 + 1 + 32, a) and [f.shape for f in feats_e] == levels
    assert torch.equal(prediction[:, 5:], coefficients_e) and prototypes_e.shape == prototypes.shape
    scores = prediction[:, 4:5]
    assert scores.min() >= 0 and scores.max() <= 1  # class scores are sigmoids; coefficients are raw
    head = model.model[-1]
    head.export = True
    try:
        exported = model(x)
    finally:
        head.export = False
    assert len(exported) == 2 and torch.equal(exported[0], prediction) and torch.equal(exported[1], prototypes_e)


def test_dual_output_structure():
    model = _tiny("yolov9-tiny-dseg", nc=2)
    x = torch.rand(1, 3, 64, 96)
    a = _anchors(64, 96)
    (d1, d2), (c1, c2), (p1, p2) = model(x)  # training: auxiliary then main, for every part
    assert [f.shape for f in d1] == [f.shape for f in d2] == [(1, 66, 64 // s, 96 // s) for s in (8, 16, 32)]
    assert c1.shape == c2.shape == (1, 32, a) and p1.shape == p2.shape == (1, 32, 16, 24)

    model.eval()
    head = model.model[-1]
    with torch.no_grad():
        prediction, (feats, coefficients, prototypes) = model(x)  # eval: the main branch only, as upstream
        head.training = True  # the training structure from the same eval-mode layers
        (_, main_feats), (aux_coefficients, main_coefficients), (_, main_prototypes) = model(x)
        head.training = False
    assert prediction.shape == (1, 4 + 2 + 32, a)
    assert torch.equal(coefficients, main_coefficients) and torch.equal(prototypes, main_prototypes)
    assert all(torch.equal(f, g) for f, g in zip(feats, main_feats))
    assert not torch.equal(coefficients, aux_coefficients)


@pytest.mark.parametrize("name", ["gelan-tiny-seg", "gelan-tiny-dseg", "yolov9-tiny-dseg"])
def test_fusing_keeps_outputs(name):
    model = _tiny(name, nc=2 if name.startswith("yolov9") else 1).eval()
    randomize_statistics(model)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        prediction, (_, _, prototypes) = model(x)
        fused = deepcopy(model).fuse()
        fused_prediction, (_, _, fused_prototypes) = fused(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert (prediction - fused_prediction).abs().max() < 1e-3
    assert (prototypes - fused_prototypes).abs().max() < 1e-3
