"""Upstream's module path for the datasets and loader, kept so that `from utils.dataloaders import ...` works.

The implementation lives in utils/data/dataset.py: patch_yolov9.sh copies the QAT layer, which
calibrates and fine-tunes on our loader, into upstream checkouts, where utils/dataloaders.py is
upstream's own file with another create_dataloader signature.
"""
from utils.data.dataset import (  # noqa: F401
    DEFAULT_HYP,
    YoloDataset,
    create_dataloader,
    img2label_paths,
    init_worker,
    list_image_files,
)
