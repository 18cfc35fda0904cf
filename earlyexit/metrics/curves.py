"""Threshold sweeps, static exits and budget tables, from the ``(E, N, C)`` logits of one pass.

Follows the evaluation protocol of "Joint or Disjoint: Mixing Training Regimes
for Early-Exit Models": every threshold curve, static point and budget table
is computed from the logits of ``evaluate`` by pure, vectorized functions,
never by re-running the model per threshold.

Two budget tables:

- ``ztw_budget_table``: the paper's Table 1 rule ("as in" Wołczyk et al.,
  Zero Time Waste): the seeds' curves are averaged per threshold
  (``average_curves``) and each budget takes the mean accuracy at the last
  threshold before the mean cost first exceeds it;
- ``budget_table``: for one run, the best accuracy of any threshold or static
  exit within each budget.
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
            patience ``1 .. min(n, E)`` (an explicit patience 0 keeps every
            sample to the last exit). Confidence leaves on ``> t`` (strict),
            so its last default threshold, 1.0, lets nobody leave early.
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
    """Best accuracy within compute budgets, for one run.

    A point (a threshold of ``curve`` or a static exit) fits a budget when its
    average cost is at most ``fraction * base_flops`` (with a 1e-9 relative
    slack for float rounding); the cell is the best accuracy of the points that
    fit. The paper's Table 1 uses another rule over seeds, ``ztw_budget_table``
    (the last threshold within budget of the seed-averaged curve, no static
    exits); this table is never below it for one seed.

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


def _check_curves(curves: Sequence[dict]) -> tuple[list[float], str | None]:
    """The shared thresholds and criterion of seeds' curves; ``ValueError`` when they do not line up."""
    if isinstance(curves, dict) or not len(curves):
        raise ValueError("curves must be a non-empty list of threshold_curve results (one per seed)")
    ref = [float(t) for t in curves[0]["thresholds"]]
    criterion = curves[0].get("criterion")
    if not ref:
        raise ValueError("the curves hold no thresholds")
    for i, c in enumerate(curves):
        if c.get("criterion") != criterion:
            raise ValueError(f"curve {i} uses the criterion {c.get('criterion')!r}, curve 0 {criterion!r}")
        t = [float(v) for v in c["thresholds"]]
        if len(t) != len(ref) or any(abs(a - b) > 1e-12 * max(1.0, abs(b)) for a, b in zip(t, ref)):
            raise ValueError(f"curve {i} was swept at other thresholds than curve 0; the paper's rule averages "
                             "the seeds per threshold, so every curve needs the same ones")
        if len(c["flops"]) != len(t) or len(c["accuracy"]) != len(t):
            raise ValueError(f"curve {i}: thresholds, flops and accuracy differ in length")
    return ref, criterion


def average_curves(curves: Sequence[dict]) -> dict:
    """Seeds' threshold curves averaged per threshold index, as the paper's code averages them.

    Args:
        curves: ``threshold_curve`` results, one per seed, swept at the same thresholds with the same criterion.
    Returns:
        ``{criterion, thresholds, flops, flops_std, accuracy, accuracy_std, seeds}``: the mean average cost
        and mean accuracy per threshold, their standard deviations over seeds with Bessel's correction
        (0.0 for one seed) and the number of curves averaged.
    Raises:
        ValueError: no curves, or curves swept at different thresholds or with different criteria.
    """
    thresholds, criterion = _check_curves(curves)
    flops = torch.tensor([[float(v) for v in c["flops"]] for c in curves], dtype=torch.float64)  # (S, T)
    acc = torch.tensor([[float(v) for v in c["accuracy"]] for c in curves], dtype=torch.float64)  # (S, T)
    S = flops.shape[0]

    def std(x: Tensor) -> list[float]:
        return x.std(dim=0).tolist() if S > 1 else [0.0] * x.shape[1]  # unbiased, as torch.std_mean in the paper's code

    return {"criterion": criterion, "thresholds": thresholds, "flops": flops.mean(0).tolist(), "flops_std": std(flops),
            "accuracy": acc.mean(0).tolist(), "accuracy_std": std(acc), "seeds": S}


def ztw_budget_table(curves: Sequence[dict], base_flops: float,
                     fractions: Sequence[float] = (0.25, 0.5, 0.75, 1.0)) -> dict:
    """The paper's Table 1 budget rule, "as in" Wołczyk et al. (Zero Time Waste), over the seeds of one configuration.

    Each seed's curve is swept at the same thresholds (``threshold_curve``: 100 confidences from 0 to 1,
    leave on ``> t``). Accuracy and average cost are averaged over the seeds per threshold index
    (``average_curves``). Walking the thresholds from the one that lets most samples leave (confidence,
    patience: ascending; entropy: descending), the cell of a budget fraction ``f`` is the mean accuracy, with
    its standard deviation over seeds, at the last threshold before the mean cost first exceeds
    ``f * base_flops`` (a 1e-9 relative slack absorbs float rounding, as in ``budget_table``); ``None`` when
    the first threshold already exceeds it, the last threshold when none does. ``max`` is the last threshold
    (for confidence ``t = 1.0``: nobody leaves early). Static exits do not enter, and the cells need not
    grow with the budget: the threshold just within a larger budget can be less accurate.

    This follows the paper's table code (``cost_vs_table.py`` of its public repository), which takes the
    threshold before the first one whose cost exceeds the budget. The descending walk for entropy is this
    package's extension (the paper's code sweeps confidence and PBEE's patience only); there a smaller
    threshold is the stricter one.

    Args:
        curves: ``threshold_curve`` results, one per seed, with the same thresholds and criterion.
        base_flops: the reference cost (``backbone_cost``: the backbone alone with its own classifier).
        fractions: budget fractions of ``base_flops``.
    Returns:
        ``{"25%": {"mean": m, "std": s} or None, ..., "max": {"mean": m, "std": s}}``; accuracies in [0, 1],
        ``std`` with Bessel's correction and 0.0 for one seed.
    Raises:
        ValueError: ``base_flops`` is not positive, or the curves do not line up (``average_curves``).
    """
    if not base_flops > 0:
        raise ValueError(f"base_flops must be positive, got {base_flops}")
    avg = average_curves(curves)
    order = list(range(len(avg["thresholds"])))
    if avg["criterion"] == "entropy":
        order.reverse()  # entropy fires on H <= t: the most permissive threshold is the largest
    cost = [avg["flops"][i] for i in order]

    def cell(j: int) -> dict:
        i = order[j]
        return {"mean": avg["accuracy"][i], "std": avg["accuracy_std"][i]}

    table: dict[str, dict | None] = {}
    for f in fractions:
        limit = f * base_flops * (1 + 1e-9)
        first_over = next((j for j, c in enumerate(cost) if c > limit), None)
        if first_over is None:
            table[f"{f * 100:g}%"] = cell(len(order) - 1)
        else:
            table[f"{f * 100:g}%"] = cell(first_over - 1) if first_over > 0 else None
    table["max"] = cell(len(order) - 1)
    return table


__all__ = ["threshold_curve", "static_points", "accuracy_per_exit", "budget_table", "average_curves",
           "ztw_budget_table"]
