"""Label-free agreement: how closely a deployed (INT8) model reproduces its FP32 model, on any images.

Deployment data rarely has labels, but the FP32 model is the behaviour an INT8 model should keep.
Its detections at a deployment threshold (conf 0.25 after NMS) become the ground truth, and the
INT8 model's detections at the evaluation threshold (conf 0.001) are scored against them by the
same COCO-style matching as a labelled mAP: 1.0 means the same boxes in the same order of
confidence. Matched pairs also give the boxes' IoU and the score error, per class, and a bootstrap
over images gives an interval, so a few hundred unlabelled images say how much the models differ.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from utils.boxes import box_iou
from utils.data.augment import letterbox
from utils.data.media import Frame, media_files, read_frames
from utils.errors import UserError
from utils.evaluation import bootstrap
from utils.evaluation.masks import segmentation_output
from utils.evaluation.metrics import DetectionStats
from utils.evaluation.postprocess import postprocess as run_postprocess
from utils.options import REFERENCE_CONF

MATCH_IOU = 0.5  # a candidate box matched to a reference box for the IoU and score-error figures


@dataclass
class Agreement:
    """How the candidate's detections score against the reference's, overall and per class."""

    map50_95: float
    map50: float
    intervals: dict  # metric -> {"value", "ci95_low", "ci95_high"}
    matched: float  # share of the reference's boxes the candidate finds at IoU >= MATCH_IOU, same class
    matched_iou: float  # mean IoU of those pairs
    score_error: float  # mean |candidate score - reference score| of those pairs
    images: int
    reference_boxes: int
    reference_conf: float
    per_class: list[dict] = field(default_factory=list)
    bootstrap: dict = field(default_factory=bootstrap.method)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self, title: str) -> str:
        iv = self.intervals
        lines = [f"# {title}", "",
                 f"{self.images} images; the reference's {self.reference_boxes} boxes at conf >= "
                 f"{self.reference_conf} are the ground truth. Agreement mAP50-95 **{self.map50_95:.4f}** "
                 f"[{iv['map50_95']['ci95_low']:.4f}, {iv['map50_95']['ci95_high']:.4f}], mAP50 {self.map50:.4f} "
                 f"[{iv['map50']['ci95_low']:.4f}, {iv['map50']['ci95_high']:.4f}] (95% bootstrap over images); "
                 f"{100 * self.matched:.1f}% of the reference's boxes matched at IoU >= {MATCH_IOU} with mean IoU "
                 f"{self.matched_iou:.4f} and mean score error {self.score_error:.4f}.", "",
                 "| Class | Reference boxes | AP50-95 | AP50 | matched | IoU | score error |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {c['name']} | {c['reference_boxes']} | {c['map50_95']:.4f} | {c['map50']:.4f} | "
                  f"{100 * c['matched']:.1f}% | {c['matched_iou']:.4f} | {c['score_error']:.4f} |"
                  for c in self.per_class]
        return "\n".join(lines) + "\n"


def frames_of(sources: Sequence[str | Path], vid_stride: int = 1) -> Iterator[tuple[str, Frame]]:
    """Every image, and every ``vid_stride``-th video frame, of the sources, with a key naming it."""
    for source in sources:
        for path in media_files(source):
            for frame in read_frames(path, vid_stride):
                yield (str(path) if frame.index is None else f"{path}:{frame.index}"), frame


def letterboxed_batches(frames: Iterable[tuple[str, Frame]], imgsz: int | tuple[int, int], batch_size: int
                        ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(keys, uint8 (B, 3, h, w) RGB batch) letterboxed to exactly ``imgsz`` (an int: square; a pair:
    (h, w), a non-square export's input): one input both models see alike."""
    keys, images = [], []
    for key, frame in frames:
        padded = letterbox(frame.image, imgsz, auto=False)[0]
        keys.append(key)
        images.append(torch.from_numpy(np.ascontiguousarray(padded[..., ::-1].transpose(2, 0, 1))))
        if len(images) == batch_size:
            yield keys, torch.stack(images)
            keys, images = [], []
    if images:
        yield keys, torch.stack(images)


def match_to_reference(candidate: torch.Tensor, reference: torch.Tensor, iou_thres: float = MATCH_IOU
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (reference index, candidate index, IoU): each reference box, in descending score, takes
    the still-free candidate box of its class with the highest IoU, if that is at least ``iou_thres``."""
    if not (len(candidate) and len(reference)):
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(reference[:, :4].double(), candidate[:, :4].double()).numpy()
    iou *= reference[:, 5:6].numpy() == candidate[None, :, 5].numpy()
    free = np.ones(len(candidate), dtype=bool)
    pairs = []
    for r in np.argsort(-reference[:, 4].numpy(), kind="stable"):
        options = np.where(free, iou[r], -1.0)
        c = int(options.argmax())
        if options[c] >= iou_thres:
            free[c] = False
            pairs.append((r, c, options[c]))
    if not pairs:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    ref, cand, ious = map(np.array, zip(*pairs))
    return ref, cand, ious


class _MatchTally:
    """Per-class sums of matched pairs: count, IoU and absolute score error."""

    def __init__(self):
        self.boxes: dict[int, int] = {}
        self.pairs: dict[int, list[tuple[float, float]]] = {}

    def add(self, candidate: torch.Tensor, reference: torch.Tensor) -> None:
        for c in reference[:, 5].long().tolist():
            self.boxes[c] = self.boxes.get(c, 0) + 1
        ref, cand, ious = match_to_reference(candidate, reference)
        errors = (candidate[cand, 4] - reference[ref, 4]).abs().tolist()
        for c, iou, err in zip(reference[ref, 5].long().tolist(), ious.tolist(), errors):
            self.pairs.setdefault(c, []).append((iou, err))

    def summary(self, classes: Iterable[int] | None = None) -> tuple[float, float, float]:
        """(share matched, mean IoU, mean score error) over ``classes`` (all by default)."""
        classes = list(self.boxes) if classes is None else list(classes)
        pairs = [p for c in classes for p in self.pairs.get(c, [])]
        boxes = sum(self.boxes.get(c, 0) for c in classes)
        if not pairs:
            return 0.0, 0.0, 0.0
        ious, errors = np.array(pairs).T
        return len(pairs) / boxes, float(ious.mean()), float(errors.mean())


def check_reference_task(task: str, reference: torch.nn.Module, model_name: str | Path,
                         reference_name: str | Path) -> None:
    """Refuse a reference whose task ('detect' or 'segment') differs from the scored model's: it
    cannot be the FP32 model that one came from."""
    from utils.data.dataset import model_task

    kinds = {"segment": "a segmentation model", "detect": "a detection model"}
    if model_task(reference) != task:
        raise UserError(f"{model_name} is {kinds[task]} but the reference {reference_name} is "
                        f"{kinds[model_task(reference)]}; pass the FP32 checkpoint it came from")


def _boxes(output, kind: str, **settings) -> list[torch.Tensor]:
    """Each image's (n, 6) detections of a head output; a segmentation head's mask coefficients are
    dropped, since agreement compares boxes."""
    seg = segmentation_output(output)
    prediction, nm = (seg[0], seg[1].shape[1]) if seg is not None else (output, 0)
    return [det[:, :6] for det in run_postprocess(prediction, kind, nm=nm, **settings)]


def agreement(candidate: Callable[[torch.Tensor], object], reference: torch.nn.Module,
              frames: Iterable[tuple[str, Frame]], imgsz: int | tuple[int, int], names: Sequence[str], *,
              candidate_device: torch.device, batch_size: int = 16, postprocess: str = "nms",
              reference_conf: float = REFERENCE_CONF, conf_thres: float = 0.001, iou_thres: float = 0.7,
              max_det: int = 300, resamples: int = bootstrap.RESAMPLES, seed: int = bootstrap.SEED) -> Agreement:
    """Score ``candidate`` (a model or a runtime backend: images in [0, 1] -> head output) against
    ``reference``'s own detections on ``frames``. Both see the same letterboxed images and
    the same NMS; only the confidence threshold differs (``reference_conf`` vs ``conf_thres``)."""
    ref_device = next(reference.parameters()).device
    stats, tally, n_images = DetectionStats(), _MatchTally(), 0
    with torch.no_grad():
        for keys, batch in tqdm(letterboxed_batches(frames, imgsz, batch_size), desc="agreement", leave=False):
            images = batch.float() / 255
            truth = _boxes(reference(images.to(ref_device)), "nms", conf_thres=reference_conf,
                           iou_thres=iou_thres, max_det=max_det, multi_label=True)
            found = _boxes(candidate(images.to(candidate_device)), postprocess, conf_thres=conf_thres,
                           iou_thres=iou_thres, max_det=max_det, multi_label=True)
            for key, ref, cand in zip(keys, truth, found):
                ref, cand = ref.float().cpu(), cand.float().cpu()
                stats.add(cand, torch.cat((ref[:, 5:6], ref[:, :4]), 1), image=key)
                tally.add(cand, ref)
                n_images += 1
    if n_images == 0:
        raise UserError("agreement: the sources hold no images or video frames")
    if not tally.boxes:
        raise UserError(f"agreement: the reference model detects nothing at conf >= {reference_conf} on these "
                        f"{n_images} images, so there is nothing to agree with (lower --reference-conf?)")
    ap = stats.compute()
    per_class = []
    for c, n, a in zip(ap.classes.tolist(), ap.n_targets.tolist(), ap.ap):
        matched, iou, err = tally.summary([c])
        per_class.append({"class": c, "name": str(names[c]), "reference_boxes": n, "map50_95": float(a.mean()),
                          "map50": float(a[0]), "matched": matched, "matched_iou": iou, "score_error": err})
    matched, iou, err = tally.summary()
    intervals = bootstrap.interval(stats.per_image(), resamples, seed)
    return Agreement(ap.map50_95, ap.map50, {k: v.to_dict() for k, v in intervals.items()}, matched, iou, err,
                     n_images, int(ap.n_targets.sum()), reference_conf, per_class, bootstrap.method(resamples, seed))


def run_agreement(candidate: Callable[[torch.Tensor], object], reference: torch.nn.Module,
                  sources: Sequence[str | Path], imgsz: int | tuple[int, int], save_dir: Path, title: str,
                  **kwargs) -> Agreement:
    """``agreement`` over image / video sources, written to ``save_dir`` as agreement.json and .md."""
    names = getattr(reference, "names", None) or [str(i) for i in range(int(reference.nc))]
    names = list(names.values()) if isinstance(names, dict) else list(names)
    result = agreement(candidate, reference, frames_of(sources), imgsz, names, **kwargs)
    (save_dir / "agreement.json").write_text(json.dumps({"sources": [str(s) for s in sources], **result.to_dict()},
                                                        indent=2) + "\n")
    (save_dir / "agreement.md").write_text(result.markdown(title))
    print(result.markdown(title), end="")
    return result
