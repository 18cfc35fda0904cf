"""BatchNorm statistics of a model whose weights were moved: ``reset_bn``.

The analyses of "Joint or Disjoint: Mixing Training Regimes for Early-Exit
Models" evaluate networks at weights that no training run produced: points
between two models (the connectivity path and plane) and points around one
model (the loss landscapes). The running statistics a model carries belong to
its own weights; at any other point they are re-estimated on training batches,
as the plane of Figure 2 and the landscapes of appendix A do here. This module
is the one place that does it, shared by ``connectivity``, ``plane`` and
``landscape``.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable

import torch
from torch import nn


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reset_bn(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None) -> nn.Module:
    """Recompute every BatchNorm layer's running statistics on ``batches``.

    The statistics are reset and re-estimated as an exact average over the
    batches (``momentum=None``), with only the BatchNorm layers in training
    mode (dropout stays off) and no gradients. A model without BatchNorm is
    returned untouched.

    Args:
        model: the model, changed in place.
        batches: ``(x, y)`` pairs (training data, without augmentation is usual).
        num_batches: use at most this many batches; None = all.
    Returns:
        ``model``.
    Raises:
        ValueError: if there are BatchNorm layers but no batches.
    """
    from ..tree import to_device

    bns = bn_modules(model)
    if not bns:
        return model
    device = next(model.parameters()).device
    momenta = [m.momentum for m in bns]
    was = {m: m.training for m in model.modules()}
    seen = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
            m.train()
        with torch.no_grad():
            for x, _ in itertools.islice(batches, num_batches):
                model(to_device(x, device))
                seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, w in was.items():
            m.train(w)
    if seen == 0:
        raise ValueError("reset_bn needs at least one batch")
    return model
