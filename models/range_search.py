"""Activation-range searches over a histogram of |x| (bins of equal width starting at 0).

Our own implementations rather than Model Optimizer's ``calib.histogram`` helpers: its MSE search
passes ``num_bits`` where ``fake_tensor_quant`` expects ``bias`` (0.47), so every candidate is
scored against a wrong quantizer; its entropy search scores a candidate with no counts below it
as ``nan``, which ``argmin`` then *prefers*. Here such candidates are skipped, and the caller
caps every range at the exact max (the histogram range can be up to twice the max).
"""
from __future__ import annotations

import torch

START_BIN = 128  # first candidate: 128 levels of one bin each (TensorRT's KL search starts here)
LEVELS = 128  # |x| levels of a signed narrow-range INT8 quantizer


def candidates(n_bins: int, stride: int) -> torch.Tensor:
    """Upper bin indices (exclusive) of the candidate ranges, ``START_BIN..n_bins`` every ``stride``."""
    first = min(START_BIN, n_bins)
    out = torch.arange(first, n_bins + 1, max(1, stride))
    return out if out[-1] == n_bins else torch.cat([out, torch.tensor([n_bins])])


def percentile_amax(counts: torch.Tensor, width: float, percentile: float) -> float:
    """Upper edge of the bin where the cumulative count reaches ``percentile`` %."""
    cdf = counts.double().cumsum(0) / counts.sum()
    i = int(torch.searchsorted(cdf, torch.tensor([percentile / 100.0], dtype=torch.float64)).clamp(max=len(counts) - 1))
    return (i + 1) * width


def mse_amax(counts: torch.Tensor, width: float, stride: int) -> float:
    """Candidate range minimizing the count-weighted squared error of quantizing the bin centers."""
    counts = counts.double()
    centers = (torch.arange(len(counts), dtype=torch.float64) + 0.5) * width
    ends = candidates(len(counts), stride)
    amax = ends.double() * width
    step = (amax / (LEVELS - 1)).unsqueeze(1)
    q = (centers / step).round().clamp(max=LEVELS - 1) * step
    err = ((q - centers) ** 2 * counts).sum(1)
    return float(amax[int(err.argmin())])


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two count vectors (normalized here); ``inf`` where q misses mass of p."""
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    if bool((q[m] == 0).any()):
        return float("inf")
    return float((p[m] * (p[m] / q[m]).log()).sum())


def entropy_amax(counts: torch.Tensor, width: float, stride: int) -> float:
    """TensorRT's KL-divergence calibration: for each candidate range [0, i bins), the reference
    p is the histogram clipped there (outliers folded into its last bin) and q is the same bins
    quantized to 128 levels (each level's count spread over its non-empty bins); the range with
    the smallest KL(p || q) wins. Bin 0 takes bin 1's count, as TensorRT does, so the spike of
    near-zero values does not decide the range."""
    bins = counts.double().clone()
    if len(bins) > 1:
        bins[0] = bins[1]
    best, best_i = float("inf"), len(bins)
    for i in candidates(len(bins), stride).tolist():
        ref = bins[:i].clone()
        ref[-1] += bins[i:].sum()
        if ref.sum() == 0 or bins[:i].sum() == 0:
            continue
        level = torch.arange(i) * LEVELS // i
        nonzero = (bins[:i] > 0).double()
        per_level = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, level, bins[:i])
        filled = torch.zeros(LEVELS, dtype=torch.float64).index_add_(0, level, nonzero)
        q = per_level[level] / filled[level].clamp(min=1) * nonzero
        kl = _kl(ref, q)  # inf when the last bin is empty but receives outliers
        if kl <= best:  # ties (all inf included): the wider range clips less
            best, best_i = kl, i
    return best_i * width
