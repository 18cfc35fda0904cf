"""Inference timing: early-exit ``predict`` against the plain backbone and the forward through every exit.

``inference_bench`` measures the wall-clock times next to the speed-up that
FLOPs predict; ``inference_section`` runs it on real test samples for the
machine benchmark and formats its table.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from ..device import autocast_context, cuda_sync, model_device
from ..inference import _check_criterion, predict
from ..metrics import backbone_cost, exit_costs
from ..models import MultiExitModel
from ..tree import to_device
from .sweep import sample_batches

INFERENCE_BATCHES = (1, 64, 256)
INFERENCE_THRESHOLD = 0.9  # confidence threshold of the inference section


def _median_seconds(fn: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        cuda_sync(device)
        t0 = time.perf_counter()
        fn()
        cuda_sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def inference_bench(model: MultiExitModel, example_batch_fn: Callable[[int], Any], *, thresholds: Sequence[float],
                    criterion: str = "confidence", batch_sizes: Sequence[int] = (1, 64, 256), repeats: int = 10,
                    warmup: int = 2) -> list[dict]:
    """Wall-clock time of ``predict`` against the plain backbone, next to the speed-up FLOPs predict.

    The baseline is the backbone alone (``model(x, exits=[-1])``: stem, every
    stage and the backbone's own classifier, no ICs), the fair reference for
    an early-exit model; the forward through every exit is timed too. The
    FLOP-predicted speed-up is ``backbone_cost / mean_n exit_costs[exit_n]``
    over the exits the samples of the timed batch actually took
    (``metrics.exit_costs``: stages plus every head passed). Times are medians
    over ``repeats`` runs after ``warmup`` runs, in eval mode under
    ``torch.inference_mode``, with CUDA synchronised around each run.

    Args:
        model: the multi-exit model, already on its device.
        example_batch_fn: ``fn(batch_size) -> x``, an input batch (tensor or pytree).
        thresholds: criterion thresholds to time.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"``.
        batch_sizes: batch sizes to time.
        repeats, warmup: timed and untimed runs per measurement.
    Returns:
        One dict per (batch size, threshold): ``batch_size``, ``criterion``,
        ``threshold``, ``backbone_ms``, ``all_exits_ms``, ``predict_ms``,
        ``measured_speedup`` (backbone / predict time), ``flops_speedup``,
        ``avg_flops`` and ``backbone_flops`` (per sample), ``exit_counts`` (per exit).
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    for t in thresholds:
        _check_criterion(criterion, t)
    device = model_device(model)
    was_training = model.training
    rows = []
    costs = base = None
    try:
        for bs in batch_sizes:
            x = to_device(example_batch_fn(int(bs)), device)
            if costs is None:  # per-sample FLOPs do not depend on the batch size
                costs = torch.tensor(exit_costs(model, x), dtype=torch.float64)  # (E,)
                base = backbone_cost(model, x)
            model.eval()

            def forward(exits: Sequence[int] | None) -> Callable[[], Any]:
                def fn() -> Any:
                    with torch.inference_mode(), autocast_context(device):
                        return model(x, exits=exits)
                return fn

            backbone_s = _median_seconds(forward([-1]), device, repeats=repeats, warmup=warmup)
            all_s = _median_seconds(forward(None), device, repeats=repeats, warmup=warmup)
            for t in thresholds:
                _, exits = predict(model, x, criterion=criterion, threshold=t)
                model.eval()
                pred_s = _median_seconds(lambda: predict(model, x, criterion=criterion, threshold=t), device,
                                         repeats=repeats, warmup=warmup)
                counts = torch.bincount(exits.cpu(), minlength=model.num_exits)  # (E,)
                avg = float(counts.double() @ costs / counts.sum())
                rows.append({
                    "batch_size": int(bs), "criterion": criterion, "threshold": float(t),
                    "backbone_ms": backbone_s * 1e3, "all_exits_ms": all_s * 1e3, "predict_ms": pred_s * 1e3,
                    "measured_speedup": backbone_s / pred_s, "flops_speedup": base / avg,
                    "avg_flops": avg, "backbone_flops": float(base), "exit_counts": counts.tolist(),
                })
    finally:
        model.train(was_training)
    return rows


def _input_batches(split: Any) -> Callable[[int], Any]:
    """``fn(batch_size) -> x``: the first ``batch_size`` samples of ``split`` (cycled when it is smaller)."""
    def fn(batch_size: int) -> Any:
        parts = [x for x, _ in sample_batches(split, batch_size, batch_size)]
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(x, torch.Tensor) for x in parts):
            raise ValueError("inference batches larger than the split are only built for tensor inputs")
        return torch.cat(parts)  # (batch_size, ...)
    return fn


def inference_section(model: MultiExitModel, split: Any, *, repeats: int, warmup: int, trained: bool,
                      label: str = "") -> tuple[dict[str, float], list[str]]:
    """Time early-exit ``predict`` against full forward passes; numeric results and table lines.

    Args:
        model: the model, on its device.
        split: the test split its inputs are taken from (real samples: exits depend on the data).
        repeats, warmup: timed and untimed runs per measurement.
        trained: whether the model comes from a trained run (else the table says nothing exits early).
        label: a note on the model variant, shown in the table's title.
    Returns:
        ``({"inference_b{B}_{figure}": value}, lines)``.
    """
    rows = inference_bench(model, _input_batches(split), thresholds=[INFERENCE_THRESHOLD], criterion="confidence",
                           batch_sizes=INFERENCE_BATCHES, repeats=repeats, warmup=warmup)
    who = "trained run" if trained else "untrained model: almost nothing leaves early, expect no speed-up"
    lines = [f"inference, confidence > {INFERENCE_THRESHOLD} ({who}{', ' + label if label else ''}):",
             f"{'batch':>6}{'predict ms':>12}{'backbone ms':>13}{'all exits ms':>14}{'speed-up':>10}"
             f"{'FLOPs speed-up':>16}{'measured/FLOPs':>16}{'left early':>12}"]
    flat: dict[str, float] = {}
    for r in rows:
        counts = r["exit_counts"]
        early = 1.0 - counts[-1] / max(sum(counts), 1)
        lines.append(f"{r['batch_size']:>6}{r['predict_ms']:>12.2f}{r['backbone_ms']:>13.2f}{r['all_exits_ms']:>14.2f}"
                     f"{r['measured_speedup']:>9.2f}x{r['flops_speedup']:>15.2f}x"
                     f"{r['measured_speedup'] / r['flops_speedup']:>16.2f}{early * 100:>11.1f}%")
        for k in ("predict_ms", "backbone_ms", "all_exits_ms", "measured_speedup", "flops_speedup"):
            flat[f"inference_b{r['batch_size']}_{k}"] = float(r[k])
        flat[f"inference_b{r['batch_size']}_early_share"] = early
    return flat, lines


__all__ = ["inference_bench", "inference_section", "INFERENCE_BATCHES", "INFERENCE_THRESHOLD"]
