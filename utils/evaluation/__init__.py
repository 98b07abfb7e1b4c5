"""Evaluation stage: postprocessing (NMS), COCO-style metrics, the evaluator that runs a model over a split, plots."""
