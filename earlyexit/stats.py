"""Paired statistics over seeds and test samples, the decision rule of RESULTS.md, and training cost.

A claim of the paper compares two configurations (e.g. mixed against joint) at a budget. The seeds of
the two are paired (disjoint and mixed share phase 1; joint starts from the same initialisation), so the
statistic is the per-seed difference ``d_s = a_s - b_s``:

- ``paired_t``: mean difference and its two-sided 95 % Student-t interval over seeds (n - 1 degrees of
  freedom; no interval for one seed);
- ``paired_bootstrap``: for one seed, a percentile bootstrap over test samples of the accuracy
  difference, resampling the same test indices for both (the paired test of one run pair);
- ``decide``: *reproduced* when the interval excludes zero in the paper's direction, *contradicted* when
  it excludes zero the other way, otherwise *not resolved* (the rule RESULTS.md states before its numbers).

Training cost (``training_cost``) is counted in forward passes of the backbone per training sample: a
trained part costs 3 forward passes (forward, and a backward of about twice the forward's FLOPs), a frozen
part 1 (forward only). Phase 1 trains the backbone and its head (3 x base); phase 2 trains everything
(3 x the last exit's cumulative cost, every IC included); phase 3 runs the frozen backbone forward and
trains the ICs (base + 3 x the ICs' cost). Every epoch of every learning-rate grid point counts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

VERDICTS = ("reproduced", "contradicted", "not resolved")


def _t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (scipy when present, else a series)."""
    try:
        from scipy.stats import t as student_t

        return float(student_t.ppf(q, df))
    except ImportError:  # Cornish-Fisher expansion around the normal quantile (error < 1e-3 for df >= 2)
        z = math.sqrt(2) * _erfinv(2 * q - 1)
        g1 = (z ** 3 + z) / 4
        g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
        g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
        return z + g1 / df + g2 / df ** 2 + g3 / df ** 3


def _erfinv(y: float) -> float:
    """Inverse error function by Newton steps on ``math.erf``."""
    x = 0.0
    for _ in range(60):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


def paired_t(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired seeds and its two-sided Student-t interval.

    Args:
        a, b: one value per seed, in the same seed order.
        level: coverage of the interval.
    Returns:
        ``{n, mean, std, low, high, p}``: ``low``/``high``/``p`` are None for one seed; ``p`` is the
        two-sided p-value of a zero mean difference (None without scipy).
    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same seeds on both sides, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "low": None, "high": None, "p": None}
    std = float(d.std(ddof=1))
    half = _t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    p = None
    try:
        from scipy.stats import t as student_t

        p = 1.0 if std == 0 and mean == 0 else (0.0 if std == 0 else
                                                 float(2 * student_t.sf(abs(mean) / (std / math.sqrt(n)), n - 1)))
    except ImportError:
        pass
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "p": p}


def paired_bootstrap(correct_a: Sequence[bool], correct_b: Sequence[bool], *, level: float = 0.95,
                     resamples: int = 2000, seed: int = 0) -> dict:
    """Accuracy difference of two classifiers on the same test samples, with a paired percentile bootstrap.

    Args:
        correct_a, correct_b: per test sample, whether each got it right (same samples, same order).
        level: coverage of the interval.
        resamples: bootstrap resamples (the same sample indices for both sides).
        seed: seed of the resampling.
    Returns:
        ``{n, mean, low, high}``: ``mean`` is ``acc(a) - acc(b)`` on the whole set.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired samples need equal, non-empty 1-D shapes, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(resamples, d.size))
    boot = d[idx].mean(1)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return {"n": int(d.size), "mean": float(d.mean()), "low": float(lo), "high": float(hi)}


def decide(interval: dict | None, direction: int) -> str:
    """The verdict of a paired interval on a claim that ``a - b`` has the sign ``direction`` (+1 or -1).

    *reproduced*: the interval excludes 0 on the claimed side; *contradicted*: it excludes 0 on the other
    side; *not resolved*: it contains 0, or there is no interval (one seed, or a budget no run reaches).
    """
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    if not interval or interval.get("low") is None or interval.get("high") is None:
        return "not resolved"
    lo, hi = interval["low"] * direction, interval["high"] * direction
    lo, hi = min(lo, hi), max(lo, hi)
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    return "not resolved"


def training_cost(phases: Sequence[dict], base_flops: float, exit_flops: Sequence[float]) -> dict:
    """Epochs and training FLOPs a run spent, from its results.json ``train.phases``.

    Args:
        phases: ``[{phase, grid: [{epochs, ...}], ...}]`` as results.json's ``train.phases``.
        base_flops: forward FLOPs per sample of the backbone with its own head.
        exit_flops: cumulative forward FLOPs per exit (the last: backbone, every IC and the final head).
    Returns:
        ``{epochs: {phase: epochs run over every grid point}, total_epochs, backbone_epochs (phases 1 and
        2), passes: training FLOPs per training sample in backbone forward passes}`` (see the module
        docstring for the 3-and-1 rule).
    """
    ics = max(exit_flops[-1] - base_flops, 0.0) if exit_flops else 0.0
    per_pass = {1: 3 * base_flops, 2: 3 * (base_flops + ics), 3: base_flops + 3 * ics}
    epochs: dict[int, int] = {}
    flops = 0.0
    for ph in phases:
        p = int(ph["phase"])
        n = sum(int(g.get("epochs", 0)) for g in ph.get("grid") or []) or int(ph.get("epochs", 0) or 0)
        epochs[p] = epochs.get(p, 0) + n
        flops += n * per_pass[p]
    return {"epochs": {str(k): v for k, v in sorted(epochs.items())}, "total_epochs": sum(epochs.values()),
            "backbone_epochs": epochs.get(1, 0) + epochs.get(2, 0),
            "passes": flops / base_flops if base_flops > 0 else None}


__all__ = ["VERDICTS", "decide", "paired_bootstrap", "paired_t", "training_cost"]
