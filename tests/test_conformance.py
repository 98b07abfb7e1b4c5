"""A CI slice of the export-conformance matrix (bench/bench_conformance.py runs all of it): the two
smallest configs of each family, one and 80 classes, every export variant, through the bench's own
case function. One trace per model keeps it fast; across the four models the traces cover both
batch modes and both input shapes."""
from __future__ import annotations

import pytest

from bench import conformance as cf

# (config, nc) -> the one (batch mode, shape) traced for it
SLICE = {("gelan-t", 1): ("dynamic", "non-square"), ("gelan-t", 80): ("static", "square"),
         ("yolov9-t", 1): ("static", "non-square"), ("yolov9-t", 80): ("dynamic", "square")}


@pytest.fixture(scope="module")
def traced():
    """Each slice model quantized and traced once, built on first use."""
    cache = {}

    def get(cfg: str, nc: int):
        if (cfg, nc) not in cache:
            model = cf.quantized_model(cfg, nc)
            cache[cfg, nc] = model, cf.trace(model, *SLICE[cfg, nc])
        return cache[cfg, nc]

    return get


@pytest.mark.parametrize("variant", cf.VARIANTS)
@pytest.mark.parametrize("cfg, nc", list(SLICE))
def test_conformance_case(traced, cfg, nc, variant, tmp_path):
    model, pred = traced(cfg, nc)
    case = cf.Case(cfg, nc, variant, *SLICE[cfg, nc])
    result = cf.run_case(model, pred, case, tmp_path)
    assert result.passed, f"{case.name}: {result.problems}"
    if variant != "topk":
        assert result.box_err is not None and result.score_err is not None


def test_a_broken_plugin_node_and_a_wrong_detection_are_caught(traced, tmp_path):
    """The case checks can fail: a plugin attribute of the wrong type and a missing detection."""
    import onnx
    import torch
    from onnx import helper

    model, pred = traced("gelan-t", 80)
    cf.run_case(model, pred, cf.Case("gelan-t", 80, "nms", *SLICE["gelan-t", 80]), tmp_path)
    graph = onnx.load(str(next(tmp_path.glob("*-nms-*.onnx"))))
    plugin = next(n for n in graph.graph.node if n.op_type == "EfficientNMS_TRT")
    for i, a in enumerate(plugin.attribute):
        if a.name == "max_output_boxes":
            plugin.attribute[i].CopyFrom(helper.make_attribute("max_output_boxes", 30.0))
    problems = cf.plugin_problems(graph, cf.load_contract(), 80)
    assert any("max_output_boxes" in p and "int32" in p for p in problems), problems
    assert cf.plugin_problems(graph, cf.load_contract(), 3)  # scores do not have 3 classes

    ref = torch.zeros(4 + 2, 3)
    ref[:4] = torch.tensor([[10.0, 20, 30], [10, 20, 30], [4, 4, 4], [4, 4, 4]])
    ref[4:] = torch.tensor([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3]])
    full = torch.tensor([[8.0, 8, 12, 12, 0.9, 0], [18, 18, 22, 22, 0.8, 1], [28, 28, 32, 32, 0.6, 0]])
    assert cf.topk_set_problems(full, full, ref, k=3) == []
    assert cf.topk_set_problems(full[:2], full, ref, k=3)  # a confident detection missing
    wrong_class = full.clone()
    wrong_class[0, 5] = 1
    assert cf.topk_set_problems(wrong_class, full, ref, k=3)
