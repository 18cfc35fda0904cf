"""Optimizer, learning-rate schedule and seed derivation of the training loop.

``make_optimizer`` builds a phase's optimizer (SGD with momentum or AdamW),
``lr_at`` the learning rate of a step under the phase's schedule, and
``seed_for`` the seed of one epoch: data order, augmentation and dropout
depend on ``(seed, phase, grid point, epoch)`` alone, which is what makes a
resumed run take exactly the path of an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..config import PhaseConfig


def seed_for(seed: int, phase: int, grid: int, epoch: int) -> int:
    """The seed of one epoch of one grid point of one phase."""
    return (seed * 1_000_003 + phase * 10_007 + grid * 101 + epoch) % (2**31 - 1)


def make_optimizer(params: Sequence[nn.Parameter], pc: PhaseConfig, lr: float) -> torch.optim.Optimizer:
    if pc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=pc.momentum, weight_decay=pc.weight_decay, nesterov=False)
    if pc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=pc.weight_decay)
    raise ValueError(f"unknown optimizer {pc.optimizer!r}; valid: sgd, adamw")


def lr_at(pc: PhaseConfig, base: float, step: int, total: int) -> float:
    """The learning rate of step ``step`` of ``total``: the schedule times a linear warmup over ``pc.warmup`` steps."""
    warm = min(1.0, (step + 1) / pc.warmup) if pc.warmup else 1.0
    if pc.schedule == "constant":
        return base * warm
    if pc.schedule == "cosine":
        return base * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise ValueError(f"unknown schedule {pc.schedule!r}; valid: cosine, constant")


__all__ = ["seed_for", "make_optimizer", "lr_at"]
