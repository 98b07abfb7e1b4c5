"""Upstream's module path for the task-aligned assigner, kept so that upstream-style imports work.

The implementation lives in utils/training/assigner.py, which our loss imports: in an upstream checkout
patched with the QAT layer this path is upstream's own assigner, whose outputs differ from ours.
"""
from utils.training.assigner import Assignment, TaskAlignedAssigner, anchors_inside_boxes, resolve_overlaps  # noqa: F401
