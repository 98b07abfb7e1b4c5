"""The evaluation loop: letterboxed batches -> model -> postprocess -> original-image boxes -> metrics.

val.py, train.py and qat.py all evaluate through ``evaluate`` and get an ``EvalResult`` value
back, so a number printed by one is the number another one selects on.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.boxes import scale_boxes, xywh2xyxy
from utils.evaluation.metrics import COCO_MAX_DETS, APResult, ConfusionMatrix, DetectionStats, PerImageStats, fitness
from utils.evaluation.postprocess import postprocess as run_postprocess

TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")


@dataclass
class EvalResult:
    """What one evaluation found; ``per_class`` rows cover the classes that have ground truth."""

    map50: float
    map50_95: float
    precision: float
    recall: float
    per_class: list[dict]
    loss: tuple | None
    speed_ms: dict
    images: int
    instances: int
    coco: dict | None = None  # the reference tool's figures, when val ran it (--save-json)

    @property
    def fitness(self) -> float:
        """The score best.pt and QAT epochs are chosen by: 0.1 * mAP50 + 0.9 * mAP50-95."""
        return float(fitness(np.array([self.precision, self.recall, self.map50, self.map50_95])))

    def to_dict(self) -> dict:
        return {**asdict(self), "fitness": self.fitness}

    def table(self, per_class: bool = True) -> str:
        """The upstream console table: an 'all' row, then one row per class."""
        rows = [("%22s" + "%11s" * 6) % TABLE_HEADER,
                _row("all", self.images, self.instances, self.precision, self.recall, self.map50, self.map50_95)]
        if per_class:
            rows += [_row(c["name"], c["images"], c["instances"], c["precision"], c["recall"], c["map50"],
                          c["map50_95"]) for c in self.per_class]
        return "\n".join(rows)

    def markdown(self) -> str:
        """The same table as markdown, plus speed (and the COCO tool's figures when present)."""
        lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
        entries = [("all", self.images, self.instances, self.precision, self.recall, self.map50, self.map50_95)]
        entries += [(c["name"], c["images"], c["instances"], c["precision"], c["recall"], c["map50"], c["map50_95"])
                    for c in self.per_class]
        lines += [f"| {n} | {i} | {k} | {p:.4f} | {r:.4f} | {a:.4f} | {b:.4f} |" for n, i, k, p, r, a, b in entries]
        speed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.speed_ms.items())
        lines += ["", f"Speed per image: {speed}", f"Fitness (0.1 mAP50 + 0.9 mAP50-95): {self.fitness:.4f}"]
        if self.coco:
            lines.append(f"COCO tool ({self.coco['backend']}): mAP50-95 {self.coco['map50_95']:.4f}, "
                         f"mAP50 {self.coco['map50']:.4f}")
        return "\n".join(lines) + "\n"


def _row(name, images, instances, p, r, map50, map50_95) -> str:
    return ("%22s" + "%11i" * 2 + "%11.3g" * 4) % (name, images, instances, p, r, map50, map50_95)


@dataclass
class EvalArtifacts:
    """By-products for plots, COCO JSON and bootstrap intervals; boxes are kept only when asked for."""

    ap: APResult
    confusion: ConfusionMatrix
    per_image: PerImageStats | None = None  # the matches image by image (utils.evaluation.bootstrap)
    files: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # original (h, w)
    detections: list[np.ndarray] = field(default_factory=list)  # (n, 6), original pixels
    labels: list[np.ndarray] = field(default_factory=list)      # (m, 5) [cls, x1, y1, x2, y2]


class _Stopwatch:
    """Accumulated wall time of a code block; waits for queued GPU work so the time is real."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds += time.perf_counter() - self._start

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def _labels_in_original_pixels(targets: torch.Tensor, index: int, input_hw, shape) -> torch.Tensor:
    """(m, 5) [cls, x1, y1, x2, y2] of one image, from the batch's normalised letterbox labels."""
    lab = targets[targets[:, 0] == index, 1:].float()
    h, w = input_hw
    boxes = xywh2xyxy(lab[:, 1:5] * torch.tensor((w, h, w, h), dtype=lab.dtype))
    scale_boxes(input_hw, boxes, shape[0], shape[1])
    return torch.cat((lab[:, :1], boxes), 1)


def _train_outputs(output):
    """The raw feature maps a loss needs, present when an eval-mode head returns (inference, train)."""
    return output[1] if isinstance(output, tuple) and len(output) == 2 else None


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: Iterable, names: Sequence[str], device: torch.device | None = None,
             half: bool = False, conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300,
             postprocess: str = "nms", single_cls: bool = False, compute_loss=None,
             coco_max_dets: int | None = COCO_MAX_DETS, keep_boxes: bool = False,
             desc: str = "") -> tuple[EvalResult, EvalArtifacts]:
    """Evaluate ``model`` (already in eval mode, on ``device``) over ``dataloader``.

    Batches are upstream's (uint8 images, [batch_idx, cls, x, y, w, h] targets, paths, shapes).
    Boxes are compared in original image pixels, as COCO ground truth is. ``coco_max_dets``
    applies COCOeval's per-image-per-class limit (None: count every detection, like upstream).
    """
    device = device or next(model.parameters()).device
    nc = 1 if single_cls else len(names)
    confusion = ConfusionMatrix(nc)
    artifacts_boxes: dict[str, list] = {"files": [], "shapes": [], "detections": [], "labels": []}
    stats, images_with = DetectionStats(max_dets_per_class=coco_max_dets), np.zeros(nc, dtype=np.int64)
    watches = {k: _Stopwatch(device) for k in ("pre", "inference", "nms")}
    loss, seen, batches = None, 0, 0
    header = desc or ("%22s" + "%11s" * 6) % TABLE_HEADER
    for imgs, targets, paths, shapes in tqdm(dataloader, desc=header, leave=False):
        with watches["pre"]:
            imgs = imgs.to(device, non_blocking=True)
            imgs = (imgs.half() if half else imgs.float()) / 255
        with watches["inference"]:
            output = model(imgs)
        if compute_loss is not None and _train_outputs(output) is not None:
            items = compute_loss(_train_outputs(output), targets.to(device))[1].detach().float().cpu()
            loss = items if loss is None else loss + items
        with watches["nms"]:
            preds = run_postprocess(output, postprocess, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det,
                                    agnostic=single_cls, multi_label=True)
        batches += 1
        targets = targets.cpu()
        if single_cls:
            targets[:, 1] = 0
        input_hw = tuple(imgs.shape[2:])
        for si, pred in enumerate(preds):
            seen += 1
            labels = _labels_in_original_pixels(targets, si, input_hw, shapes[si])
            pred = pred.detach().float().cpu().clone()
            if single_cls:
                pred[:, 5] = 0
            scale_boxes(input_hw, pred[:, :4], shapes[si][0], shapes[si][1])
            if keep_boxes:
                artifacts_boxes["files"].append(str(paths[si]))
                artifacts_boxes["shapes"].append(tuple(int(s) for s in shapes[si][0]))
                artifacts_boxes["detections"].append(pred.numpy())
                artifacts_boxes["labels"].append(labels.numpy())
            stats.add(pred, labels, image=paths[si])
            images_with[np.unique(labels[:, 0].numpy().astype(int))] += 1
            confusion.process_batch(pred, labels)
    ap = stats.compute()
    per_class = [{"class": int(c), "name": str(names[c]) if not single_cls else "all-classes",
                  "images": int(images_with[c]), "instances": int(n), "precision": float(p), "recall": float(r),
                  "map50": float(a[0]), "map50_95": float(a.mean())}
                 for c, n, p, r, a in zip(ap.classes, ap.n_targets, ap.precision, ap.recall, ap.ap)]
    result = EvalResult(map50=ap.map50, map50_95=ap.map50_95, precision=ap.mp, recall=ap.mr, per_class=per_class,
                        loss=tuple((loss / max(batches, 1)).tolist()) if loss is not None else None,
                        speed_ms={k: w.seconds / max(seen, 1) * 1e3 for k, w in watches.items()},
                        images=seen, instances=int(ap.n_targets.sum()))
    return result, EvalArtifacts(ap, confusion, stats.per_image(), **artifacts_boxes)
