"""bench/layout_census.py counts what reaches an op in another layout, on a tiny config."""
from __future__ import annotations

from bench.layout_census import census
from tests.qat_helpers import one_thread
from utils.paths import ROOT


def test_census_of_a_tiny_qat_step():
    with one_thread():
        counts = census(str(ROOT / "tests" / "assets" / "gelan-tiny.yaml"), imgsz=32, nc=1)
    backward, forward = counts["qat_backward"], counts["teacher_forward"]
    assert backward["aten.where calls"] > 0 and 0 < backward["aten.where mixed"] < backward["aten.where calls"]
    assert 0 <= backward["aten.add.Tensor mixed"] <= backward["aten.add.Tensor calls"]
    assert 0 < forward["aten.convolution strided"] < forward["aten.convolution calls"]  # chunk's slices
