"""Gradient dominance as cosines: the paper's Figure 4.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" asks which
exits dominate the backbone's update when all exits train together. The
update of the shared backbone parameters ``theta`` is ``g_total = sum_k g_k``
with ``g_k = d(w_k * CE_k) / d theta`` (``w_k`` the loss weight of exit ``k``,
``CE_k`` its cross-entropy on the batch); exit ``k`` dominates when ``g_total``
points along ``g_k``. Figure 4 plots, for every exit over the training steps,

    cos_k = <g_k, g_total> / (||g_k|| ||g_total||),

with all backbone parameters flattened and concatenated into one vector.

Choices:

- Backbone parameters: the stem and the stages, the parameters every exit
  shares. The backbone's own classifier (``heads[-1]``) belongs to the last
  exit only, like each IC head to its IC; ``include_final_head=True`` adds it.
- Weights: the mean over exits by default (``1 / E`` each), the default loss
  of ``train``; cosines do not change when all weights are scaled together, so
  the ``sum`` weighting gives the same values.
- Exits whose loss does not reach the backbone (an IC head that detaches its
  input, or a zero weight) have no direction: their entry is ``None``, never
  a silent 0, and they add nothing to ``g_total``. When ``g_total`` is zero
  every entry is ``None``.
- Mode: training mode by default (BatchNorm on batch statistics, as in the
  training step); BatchNorm's running statistics are restored afterwards.

``g_total`` is computed by one backward pass of the weighted sum of the
losses, then each ``g_k`` by its own; only ``g_total`` and one ``g_k`` are held at
a time, so memory stays at two copies of the backbone's gradient. The model's
weights, ``requires_grad`` flags, train/eval flags and buffers are left as they were.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import model_device
from ..models.multiexit import MultiExitModel
from ..tree import to_device
from .gradients import kept_grad_state


def shared_parameters(model: MultiExitModel, *, include_final_head: bool = False) -> list[nn.Parameter]:
    """The backbone parameters every exit shares: stem and stages (and the final classifier if asked).

    Args:
        model: the multi-exit model.
        include_final_head: add the backbone's own classifier ``heads[-1]``.
    Returns:
        The parameters, each once, in module order.
    """
    mods = [model.stem, *model.stages] + ([model.heads[-1]] if include_final_head else [])
    seen: set[int] = set()
    out = []
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _weights(weights: Sequence[float] | None, E: int) -> list[float]:
    if weights is None:
        return [1.0 / E] * E
    w = [float(v) for v in weights]
    if len(w) != E:
        raise ValueError(f"weights must hold one value per exit ({E}), got {len(w)}")
    if not all(math.isfinite(v) for v in w):
        raise ValueError(f"weights must be finite, got {w}")
    return w


def gradient_cosines(model: MultiExitModel, x: Any, y: Tensor, *, weights: Sequence[float] | None = None,
                     train_mode: bool = True, include_final_head: bool = False) -> list[float | None]:
    """Cosine between each exit's backbone gradient ``g_k`` and their sum ``g_total`` (Figure 4).

    Args:
        model: the multi-exit model (left as it was: weights, ``requires_grad``, modes, buffers).
        x: an input batch (tensor or pytree), moved to the model's device.
        y: ``(B,)`` class labels.
        weights: loss weight ``w_k`` of every exit; None: ``1 / E`` each.
        train_mode: run the forward pass in training mode (as the training step does); False: eval mode.
        include_final_head: count the backbone's own classifier among the backbone parameters.
    Returns:
        One entry per exit, depth order: ``cos(g_k, g_total)`` in ``[-1, 1]``, or ``None`` for an
        exit whose weighted loss has no gradient on the backbone (see the module docstring).
    Raises:
        TypeError: for a model that is not a ``MultiExitModel``.
        ValueError: on weights of the wrong length or labels that do not fit the batch.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    E = model.num_exits
    w = _weights(weights, E)
    device = model_device(model)
    y = torch.as_tensor(y).reshape(-1).to(device)
    params = shared_parameters(model, include_final_head=include_final_head)
    modes = {m: m.training for m in model.modules()}
    with kept_grad_state(model, buffers=train_mode):
        try:
            for p in params:
                p.requires_grad_(True)  # frozen or not, the gradient is measured
            model.train(train_mode)
            with torch.enable_grad():
                outs = model(to_device(x, device))
                if outs[0].shape[0] != y.shape[0]:
                    raise ValueError(f"{y.shape[0]} labels for a batch of {outs[0].shape[0]} samples")
                losses = [wk * F.cross_entropy(o.float(), y) for wk, o in zip(w, outs)]
            live = [k for k in range(E) if losses[k].requires_grad and w[k] != 0.0]
            if not live:
                return [None] * E
            total_loss = sum(losses[k] for k in live)
            g_total = torch.autograd.grad(total_loss, params, retain_graph=True, allow_unused=True)
            norm_total = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_total if g is not None))
            out: list[float | None] = [None] * E
            for i, k in enumerate(live):
                g_k = torch.autograd.grad(losses[k], params, retain_graph=i < len(live) - 1, allow_unused=True)
                pairs = [(a, b) for a, b in zip(g_k, g_total) if a is not None]
                norm_k = math.sqrt(sum(float(a.double().pow(2).sum()) for a, _ in pairs))
                if norm_k == 0.0 or norm_total == 0.0:
                    continue  # no direction: stays None
                dot = sum(float((a.double() * b.double()).sum()) for a, b in pairs if b is not None)
                out[k] = max(-1.0, min(1.0, dot / (norm_k * norm_total)))
            return out
        finally:
            for m, t in modes.items():
                m.train(t)


def gradient_cosine_record(model: MultiExitModel, x: Any, y: Tensor, *, phase: int, epoch: int, step: int,
                           **kwargs: Any) -> dict:
    """One line of a ``gradients.jsonl`` log: ``{"phase", "epoch", "step", "cos": [E]}`` (None where undefined).

    Args:
        model, x, y, **kwargs: as for ``gradient_cosines``.
        phase, epoch, step: where in training the batch was taken.
    Returns:
        The JSON-ready record (``figures.plot_gradient_cosines`` draws a list of them).
    """
    return {"phase": int(phase), "epoch": int(epoch), "step": int(step),
            "cos": gradient_cosines(model, x, y, **kwargs)}
