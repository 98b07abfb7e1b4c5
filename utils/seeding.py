"""Seeds for reproducible runs, shared by training and QAT fine-tuning.

A module of its own so that the QAT layer copied into an upstream checkout (patch_yolov9.sh) can
seed its epochs without importing our trainer, which depends on our val.py and loss paths.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """One seed per (run seed, epoch, rank): a resumed epoch draws the same shuffles and augmentations."""
    return seed * 1_000_003 + epoch * 1_009 + max(rank, 0) + 1
