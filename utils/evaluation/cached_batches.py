"""An evaluation loader's batches, decoded once and replayed from memory.

A QAT run evaluates the same images many times: the float model, each calibration method that
``--calib-method auto`` tries, every QAT epoch; training validates every epoch. Decoding and
letterboxing the images again each time costs more than running a small model over them, so the
first complete pass keeps the batches (uint8 images, already pinned when the loader pins) and
later passes replay them. A split whose batches outgrow ``max_bytes`` streams every time instead.
"""
from __future__ import annotations

from typing import Iterator

import torch

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB: BCCD's test split is 66 MB at 640; COCO val2017 (~6 GB) streams


def _nbytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in batch if isinstance(t, torch.Tensor))


class CachedBatches:
    """Iterates like ``loader``; after one complete pass, from the batches that pass kept.

    Batches are handed out as they are: consumers must not modify them in place.
    """

    def __init__(self, loader, max_bytes: int = DEFAULT_MAX_BYTES):
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self.max_bytes = max_bytes
        self._batches: list | None = None
        self._too_big = False

    def __len__(self) -> int:
        return len(self._batches) if self._batches is not None else len(self.loader)

    @property
    def cached(self) -> bool:
        return self._batches is not None

    def __iter__(self) -> Iterator:
        if self._batches is not None:
            yield from self._batches
            return
        kept, size = (None if self._too_big else []), 0
        for batch in self.loader:
            if kept is not None:
                size += _nbytes(batch)
                if size > self.max_bytes:
                    kept, self._too_big = None, True
                else:
                    kept.append(batch)
            yield batch
        self._batches = kept  # reached only when the pass completed
