"""A CI slice of the export-conformance matrix (bench/bench_conformance.py runs all of it): the
smallest config of each detection family and gelan-c-seg's layout at test width (masks; the shipped
segmentation configs run in the bench), every export variant, through the bench's own case function.
One trace per model keeps it fast; across the three models the traces cover one, two and 80 classes,
both batch modes and both input shapes (gelan-t nc=1 dynamic non-square, yolov9-t nc=80 dynamic
square, gelan-tiny-seg nc=2 static non-square). Quantizing and tracing a full-width model is a
minute or more on 2 CPU cores, so the slice holds the edges, not the matrix: gelan-t with 80 classes
and yolov9-t with one class run in the bench (the nc=1 normalization of the dual head too: every
yolov9-* nc1 case there)."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import conformance as cf
from tests.export_helpers import CONFORMANCE_SLICE as SLICE
from tests.export_helpers import SLICE_SEGMENT_CFG


@pytest.fixture()
def traced(conformance_model):
    """(model, trace) of a slice model, shared for the session (tests/conftest.py)."""
    return lambda cfg, nc: conformance_model(cfg, nc, *SLICE[cfg, nc])


@pytest.mark.parametrize("variant", cf.VARIANTS)
@pytest.mark.parametrize("cfg, nc", list(SLICE), ids=[f"{Path(cfg).name}-{nc}" for cfg, nc in SLICE])
def test_conformance_case(traced, cfg, nc, variant, tmp_path):
    model, pred = traced(cfg, nc)
    case = cf.Case(cfg, nc, variant, *SLICE[cfg, nc])
    result = cf.run_case(model, pred, case, tmp_path)
    assert result.passed, f"{case.name}: {result.problems}"
    if variant != "topk":
        assert result.box_err is not None and result.score_err is not None
    assert (result.mask_err is not None) == (cfg == SLICE_SEGMENT_CFG)
    # Model Optimizer writes a one-output-channel weight's range unrunnably (the class convs when nc=1:
    # Q and DQ at each of the 3 levels); every other Q/DQ it writes is already canonical
    assert pred.normalized_qdq == (6 if nc == 1 else 0)


def test_a_broken_plugin_node_and_a_wrong_detection_are_caught(traced, tmp_path):
    """The case checks can fail: a plugin attribute of the wrong type and a missing detection."""
    import onnx
    import torch
    from onnx import helper

    model, pred = traced("yolov9-t", 80)
    cf.run_case(model, pred, cf.Case("yolov9-t", 80, "nms", *SLICE["yolov9-t", 80]), tmp_path)
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


def test_matrix_summary_lists_failures_and_renders_into_benchmarks(tmp_path):
    """The bench's bookkeeping: counts by config / nc / variant, failures named, the report section."""
    from bench import bench_conformance, report

    cases = [cf.Case("gelan-t", nc, v, b, s) for nc in (1, 80) for b in cf.BATCH_MODES for s in cf.SHAPES
             for v in cf.VARIANTS]
    results = [cf.CaseResult(c, [] if i else ["lint: 1 finding(s)"], 0.01 * i, 0.001).to_dict()
               for i, c in enumerate(cases)]
    summary = bench_conformance.summarize(results, cases)
    assert summary["cases"] == 24 and summary["failures"] == 1
    assert summary["failed_cases"][0]["case"] == cases[0].name
    assert summary["by_config_nc_variant"]["gelan-t"]["1"]["raw"] == {"passed": 3, "failed": 1}
    table = bench_conformance.to_markdown(summary)
    assert "| gelan-t | 3/4 | 4/4 | 4/4 | 4/4 | 4/4 | 4/4 |" in table and "24 cases, 1 failed" in table
    records = [{"name": "conformance_cases_total", "value": 24, "model": "m", "dataset": "d", "command": "c",
                "machine": "x", "date": "today", "extra": {"by_config_nc_variant": summary["by_config_nc_variant"]}},
               {"name": "conformance_failures_total", "value": 1, "extra": {
                   "failed_cases": [cases[0].name], "error_distribution": summary["error_distribution"]}}]
    section = report.render_conformance(records)
    assert "**24 cases, 1 failed** (gelan-t-nc1-raw-static-square)" in section and table.split("\n\n")[0] in section


def test_mask_checks_catch_a_wrong_prototype_scale_and_a_wrong_mask_row():
    """The segmentation checks can fail: prototypes at twice their scale, and a det_masks row taken
    from another anchor."""
    import torch

    from utils.deployment.onnx_export import tail_for

    g = torch.Generator().manual_seed(0)
    nc, nm, anchors, hw = 2, 4, 12, (16, 24)
    boxes = torch.cat((torch.rand(1, 2, anchors, generator=g) * torch.tensor([[24.0], [16.0]]),
                       4 + 6 * torch.rand(1, 2, anchors, generator=g)), 1)
    pred = torch.cat((boxes, torch.rand(1, nc, anchors, generator=g), torch.randn(1, nm, anchors, generator=g)), 1)
    proto = 2 * torch.randn(1, nm, 4, 6, generator=g)
    ref = cf.Reference(pred, proto, nc, hw)
    result = cf.CaseResult(cf.Case("gelan-c-seg", nc, "raw", "static", "square"))
    assert cf._anchor_mask_problems(result, pred, proto, ref) == [] and result.mask_err == 0.0
    assert cf._anchor_mask_problems(result, pred, 2 * proto, ref)
    outs = list(tail_for("topk", anchors, 5, 0.45, 0.2, (nm, hw))(pred, proto))
    assert int(outs[0]) == 5 and cf._assembly_problems(outs, pred, proto, ref) == []
    outs[4] = outs[4][:, [1, 0, 2, 3, 4]]  # rows 0 and 1 swapped: each mask belongs to the other box
    assert cf._assembly_problems(outs, pred, proto, ref)
