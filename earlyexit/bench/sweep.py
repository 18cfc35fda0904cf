"""Sweep timing: one forward pass over test samples against the threshold sweep over their stored logits."""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import torch

from .. import metrics
from ..device import cuda_sync
from ..models import MultiExitModel

SWEEP_SAMPLES = 10_000     # samples whose logits the threshold sweep reads
SWEEP_THRESHOLDS = 100     # thresholds of the confidence sweep
EVAL_BATCH_SIZE = 512      # batch size of the forward pass that stores the logits


def sample_batches(split: Any, n: int, batch_size: int) -> list[tuple[Any, torch.Tensor]]:
    """Exactly ``n`` samples of ``split`` in batches (cycling over it when it is smaller)."""
    out, have = [], 0
    while have < n:
        before = have
        for x, y in split.batches(batch_size):
            take = min(len(y), n - have)
            if take < len(y):
                x, y = _take(x, take), y[:take]
            out.append((x, y))
            have += take
            if have >= n:
                break
        if have == before:
            raise ValueError("the test split holds no samples")
    return out


def _take(x: Any, k: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:k]
    if isinstance(x, dict):
        return {key: _take(v, k) for key, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, k) for v in x)
    return x


def time_sweep(model: MultiExitModel, split: Any, costs: Sequence[float], *, device: torch.device,
               samples: int = SWEEP_SAMPLES, thresholds: int = SWEEP_THRESHOLDS, repeats: int = 3) -> dict[str, float]:
    """Seconds of one forward pass over ``samples`` samples vs. a threshold sweep over their stored logits.

    Args:
        model: the model, on ``device``.
        split: a split with ``batches(batch_size)`` (the test split); cycled if smaller than ``samples``.
        costs: per-exit cumulative FLOPs (``metrics.exit_costs``).
        device: where the model runs.
        samples: number of samples.
        thresholds: number of confidence thresholds.
        repeats: the sweep is timed this many times (median).
    Returns:
        ``{"forward_s", "sweep_s"}``.
    """
    batches = sample_batches(split, samples, EVAL_BATCH_SIZE)
    metrics.evaluate(model, batches[:1], device=device)  # warm-up
    cuda_sync(device)
    t0 = time.perf_counter()
    logits, labels = metrics.evaluate(model, batches, device=device)  # (E, N, C), (N,)
    cuda_sync(device)
    forward_s = time.perf_counter() - t0
    metrics.threshold_curve(logits, labels, costs, thresholds=thresholds)  # warm-up
    sweeps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics.threshold_curve(logits, labels, costs, thresholds=thresholds, criterion="confidence")
        sweeps.append(time.perf_counter() - t0)
    return {"forward_s": forward_s, "sweep_s": statistics.median(sweeps)}


__all__ = ["time_sweep", "sample_batches", "SWEEP_SAMPLES", "SWEEP_THRESHOLDS", "EVAL_BATCH_SIZE"]
