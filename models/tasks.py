"""Which task a model serves, told from its head by what it has, not by its class: the copies of
our library that patch_yolov9.sh puts into an upstream checkout meet upstream's head classes
(Segment, DSegment, DualDSegment), which share the attributes but not our base class."""
from __future__ import annotations

import torch.nn as nn


def is_segmentation_head(head: nn.Module) -> bool:
    """A head that predicts ``nm`` mask coefficients per anchor and has prototypes (``proto``)."""
    return hasattr(head, "nm") and hasattr(head, "proto")


def model_task(model: nn.Module) -> str:
    """'segment' when the model's last layer is a segmentation head, else 'detect' (what data it needs)."""
    layers = getattr(getattr(model, "module", model), "model", None)  # DDP / DataParallel wrap the model
    return "segment" if layers is not None and is_segmentation_head(layers[-1]) else "detect"
