"""The paired bootstrap over test samples for one seed: how much of a difference is test-set noise.

The t intervals of ``earlyexit.pairs`` are over seeds: they say how a difference varies from training run to
training run. For a single seed there is a second source of noise, the finite test set. ``sample_bootstrap``
rebuilds two run folders of the same seed (their weights), recomputes each one's validation-calibrated
operating points (thresholds chosen on validation for each target cost, applied unchanged to the test set,
exactly as results.json's ``calibrated_budgets``), takes at every budget the point that table reports, and
resamples the test samples (the same indices for both runs) to put a 95 % interval on ``acc(a) - acc(b)``.

The recomputed accuracy of every budget must equal the run's results.json; otherwise the weights are not the
ones the results came from, and the bootstrap refuses (one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import metrics
from .errors import EarlyExitError
from .results import Results
from .score import calibrates, calibration_modes
from .stats import paired_bootstrap

FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def calibrated_correct(run_dir: str | Path, *, device: str | None = None) -> dict[str, Any]:
    """Per budget of a run's validation-calibrated table, which test samples its operating point gets right.

    Returns:
        ``{"accuracy": {budget: acc or None}, "correct": {budget: (N,) bool tensor or None}}``, budgets
        ``25%``, ``50%``, ``75%``, ``100%`` and ``max`` as in results.json.
    """
    from .device import local_device
    from .runs import load_data, load_run

    run_dir = Path(run_dir)
    dev = local_device(device)
    model, cfg = load_run(run_dir, device=dev)
    crit = cfg.eval.criterion
    if not calibrates(crit, model.num_exits):
        raise EarlyExitError(f"{run_dir}: no validation-calibrated table for criterion {crit!r} "
                             f"with {model.num_exits} exit(s)")
    splits = load_data(cfg)
    example = model.example_input(1, device=dev)
    costs, base = metrics.exit_costs(model, example), metrics.backbone_cost(model, example)
    test, labels = metrics.evaluate(model, splits.test.batches(cfg.eval.batch_size), device=dev)
    val, _ = metrics.evaluate(model, splits.val.batches(cfg.eval.batch_size), device=dev)
    test, labels, val = test.cpu(), labels.cpu(), val.cpu()
    mode = calibration_modes(crit)[0]  # the calibration results.json's calibrated_budgets reads
    cal = metrics.calibrated_curve(val, test, labels, costs, criterion=crit, mode=mode)
    points = list(enumerate(zip(cal["flops"], cal["accuracy"])))
    chosen: dict[str, int | None] = {}
    for f in FRACTIONS:  # budget_table's rule: the best accuracy among the points within the budget
        fits = [(a, -i, i) for i, (c, a) in points if c <= f * base * (1 + 1e-9)]
        chosen[f"{f * 100:g}%"] = max(fits)[2] if fits else None
    chosen["max"] = max((a, -i, i) for i, (_, a) in points)[2]
    acc: dict[str, float | None] = {}
    correct: dict[str, torch.Tensor | None] = {}
    rows = torch.arange(labels.numel())
    for name, i in chosen.items():
        if i is None:
            acc[name], correct[name] = None, None
            continue
        exits = (metrics.exit_decisions(test, crit, cal["thresholds"][i][0]) if crit == "patience"
                 else metrics.apply_thresholds(test, cal["thresholds"][i], criterion=crit))
        ok = test[exits, rows].argmax(-1) == labels
        acc[name], correct[name] = float(ok.double().mean()), ok
    stored = Results.from_json(run_dir).calibrated_budgets or {}
    for name, v in acc.items():
        s = stored.get(name)
        if (v is None) != (s is None) or (v is not None and abs(v - s) > 1e-6):
            raise EarlyExitError(f"{run_dir}: recomputed calibrated accuracy at {name} is {v}, results.json says "
                                 f"{s}; the weights are not the ones the results came from")
    return {"accuracy": acc, "correct": correct}


def sample_bootstrap(dir_a: str | Path, dir_b: str | Path, *, resamples: int = 2000, seed: int = 0,
                     device: str | None = None) -> dict[str, Any]:
    """``acc(a) - acc(b)`` at every calibrated budget with a paired bootstrap over the test samples.

    Both runs must be evaluated on the same test split (same dataset and size). Returns ``{"a", "b",
    "resamples", "budgets": {budget: {n, mean, low, high} or None}}`` (None where a run has no point within
    the budget).
    """
    a, b = calibrated_correct(dir_a, device=device), calibrated_correct(dir_b, device=device)
    out: dict[str, Any] = {"a": str(dir_a), "b": str(dir_b), "resamples": resamples, "budgets": {}}
    for name, ca in a["correct"].items():
        cb = b["correct"][name]
        if ca is None or cb is None:
            out["budgets"][name] = None
            continue
        if ca.shape != cb.shape:
            raise EarlyExitError(f"{dir_a} and {dir_b} were tested on different test sets "
                                 f"({ca.numel()} vs {cb.numel()} samples)")
        out["budgets"][name] = paired_bootstrap(ca.tolist(), cb.tolist(), resamples=resamples, seed=seed)
    return out


def format_bootstrap(result: dict[str, Any]) -> list[str]:
    """One line per pair: each budget's difference in points with its interval."""
    cells = []
    for name, c in result["budgets"].items():
        cells.append(f"{name}: n/a" if c is None else
                     f"{name}: {100 * c['mean']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]")
    return [f"bootstrap over test samples ({Path(result['a']).name} - {Path(result['b']).name}, "
            f"{result['resamples']} resamples, validation-calibrated): " + "; ".join(cells)]


__all__ = ["calibrated_correct", "sample_bootstrap", "format_bootstrap"]
