"""The evaluation loop: letterboxed batches -> model -> postprocess -> original-image boxes -> metrics.

val.py, train.py and qat.py all evaluate through ``evaluate`` and get an ``EvalResult`` value
back, so a number printed by one is the number another one selects on.

The task follows from the model's output: a segmentation head's output (``masks.segmentation_output``)
on a segmentation dataloader's batches adds mask metrics, computed on the same detections with mask
IoU in original-image pixels (``utils.evaluation.masks``); the box metrics are the same either way.
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
from utils.data.polygons import rasterize
from utils.errors import UserError
from utils.evaluation.masks import (
    ground_truth_masks,
    mask_iou,
    mask_probabilities,
    masks_at_input,
    masks_in_original,
    polygons_in_original,
    segmentation_output,
)
from utils.evaluation.metrics import COCO_MAX_DETS, APResult, ConfusionMatrix, DetectionStats, PerImageStats, fitness
from utils.evaluation.postprocess import postprocess as run_postprocess

TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
MASK_TABLE_HEADER = ("Class", "Images", "Instances", "Box(P", "R", "mAP50", "mAP50-95)", "Mask(P", "R", "mAP50",
                     "mAP50-95)")
METRIC_KEYS = ("precision", "recall", "map50", "map50_95")
PLOTTED_IMAGES = 16  # validation images drawn with their masks (mask_predictions.png / mask_labels.png)
PLOT_CONF = 0.25  # detections drawn on those images: the usual deployment threshold, not mAP's 0.001


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
    # Segmentation: the same four metrics for masks ({'precision', 'recall', 'map50', 'map50_95'});
    # per_class rows then also hold 'mask_precision', 'mask_recall', 'mask_map50', 'mask_map50_95'.
    mask: dict | None = None

    @property
    def fitness(self) -> float:
        """The score best.pt and QAT epochs are chosen by: 0.1 * mAP50 + 0.9 * mAP50-95, of boxes plus,
        for segmentation, of masks (upstream's segmentation fitness)."""
        box = float(fitness(np.array([self.precision, self.recall, self.map50, self.map50_95])))
        if self.mask is None:
            return box
        return box + float(fitness(np.array([self.mask[k] for k in METRIC_KEYS])))

    def to_dict(self) -> dict:
        return {**asdict(self), "fitness": self.fitness}

    def _entries(self) -> list[tuple]:
        """(name, images, instances, box P, R, mAP50, mAP50-95[, the mask four]) for 'all', then each class."""
        mask_keys = [f"mask_{k}" for k in METRIC_KEYS] if self.mask is not None else []
        rows = [("all", self.images, self.instances, *(getattr(self, k) for k in METRIC_KEYS),
                 *(self.mask[k] for k in METRIC_KEYS if self.mask is not None))]
        return rows + [(c["name"], c["images"], c["instances"], *(c[k] for k in (*METRIC_KEYS, *mask_keys)))
                       for c in self.per_class]

    def table(self, per_class: bool = True) -> str:
        """The upstream console table: an 'all' row, then one row per class (box and mask columns for segmentation)."""
        header = MASK_TABLE_HEADER if self.mask is not None else TABLE_HEADER
        entries = self._entries() if per_class else self._entries()[:1]
        line = "%22s" + "%11i" * 2 + "%11.3g" * (len(header) - 3)
        return "\n".join([("%22s" + "%11s" * (len(header) - 1)) % header] + [line % e for e in entries])

    def markdown(self) -> str:
        """The same table as markdown, plus speed (and the COCO tool's figures when present)."""
        header = ("Class", "Images", "Instances", "Box P", "Box R", "Box mAP50", "Box mAP50-95", "Mask P", "Mask R",
                  "Mask mAP50", "Mask mAP50-95") if self.mask is not None else TABLE_HEADER
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([str(n), str(i), str(k)] + [f"{v:.4f}" for v in values]) + " |"
                  for n, i, k, *values in self._entries()]
        speed = ", ".join(f"{k} {v:.2f} ms" for k, v in self.speed_ms.items())
        what = "box + mask " if self.mask is not None else ""
        lines += ["", f"Speed per image: {speed}", f"Fitness ({what}0.1 mAP50 + 0.9 mAP50-95): {self.fitness:.4f}"]
        if self.coco:
            lines.append(f"COCO tool ({self.coco['backend']}): mAP50-95 {self.coco['map50_95']:.4f}, "
                         f"mAP50 {self.coco['map50']:.4f}" + (f"; masks mAP50-95 {self.coco['mask_map50_95']:.4f}, "
                                                               f"mAP50 {self.coco['mask_map50']:.4f}"
                                                               if "mask_map50_95" in self.coco else ""))
        return "\n".join(lines) + "\n"


@dataclass
class MaskSample:
    """One letterboxed validation image with its true and predicted instances, for drawing."""

    image: np.ndarray          # (H, W, 3) uint8 RGB
    labels: np.ndarray         # (m, 5) [cls, x1, y1, x2, y2] input pixels
    label_masks: np.ndarray    # (m, H, W) bool
    detections: np.ndarray     # (n, 6) input pixels, conf >= PLOT_CONF
    detection_masks: np.ndarray  # (n, H, W) bool


@dataclass
class EvalArtifacts:
    """By-products for plots, COCO JSON and bootstrap intervals; boxes (and masks) are kept only when asked for."""

    ap: APResult
    confusion: ConfusionMatrix
    per_image: PerImageStats | None = None  # the matches image by image (utils.evaluation.bootstrap)
    files: list[str] = field(default_factory=list)
    shapes: list[tuple[int, int]] = field(default_factory=list)  # original (h, w)
    detections: list[np.ndarray] = field(default_factory=list)  # (n, 6), original pixels
    labels: list[np.ndarray] = field(default_factory=list)      # (m, 5) [cls, x1, y1, x2, y2]
    mask_ap: APResult | None = None  # segmentation
    mask_per_image: PerImageStats | None = None  # segmentation: the mask matches image by image
    mask_samples: list[MaskSample] = field(default_factory=list)  # a few images for the mask plots
    masks: list[list] = field(default_factory=list)  # per image, each detection's mask (BoxMask), when kept
    polygons: list[list[np.ndarray]] = field(default_factory=list)  # per image, true polygons in original pixels


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


def _per_class(ap: APResult, images_with: np.ndarray, names: Sequence[str], single_cls: bool,
               mask_ap: APResult | None) -> list[dict]:
    rows = [{"class": int(c), "name": str(names[c]) if not single_cls else "all-classes",
             "images": int(images_with[c]), "instances": int(n), "precision": float(p), "recall": float(r),
             "map50": float(a[0]), "map50_95": float(a.mean())}
            for c, n, p, r, a in zip(ap.classes, ap.n_targets, ap.precision, ap.recall, ap.ap)]
    if mask_ap is not None:  # the same classes: both come from the same labels
        for row, p, r, a in zip(rows, mask_ap.precision, mask_ap.recall, mask_ap.ap):
            row.update(mask_precision=float(p), mask_recall=float(r), mask_map50=float(a[0]),
                       mask_map50_95=float(a.mean()))
    return rows


@torch.no_grad()
def evaluate(model: nn.Module, dataloader: Iterable, names: Sequence[str], device: torch.device | None = None,
             half: bool = False, conf_thres: float = 0.001, iou_thres: float = 0.7, max_det: int = 300,
             postprocess: str = "nms", single_cls: bool = False, compute_loss=None,
             coco_max_dets: int | None = COCO_MAX_DETS, keep_boxes: bool = False, desc: str = "",
             mask_plots: bool = False) -> tuple[EvalResult, EvalArtifacts]:
    """Evaluate ``model`` (already in eval mode, on ``device``) over ``dataloader``.

    Batches are upstream's (uint8 images, [batch_idx, cls, x, y, w, h] targets, paths, shapes), plus
    (masks, polygons) from a segmentation dataloader. Boxes and masks are compared in original image
    pixels, as COCO ground truth is. ``coco_max_dets`` applies COCOeval's per-image-per-class limit
    (None: count every detection, like upstream). ``keep_boxes`` keeps every image's detections and
    labels (and masks and true polygons) for COCO JSON; ``mask_plots`` keeps the first images with
    their masks for drawing.
    """
    device = device or next(model.parameters()).device
    nc = 1 if single_cls else len(names)
    confusion = ConfusionMatrix(nc)
    kept: dict[str, list] = {k: [] for k in ("files", "shapes", "detections", "labels", "masks", "polygons",
                                             "mask_samples")}
    stats, images_with = DetectionStats(max_dets_per_class=coco_max_dets), np.zeros(nc, dtype=np.int64)
    mask_stats = None
    watches = {k: _Stopwatch(device) for k in ("pre", "inference", "nms")}
    loss, seen, batches = None, 0, 0
    header = desc or ("%22s" + "%11s" * 6) % TABLE_HEADER
    for imgs, targets, paths, shapes, *segmentation in tqdm(dataloader, desc=header, leave=False):
        with watches["pre"]:
            imgs = imgs.to(device, non_blocking=True)
            imgs = (imgs.half() if half else imgs.float()) / 255
        with watches["inference"]:
            output = model(imgs)
        seg = segmentation_output(output)
        if seg is not None and not segmentation:
            raise UserError("a segmentation model's output came with a detection dataloader's batches; "
                            "build the dataloader with task='segment'")
        if seg is not None and mask_stats is None:
            mask_stats = DetectionStats(max_dets_per_class=coco_max_dets)
        if compute_loss is not None and _train_outputs(output) is not None:
            extra = [segmentation[0].to(device)] if seg is not None else []
            items = compute_loss(_train_outputs(output), targets.to(device), *extra)[1].detach().float().cpu()
            loss = items if loss is None else loss + items
        with watches["nms"]:
            preds = run_postprocess(seg[0] if seg is not None else output, postprocess, conf_thres=conf_thres,
                                    iou_thres=iou_thres, max_det=max_det, agnostic=single_cls, multi_label=True,
                                    nm=seg[1].shape[1] if seg is not None else 0)
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
            in_input = pred[:, :4].clone()
            scale_boxes(input_hw, pred[:, :4], shapes[si][0], shapes[si][1])
            if keep_boxes:
                kept["files"].append(str(paths[si]))
                kept["shapes"].append(tuple(int(s) for s in shapes[si][0]))
                kept["detections"].append(pred[:, :6].numpy())
                kept["labels"].append(labels.numpy())
            stats.add(pred[:, :6], labels, image=paths[si])
            images_with[np.unique(labels[:, 0].numpy().astype(int))] += 1
            confusion.process_batch(pred[:, :6], labels)
            if seg is not None:
                probabilities = mask_probabilities(pred[:, 6:], seg[1][si].cpu())
                masks = masks_in_original(probabilities, input_hw, shapes[si][0], shapes[si][1], pred[:, :4])
                polygons = polygons_in_original(segmentation[1][si], shapes[si][1])
                truth = ground_truth_masks(polygons, shapes[si][0])
                mask_stats.add(pred[:, :6], labels, image=paths[si],
                               iou=mask_iou(masks, pred[:, 5].numpy(), truth, labels[:, 0].numpy()))
                if keep_boxes:
                    kept["masks"].append(masks)
                    kept["polygons"].append(polygons)
                if mask_plots and len(kept["mask_samples"]) < PLOTTED_IMAGES:
                    kept["mask_samples"].append(_mask_sample(imgs[si], targets[targets[:, 0] == si, 1:],
                                                               segmentation[1][si], pred, in_input, probabilities))
    ap, mask_ap = stats.compute(), mask_stats.compute() if mask_stats is not None else None
    result = EvalResult(map50=ap.map50, map50_95=ap.map50_95, precision=ap.mp, recall=ap.mr,
                        per_class=_per_class(ap, images_with, names, single_cls, mask_ap),
                        loss=tuple((loss / max(batches, 1)).tolist()) if loss is not None else None,
                        speed_ms={k: w.seconds / max(seen, 1) * 1e3 for k, w in watches.items()},
                        images=seen, instances=int(ap.n_targets.sum()),
                        mask=None if mask_ap is None else {"precision": mask_ap.mp, "recall": mask_ap.mr,
                                                           "map50": mask_ap.map50, "map50_95": mask_ap.map50_95})
    return result, EvalArtifacts(ap, confusion, stats.per_image(), mask_ap=mask_ap,
                                 mask_per_image=mask_stats.per_image() if mask_stats is not None else None, **kept)


def _mask_sample(image: torch.Tensor, targets: torch.Tensor, polygons: list[np.ndarray], pred: torch.Tensor,
                 boxes_in_input: torch.Tensor, probabilities: torch.Tensor) -> MaskSample:
    """One image for the mask plots, all in letterboxed-input pixels."""
    h, w = image.shape[1:]
    labels = torch.cat((targets[:, :1], xywh2xyxy(targets[:, 1:5] * torch.tensor((w, h, w, h)))), 1)
    shown = pred[:, 4] >= PLOT_CONF
    detections = torch.cat((boxes_in_input[shown], pred[shown, 4:6]), 1)
    return MaskSample((image.float().cpu() * 255 if image.is_floating_point() else image.cpu()).byte()
                      .permute(1, 2, 0).numpy(), labels.numpy(), rasterize(polygons, h, w).astype(bool),
                      detections.numpy(), masks_at_input(probabilities[shown], boxes_in_input[shown], (h, w)).numpy())
