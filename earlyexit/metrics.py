"""Early-exit metrics: per-exit FLOPs, one-pass evaluation, threshold sweeps, budgets, calibration.

Follows the evaluation protocol of "Joint or Disjoint: Mixing Training Regimes
for Early-Exit Models": the data is run once, every exit's logits are kept as an
``(E, N, C)`` tensor, and every threshold curve, static point and budget table
(the paper's Table 1) is computed from that tensor by pure, vectorized
functions, never by re-running the model per threshold. Budgets can also be
calibrated on validation logits and applied to the test logits, after MSDNet's
budgeted protocol (Huang et al., ICLR 2018): ``calibrate_thresholds``,
``apply_thresholds``, ``calibrated_curve``.

FLOP convention: FLOPs = 2 x multiply-adds, as ``torch.utils.flop_counter``
counts them (matrix products and convolutions, including the score and value
products inside ``scaled_dot_product_attention``; element-wise ops, pooling
and normalisation are not counted). Costs are per sample.

Exit criteria (a sample leaves at the first exit whose criterion fires, and at
the last exit when none does):

- ``confidence``: the maximum softmax probability is ``>= t``;
- ``entropy``: the entropy of the softmax, in nats, is ``<= t``;
- ``patience`` (PABEE, Zhou et al., NeurIPS 2020): the arg-max prediction has
  been the same at ``p`` consecutive exits ending at the current one, i.e. at
  exit ``k`` (0-based, ``k >= p - 1``) the predictions at ``k, k-1, ..., k-p+1``
  all agree. ``p = 1`` leaves at the first exit. PABEE's own patience counts
  the agreements after the first prediction, so it equals ``p - 1`` here.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from .flops import count_flops
from .device import autocast_context, model_device
from .models import MultiExitModel
from .tree import state_batch_size, to_device

CRITERIA = ("confidence", "entropy", "patience")


# --- FLOPs ------------------------------------------------------------------

def _part_costs(model: MultiExitModel, example_input: Any, *, ic_heads: bool) -> tuple[list[float], list[float]]:
    """Per-sample FLOPs of each stage (stage 0 with the stem) and of each head (0 for skipped ICs)."""
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    batch = state_batch_size(example_input)
    if batch <= 0:
        raise ValueError("example_input holds no tensor with a non-empty batch dimension")
    E = model.num_exits
    stage_flops = [0.0] * len(model.stages)
    head_flops = [0.0] * E
    was_training = model.training
    model.eval()  # BatchNorm and dropout as at inference; the counts do not depend on it, the state does
    try:
        state = to_device(example_input, model_device(model))
        k = 0
        for i in range(len(model.stages)):
            c, state = count_flops(model.stage, i, state)
            stage_flops[i] = c / batch
            while k < E and model.exit_after[k] == i:
                if ic_heads or k == E - 1:
                    c, _ = count_flops(model.head, k, state)
                    head_flops[k] = c / batch
                k += 1
    finally:
        model.train(was_training)
    return stage_flops, head_flops


def exit_costs(model: MultiExitModel, example_input: Any) -> list[float]:
    """Cumulative per-sample FLOPs of leaving the model at each exit.

    The cost of exit ``k`` is the stem and every stage up to ``exit_after[k]``,
    plus every head up to and including ``k`` (a sample that leaves at ``k``
    has been through the earlier heads too). Convention: FLOPs = 2 x
    multiply-adds, as ``torch.utils.flop_counter`` counts matrix products and
    convolutions (attention score and value products included, through
    ``scaled_dot_product_attention``); element-wise ops, pooling and
    normalisation are free. Counted once in eval mode; the model's training
    flag is restored.

    Args:
        model: the multi-exit model.
        example_input: an input batch (tensor or pytree such as a dict of
            tensors); the counts are divided by its batch size.
    Returns:
        One float per exit, non-decreasing along exits.
    """
    stage_flops, head_flops = _part_costs(model, example_input, ic_heads=True)
    costs, k, total = [], 0, 0.0
    for i, s in enumerate(stage_flops):
        total += s
        while k < model.num_exits and model.exit_after[k] == i:
            total += head_flops[k]
            costs.append(total)
            k += 1
    return costs


def backbone_cost(model: MultiExitModel, example_input: Any) -> float:
    """Per-sample FLOPs of the backbone alone: stem, every stage and its own classifier, no ICs.

    Same convention as ``exit_costs`` (2 x multiply-adds, ``torch.utils.flop_counter``).

    Args:
        model: the multi-exit model.
        example_input: an input batch (tensor or pytree); counts are divided by its batch size.
    Returns:
        The cost as a float: the reference of the budget table.
    """
    stage_flops, head_flops = _part_costs(model, example_input, ic_heads=False)
    return sum(stage_flops) + head_flops[-1]


# --- evaluation ---------------------------------------------------------------

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


# --- exit policies ------------------------------------------------------------

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
    if criterion == "patience" and bool(((t < 1) | (t != t.round())).any()):
        raise ValueError(f"patience values must be integers >= 1, got {t.tolist()}")
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
        return run[None] >= t  # (T, E, N)
    if criterion == "confidence":
        return exit_scores(logits, criterion)[None] >= t
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
        threshold: the threshold ``t`` (the patience ``p`` for ``"patience"``).
    Returns:
        ``(N,)`` long tensor of exit indices in ``[0, E)``.
    """
    _check_logits(logits)
    E, _, C = logits.shape
    t = _resolve_thresholds(criterion, [threshold], E, C)
    return _exit_indices(logits, criterion, t)[0]


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


# --- budgets calibrated on validation data -------------------------------------
# MSDNet's budgeted protocol (Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
# Classification", ICLR 2018): per-exit thresholds are chosen on the validation split for a target average
# cost, then applied unchanged to the test split, so no test label or test score shapes the operating point.

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
    point), so one calibration routine serves both and thresholds convert back by one negation.
    """
    values = exit_scores(logits, criterion)  # (E, N)
    return values if criterion == "confidence" else -values


def _from_score_threshold(u: float, criterion: str) -> float:
    """A threshold on the leave score back in the criterion's own units."""
    return u if criterion == "confidence" else -u


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

    Thresholds are in the criterion's own units (confidence: leave if max softmax ``>= t``; entropy: leave
    if entropy ``<= t``). Convention: the last threshold always fires (``-inf`` for confidence, ``+inf``
    for entropy) and an exit that should let nobody leave gets the never-firing value (``+inf`` for
    confidence, ``-inf`` for entropy); ``json`` writes these as ``Infinity`` / ``-Infinity``.

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


def _exits_under(values: Tensor, criterion: str, thresholds: Tensor) -> Tensor:
    """(P, N) long: the exit of each sample under each row of per-exit thresholds ``(P, E)``."""
    t = thresholds.to(values.device)[:, :, None]  # (P, E, 1)
    fire = values[None] >= t if criterion == "confidence" else values[None] <= t  # (P, E, N)
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
    softmax ``>= thresholds[k]``; entropy: entropy ``<= thresholds[k]``), else at the last exit. With every
    threshold equal to ``t`` this is ``exit_decisions(logits, criterion, t)``.

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
        criterion: ``"confidence"`` or ``"entropy"``.
        mode: ``"geometric"`` (MSDNet) or ``"global"`` (one threshold for every exit).
    Returns:
        A dict with ``criterion``, ``mode``, ``targets`` (the budgets), ``thresholds`` (per target, a list
        of E), ``flops`` (realised average test cost per target), ``accuracy`` (test, per target),
        ``val_flops`` (realised average validation cost per target) and ``exit_counts`` (test, per target,
        a list of E sample counts).
    """
    _check_logits(val_logits, costs=costs)
    _check_logits(test_logits, test_labels, costs)
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
    thresholds = _calibrate(_leave_scores(val_logits, criterion), cost, targets, criterion, mode)
    t = _thresholds_tensor(thresholds, E)  # (P, E)
    P = len(targets)
    offsets = torch.arange(P)[:, None] * E  # (P, 1): one histogram row per target

    def counts_of(logits: Tensor) -> tuple[Tensor, Tensor]:
        exits = _exits_under(exit_scores(logits, criterion), criterion, t).cpu()  # (P, N)
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


__all__ = ["CRITERIA", "to_device", "autocast_context", "model_device", "exit_scores", "exit_costs", "backbone_cost", "evaluate", "exit_decisions",
           "threshold_curve", "static_points", "accuracy_per_exit", "budget_table", "CALIBRATION_MODES",
           "geometric_fractions", "calibrate_thresholds", "apply_thresholds", "calibrated_curve"]
