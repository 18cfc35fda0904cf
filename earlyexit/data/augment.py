"""Training augmentation and normalisation of image batches, applied to whole batches at once.

``Augment`` names a dataset's augmentation (random crop after zero padding,
horizontal flip); its parameters are drawn per global batch from the epoch's
generator (``earlyexit.data.sampling``), so every rank sees the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    """A dataset's training augmentation, applied to whole batches at once."""

    crop_pad: int = 0   # random crop of the original size after zero padding by this many pixels per side; 0 = off
    flip: bool = False  # horizontal flip with probability 1/2

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip


def _draw_augment(spec: Augment, g: torch.Generator, size: int) -> tuple[Tensor | None, Tensor | None]:
    """Crop offsets ``(2, size)`` and flip flags ``(size,)`` for one global batch (None when off)."""
    offsets = torch.randint(0, 2 * spec.crop_pad + 1, (2, size), generator=g) if spec.crop_pad else None
    flips = torch.randint(0, 2, (size,), generator=g).bool() if spec.flip else None
    return offsets, flips


def apply_augment(x: Tensor, pad: int, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
    """Random crop with zero padding, then horizontal flip, as one gather over the batch.

    Args:
        x: images ``(B, C, H, W)`` of any dtype (zero is the padding value).
        pad: zero padding per side before cropping (ignored when ``offsets`` is None).
        offsets: top/left crop offsets in the padded image, ``(2, B)``, each in ``[0, 2 * pad]``; None = no crop.
        flips: ``(B,)`` bool, True = flip horizontally; None = no flip.
    Returns:
        The augmented images, same shape and dtype as ``x``.
    """
    if offsets is None and flips is None:
        return x
    B, C, H, W = x.shape
    dev = x.device
    rows = torch.arange(H, device=dev).expand(B, H)  # (B, H)
    cols = torch.arange(W, device=dev).expand(B, W)  # (B, W)
    if flips is not None:
        # Flipping after the crop reads the crop window right to left.
        cols = torch.where(flips.to(dev)[:, None], W - 1 - cols, cols)  # (B, W)
    if offsets is not None and pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
        offsets = offsets.to(dev)
        rows = rows + offsets[0][:, None]  # (B, H)
        cols = cols + offsets[1][:, None]  # (B, W)
    # One gather over flattened planes is ~3x faster than 4-D advanced indexing.
    flat = (rows[:, :, None] * x.shape[-1] + cols[:, None, :]).reshape(B, 1, H * W)  # (B, 1, H*W)
    out = x.reshape(B, C, x.shape[-2] * x.shape[-1]).gather(2, flat.expand(B, C, H * W))  # (B, C, H*W)
    return out.reshape(B, C, H, W)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] (or float in [0, 1]) -> float32 ``(x - mean) / std``."""
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)
    mul = (scale / std_t).view(1, -1, 1, 1)  # (1, C, 1, 1)
    sub = (torch.tensor(mean, dtype=torch.float32, device=x.device) / std_t).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return x.to(torch.float32).mul_(mul).sub_(sub)  # (B, C, H, W)
