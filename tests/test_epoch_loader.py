"""The training loader's one stream over all epochs: the same batches as a loader built for each epoch."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from tests.data_builders import build_dataset
from utils.data.config import load_hyp
from utils.data.dataset import YoloDataset, set_epoch
from utils.data.epoch_loader import EpochBatchSampler, EpochLoader
from utils.dataloaders import create_dataloader
from utils.paths import ROOT

HYP = ROOT / "data" / "hyps" / "hyp.scratch-high.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory, coco128_dir):
    return build_dataset(tmp_path_factory.mktemp("epochs"), coco128_dir, n=7)


def training_loader(images, workers: int, seed: int = 5):
    loader, dataset = create_dataloader(str(images), 64, 3, 32, hyp=load_hyp(HYP), augment=True, shuffle=True,
                                        workers=workers, seed=seed)
    assert isinstance(loader, EpochLoader) and len(loader) == 3  # 7 images in batches of 3
    return loader, dataset


def take(loader, batches: int | None = None) -> list:
    out = []
    for i, (imgs, targets, paths, shapes) in enumerate(loader):
        out.append((imgs.clone(), targets.clone(), paths, shapes))
        if batches is not None and i + 1 == batches:
            break
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                    for x, y in zip(a, b))


def test_persistent_stream_gives_each_epoch_the_batches_of_a_loader_built_for_it(images):
    stream, _ = training_loader(images, workers=2)
    epochs = [take(stream) for _ in range(3)]
    for epoch, got in enumerate(epochs):
        rebuilt, _ = training_loader(images, workers=0)  # another worker count, in the main process
        rebuilt.set_epoch(epoch)
        assert same(got, take(rebuilt)), epoch
    assert [p for *_, p, _ in epochs[0]] != [p for *_, p, _ in epochs[1]]  # a new order each epoch
    assert stream.persistent_workers and stream.num_workers == 2  # the DataLoader's attributes show through


def test_stream_gives_the_batches_of_a_plain_dataloader_set_to_each_epoch(images):
    """The same order and augmentations as a DataLoader over a one-replica DistributedSampler whose
    sampler and dataset are told the epoch (``set_epoch``), rebuilt for every epoch."""
    stream, _ = training_loader(images, workers=2)
    for epoch in range(2):
        got = take(stream)
        _, dataset = training_loader(images, workers=0)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=5)
        plain = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=YoloDataset.collate_fn)
        set_epoch(plain, epoch)
        assert same(got, take(plain)), epoch


def test_epochs_cut_short_do_not_shift_the_next_ones(images):
    full = take(training_loader(images, workers=0)[0])
    loader, _ = training_loader(images, workers=2)
    assert same(take(loader, batches=1), full[:1])
    second = take(loader)
    reference, _ = training_loader(images, workers=0)
    reference.set_epoch(1)
    assert same(second, take(reference))


def test_close_mosaic_from_an_epoch_reaches_batches_prepared_ahead(images):
    loader, dataset = training_loader(images, workers=2)
    dataset.close_mosaic(from_epoch=1)
    first, second = take(loader), take(loader)
    assert all(s is None for *_, shapes in first for s in shapes)  # hyp mosaic 1.0: every sample a mosaic
    assert all(s is not None for *_, shapes in second for s in shapes)
    dataset.close_mosaic()  # now: prepared batches are dropped, the next epoch starts afresh
    assert all(s is not None for *_, shapes in take(loader) for s in shapes)


def test_stepping_back_an_epoch_replays_it(images):
    loader, _ = training_loader(images, workers=2)
    first = take(loader)
    take(loader)
    loader.set_epoch(0)
    assert same(take(loader), first)


def test_ranks_share_one_order_and_split_it():
    shards = []
    for rank in range(3):
        sampler = EpochBatchSampler(10, batch_size=2, seed=1)
        sampler.rank, sampler.world_size = rank, 3
        shards.append([key.index for batch in sampler.batches(4) for key in batch])
    assert all(len(s) == 4 for s in shards)  # 10 images padded to 12, 4 per rank
    drawn = [shards[r][k] for k in range(4) for r in range(3)]
    assert sorted(set(drawn)) == list(range(10)) and drawn[:10] == EpochBatchSampler(10, 2, seed=1).order(4)
    assert len(EpochBatchSampler(5, batch_size=4, drop_last=True)) == 1
    assert len(EpochBatchSampler(3, batch_size=4, drop_last=True)) == 1  # never an empty epoch
