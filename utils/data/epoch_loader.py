"""A training loader that streams epoch after epoch through one set of worker processes.

A DataLoader starts every epoch empty: its workers only begin the next epoch's batches when the
trainer asks for the first one. On a small dataset (BCCD: 7 batches of 32) that wait, a whole
batch of mosaics built by one worker, recurs every few steps and dominates the epoch. Here one
endless iterator feeds all epochs, so the workers build the next epoch's first batches while the
GPU finishes the current epoch and validation runs.

What a batch holds is fixed by its (epoch, position) alone, whatever the number of workers or
processes and whether the run was resumed: each epoch's order is ``DistributedSampler``'s for
(seed, epoch) (one replica per process, shared by all DDP ranks), and each sample carries its
epoch (``SampleKey``), from which ``YoloDataset`` seeds its augmentations per (seed, epoch, image):
the same batches a DataLoader gives after ``set_epoch`` on its sampler and dataset. Epochs are
consumed in order; ``set_epoch`` says where a resumed run starts.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, NamedTuple

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler


class SampleKey(NamedTuple):
    """What the dataset is asked for: an image and the epoch it is drawn for."""

    index: int
    epoch: int


class EpochBatchSampler(Sampler):
    """Batches of ``SampleKey`` for epoch after epoch, without end (this process's shard of each).

    ``handed_out`` records the epoch of every batch handed to the DataLoader and not yet taken back
    by ``EpochLoader``: the DataLoader returns batches in that order.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.start_epoch = 0
        self.handed_out: deque[int] = deque()
        self._jump = 0

    @property
    def per_rank(self) -> int:
        return -(-self.n // self.world_size)  # the epoch is padded by repeating images, as DistributedSampler does

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.per_rank, self.batch_size)
        return full + (1 if rest and (not self.drop_last or not full) else 0)  # never an empty epoch

    def order(self, epoch: int) -> list[int]:
        """This rank's images of ``epoch`` in the order they are drawn: ``DistributedSampler``'s."""
        sampler = DistributedSampler(range(self.n), num_replicas=self.world_size, rank=self.rank, shuffle=self.shuffle,
                                     seed=self.seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def batches(self, epoch: int) -> list[list[SampleKey]]:
        keys = [SampleKey(i, epoch) for i in self.order(epoch)]
        return [keys[k:k + self.batch_size] for k in range(0, len(self) * self.batch_size, self.batch_size)]

    def restart(self, epoch: int) -> None:
        """The next iteration starts at ``epoch`` with nothing handed out."""
        self.start_epoch, self._jump = epoch, epoch
        self.handed_out.clear()

    def jump_to(self, epoch: int) -> None:
        """Hand out no more batches of epochs before ``epoch``: the consumer has moved on to it."""
        self._jump = max(self._jump, epoch)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch = self.start_epoch
        while True:
            for batch in self.batches(epoch):
                if self._jump > epoch:
                    break
                self.handed_out.append(epoch)
                yield batch
            epoch = max(epoch + 1, self._jump)


class EpochLoader:
    """One epoch of batches per iteration, like a DataLoader, from a single endless DataLoader iterator.

    Stopping an epoch early (``max_iters``) is fine: the batches of it already prepared are skipped
    when the next epoch starts. Attributes it lacks are the DataLoader's (``dataset``, ``num_workers``...).
    """

    def __init__(self, loader: DataLoader):
        if not isinstance(loader.batch_sampler, EpochBatchSampler):
            raise TypeError("EpochLoader needs a DataLoader whose batch_sampler is an EpochBatchSampler")
        self.loader = loader
        self.sampler: EpochBatchSampler = loader.batch_sampler
        self.epoch = 0  # the epoch the next iteration yields
        self._stream: Iterator | None = None
        self._last = -1  # the epoch iterated last
        self._augmentation = None

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (a resumed run starts past 0)."""
        self.epoch = epoch

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        augmentation = _augmentation_state(self.loader.dataset)
        if self._stream is None or epoch <= self._last or augmentation != self._augmentation:
            # first use, a step back, or augmentation switched under prepared batches: start afresh
            self.sampler.restart(epoch)
            self._stream, self._augmentation = iter(self.loader), augmentation
        else:
            self.sampler.jump_to(epoch)
        self._last = epoch
        return self._epoch(epoch)

    def _epoch(self, epoch: int):
        taken = 0
        while taken < len(self):
            batch = next(self._stream)
            if self.sampler.handed_out.popleft() < epoch:
                continue  # prepared for an epoch that was cut short
            taken += 1
            yield batch


def _augmentation_state(dataset) -> object:
    """What decides how an already prepared sample looks (mosaic on or off): a change voids them."""
    return getattr(dataset, "augmentation_state", lambda: None)()
