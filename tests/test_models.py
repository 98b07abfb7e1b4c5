"""The YOLOv9 / GELAN family: exact upstream sizes, output layouts and YAML parsing."""
from __future__ import annotations

import gzip
import json
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from models.common import Conv, RepConvN
from models.config import CONFIG_DIR
from models.yolo import DDetect, DetectionModel, DualDDetect, Model, parse_activation
from tests.model_builders import randomize_statistics
from utils.errors import UserError
from utils.torch_utils import count_gflops

GOLDEN = Path(__file__).parent / "golden"

# Parameters of the training form at nc=80, as upstream YOLOv9 reports them.
PARAMS = {
    "gelan-t": 2_442_640, "gelan-s": 7_226_208, "gelan-m": 20_124_000, "gelan-c": 25_498_752,
    "gelan-e": 58_114_432, "yolov9-t": 3_717_680, "yolov9-s": 9_804_512, "yolov9-m": 32_878_432,
    "yolov9-c": 51_182_080, "yolov9-e": 69_529_664,
}

# After model.fuse(): parameters and GFLOPs at 640x640 as upstream's model_info prints them for
# the same configs (checked against upstream's own code; gelan-* are the reference numbers).
FUSED = {
    "gelan-t": (2_407_632, 9.8), "gelan-s": (7_105_888, 26.4), "gelan-m": (19_978_672, 76.3),
    "gelan-c": (25_288_768, 102.1), "gelan-e": (57_345_920, 189.0), "yolov9-t": (3_674_576, 16.2),
    "yolov9-s": (9_659_168, 39.1), "yolov9-m": (32_667_400, 131.3), "yolov9-c": (50_880_768, 237.6),
    "yolov9-e": (68_669_632, 241.4),
}
# Training-form GFLOPs at 640 (thop's count, which includes BatchNorm), as upstream prints them.
GFLOPS = {
    "gelan-t": 10.1, "gelan-s": 27.0, "gelan-m": 77.4, "gelan-c": 103.5, "gelan-e": 192.5,
    "yolov9-t": 16.5, "yolov9-s": 39.9, "yolov9-m": 133.0, "yolov9-c": 239.9, "yolov9-e": 245.5,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def models() -> dict[str, DetectionModel]:
    torch.manual_seed(0)
    return {name: DetectionModel(name) for name in PARAMS}


@pytest.mark.parametrize("name", list(PARAMS))
def test_training_form_matches_upstream_size(models, name):
    model = models[name]
    assert n_params(model) == PARAMS[name]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    assert model.nc == 80 and model.names == [str(i) for i in range(80)]
    head = model.model[-1]
    assert type(head) is (DualDDetect if name.startswith("yolov9") else DDetect)
    assert head.reg_max == 16 and head.no == 80 + 64 and head.nl == 3


def test_strides_are_measured_again_on_an_input_too_small_for_the_coarsest_level(models):
    """Strides come from a 64 px pass (upstream's 256 px gives the same). At 32 px the stride-32 level
    is 1 x 1, which BatchNorm refuses in training mode for one image: measured again at 256 px."""
    model = models["gelan-t"]
    assert model._measure_strides(3, 32).tolist() == model._measure_strides(3, 256).tolist() == [8.0, 16.0, 32.0]


@pytest.mark.parametrize("name", list(PARAMS))
def test_state_dict_matches_upstream_manifest(models, name):
    # tests/golden/*.json.gz: (key, shape) of upstream YOLOv9's own model, in upstream's order
    with gzip.open(GOLDEN / f"{name}.json.gz", "rt") as f:
        golden = list(json.load(f).items())
    ours = [(k, list(v.shape)) for k, v in models[name].state_dict().items()]
    assert ours == golden


@pytest.mark.parametrize("name", list(PARAMS))
def test_fused_size_and_gflops_match_upstream(models, name):
    model = models[name]
    assert round(count_gflops(model), 1) == GFLOPS[name]
    fused = deepcopy(model).eval().fuse()
    assert (n_params(fused), round(count_gflops(fused), 1)) == FUSED[name]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert all("conv" in m._modules and "conv1" not in m._modules for m in fused.modules() if isinstance(m, RepConvN))


@pytest.mark.parametrize("name", ["gelan-t", "gelan-s", "yolov9-t", "gelan-c"])
def test_fusing_keeps_outputs(name):
    torch.manual_seed(0)
    model = DetectionModel(name, nc=4).eval()
    randomize_statistics(model)
    x = torch.rand(2, 3, 128, 96)
    with torch.no_grad():
        before = model(x)[0]
        after = deepcopy(model).fuse()(x)[0]
    before, after = (before, after) if name.startswith("gelan") else (before[1], after[1])
    assert before.shape == after.shape
    assert (before - after).abs().max() < 1e-3


def test_every_bundled_config_is_tested():
    assert sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) == sorted(PARAMS)


def test_model_alias_and_nc_override():
    model = Model(CONFIG_DIR / "gelan-t.yaml", nc=3)
    assert model.nc == 3 and model.model[-1].nc == 3 and model.model[-1].cv3[0][-1].out_channels == 3
    assert model.yaml_file == "gelan-t.yaml"


def test_layers_carry_graph_attributes(models):
    model = models["yolov9-c"]
    for i, m in enumerate(model.model):
        assert m.i == i and hasattr(m, "f") and isinstance(m.np, int)
    assert model.model[0].type == "models.common.Silence"
    assert model.model[-1].type == "models.yolo.DualDDetect"
    assert all(isinstance(i, int) for i in model.save) and model.save == sorted(model.save)


def test_ddetect_output_layout():
    model = DetectionModel("gelan-t", nc=5).eval()
    x = torch.rand(2, 3, 128, 96)
    y, feats = model(x)
    anchors = (128 // 8) * (96 // 8) + (128 // 16) * (96 // 16) + (128 // 32) * (96 // 32)
    assert y.shape == (2, 4 + 5, anchors)
    assert [f.shape for f in feats] == [(2, 64 + 5, 128 // s, 96 // s) for s in (8, 16, 32)]
    scores = y[:, 4:]
    assert scores.min() >= 0 and scores.max() <= 1
    # boxes are xywh in input pixels: centres inside the image, positive sizes
    assert y[:, 0].max() <= 96 and y[:, 1].max() <= 128 and (y[:, 2:4] > 0).all()
    head = model.model[-1]
    head.export = True
    try:
        assert torch.equal(model(x), y)
    finally:
        head.export = False


def test_dual_ddetect_output_layout():
    model = DetectionModel("yolov9-t", nc=2)
    x = torch.rand(1, 3, 64, 64)
    d1, d2 = model(x)  # training: auxiliary then main feature lists
    assert [f.shape[1:] for f in d1] == [f.shape[1:] for f in d2] == [(66, 8, 8), (66, 4, 4), (66, 2, 2)]
    model.eval()
    (y1, y2), (f1, f2) = model(x)
    assert y1.shape == y2.shape == (1, 6, 64 + 16 + 4)
    assert not torch.equal(y1, y2)


def test_train_mode_ddetect_returns_level_list():
    model = DetectionModel("gelan-t", nc=1)
    out = model(torch.rand(1, 3, 64, 64))
    assert isinstance(out, list) and [o.shape for o in out] == [(1, 65, 8, 8), (1, 65, 4, 4), (1, 65, 2, 2)]


def test_upstream_yaml_spellings_parse_without_eval():
    # Upstream files quote 'nearest', pass None/nc as bare words and may set an activation.
    cfg = yaml.safe_load(
        """
        nc: 4
        depth_multiple: 1.0
        width_multiple: 0.5
        activation: nn.LeakyReLU(0.1)
        anchors: 3
        backbone:
          [[-1, 1, Conv, [32, 3, 2]],
           [-1, 1, Conv, [64, 3, 2]],
           [-1, 1, Conv, [64, 3, 2]],
           [-1, 1, RepNCSPELAN4, [64, 64, 32, 1]],
           [-1, 1, Conv, [64, 3, 2]],
           [-1, 1, Conv, [64, 3, 2]]]
        head:
          [[-1, 1, nn.Upsample, [None, 2, 'nearest']],
           [[-1, 4], 1, Concat, [1]],
           [-1, 1, Conv, [64, 3, 2]],
           [[3, 7, 8], 1, DDetect, [nc]]]
        """
    )
    model = DetectionModel(cfg)
    assert model.model[0].conv.out_channels == 16  # width_multiple 0.5
    assert isinstance(model.model[0].act, nn.LeakyReLU) and model.model[0].act.negative_slope == 0.1
    assert any(isinstance(m, RepConvN) and isinstance(m.act, nn.LeakyReLU) for m in model.modules())
    assert model.model[-1].nc == 4
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    # the activation applied only while that model was built
    assert isinstance(Conv.default_act, nn.SiLU) and isinstance(RepConvN.default_act, nn.SiLU)


@pytest.mark.parametrize("spec", ["os.system('x')", "nn.Conv2d(1, 1, 1)", "nn.ReLU(x)", "__import__('os')"])
def test_activation_rejects_anything_but_listed_literals(spec):
    with pytest.raises(UserError, match="activation"):
        parse_activation(spec)


def test_unknown_module_and_missing_config_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown module 'eval'"):
        DetectionModel({"nc": 1, "backbone": [[-1, 1, "eval", []]], "head": []})
    with pytest.raises(UserError, match="not found"):
        DetectionModel(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("just: text\n")
    with pytest.raises(UserError, match="bad.yaml: not a model config"):
        DetectionModel(bad)
