"""create_dataloader: upstream's batch layout, rect batches, workers, seeding and close-mosaic."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.data_builders import build_dataset
from utils.boxes import scale_boxes, xywh2xyxy, xywhn2xyxy
from utils.data.config import load_hyp
from utils.data.dataset import set_epoch
from utils.dataloaders import create_dataloader
from utils.paths import ROOT


@pytest.fixture(scope="module")
def images(tmp_path_factory, coco128_dir):
    return build_dataset(tmp_path_factory.mktemp("loader"), coco128_dir, n=10)


def test_validation_batches_have_upstream_layout_and_map_back_to_original_labels(images):
    loader, ds = create_dataloader(str(images), 96, 4, 32, rect=True, pad=0.5, workers=0, nc=80)
    seen = 0
    for imgs, targets, paths, shapes in loader:
        b = imgs.shape[0]
        assert imgs.dtype == torch.uint8 and imgs.shape[1] == 3
        assert imgs.shape[2] % 32 == 0 and imgs.shape[3] % 32 == 0 and max(imgs.shape[2:]) <= 96 + 32
        assert isinstance(paths, tuple) and isinstance(shapes, tuple) and len(paths) == len(shapes) == b
        assert targets.dtype == torch.float32 and targets.shape[1] == 6
        assert set(targets[:, 0].long().tolist()) <= set(range(b))
        for j, (path, ((h0, w0), ((gh, gw), (padw, padh)))) in enumerate(zip(paths, shapes)):
            i = ds.im_files.index(path)
            assert (w0, h0) == tuple(ds.shapes[i])
            mine = targets[targets[:, 0] == j]
            h, w = imgs.shape[2:]
            boxes = xywh2xyxy(mine[:, 2:]) * torch.tensor([w, h, w, h])
            back = scale_boxes((h, w), boxes, (h0, w0), ratio_pad=((gh, gw), (padw, padh)))
            truth = xywhn2xyxy(torch.from_numpy(ds.labels[i][:, 1:]), w0, h0)
            assert torch.allclose(back, truth, atol=1.5 / min(gh, gw))  # within a pixel of the letterboxed image
            np.testing.assert_array_equal(mine[:, 1].numpy(), ds.labels[i][:, 0])
            seen += 1
    assert seen == len(ds) == 10


def test_rect_batches_sorted_by_aspect_with_stride_multiple_shapes(images):
    loader, ds = create_dataloader(str(images), 128, 3, 32, rect=True, pad=0.0, workers=0)
    aspect = ds.shapes[:, 1] / ds.shapes[:, 0]
    assert (np.diff(aspect) >= 0).all()
    assert (ds.batch_shapes % 32 == 0).all() and ds.batch_shapes.shape == (4, 2)
    for b, (imgs, *_) in enumerate(loader):
        assert tuple(imgs.shape[2:]) == tuple(ds.batch_shapes[b])
        ar = aspect[ds.batch == b]
        assert ds.batch_shapes[b].max() == 128  # the long side is the image size...
        if ar.max() < 1:
            assert ds.batch_shapes[b][0] >= 128 * ar.max()  # ...and the short side fits every image


def test_rect_turns_shuffle_off(images, caplog):
    loader, _ = create_dataloader(str(images), 64, 2, 32, rect=True, shuffle=True, workers=0)
    assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
    assert "shuffle turned off" in caplog.text


def test_workers_give_the_same_validation_batches(images):
    batches = []
    for workers in (0, 2):
        loader, _ = create_dataloader(str(images), 64, 4, 32, rect=True, workers=workers)
        assert loader.num_workers == workers
        batches.append(list(loader))
    for (a_img, a_t, a_p, a_s), (b_img, b_t, b_p, b_s) in zip(*batches):
        assert torch.equal(a_img, b_img) and torch.equal(a_t, b_t) and a_p == b_p and a_s == b_s


def test_shuffled_training_is_reproducible_from_the_seed(images):
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")

    def first_epoch(seed):
        loader, _ = create_dataloader(str(images), 64, 4, 32, hyp=hyp, augment=True, shuffle=True, workers=2,
                                      seed=seed)
        return [(imgs, t, p) for imgs, t, p, _ in loader]

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    assert [x[2] for x in a] != [x[2] for x in c]


def test_an_epoch_draws_the_same_batches_from_any_loader(images):
    """Epoch 2 of a loader whose persistent workers already served epoch 1 equals epoch 2 of a fresh
    loader without workers (what a resumed run starts): order and augmentations follow (seed, epoch)."""
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")

    def epoch(loader, e):
        set_epoch(loader, e)
        return [(imgs, t, p) for imgs, t, p, _ in loader]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) and x[2] == y[2]
                                        for x, y in zip(a, b))

    ongoing, _ = create_dataloader(str(images), 64, 4, 32, hyp=hyp, augment=True, shuffle=True, workers=2, seed=3)
    first, second = epoch(ongoing, 0), epoch(ongoing, 1)
    resumed, _ = create_dataloader(str(images), 64, 4, 32, hyp=hyp, augment=True, shuffle=True, workers=0, seed=3)
    assert ongoing.persistent_workers and same(epoch(resumed, 1), second)
    assert not same(first, second)  # each epoch draws anew
    assert same(epoch(ongoing, 0), first)  # and an epoch is a function of its number, not of what came before


def test_close_mosaic_reaches_persistent_workers(images):
    hyp = load_hyp(ROOT / "data" / "hyps" / "hyp.scratch-high.yaml")
    loader, ds = create_dataloader(str(images), 64, 2, 32, hyp=hyp, augment=True, shuffle=True, workers=2,
                                   close_mosaic=True)
    assert loader.persistent_workers and ds.mosaic
    assert all(s is None for *_, shapes in loader for s in shapes)  # mosaic probability is 1.0
    ds.close_mosaic()
    assert not ds.mosaic
    for imgs, targets, paths, shapes in loader:
        assert all(s is not None for s in shapes)
        assert imgs.shape[2:] == (64, 64)
