"""Mini-batch iteration over an in-memory :class:`~cnnpress.data.spec.Dataset`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cnnpress.data.spec import Dataset
from cnnpress.data.transforms import normalize, random_crop, random_hflip
from cnnpress.errors import ConfigError

__all__ = ["Loader"]

_MASK63 = (1 << 63) - 1


class Loader:
    """Iterates over normalised mini-batches ``(x_float32, y_int64)`` of a data set.

    The order and the augmentation of an epoch depend only on ``(seed, epoch, rank)``, so a
    resumed run that calls :meth:`set_epoch` sees exactly the same batches. The data set stays
    uint8 in memory; each batch is gathered, augmented (on uint8, so padding is black) and
    normalised with the spec's mean and std.

    With ``world_size > 1`` every rank takes the strided share ``perm[rank::world_size]`` of
    the epoch's permutation (the same on all ranks). With ``drop_last`` the permutation is first
    cut to a multiple of ``world_size`` so every rank gets the same number of batches.

    Args:
        dataset: The split to iterate over.
        batch_size: Samples per batch (>= 1).
        train: Shuffle each epoch (and augment, unless ``augment`` says otherwise).
        seed: Base seed of the shuffling and augmentation.
        augment: Random crop with ``spec.crop_padding`` and, if ``spec.hflip``, horizontal
            flips; defaults to ``train``.
        drop_last: Drop the last incomplete batch; defaults to ``train``.
        rank: This process's rank in ``0 .. world_size - 1``.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        train: bool,
        seed: int = 0,
        augment: bool | None = None,
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"the batch size must be a positive integer, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.augment = self.train if augment is None else bool(augment)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _epoch_seed(self) -> int:
        return (self.seed * 1_000_003 + self.epoch) & _MASK63

    def epoch_indices(self) -> torch.Tensor:
        """The sample indices this rank visits in the current epoch, in order."""
        n = len(self.dataset)
        if self.train:
            gen = torch.Generator().manual_seed(self._epoch_seed())
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            if self.drop_last:
                order = order[: n - n % self.world_size]
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self.epoch_indices()) if self.world_size > 1 else len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def _augment(self, images: torch.Tensor, batch_index: int) -> torch.Tensor:
        spec = self.dataset.spec
        seed = (self._epoch_seed() * 7919 + self.rank * 104_729 + batch_index + 1) & _MASK63
        gen = torch.Generator().manual_seed(seed)
        images = random_crop(images, spec.crop_padding, gen)
        if spec.hflip:
            images = random_hflip(images, gen)
        return images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_indices()
        spec = self.dataset.spec
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.dataset.images[idx]
            if self.augment:
                images = self._augment(images, b)
            yield normalize(images, spec.mean, spec.std), self.dataset.labels[idx]
