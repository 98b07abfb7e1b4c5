"""Evaluation figures as PNG files: precision-recall curves, the confusion matrix, validation images with masks."""
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


# One colour per class, cycled; strong enough to read through a 50 % blend.
_PALETTE = np.array([(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 178, 29), (207, 210, 49), (146, 204, 23),
                     (26, 147, 52), (0, 212, 187), (44, 153, 168), (52, 69, 147), (100, 115, 255), (0, 24, 236),
                     (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199), (255, 112, 31)],
                    dtype=np.uint8)  # RGB
MASK_ALPHA = 0.5
MIN_TILE = 320  # pixels on the longer side of each image in a mask plot


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, masks: np.ndarray,
                   captions: Sequence[str]) -> np.ndarray:
    """``image`` (H, W, 3) RGB with each instance's mask blended in and its box and caption drawn."""
    import cv2

    out = image.copy()
    for box, cls, mask, caption in zip(boxes, classes, masks, captions):
        colour = _PALETTE[int(cls) % len(_PALETTE)]
        out[mask] = (out[mask] * (1 - MASK_ALPHA) + colour * MASK_ALPHA).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), tuple(int(c) for c in colour), 1)
        cv2.putText(out, caption, (x1, max(y1 - 2, 8)), cv2.FONT_HERSHEY_SIMPLEX, 0.3, tuple(int(c) for c in colour), 1)
    return out


def plot_mask_samples(samples: Sequence, names: Sequence[str], path: str | Path, predictions: bool) -> Path:
    """A grid of validation images with their true (or, with ``predictions``, predicted) masks and boxes,
    as upstream's ``val_batch*_labels/pred`` images: ``samples`` are the evaluator's ``MaskSample``s.

    Small images are enlarged (nearest neighbour) to ``MIN_TILE`` pixels so that captions stay legible.
    """
    import cv2

    path = Path(path)
    tiles = []
    for s in samples:
        if predictions:
            boxes, classes, masks = s.detections[:, :4], s.detections[:, 5], s.detection_masks
            captions = [f"{names[int(c)]} {conf:.2f}" for conf, c in s.detections[:, 4:6]]
        else:
            boxes, classes, masks = s.labels[:, 1:5], s.labels[:, 0], s.label_masks
            captions = [names[int(c)] for c in classes]
        f = max(1, MIN_TILE // max(s.image.shape[:2]))
        image = s.image.repeat(f, 0).repeat(f, 1)
        masks = masks.repeat(f, 1).repeat(f, 2) if len(masks) else np.zeros((0, *image.shape[:2]), bool)
        tiles.append(draw_instances(image, boxes * f, classes, masks, captions))
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)  # rect batches differ in shape
    cols = int(np.ceil(np.sqrt(len(tiles))))
    grid = np.full((int(np.ceil(len(tiles) / cols)) * h, cols * w, 3), 255, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * h:r * h + tile.shape[0], c * w:c * w + tile.shape[1]] = tile
    cv2.imwrite(str(path), grid[..., ::-1])
    return path
