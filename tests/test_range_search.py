"""Calibration statistics and range searches: batched over quantizers, on the device, without host reads.

The searches are checked against straightforward per-histogram loops (the reference semantics:
TensorRT's KL search, MSE over bin centers, a percentile of the counts).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from models.quant_modules import MAX_SEARCH_STEPS, RangeCalibrator
from models.range_search import LEVELS, candidates, entropy_amax, mse_amax, percentile_amax

BINS, STRIDE = RangeCalibrator.NUM_BINS, RangeCalibrator.NUM_BINS // MAX_SEARCH_STEPS


def reference_percentile(counts: torch.Tensor, width: float, percentile: float) -> float:
    cdf = counts.cumsum(0) / counts.sum()
    i = next((k for k, c in enumerate(cdf.tolist()) if c >= percentile / 100), len(counts) - 1)
    return (i + 1) * width


def reference_mse(counts: torch.Tensor, width: float) -> float:
    best, best_amax = math.inf, 0.0
    centers = (torch.arange(len(counts), dtype=torch.float64) + 0.5) * width
    for end in candidates(len(counts), STRIDE).tolist():
        step = end * width / (LEVELS - 1)
        err = float((((centers / step).round().clamp(max=LEVELS - 1) * step - centers) ** 2 * counts).sum())
        if err < best:
            best, best_amax = err, end * width
    return best_amax


def reference_entropy(counts: torch.Tensor, width: float) -> float:
    bins = counts.clone()
    bins[0] = bins[1]
    best, best_end = math.inf, len(bins)
    for end in candidates(len(bins), STRIDE).tolist():
        if bins[:end].sum() == 0:
            continue
        p = bins[:end].clone()
        p[-1] += bins[end:].sum()
        level = torch.arange(end) * LEVELS // end
        nonzero = (bins[:end] > 0).double()
        per_level = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, level, bins[:end])
        filled = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, level, nonzero)
        q = per_level[level] / filled[level].clamp(min=1) * nonzero
        p, q = p / p.sum(), q / q.sum()
        mass = p > 0
        kl = math.inf if bool((q[mass] == 0).any()) else float((p[mass] * (p[mass] / q[mass]).log()).sum())
        if kl <= best:
            best, best_end = kl, end
    return best_end * width


def histograms() -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms of |x| a calibrator meets: SiLU-like, heavy tails, images, empty tails, a spike at 0."""
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(20000, generator=g).abs(),
               torch.distributions.StudentT(3.0).sample((20000,)).abs(),
               nn.functional.silu(torch.randn(20000, generator=g) * 3).abs(),
               (torch.rand(20000, generator=g) * 255).round() / 255,
               torch.cat([torch.zeros(15000), torch.rand(5000, generator=g)])]
    counts, widths = [], []
    for k, x in enumerate(samples):
        for reach in (1.0, 1.7, 4.0):  # the histogram range may exceed the max, leaving an empty tail
            top = float(x.max()) * reach
            counts.append(torch.histc(x, bins=BINS, min=0, max=top).double())
            widths.append(top / BINS)
    return torch.stack(counts), torch.tensor(widths, dtype=torch.float64)


def test_batched_searches_equal_the_per_histogram_reference():
    counts, widths = histograms()
    found = {"percentile": percentile_amax(counts, widths, 99.99), "mse": mse_amax(counts, widths, STRIDE),
             "entropy": entropy_amax(counts, widths, STRIDE)}
    for i, (c, w) in enumerate(zip(counts, widths.tolist())):
        assert float(found["percentile"][i]) == pytest.approx(reference_percentile(c, w, 99.99), rel=1e-12), i
        assert float(found["mse"][i]) == pytest.approx(reference_mse(c, w), rel=1e-12), i
        assert float(found["entropy"][i]) == pytest.approx(reference_entropy(c, w), rel=1e-12), i


def test_histograms_without_a_usable_candidate_keep_the_whole_range():
    counts = torch.zeros(2, BINS, dtype=torch.float64)
    counts[0, -1] = 5.0  # every count in the last bin: only the widest candidate sees any
    widths = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert entropy_amax(counts, widths, STRIDE).tolist() == [BINS * 0.5, BINS * 0.5]
    assert [reference_entropy(c, 0.5) for c in counts] == [BINS * 0.5, BINS * 0.5]


class _NoHostReads(TorchFunctionMode):
    """Fails on any read of a tensor's value into Python: on a GPU each one waits for the queue to drain."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
             torch.Tensor.__int__, torch.Tensor.__index__}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            raise AssertionError(f"host read {func.__name__} during calibration")
        return func(*args, **(kwargs or {}))


def test_collecting_never_reads_values_back_and_merges_bins_exactly():
    g = torch.Generator().manual_seed(2)
    small, large = torch.rand(1000, generator=g), torch.rand(1000, generator=g) * 3.0
    small[0], large[0] = 1.0, 3.0  # the range starts at 1 and grows to 4: each new bin is 4 old ones
    cal = RangeCalibrator()
    with _NoHostReads():
        for x in (torch.zeros(100), small, -large):
            cal.collect(x)
    assert float(cal._range) == 4.0 and float(cal._max) == 3.0
    first = torch.histc(small, BINS, 0, 1).double()  # binned while the range was 1, then merged 4 to 1
    merged = torch.zeros(BINS, dtype=torch.float64).index_add_(0, torch.arange(BINS) // 4, first)
    expected = merged + torch.histc(large, BINS, 0, 4).double()
    assert torch.equal(cal._counts, expected)  # the all-zero first batch counted nothing, as before any range
    huge = RangeCalibrator()
    for x in (small, small * 1e5):  # grew past 2**11-fold: old counts all fall in bin 0 of a range at the max
        huge.collect(x)
    assert float(huge._range) == float(huge._max) and float(huge._counts[0]) >= 1000


def test_all_quantizers_are_searched_in_one_call_with_the_same_result_as_one_by_one():
    g = torch.Generator().manual_seed(1)
    cals = [RangeCalibrator() for _ in range(5)]
    for k, cal in enumerate(cals):
        for scale in (1.0, 3.0):
            cal.collect(torch.randn(5000, generator=g) * scale * (k + 1))
    idle = RangeCalibrator()  # saw no data
    for method in ("max", "percentile", "mse", "entropy"):
        together = RangeCalibrator.compute_amaxes([*cals, idle], method, percentile=99.9)
        assert together[-1] is None
        for cal, amax in zip(cals, together):
            assert torch.equal(amax, cal.compute_amax(method, percentile=99.9))
            assert 0 < float(amax) <= float(cal._max)
