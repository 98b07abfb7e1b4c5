"""Upstream's module path for the detection metrics, kept so that `from utils.metrics import ...` works.

The implementation lives in utils/evaluation/metrics.py: patch_yolov9.sh copies our evaluation
into upstream checkouts, where utils/metrics.py is upstream's own file with other names.
"""
from utils.evaluation.metrics import (  # noqa: F401
    COCO_MAX_DETS,
    CONF_GRID,
    IOU_THRESHOLDS,
    RECALL_POINTS,
    APResult,
    ConfusionMatrix,
    DetectionStats,
    ap_per_class,
    fitness,
    match_detections,
    process_batch,
    within_per_class_limit,
)
