"""Training data order that depends only on (seed, micro-batch number).

Epoch ``e`` is ``DistributedSampler(seed=seed).set_epoch(e)``'s shuffle of the dataset, cut into
per-rank batches; each sample carries its own augmentation seed built from (seed, micro-batch,
rank, position). A run resumed at step ``s`` starts at micro-batch ``s * accum`` and sees
exactly the batches, crops and flips of an uninterrupted run, whatever the number of workers.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..data.base import SegDataset
from ..data.transforms import TrainAugment


class ResumableBatchSampler(Sampler):
    """Endless per-rank batches of ``(index, aug_seed)`` from micro-batch `start` on."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, start: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        per_rank = len(dataset) // world_size  # DistributedSampler(drop_last=True)
        self.batches_per_epoch = per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(f"the training set has {len(dataset)} samples, fewer than "
                             f"batch_size x world_size = {batch_size} x {world_size}")

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader)
        return self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                     shuffle=True, seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
        micro = self.start
        epoch, offset = divmod(micro, self.batches_per_epoch)
        while True:
            order = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                yield [(i, (self.seed, micro, self.rank, p)) for p, i in enumerate(idx)]
                micro += 1
            epoch, offset = epoch + 1, 0


class AugmentedDataset(Dataset):
    """``dataset[(index, aug_seed)]`` -> (normalised image [3, c, c], mask [c, c])."""

    def __init__(self, dataset: SegDataset, augment: TrainAugment):
        self.dataset, self.augment = dataset, augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, aug_seed = key
        image, mask = self.dataset.load(index)
        rng = np.random.default_rng(list(aug_seed))
        return self.augment(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask), rng)


def baseline_for_step(baselines: tuple[str, ...], seed: int, step: int) -> str:
    """The baseline of optimizer step `step`: the same on every rank and after a resume."""
    rng = np.random.default_rng([seed, step, 0xBA5E])
    return baselines[int(rng.integers(len(baselines)))]
