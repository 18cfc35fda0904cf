"""Threshold sweeps, static exits and budget tables, from the ``(E, N, C)`` logits of one pass.

Follows the evaluation protocol of "Joint or Disjoint: Mixing Training Regimes
for Early-Exit Models": every threshold curve, static point and budget table
(the paper's Table 1) is computed from the logits of ``evaluate`` by pure,
vectorized functions, never by re-running the model per threshold.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .criteria import _check_logits, _exit_indices, _resolve_thresholds


def threshold_curve(logits: Tensor, labels: Tensor, costs: Sequence[float], thresholds: int | Sequence[float] = 100,
                    criterion: str = "confidence") -> dict:
    """Average cost and accuracy of early-exit inference over a sweep of thresholds.

    Vectorized over thresholds and samples: a ``(T, E, N)`` mask of where the
    criterion fires, its first ``True`` along exits, then counts per exit.

    Args:
        logits: ``(E, N, C)`` logits of every exit (from ``evaluate``).
        labels: ``(N,)`` class indices.
        costs: per-exit cumulative costs (from ``exit_costs``).
        thresholds: a count or an explicit sequence. Default counts:
            confidence ``linspace(0, 1, n)``, entropy ``linspace(0, log C, n)``,
            patience ``1 .. min(n, E)``.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"``.
    Returns:
        A dict with ``criterion``, ``thresholds`` (floats), ``flops`` (average
        cost per threshold), ``accuracy`` (per threshold) and ``exit_counts``
        (per threshold, a list of E sample counts).
    """
    _check_logits(logits, labels, costs)
    E, N, C = logits.shape
    t = _resolve_thresholds(criterion, thresholds, E, C)  # (T,)
    T = t.numel()
    exits = _exit_indices(logits, criterion, t).cpu()  # (T, N)
    correct = (logits.argmax(-1).cpu() == labels.cpu()[None])  # (E, N)
    hit = correct[exits, torch.arange(N)[None]]  # (T, N)
    offsets = torch.arange(T)[:, None] * E  # (T, 1): one histogram row per threshold
    counts = torch.bincount((exits + offsets).flatten(), minlength=T * E).view(T, E)  # (T, E)
    cost = torch.as_tensor([float(c) for c in costs], dtype=torch.float64)  # (E,)
    flops = counts.double() @ cost / N  # (T,)
    return {
        "criterion": criterion,
        "thresholds": t.tolist(),
        "flops": flops.tolist(),
        "accuracy": hit.double().mean(1).tolist(),
        "exit_counts": counts.tolist(),
    }


def static_points(logits: Tensor, labels: Tensor, costs: Sequence[float]) -> list[dict]:
    """Cost and accuracy when every sample leaves at the same exit k.

    Args:
        logits: ``(E, N, C)`` logits; labels: ``(N,)``; costs: per-exit costs.
    Returns:
        One ``{"index", "flops", "accuracy"}`` dict per exit.
    """
    _check_logits(logits, labels, costs)
    acc = accuracy_per_exit(logits, labels)
    return [{"index": k, "flops": float(c), "accuracy": a} for k, (c, a) in enumerate(zip(costs, acc))]


def accuracy_per_exit(logits: Tensor, labels: Tensor) -> list[float]:
    """Top-1 accuracy of each exit.

    Args:
        logits: ``(E, N, C)`` logits; labels: ``(N,)`` class indices.
    Returns:
        One accuracy in ``[0, 1]`` per exit.
    """
    _check_logits(logits, labels)
    return (logits.argmax(-1) == labels.to(logits.device)[None]).double().mean(1).tolist()  # (E,)


def budget_table(curve: dict, statics: Sequence[dict], base_flops: float,
                 fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> dict:
    """Best accuracy within compute budgets (the paper's Table 1).

    A point (a threshold of ``curve`` or a static exit) fits a budget when its
    average cost is at most ``fraction * base_flops`` (with a 1e-9 relative
    slack for float rounding).

    Args:
        curve: a ``threshold_curve`` result (uses ``flops`` and ``accuracy``).
        statics: ``static_points`` results.
        base_flops: the reference cost, usually ``backbone_cost``.
        fractions: budget fractions of ``base_flops``.
    Returns:
        ``{"25%": acc or None, ..., "max": best accuracy overall}``.
    """
    if not base_flops > 0:
        raise ValueError(f"base_flops must be positive, got {base_flops}")
    if len(curve["flops"]) != len(curve["accuracy"]):
        raise ValueError("curve['flops'] and curve['accuracy'] differ in length")
    points = list(zip(curve["flops"], curve["accuracy"])) + [(s["flops"], s["accuracy"]) for s in statics]
    table: dict[str, float | None] = {}
    for f in fractions:
        limit = f * base_flops * (1 + 1e-9)
        fits = [a for c, a in points if c <= limit]
        table[f"{f * 100:g}%"] = max(fits) if fits else None
    table["max"] = max((a for _, a in points), default=None)
    return table


__all__ = ["threshold_curve", "static_points", "accuracy_per_exit", "budget_table"]
