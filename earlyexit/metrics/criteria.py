"""Exit criteria: per-exit scores, the exit each sample leaves at, and the checks of ``(E, N, C)`` logits.

Exit criteria (a sample leaves at the first exit whose criterion fires, and at
the last exit when none does):

- ``confidence``: the maximum softmax probability is ``> t`` (strictly, as
  in the paper's code): ``t = 1.0`` lets no sample leave early, even one whose
  float32 softmax saturates at exactly 1.0, and ``t = 0`` lets every sample
  leave at the first exit;
- ``entropy``: the entropy of the softmax, in nats, is ``<= t``;
- ``patience`` (PABEE, Zhou et al., NeurIPS 2020): the arg-max prediction has
  been the same at ``p`` consecutive exits ending at the current one, i.e. at
  exit ``k`` (0-based, ``k >= p - 1``) the predictions at ``k, k-1, ..., k-p+1``
  all agree. ``p = 1`` leaves at the first exit; ``p = 0`` never fires, so
  every sample runs to the last exit (PABEE's patience 0, "use all layers").
  PABEE's own patience counts the agreements after the first prediction, so
  for PABEE's ``t >= 1`` it equals ``p - 1`` here
  (``earlyexit.methods.pbee.patience_threshold`` converts).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..config import CRITERIA  # the names live with the config, which checks them when it is built


def _check_logits(logits: Tensor, labels: Tensor | None = None, costs: Sequence[float] | None = None) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be an (E, N, C) tensor, got {getattr(logits, 'shape', type(logits))}")
    E, N, C = logits.shape
    if E == 0 or N == 0 or C == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(logits.shape)}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != (N,)):
        raise ValueError(f"labels must be an ({N},) tensor, got {getattr(labels, 'shape', type(labels))}")
    if costs is not None and len(costs) != E:
        raise ValueError(f"costs must hold one value per exit ({E}), got {len(costs)}")


def _resolve_thresholds(criterion: str, thresholds: int | Sequence[float], E: int, C: int) -> Tensor:
    """The swept thresholds as a float64 tensor (T,)."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if isinstance(thresholds, bool):
        raise ValueError("thresholds must be a count or a sequence of values")
    if isinstance(thresholds, int):
        if thresholds < 1:
            raise ValueError(f"the number of thresholds must be >= 1, got {thresholds}")
        if criterion == "confidence":
            return torch.linspace(0, 1, thresholds, dtype=torch.float64)
        if criterion == "entropy":
            return torch.linspace(0, math.log(C), thresholds, dtype=torch.float64)
        # Patience beyond E always leaves at the last exit: the first min(n, E) values cover the curve.
        return torch.arange(1, min(thresholds, E) + 1, dtype=torch.float64)
    t = torch.as_tensor([float(v) for v in thresholds], dtype=torch.float64)
    if t.numel() == 0:
        raise ValueError("thresholds must not be empty")
    if criterion == "patience" and bool(((t < 0) | (t != t.round())).any()):
        raise ValueError(f"patience values must be integers >= 0 (0: never leave early), got {t.tolist()}")
    return t


def _fire_mask(logits: Tensor, criterion: str, thresholds: Tensor) -> Tensor:
    """(T, E, N) bool: whether exit k would let sample n leave under threshold t."""
    E = logits.shape[0]
    t = thresholds.to(logits.device)[:, None, None]  # (T, 1, 1)
    if criterion == "patience":
        pred = logits.argmax(-1)  # (E, N)
        change = torch.ones_like(pred, dtype=torch.bool)  # (E, N): a new run of equal predictions starts here
        change[1:] = pred[1:] != pred[:-1]
        k = torch.arange(E, device=logits.device)[:, None]  # (E, 1)
        last_change = torch.cummax(torch.where(change, k, 0), dim=0).values  # (E, N)
        run = (k - last_change + 1).double()  # (E, N): length of the run of equal predictions ending at k
        return (run[None] >= t) & (t > 0)  # (T, E, N): p = 0 never fires
    if criterion == "confidence":
        return exit_scores(logits, criterion)[None] > t  # strict: t = 1.0 keeps even saturated samples in
    return exit_scores(logits, criterion)[None] <= t


def exit_scores(logits: Tensor, criterion: str) -> Tensor:
    """(E, N) float64 from (E, N, C) logits: the max softmax probability (``confidence``) or the entropy in
    nats (``entropy``); the one formula behind every exit decision, offline and in ``inference.predict``."""
    if criterion == "confidence":
        x = logits.float()
        return (x.amax(-1) - x.logsumexp(-1)).exp().double()  # (E, N): max softmax without materialising it
    # One exit at a time keeps a single (N, C) softmax alive; entr(0) = 0 tolerates masked (-inf) classes.
    return torch.stack([torch.special.entr(torch.softmax(x.float(), dim=-1)).sum(-1) for x in logits]).double()  # (E, N)


def _exit_indices(logits: Tensor, criterion: str, thresholds: Tensor) -> Tensor:
    """(T, N) long: the exit each sample leaves at under each threshold."""
    fire = _fire_mask(logits, criterion, thresholds)  # (T, E, N)
    fire[:, -1] = True  # nobody gets past the last exit
    # argmax returns the first maximal index, i.e. the first exit that fires.
    return fire.to(torch.uint8).argmax(dim=1)  # (T, N)


def exit_decisions(logits: Tensor, criterion: str, threshold: float) -> Tensor:
    """The exit each sample leaves at under one threshold.

    Args:
        logits: ``(E, N, C)`` logits of every exit.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"`` (see the module docstring).
        threshold: the threshold ``t`` (confidence: leave if ``> t``; entropy: leave if ``<= t``), or the
            patience ``p >= 0`` for ``"patience"`` (0: nobody leaves early).
    Returns:
        ``(N,)`` long tensor of exit indices in ``[0, E)``.
    """
    _check_logits(logits)
    E, _, C = logits.shape
    t = _resolve_thresholds(criterion, [threshold], E, C)
    return _exit_indices(logits, criterion, t)[0]


__all__ = ["CRITERIA", "exit_scores", "exit_decisions"]
