"""Upstream's module path for the training loss, kept so that `from utils.loss_tal import ...` works.

The implementation lives in utils/training/loss.py: patch_yolov9.sh copies the QAT layer, which
fine-tunes with our loss, into upstream checkouts, where utils/loss_tal.py is upstream's own file.
"""
from utils.training.loss import (  # noqa: F401
    AUX_BRANCH_WEIGHT,
    DEFAULT_GAINS,
    BranchLoss,
    ComputeLoss,
    DualComputeLoss,
    DualSegmentationLoss,
    SegmentationLoss,
    build_loss,
    distribution_focal_loss,
)
