"""Evaluation batches decoded once: every model of a QAT run is evaluated on one pass of decoded images."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

import qat
from tests.qat_helpers import one_thread, save_float_checkpoint, tiny_model
from utils.data.dataset import YoloDataset
from utils.data.synthetic import make_shapes_dataset
from utils.evaluation.cached_batches import CachedBatches

IMGSZ = 64


class CountingLoader:
    def __init__(self, n: int):
        self.batches = [(torch.full((2, 3, 4, 4), i, dtype=torch.uint8), torch.zeros(0, 6), (f"{i}.jpg",), None)
                        for i in range(n)]
        self.passes = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        yield from self.batches


def test_a_complete_pass_is_kept_and_replayed():
    loader = CountingLoader(3)
    cached = CachedBatches(loader)
    first = list(cached)
    assert cached.cached and [b[2] for b in list(cached)] == [b[2] for b in first] and loader.passes == 1
    assert len(cached) == 3


def test_an_interrupted_pass_is_not_kept_and_a_large_split_streams():
    loader = CountingLoader(3)
    cached = CachedBatches(loader)
    next(iter(cached))
    assert not cached.cached
    list(cached)
    assert cached.cached and loader.passes == 2
    big = CountingLoader(3)
    streamed = CachedBatches(big, max_bytes=2 * 2 * 3 * 4 * 4)  # room for two batches' images only
    for _ in range(3):
        assert len(list(streamed)) == 3
    assert not streamed.cached and big.passes == 3


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=8, n_val=4, imgsz=IMGSZ)


def test_auto_calibration_decodes_the_evaluation_images_once(shapes, tmp_path, monkeypatch):
    """Origin and the four PTQ evaluations of --calib-method auto read each validation image once."""
    reads: Counter = Counter()
    original = YoloDataset.__getitem__

    def counting(self, index):
        item = original(self, index)
        reads[Path(item[2]).parent.name] += 1
        return item

    monkeypatch.setattr(YoloDataset, "__getitem__", counting)
    weights = save_float_checkpoint(tiny_model(), tmp_path / "fp.pt")
    with one_thread():
        qat.main(["quantize", "--weights", str(weights), "--data", str(shapes), "--imgsz", str(IMGSZ),
                  "--batch-size", "4", "--device", "cpu", "--workers", "0", "--calib-batches", "2",
                  "--calib-method", "auto", "--epochs", "0", "--project", str(tmp_path / "runs"), "--name", "q"])
    assert reads["val"] == 4  # five evaluations, one decode of each of the 4 validation images
