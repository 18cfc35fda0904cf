"""Seeded random streams and batch plans: which samples form each batch of an epoch, on each rank.

Order and augmentation depend only on ``(seed, epoch)`` through a local
``torch.Generator`` (never the global RNG); under data parallelism every rank
draws the same plan for the global batch and keeps its own contiguous slice,
so the ranks together see exactly the single-process batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

# Independent random streams derived from the same user seed.
_STREAM_ORDER, _STREAM_SPLIT, _STREAM_SYNTHETIC = 0, 1, 2


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(stream, seed, epoch)`` only (never the global RNG).

    ``SeedSequence`` mixes the three numbers so that nearby seeds and epochs give
    unrelated streams.
    """
    words = [stream % 2**64, seed % 2**64, epoch % 2**64]
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


@dataclass
class EpochPlan:
    """The batches of one epoch as seen by one rank.

    Attributes:
        generator: the epoch's generator, positioned after the permutation; draw
            augmentation parameters from it for each global batch, in order.
        batches: global batches of sample indices, each ``(G,)`` with ``G <= batch_size``.
        slices: this rank's contiguous part of each global batch.
    """

    generator: torch.Generator
    batches: list[Tensor]
    slices: list[slice]


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size % world_size:
        raise DataError(f"batch_size {batch_size} is not divisible by world_size {world_size}; "
                        "the global batch is split evenly over the ranks")


def count_batches(n: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
    """Number of batches ``plan_epoch`` yields per epoch (the same on every rank).

    Args:
        n: number of samples.
        batch_size: global batch size.
        world_size: number of data-parallel ranks.
        drop_last: drop the last, partial global batch.
    Returns:
        The number of batches.
    """
    full, rest = divmod(n, batch_size)
    # A partial batch smaller than world_size would leave some rank empty: it is dropped.
    return full + int(rest > 0 and not drop_last and rest >= world_size)


def plan_epoch(n: int, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> EpochPlan:
    """Cut one epoch over ``n`` samples into global batches and this rank's slices.

    The order depends only on ``(seed, epoch)``. Rank ``r`` gets the ``r``-th of
    ``world_size`` contiguous, equal slices of each global batch, so averaging the
    ranks' mean losses gives the single-process loss. The last, partial global
    batch (unless ``drop_last``) is cut into near-equal contiguous parts
    (``torch.tensor_split``); if it holds fewer samples than ranks it is dropped,
    so that every rank runs the same number of steps.

    Args:
        n: number of samples.
        batch_size: global batch size (divisible by ``world_size``).
        shuffle: permute the samples; otherwise keep their order.
        seed: seed of the order (and of augmentation drawn from the generator).
        epoch: epoch number; each epoch has its own order.
        rank: this process's rank.
        world_size: number of data-parallel ranks.
        drop_last: drop the last, partial global batch.
    Returns:
        An ``EpochPlan``.
    Raises:
        DataError: on a bad batch size, rank or world size.
    """
    _check_batching(batch_size, rank, world_size)
    g = _generator(seed, epoch, _STREAM_ORDER)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)  # (n,)
    steps = count_batches(n, batch_size, world_size=world_size, drop_last=drop_last)
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]  # each (G,)
    slices = []
    for b in batches:
        if len(b) == batch_size:
            per = batch_size // world_size
            slices.append(slice(rank * per, (rank + 1) * per))
        else:
            bounds = [len(p) for p in torch.arange(len(b)).tensor_split(world_size)]
            lo = sum(bounds[:rank])
            slices.append(slice(lo, lo + bounds[rank]))
    return EpochPlan(generator=g, batches=batches, slices=slices)
