"""Upstream's module path for the helpers user scripts import most (``from utils.general import ...``).

Each name is re-exported from the stage module that implements it here. Upstream's general.py
also holds downloads, logging set-up and checks this project does not need; those stay upstream's.
"""
from utils.boxes import clip_boxes, scale_boxes, xywh2xyxy, xywhn2xyxy, xyxy2xywh, xyxy2xywhn  # noqa: F401
from utils.evaluation.postprocess import non_max_suppression  # noqa: F401
from utils.logs import LOGGER  # noqa: F401
from utils.paths import increment_path  # noqa: F401
