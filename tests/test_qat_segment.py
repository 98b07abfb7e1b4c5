"""QAT on segmentation models: distillation reaches the mask coefficients and prototypes."""
from __future__ import annotations

from copy import deepcopy

import pytest
import torch

from models.quantize import calibrate, prepare, set_trainable
from models.yolo import Model
from tests.qat_helpers import one_thread
from utils.paths import ROOT
from utils.quantization.distill import FeatureDistillation, mask_outputs, supervised_layers

ASSETS = ROOT / "tests" / "assets"
IMGSZ = 64


@pytest.mark.parametrize("cfg,sites", [
    ("gelan-tiny-seg", ["model.22.cv4.0", "model.22.cv4.1", "model.22.cv4.2", "model.22.proto"]),
    ("yolov9-tiny-dseg", ["model.35.cv6.0", "model.35.cv6.1", "model.35.cv6.2", "model.35.proto",
                          "model.35.cv7.0", "model.35.cv7.1", "model.35.cv7.2", "model.35.proto2"]),
])
def test_distillation_supervises_mask_coefficients_and_prototypes(cfg, sites):
    """Every branch's coefficient towers and prototype layer are distilled, and their error's gradient
    reaches the quantized prototype convolutions; a detector gets no mask sites."""
    with one_thread():
        torch.manual_seed(0)
        fp = Model(ASSETS / f"{cfg}.yaml", nc=2).fuse().eval()
        q = set_trainable(prepare(deepcopy(fp)))
        x = torch.rand(2, 3, IMGSZ, IMGSZ)
        calibrate(q, [x])
        assert mask_outputs(q) == sites
        distill = FeatureDistillation(q, fp, supervised_layers(len(q.model), 1))
        assert distill.sites[-len(sites):] == sites and len(distill.teacher.model) == len(fp.model)
        q.train()
        preds = q(x)
        term = distill(x, preds, None)
        proto = q.get_submodule(sites[3])
        conv = (proto.cv3 if hasattr(proto, "cv3") else proto).conv
        term.backward()
        distill.remove()
    assert 0 < float(term.detach()) < 1e-1
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
    assert mask_outputs(Model(ASSETS / "gelan-tiny.yaml", nc=2)) == []
