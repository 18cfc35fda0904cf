"""The one pass over the data: every exit's logits, kept as an ``(E, N, C)`` tensor.

Follows the evaluation protocol of "Joint or Disjoint: Mixing Training Regimes
for Early-Exit Models": the data is run once, and every threshold curve, static
point and budget table is computed from the resulting tensor, never by
re-running the model per threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from ..device import autocast_context, model_device
from ..tree import to_device

if TYPE_CHECKING:
    from ..models.multiexit import MultiExitModel


def evaluate(model: MultiExitModel, batches: Iterable[Any], *, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Run the data once and keep every exit's logits.

    Runs under ``torch.inference_mode`` in eval mode (the training flag is
    restored afterwards), with bf16 autocast on CUDA.

    Args:
        model: the multi-exit model, already on ``device``.
        batches: an iterable of ``(x, y)`` pairs; ``x`` a tensor or a pytree
            (e.g. a dict of tensors), ``y`` a ``(B,)`` tensor of class indices.
        device: where the model runs; ``None`` = the device of its parameters.
    Returns:
        ``(logits, labels)``: ``(E, N, C)`` float32 logits and ``(N,)`` labels, on the CPU.
    """
    home = model_device(model)
    device = home if device is None else torch.device(device)
    if device.type != home.type or (device.index is not None and home.index is not None and device.index != home.index):
        raise ValueError(f"the model is on {home} but device={device}; move the model first")
    logits, labels = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device):
            for batch in batches:
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError("each batch must be an (x, y) pair")
                x, y = batch
                outs = model(to_device(x, device))
                logits.append(torch.stack([o.float() for o in outs]).cpu())  # (E, B, C)
                labels.append(torch.as_tensor(y).reshape(-1).cpu())  # (B,)
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("no batches to evaluate")
    return torch.cat(logits, dim=1), torch.cat(labels)  # (E, N, C), (N,)


__all__ = ["evaluate"]
