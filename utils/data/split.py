"""Split a dataset that came without split lists into train / val / test, the same way every time.

Most datasets people label themselves or download are one folder of images; the converters
split them here. The split depends only on the set of image names and the seed (not on the
order the file system lists them), so a conversion rerun with the same seed reproduces it.
"""
from __future__ import annotations

import logging
import math
import random
from typing import Sequence

from utils.data.config import SPLITS
from utils.errors import UserError

LOGGER = logging.getLogger("yolov9.data")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SUM_TOLERANCE = 1e-6


def check_fractions(fractions: Sequence[float], flag: str = "--split") -> tuple[float, ...]:
    """Three fractions for train, val and test in [0, 1] that sum to 1; ``UserError`` otherwise."""
    given = " ".join(str(f) for f in fractions)
    if len(fractions) != len(SPLITS):
        raise UserError(f"{flag} {given}: give three fractions, TRAIN VAL TEST")
    values = tuple(float(f) for f in fractions)
    if not all(math.isfinite(v) and 0 <= v <= 1 for v in values):
        raise UserError(f"{flag} {given}: each fraction must lie between 0 and 1")
    if abs(sum(values) - 1) > SUM_TOLERANCE:
        raise UserError(f"{flag} {given}: fractions sum to {sum(values):g}, not 1")
    if values[0] == 0 and values[1] == 0:
        raise UserError(f"{flag} {given}: a dataset needs a train or a val split")
    return values


def split_sizes(n: int, fractions: Sequence[float]) -> list[int]:
    """Image counts per split: the largest-remainder rounding of ``n * fraction``.

    A split with a fraction above 0 gets at least one image whenever there are enough images,
    because an empty split folder would stop training or validation later, far from its cause.
    """
    exact = [n * f for f in fractions]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[:n - sum(sizes)]:
        sizes[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and sizes[i] == 0:
            donor = max(range(len(sizes)), key=lambda j: sizes[j])
            if sizes[donor] > 1:
                sizes[donor] -= 1
                sizes[i] += 1
    return sizes


def seeded_split(keys: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """``{split: sorted keys}`` for every split that gets images (a 0 fraction means no such split)."""
    fractions = check_fractions(fractions)
    order = sorted(set(keys))
    random.Random(seed).shuffle(order)
    splits, start = {}, 0
    for name, fraction, size in zip(SPLITS, fractions, split_sizes(len(order), fractions)):
        if size:
            splits[name] = sorted(order[start:start + size])
        elif fraction > 0:
            LOGGER.warning(f"WARNING --split: {len(order)} images are too few for a {name} split; none made")
        start += size
    return splits


def describe_split(fractions: Sequence[float], seed: int) -> str:
    """How a seeded split was made, in words for the conversion report."""
    return f"seeded split {' / '.join(f'{f:g}' for f in fractions)} (train / val / test), seed {seed}"
