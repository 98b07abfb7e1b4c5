"""Activation-range searches over histograms of |x| (bins of equal width starting at 0).

Our own implementations rather than Model Optimizer's ``calib.histogram`` helpers: its MSE search
passes ``num_bits`` where ``fake_tensor_quant`` expects ``bias`` (0.47), so every candidate is
scored against a wrong quantizer; its entropy search scores a candidate with no counts below it
as ``nan``, which ``argmin`` then *prefers*. Here such candidates are skipped, and the caller
caps every range at the exact max (the histogram range can be up to twice the max).

Every search takes a batch of histograms, ``counts`` (Q, B) with bin widths ``width`` (Q,), and
scores all candidates of all of them with a few tensor operations on the histograms' device:
a model's few hundred quantizers are calibrated in one call, not in a Python loop per candidate.
Counts are whole numbers, so every sum of them is exact whatever the order of summation.
"""
from __future__ import annotations

import torch

START_BIN = 128  # first candidate: 128 levels of one bin each (TensorRT's KL search starts here)
LEVELS = 128  # |x| levels of a signed narrow-range INT8 quantizer
CHUNK_ELEMENTS = 1 << 21  # (histograms x candidates x bins) scored at once: 16 MB per float64 temporary


def candidates(n_bins: int, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Upper bin indices (exclusive) of the candidate ranges, ``START_BIN..n_bins`` every ``stride``."""
    first = min(START_BIN, n_bins)
    out = torch.arange(first, n_bins + 1, max(1, stride), device=device)
    return out if out[-1] == n_bins else torch.cat([out, torch.tensor([n_bins], device=device)])


def _chunks(q: int, per_histogram: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(per_histogram, 1))
    return [slice(i, i + step) for i in range(0, q, step)]


def percentile_amax(counts: torch.Tensor, width: torch.Tensor, percentile: float) -> torch.Tensor:
    """Per histogram, the upper edge of the bin where the cumulative count reaches ``percentile`` %."""
    counts = counts.double()
    cdf = counts.cumsum(1) / counts.sum(1, keepdim=True)
    target = torch.full((len(counts), 1), percentile / 100.0, dtype=torch.float64, device=counts.device)
    i = torch.searchsorted(cdf, target).squeeze(1).clamp(max=counts.shape[1] - 1)
    return (i + 1).double() * width.double()


def mse_amax(counts: torch.Tensor, width: torch.Tensor, stride: int) -> torch.Tensor:
    """Per histogram, the candidate range minimizing the count-weighted squared error of quantizing
    the bin centers."""
    counts, width = counts.double(), width.double()
    n_bins = counts.shape[1]
    ends = candidates(n_bins, stride, counts.device).double()
    out = torch.empty(len(counts), dtype=torch.float64, device=counts.device)
    for rows in _chunks(len(counts), len(ends) * n_bins):
        w = width[rows, None, None]
        centers = (torch.arange(n_bins, dtype=torch.float64, device=counts.device) + 0.5) * w  # (q, 1, B)
        amax = ends[:, None] * w  # (q, C, 1)
        step = amax / (LEVELS - 1)
        q = (centers / step).round().clamp(max=LEVELS - 1) * step
        err = ((q - centers) ** 2 * counts[rows, None, :]).sum(2)
        out[rows] = amax.squeeze(2).gather(1, err.argmin(1, keepdim=True)).squeeze(1)
    return out


def entropy_amax(counts: torch.Tensor, width: torch.Tensor, stride: int) -> torch.Tensor:
    """TensorRT's KL-divergence calibration, per histogram: for each candidate range [0, i bins),
    the reference p is the histogram clipped there (outliers folded into its last bin) and q is the
    same bins quantized to 128 levels (each level's count spread over its non-empty bins); the range
    with the smallest KL(p || q) wins, the widest among equals (it clips least). Bin 0 takes bin 1's
    count, as TensorRT does, so the spike of near-zero values does not decide the range. A candidate
    with no counts below its end is skipped; one where q misses mass of p scores infinity."""
    bins = counts.double().clone()
    if bins.shape[1] > 1:
        bins[:, 0] = bins[:, 1]
    n_bins, device = bins.shape[1], bins.device
    ends = candidates(n_bins, stride, device)  # (C,)
    j = torch.arange(n_bins, device=device)
    below = j[None, :] < ends[:, None]  # (C, B): the bins a candidate keeps
    last = ends[:, None] - 1 == j[None, :]  # (C, B): its last bin, which takes the outliers
    level = torch.where(below, j[None, :] * LEVELS // ends[:, None], 0)  # (C, B) quantization level of each bin
    cumulative = bins.cumsum(1)
    total = cumulative[:, -1:]
    out = torch.empty(len(bins), dtype=torch.float64, device=device)
    for rows in _chunks(len(bins), len(ends) * n_bins):
        b = bins[rows, None, :] * below  # (q, C, B)
        kept = cumulative[rows][:, ends - 1]  # (q, C): counts below each end
        p = b + last * (total[rows] - kept)[:, :, None]
        nonzero = (b > 0).double()
        index = level.expand_as(b).contiguous()
        per_level = torch.zeros(*b.shape[:2], LEVELS, dtype=torch.float64, device=device).scatter_add_(2, index, b)
        filled = torch.zeros_like(per_level).scatter_add_(2, index, nonzero)
        q = per_level.gather(2, index) / filled.gather(2, index).clamp(min=1) * nonzero
        p = p / p.sum(2, keepdim=True)
        q = q / q.sum(2, keepdim=True)
        mass = p > 0
        terms = torch.where(mass, p * (p / q).log(), 0.0)
        kl = torch.where((mass & (q == 0)).any(2), torch.inf, terms.sum(2))
        kl = torch.where(kept > 0, kl, torch.nan)  # nothing below the end: not a candidate
        # the widest of the smallest: argmin over the candidates in reverse order
        scored = torch.where(kl.isnan(), torch.inf, kl).flip(1)
        pick = len(ends) - 1 - scored.argmin(1)
        skipped = kl.isnan().all(1)
        chosen = torch.where(skipped, n_bins, ends[pick])
        out[rows] = chosen.double() * width[rows].double()
    return out
