"""Upstream's module path for the checkpoint loader, kept so that `from models.experimental import attempt_load` works.

The implementation lives in models/loading.py: patch_yolov9.sh copies the QAT layer into upstream
checkouts, where models/experimental.py is upstream's own loader (a plain torch.load that recent
torch refuses for pickled models).
"""
from models.loading import attempt_load, model_from_checkpoint  # noqa: F401
