"""Budgets calibrated on validation data: ``calibrate_thresholds``, ``apply_thresholds``, ``calibrated_curve``.

MSDNet's budgeted protocol (Huang et al., "Multi-Scale Dense Networks for
Resource Efficient Image Classification", ICLR 2018): per-exit thresholds are
chosen on the validation split for a target average cost, then applied
unchanged to the test split, so no test label or test score shapes the
operating point.

PBEE's patience is one integer for every exit, not a per-exit threshold: its calibration is the ``global`` mode
only, the patience whose validation cost is the largest within the target (``calibrated_curve``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .criteria import _check_logits, _exit_indices, exit_scores

CALIBRATION_MODES = ("geometric", "global")


def _check_calibration_criterion(criterion: str) -> None:
    if criterion == "patience":
        raise ValueError("patience is not a per-exit threshold criterion; calibrate 'confidence' or 'entropy'")
    if criterion not in ("confidence", "entropy"):
        raise ValueError(f"unknown criterion {criterion!r}; valid for calibration: confidence, entropy")


def _check_costs(costs: Sequence[float]) -> Tensor:
    """The per-exit costs as a float64 tensor (E,), checked finite and non-decreasing."""
    cost = torch.as_tensor([float(c) for c in costs], dtype=torch.float64)  # (E,)
    if cost.numel() == 0 or not bool(torch.isfinite(cost).all()):
        raise ValueError(f"costs must be a non-empty sequence of finite numbers, got {cost.tolist()}")
    if bool((cost[1:] < cost[:-1]).any()):
        raise ValueError(f"costs must be non-decreasing along exits, got {cost.tolist()}")
    return cost


def _check_target(target_flops: float, cost: Tensor) -> float:
    target = float(target_flops)
    if not math.isfinite(target):
        raise ValueError(f"target_flops must be finite, got {target_flops}")
    first = float(cost[0])
    if target < first - 1e-9 * abs(first):
        raise ValueError(f"target_flops {target:g} is below the cost of the first exit ({first:g}): no threshold meets it")
    return target


def _leave_scores(logits: Tensor, criterion: str) -> Tensor:
    """(E, N) float64 scores on one scale for both criteria: a sample leaves exit k when ``score >= u_k``.

    Confidence is its own score; entropy enters negated (``H <= t`` iff ``-H >= -t``, exactly in floating
    point), so one calibration routine serves both; ``_from_score_threshold`` converts back.
    """
    values = exit_scores(logits, criterion)  # (E, N)
    return values if criterion == "confidence" else -values


def _from_score_threshold(u: float, criterion: str) -> float:
    """A threshold on the leave score (leave iff ``score >= u``) back in the criterion's own units.

    Entropy: ``H <= -u``, one negation. Confidence leaves on ``c > t`` (strict, ``criteria``), so a finite
    ``u`` becomes the largest float64 below it: for the float64 scores, ``c > nextafter(u, -inf)`` holds
    exactly when ``c >= u``, so every sample the calibration lets out still leaves and the target is met
    as under the non-strict rule. ``+inf`` (never fires) and ``-inf`` (always fires) stay as they are.
    """
    if criterion != "confidence":
        return -u
    return u if math.isinf(u) else math.nextafter(u, -math.inf)


def geometric_fractions(costs: Sequence[float], target_flops: float) -> list[float]:
    """MSDNet's geometric exit distribution whose expected cost is ``target_flops``.

    The fraction of samples leaving at exit ``k`` (0-based) is ``q_k = p**k / sum_j p**j``; ``p`` is found by
    bisection on ``log p`` so that ``sum_k q_k * cost_k = target_flops`` (the expected cost rises with ``p``
    for non-decreasing costs). Targets at or below the first exit's cost give ``q = (1, 0, ...)``, targets at
    or above the last exit's cost give ``q = (..., 0, 1)``.

    Args:
        costs: per-exit cumulative costs (from ``exit_costs``), non-decreasing.
        target_flops: the target average cost per sample.
    Returns:
        One fraction per exit; they sum to 1.
    """
    cost = _check_costs(costs)
    target = _check_target(target_flops, cost)
    E = cost.numel()
    q = torch.zeros(E, dtype=torch.float64)  # (E,)
    if target <= float(cost[0]):
        q[0] = 1.0
        return q.tolist()
    if target >= float(cost[-1]):
        q[-1] = 1.0
        return q.tolist()
    k = torch.arange(E, dtype=torch.float64)  # (E,)
    lo, hi = -60.0, 60.0  # log p: e^-60 and e^60 put all but ~1e-26 of the mass on one end
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(torch.softmax(k * mid, dim=0) @ cost) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return torch.softmax(k * (0.5 * (lo + hi)), dim=0).tolist()  # (E,): p^k normalised, in log space for stability


def _global_scan(scores: Tensor, cost: Tensor) -> tuple[Tensor, Tensor]:
    """Every distinct single threshold on the leave score and its average cost, in one vectorized pass.

    With the same threshold ``u`` at every exit, sample ``n`` has left by exit ``k`` iff the running
    maximum of its scores over exits ``0..k`` is ``>= u``. The average cost only changes at values of
    those running maxima, so they (plus ``+inf``: nobody leaves early) are the complete set of candidates.

    Returns:
        ``(candidates (T,), flops (T,))``, candidates ascending and flops non-decreasing with them.
    """
    E, N = scores.shape
    running = scores[:-1].cummax(dim=0).values  # (E-1, N)
    inf = torch.full((1,), math.inf, dtype=scores.dtype, device=scores.device)
    cands = torch.cat([running.flatten().unique(), inf])  # (T,) ascending
    T = cands.numel()
    stay = torch.searchsorted(running.sort(dim=1).values, cands.expand(E - 1, T).contiguous())  # (E-1, T): still in after k
    gone = N - stay  # (E-1, T): left at or before exit k
    zero = torch.zeros(1, T, dtype=gone.dtype, device=gone.device)
    full = torch.full((1, T), N, dtype=gone.dtype, device=gone.device)
    counts = torch.diff(torch.cat([zero, gone, full]), dim=0)  # (E, T): samples leaving at each exit
    flops = counts.T.cpu().double() @ cost / N  # (T,)
    return cands.cpu(), flops


def _pick_global(cands: Tensor, flops: Tensor, target: float) -> float:
    """The candidate whose average cost is the largest not above ``target`` (1e-9 relative slack)."""
    fits = (flops <= target + 1e-9 * abs(target)).nonzero()  # costs rise with the candidate, so take the last fit
    return float(cands[int(fits.max())])


def _geometric_score_thresholds(scores: Tensor, fractions: Sequence[float]) -> list[float]:
    """Per-exit thresholds on the leave score that let the fractions ``q_k`` of the samples leave at exit ``k``.

    In depth order, the threshold of exit ``k`` is the ``m_k``-th largest score among the samples still
    in, so exactly ``m_k`` of them leave (more only on ties at the threshold); ``+inf`` when ``m_k <= 0``.
    MSDNet counts ``m_k = floor(N q_k)`` per exit; here the cumulative count is rounded instead,
    ``m_k = floor(N (q_0 + ... + q_k)) - (samples gone so far)``: the number gone by any exit is then off
    by less than one sample (instead of up to k), tie surpluses are paid back at the next exit, and the
    realised cost is non-decreasing in the target.
    """
    E, N = scores.shape
    cum = torch.cumsum(torch.as_tensor(fractions, dtype=torch.float64), dim=0).tolist()  # (E,)
    remaining = torch.ones(N, dtype=torch.bool, device=scores.device)  # (N,)
    gone, out = 0, []
    for k in range(E - 1):
        want = math.floor(N * cum[k] + 1e-9) - gone  # the epsilon keeps e.g. 10 * 0.3 from rounding to 2
        if want <= 0:
            out.append(math.inf)
            continue
        s = scores[k][remaining]  # (R,)
        u = float(torch.kthvalue(s, s.numel() - want + 1).values)  # the want-th largest score still in
        leave = remaining & (scores[k] >= u)  # (N,)
        remaining &= ~leave
        gone += int(leave.sum())
        out.append(u)
    out.append(-math.inf)  # the last exit takes everyone left
    return out


def calibrate_thresholds(val_logits: Tensor, costs: Sequence[float], target_flops: float, *,
                         criterion: str = "confidence", mode: str = "geometric") -> list[float]:
    """Per-exit thresholds chosen on validation logits for a target average cost (MSDNet's budgeted protocol).

    - ``mode="global"``: one threshold ``t`` at every exit, the one whose validation average cost is the
      largest that does not exceed ``target_flops`` (an exact scan over every distinct value of ``t``).
    - ``mode="geometric"`` (MSDNet): exits share the samples as ``q_k ∝ p**k`` with ``p`` solved so that
      the expected cost is ``target_flops`` (``geometric_fractions``); then, exit by exit, the threshold
      is the quantile of the score among the samples still in that lets ``q_k`` of all samples leave
      there (rounded so that the realised validation cost is within ``(cost_last - cost_0) / N`` above the
      target when scores do not tie).

    Thresholds are in the criterion's own units (confidence: leave if max softmax ``> t``, strictly;
    entropy: leave if entropy ``<= t``). A confidence threshold is therefore the float64 just below the
    score that the quantile or the scan picked, so that sample still leaves. Convention: the last
    threshold always fires (``-inf`` for confidence, ``+inf`` for entropy) and an exit that should let
    nobody leave gets the never-firing value (``+inf`` for confidence, ``-inf`` for entropy); ``json``
    writes these as ``Infinity`` / ``-Infinity``.

    Args:
        val_logits: ``(E, N, C)`` validation logits of every exit.
        costs: per-exit cumulative costs (from ``exit_costs``), non-decreasing.
        target_flops: target average cost per sample, at least ``costs[0]``; targets above ``costs[-1]``
            send every sample to the last exit.
        criterion: ``"confidence"`` or ``"entropy"`` (``"patience"`` raises ``ValueError``).
        mode: ``"geometric"`` or ``"global"``.
    Returns:
        ``E`` thresholds, one per exit, for ``apply_thresholds``.
    """
    _check_logits(val_logits, costs=costs)
    _check_calibration_criterion(criterion)
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(CALIBRATION_MODES)}")
    cost = _check_costs(costs)
    target = _check_target(target_flops, cost)
    return _calibrate(_leave_scores(val_logits, criterion), cost, [target], criterion, mode)[0]


def _calibrate(scores: Tensor, cost: Tensor, targets: Sequence[float], criterion: str, mode: str) -> list[list[float]]:
    """Thresholds (criterion units) for each target; the global scan is shared by all targets."""
    E = scores.shape[0]
    if E == 1:
        return [[_from_score_threshold(-math.inf, criterion)] for _ in targets]
    if mode == "global":
        cands, flops = _global_scan(scores, cost)
        us = [[_pick_global(cands, flops, t)] * (E - 1) + [-math.inf] for t in targets]
    else:
        us = [_geometric_score_thresholds(scores, geometric_fractions(cost.tolist(), t)) for t in targets]
    return [[_from_score_threshold(u, criterion) for u in row] for row in us]


def _calibrate_patience(val_logits: Tensor, cost: Tensor, targets: Sequence[float]) -> list[list[float]]:
    """Per target, the patience (1 .. E) whose validation average cost is the largest within it, repeated per exit.

    A larger patience never lets a sample leave earlier, so the cost rises with it and ``_pick_global``'s rule
    applies; patience 1 (everyone leaves at the first exit) costs ``cost[0]`` and always fits.
    """
    E, N = val_logits.shape[:2]
    cands = torch.arange(1, E + 1, dtype=torch.float64)  # (E,)
    exits = _exit_indices(val_logits, "patience", cands).cpu()  # (E, N)
    flops = cost[exits].mean(dim=1)  # (E,)
    return [[_pick_global(cands, flops, t)] * E for t in targets]


def _exits_under(values: Tensor, criterion: str, thresholds: Tensor) -> Tensor:
    """(P, N) long: the exit of each sample under each row of per-exit thresholds ``(P, E)``."""
    t = thresholds.to(values.device)[:, :, None]  # (P, E, 1)
    fire = values[None] > t if criterion == "confidence" else values[None] <= t  # (P, E, N): as in criteria
    fire[:, -1] = True  # nobody gets past the last exit
    return fire.to(torch.uint8).argmax(dim=1)  # (P, N): the first exit that fires


def _thresholds_tensor(thresholds: Sequence[Sequence[float]], E: int) -> Tensor:
    t = torch.as_tensor([[float(v) for v in row] for row in thresholds], dtype=torch.float64)  # (P, E)
    if t.dim() != 2 or t.shape[1] != E:
        raise ValueError(f"thresholds must hold one value per exit ({E}), got {[len(r) for r in thresholds]}")
    if bool(torch.isnan(t).any()):
        raise ValueError("thresholds must not be NaN")
    return t


def apply_thresholds(logits: Tensor, thresholds: Sequence[float] | Tensor, *, criterion: str = "confidence") -> Tensor:
    """The exit each sample leaves at under per-exit thresholds.

    A sample leaves at the first exit ``k`` whose criterion passes ``thresholds[k]`` (confidence: max
    softmax ``> thresholds[k]``, strictly; entropy: entropy ``<= thresholds[k]``), else at the last exit.
    With every threshold equal to ``t`` this is ``exit_decisions(logits, criterion, t)``.

    Args:
        logits: ``(E, N, C)`` logits of every exit.
        thresholds: ``E`` values (the last one is not consulted), e.g. from ``calibrate_thresholds``.
        criterion: ``"confidence"`` or ``"entropy"``.
    Returns:
        ``(N,)`` long tensor of exit indices in ``[0, E)``.
    """
    _check_logits(logits)
    _check_calibration_criterion(criterion)
    if isinstance(thresholds, Tensor):
        thresholds = thresholds.detach().cpu().reshape(-1).tolist()
    t = _thresholds_tensor([list(thresholds)], logits.shape[0])  # (1, E)
    return _exits_under(exit_scores(logits, criterion), criterion, t)[0]


def calibrated_curve(val_logits: Tensor, test_logits: Tensor, test_labels: Tensor, costs: Sequence[float], *,
                     budgets: Sequence[float] | None = None, criterion: str = "confidence",
                     mode: str = "geometric") -> dict:
    """Test cost and accuracy of thresholds calibrated on validation data for a range of target budgets.

    For each target, ``calibrate_thresholds`` picks per-exit thresholds on ``val_logits``; they are applied
    unchanged to ``test_logits``. The field names shared with ``threshold_curve`` (``criterion``,
    ``thresholds``, ``flops``, ``accuracy``, ``exit_counts``) mean the same, so either curve plots alike.

    Args:
        val_logits: ``(E, N_val, C)`` validation logits.
        test_logits: ``(E, N, C)`` test logits; test_labels: ``(N,)`` class indices.
        costs: per-exit cumulative costs (from ``exit_costs``), non-decreasing.
        budgets: target average costs; ``None`` = 40 evenly spaced from ``costs[0]`` to ``costs[-1]``.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"`` (PBEE: ``mode="global"`` only; the
            thresholds are then the chosen patience, repeated for every exit).
        mode: ``"geometric"`` (MSDNet) or ``"global"`` (one threshold for every exit).
    Returns:
        A dict with ``criterion``, ``mode``, ``targets`` (the budgets), ``thresholds`` (per target, a list
        of E), ``flops`` (realised average test cost per target), ``accuracy`` (test, per target),
        ``val_flops`` (realised average validation cost per target) and ``exit_counts`` (test, per target,
        a list of E sample counts).
    """
    _check_logits(val_logits, costs=costs)
    _check_logits(test_logits, test_labels, costs)
    if criterion == "patience":
        if mode != "global":
            raise ValueError("a patience is one value for every exit: calibrate it with mode='global'")
    else:
        _check_calibration_criterion(criterion)
    if mode not in CALIBRATION_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(CALIBRATION_MODES)}")
    cost = _check_costs(costs)
    if budgets is None:
        targets = torch.linspace(float(cost[0]), float(cost[-1]), 40, dtype=torch.float64).tolist()
    else:
        targets = [_check_target(b, cost) for b in budgets]
        if not targets:
            raise ValueError("budgets must not be empty")
    E = cost.numel()
    P = len(targets)
    offsets = torch.arange(P)[:, None] * E  # (P, 1): one histogram row per target
    if criterion == "patience":
        thresholds = _calibrate_patience(val_logits, cost, targets)
        patience = torch.as_tensor([row[0] for row in thresholds], dtype=torch.float64)  # (P,)

        def exits_of(logits: Tensor) -> Tensor:
            return _exit_indices(logits, "patience", patience).cpu()  # (P, N)
    else:
        thresholds = _calibrate(_leave_scores(val_logits, criterion), cost, targets, criterion, mode)
        t = _thresholds_tensor(thresholds, E)  # (P, E)

        def exits_of(logits: Tensor) -> Tensor:
            return _exits_under(exit_scores(logits, criterion), criterion, t).cpu()  # (P, N)

    def counts_of(logits: Tensor) -> tuple[Tensor, Tensor]:
        exits = exits_of(logits)  # (P, N)
        counts = torch.bincount((exits + offsets).flatten(), minlength=P * E).view(P, E)  # (P, E)
        return exits, counts

    _, val_counts = counts_of(val_logits)
    exits, counts = counts_of(test_logits)
    N = test_logits.shape[1]
    correct = test_logits.argmax(-1).cpu() == test_labels.cpu()[None]  # (E, N)
    hit = correct[exits, torch.arange(N)[None]]  # (P, N)
    return {
        "criterion": criterion,
        "mode": mode,
        "targets": [float(v) for v in targets],
        "thresholds": thresholds,
        "flops": (counts.double() @ cost / N).tolist(),
        "accuracy": hit.double().mean(1).tolist(),
        "val_flops": (val_counts.double() @ cost / val_logits.shape[1]).tolist(),
        "exit_counts": counts.tolist(),
    }



__all__ = ["CALIBRATION_MODES", "geometric_fractions", "calibrate_thresholds", "apply_thresholds", "calibrated_curve"]
