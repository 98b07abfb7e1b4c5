"""Whether a from-scratch FP32 training has converged, for the GPU studies.

A QAT - FP32 delta measures quantization only when the FP32 model has stopped improving: QAT's
extra epochs would otherwise train it further and show up as a gain. Both studies train with the
LR annealed to its final value before the last ``window`` of the epochs and held there
(``train.py --hold-lr``), then ask whether validation mAP50-95 is flat over that window.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

WINDOW = 0.2  # the share of the epochs, at the end, trained at the final LR and checked for flatness
TOLERANCE = 0.005  # mAP50-95 may rise by less than this across the window


def hold_epochs(epochs: int, window: float = WINDOW) -> int:
    """``--hold-lr`` for a run of ``epochs``: the window's epochs, leaving at least one to anneal."""
    return min(math.ceil(window * epochs), epochs - 1)


def convergence(map50_95: list[float], window: float = WINDOW, tolerance: float = TOLERANCE) -> dict:
    """Whether validation mAP50-95 is flat over the last ``window`` of the epochs: a least-squares
    line through them rises by less than ``tolerance`` across the window (a fall counts as flat)."""
    n = len(map50_95)
    k = int(np.ceil(window * n))
    if n < 10 or k < 3:
        return {"converged": False, "reason": f"{n} epochs: too few to judge", "epochs": n, "window_epochs": k}
    tail = np.asarray(map50_95[-k:], dtype=float)
    rise = float(np.polyfit(np.arange(k), tail, 1)[0] * (k - 1))
    return {"converged": rise < tolerance, "trend_rise": rise, "tolerance": tolerance, "epochs": n,
            "window_epochs": k, "window_mean": float(tail.mean()),
            "best_gain_in_window": float(tail.max() - max(map50_95[:-k]))}


def val_history(results_csv: Path, column: str = "metrics/mAP_0.5:0.95") -> list[float]:
    """One column of a training run's results.csv, epoch by epoch (segmentation runs name theirs
    with a ``(B)`` / ``(M)`` suffix)."""
    with open(results_csv, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]
