"""COCO JSON for predictions and ground truth, and evaluation by the reference COCO tools.

Our own metrics (utils/evaluation/metrics.py) follow COCOeval's rules; this module exists so any result
can be checked against pycocotools (or its faster re-implementation) on the same boxes, and for
segmentation on the same masks: predicted masks as RLE, true ones as the polygons they came from.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask

from utils.errors import UserError

COCO_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
# COCO's category ids run 1..90 with ten ids never used for detection.
_COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in _COCO_UNUSED_IDS)


def category_ids(data: dict) -> list[int]:
    """JSON category id of each class index: COCO's own ids for COCO, the index otherwise.

    A data yaml may name the ids itself with ``coco_ids`` (a subset of COCO, say).
    """
    names = list(data["names"].values()) if isinstance(data["names"], dict) else list(data["names"])
    if data.get("coco_ids") is not None:
        ids = [int(i) for i in data["coco_ids"]]
        if len(ids) != len(names):
            raise UserError(f"data yaml: coco_ids has {len(ids)} entries but names has {len(names)}")
        return ids
    if tuple(names) == COCO_NAMES:
        return list(COCO_CATEGORY_IDS)
    return list(range(len(names)))


def image_ids(files: Sequence[str | Path]) -> list[int]:
    """COCO image ids: the number in the file name when every name is a distinct one (COCO's own
    files), otherwise the position in the list."""
    stems = [Path(f).stem for f in files]
    if all(s.isdigit() for s in stems):
        ids = [int(s) for s in stems]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(stems)))


def _xyxy_to_coco(boxes: np.ndarray) -> np.ndarray:
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, 2:] -= out[:, :2]
    return out


def _exact_score(score) -> float:
    """The float32 score in its shortest exact decimal form. Upstream rounds to 5 decimals, which
    turns distinct low (or FP16) scores into ties and changes COCOeval's ranking."""
    return float(np.format_float_positional(np.float32(score), unique=True, trim="-"))


def mask_rles(masks: Sequence[np.ndarray]) -> list[dict]:
    """COCO run-length encodings (JSON-ready, 'counts' as text) of same-size (h, w) bool masks."""
    if not len(masks):
        return []
    rles = coco_mask.encode(np.asfortranarray(np.stack(masks, -1).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def predictions_to_coco(detections: Sequence[torch.Tensor | np.ndarray], img_ids: Sequence[int],
                        cat_ids: Sequence[int], segmentations: Sequence[list[dict]] | None = None) -> list[dict]:
    """COCO result list from per-image (n, 6) [x1, y1, x2, y2, conf, cls] in original image pixels.

    ``segmentations`` adds each detection's mask, per image a list of RLEs (``mask_rles``).
    """
    results = []
    for k, (det, img_id) in enumerate(zip(detections, img_ids)):
        det = det.cpu().numpy() if isinstance(det, torch.Tensor) else np.asarray(det)
        if len(det) == 0:
            continue
        for i, (box, score, cls) in enumerate(zip(_xyxy_to_coco(det[:, :4]).round(3), det[:, 4], det[:, 5])):
            results.append({"image_id": img_id, "category_id": int(cat_ids[int(cls)]),
                            "bbox": box.tolist(), "score": _exact_score(score)})
            if segmentations is not None:
                results[-1]["segmentation"] = segmentations[k][i]
    return results


def ground_truth_to_coco(labels: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]],
                         img_ids: Sequence[int], cat_ids: Sequence[int], names: Sequence[str],
                         files: Sequence[str | Path] | None = None,
                         polygons: Sequence[list[np.ndarray]] | None = None) -> dict:
    """COCO ground-truth dataset from per-image (m, 5) [cls, x1, y1, x2, y2] in original pixels.

    ``shapes`` are (height, width). Without ``polygons`` areas are box areas: box labels carry no
    masks, so the 'small/medium/large' splits differ from COCO's mask-area ones; the headline 'all'
    AP does not. ``polygons`` (per image, each label's (k, 2) outline in original pixels) become the
    annotations' segmentations, and their pixel counts the areas, as in COCO's own files.
    """
    images, annotations = [], []
    for i, (lab, (h, w), img_id) in enumerate(zip(labels, shapes, img_ids)):
        images.append({"id": img_id, "height": int(h), "width": int(w),
                       "file_name": Path(files[i]).name if files is not None else str(img_id)})
        lab = np.asarray(lab, dtype=np.float64).reshape(-1, 5)
        for k, (cls, box) in enumerate(zip(lab[:, 0], _xyxy_to_coco(lab[:, 1:]))):
            annotations.append({"id": len(annotations) + 1, "image_id": img_id,
                                "category_id": int(cat_ids[int(cls)]), "bbox": box.tolist(),
                                "area": float(box[2] * box[3]), "iscrowd": 0})
            if polygons is not None:
                outline = np.asarray(polygons[i][k], dtype=np.float64).ravel().tolist()
                annotations[-1]["segmentation"] = [outline]
                annotations[-1]["area"] = float(coco_mask.area(coco_mask.frPyObjects([outline], int(h), int(w)))[0])
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(cat_ids, names)]
    return {"info": {"description": "ground truth written by yolov9-qat utils/evaluation/coco.py"}, "licenses": [],
            "images": images, "annotations": annotations, "categories": categories}


def _backend(name: str):
    """(COCO, COCOeval) classes of the chosen implementation."""
    try:
        if name == "pycocotools":
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval
        elif name == "faster-coco-eval":
            from faster_coco_eval import COCO
            from faster_coco_eval import COCOeval_faster as COCOeval
        else:
            raise UserError(f"coco backend {name!r}: expected 'pycocotools' or 'faster-coco-eval'")
    except ImportError as exc:
        raise UserError(f"coco backend {name!r} is not installed (pip install {name})") from exc
    return COCO, COCOeval


def coco_evaluate(ground_truth: dict | str | Path, predictions: list[dict] | str | Path,
                  backend: str = "pycocotools", img_ids: Sequence[int] | None = None, iou_type: str = "bbox") -> dict:
    """Run COCO evaluation of boxes (``iou_type`` 'bbox') or masks ('segm'); returns {'map50_95', 'map50',
    'stats'} (the 12 summary numbers).

    Both inputs may be in-memory objects or JSON file paths. ``img_ids`` restricts evaluation to
    some images (upstream does this when the annotation file covers all of val2017).
    """
    COCO, COCOeval = _backend(backend)
    with contextlib.redirect_stdout(io.StringIO()):  # the reference tools print progress chatter
        gt = _load_gt(COCO, ground_truth)
        preds = _load_predictions(predictions)
        if not preds:
            return {"map50_95": 0.0, "map50": 0.0, "stats": [0.0] * 12}
        # loadRes fills in fields of the dicts it is given; copies keep the caller's list as it was
        evaluator = COCOeval(gt, gt.loadRes([dict(p) for p in preds]), iou_type)
        if img_ids is not None:
            evaluator.params.imgIds = list(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats]
    return {"map50_95": stats[0], "map50": stats[1], "stats": stats}


def _load_gt(COCO, ground_truth):
    if isinstance(ground_truth, dict):
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        return gt
    path = Path(ground_truth)
    if not path.is_file():
        raise UserError(f"{path}: COCO annotation file not found")
    return COCO(str(path))


def _load_predictions(predictions) -> list[dict]:
    if isinstance(predictions, (str, Path)):
        path = Path(predictions)
        if not path.is_file():
            raise UserError(f"{path}: COCO predictions file not found")
        return json.loads(path.read_text())
    return list(predictions)
