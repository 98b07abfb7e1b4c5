"""Evaluation figures as PNG files: precision-recall curves and the confusion matrix."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; training machines have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.evaluation.metrics import RECALL_POINTS, APResult, ConfusionMatrix  # noqa: E402

# Past this many classes per-class legends and tick labels become unreadable.
MAX_LABELLED_CLASSES = 21


def plot_pr_curve(ap: APResult, names: Sequence[str], path: str | Path) -> Path:
    """Precision against recall at IoU 0.5 for every class with ground truth, and their mean."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(9, 6), tight_layout=True)
    labelled = len(ap.classes) < MAX_LABELLED_CLASSES
    for c, curve, a in zip(ap.classes, ap.pr_curve, ap.ap[:, 0]):
        ax.plot(RECALL_POINTS, curve, linewidth=1, color="grey" if not labelled else None,
                label=f"{names[c]} {a:.3f}" if labelled else None)
    if len(ap.classes):
        ax.plot(RECALL_POINTS, ap.pr_curve.mean(0), linewidth=3, color="blue", label=f"all classes {ap.map50:.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall curve")
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return path


def plot_confusion_matrix(confusion: ConfusionMatrix, names: Sequence[str], path: str | Path,
                          normalize: bool = True) -> Path:
    """The matrix with rows = predicted class, columns = true class; columns sum to 1 when normalised."""
    path = Path(path)
    matrix = confusion.matrix.astype(np.float64)
    if normalize:
        matrix = matrix / (matrix.sum(0, keepdims=True) + 1e-9)
    matrix[matrix < 0.005] = np.nan  # blank cells read faster than a sea of zeros
    n = confusion.nc
    fig, ax = plt.subplots(figsize=(12, 9), tight_layout=True)
    image = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(image, ax=ax)
    if n < MAX_LABELLED_CLASSES:
        labels = list(names)[:n] + ["background"]
        ax.set_xticks(range(n + 1), labels, rotation=90)
        ax.set_yticks(range(n + 1), labels)
        for (i, j), v in np.ndenumerate(matrix):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion Matrix" + (" (normalised)" if normalize else ""))
    fig.savefig(path, dpi=200)
    plt.close(fig)
    return path
