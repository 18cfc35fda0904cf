"""Assertions for other test suites: check an early-exit implementation against this package.

Each helper raises an ``AssertionError`` that says what differs (which
tensor, which exit, which threshold, by how much), so a failing test in
another project reads as a diagnosis:

- ``assert_phase_freezing(train_step, model)``: one phase-3 step (ICs trained on
  a frozen backbone) leaves every backbone tensor, parameters and buffers,
  bit-identical and moves every IC parameter;
- ``assert_exit_costs(model, example_input, expected, rtol)``: the cumulative
  per-exit FLOPs of ``model`` (``metrics.exit_costs``: FLOPs = 2 x
  multiply-adds, as ``torch.utils.flop_counter`` counts them, attention's score
  and value products included) are ``expected``;
- ``assert_curve_matches(logits, labels, costs, their_curve)``: another
  implementation's accuracy-vs-cost curve is the one this package computes from
  the same logits (``metrics.threshold_curve``).

The golden numbers (``tests/golden/`` of the repository) and ``python -m
earlyexit score`` are the other two ways to compare; the README's "Testing
your implementation against earlyexit" shows all of them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import metrics

_SHOW = 5  # differing items named in a message


def _bits(t: Tensor) -> Tensor:
    """The raw bytes of a tensor (NaN == NaN, +0 != -0: bit identity, not numerical equality)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _max_diff(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{tuple(a.shape)} became {b.dtype}{tuple(b.shape)}"
    d = (b.detach().cpu().double() - a.detach().cpu().double()).abs()
    return f"max |change| {float(d.max()):.3g}" if d.numel() else "changed"


def _listing(items: Sequence[str]) -> str:
    more = f", and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def assert_phase_freezing(train_step: Callable[[nn.Module], Any], model: nn.Module, *,
                          backbone: Iterable[nn.Module] | None = None, ics: Iterable[nn.Module] | None = None) -> None:
    """One phase-3 step leaves the backbone bit-identical and moves every IC parameter.

    Phase 3 of the disjoint and mixed regimes trains the internal classifiers (ICs) on a frozen backbone: the
    backbone's weights must not change, and neither may its buffers (BatchNorm running statistics and
    ``num_batches_tracked``: the backbone runs in eval mode), while every IC parameter is updated.

    Args:
        train_step: a callable ``train_step(model)`` that performs exactly one phase-3 training step on
            ``model``, in place: it puts the model into phase 3 itself (what is trainable, which modules are
            in eval mode), runs the forward pass on one batch, back-propagates the ICs' losses and steps the
            optimizer. Its return value is ignored.
        model: the multi-exit model, before the step.
        backbone: the modules that make up the frozen backbone; default ``model.backbone_modules()`` (stem,
            stages and the backbone's own classifier, as ``earlyexit.MultiExitModel`` defines them).
        ics: the IC heads; default ``model.heads[:-1]``.
    Raises:
        AssertionError: naming every backbone tensor that changed (parameter or buffer, with its largest
            change) and every IC parameter that did not move.
    """
    backbone = list(model.backbone_modules() if backbone is None else backbone)
    ics = list(model.heads[:-1] if ics is None else ics)
    bb_ids = {id(t) for m in backbone for t in itertools.chain(m.parameters(), m.buffers())}
    ic_ids = {id(p) for m in ics for p in m.parameters()}
    if not ic_ids:
        raise AssertionError("the model has no IC parameters: phase 3 has nothing to train")

    def tensors() -> dict[str, tuple[str, Tensor]]:
        out = {}
        for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                out[name] = (kind, t)
        return out

    before = tensors()
    frozen = {n: t.detach().clone() for n, (_, t) in before.items() if id(t) in bb_ids}
    trained = {n: t.detach().clone() for n, (kind, t) in before.items() if id(t) in ic_ids}
    train_step(model)
    after = tensors()
    problems = []
    changed = [f"{n} ({before[n][0]}, {'gone' if n not in after else _max_diff(t, after[n][1])})"
               for n, t in frozen.items() if n not in after or not _same_bits(t, after[n][1])]
    if changed:
        problems.append(f"phase 3 changed {len(changed)} of {len(frozen)} backbone tensors: {_listing(changed)}")
    still = [n for n, t in trained.items() if n in after and _same_bits(t, after[n][1])]
    gone = [n for n in trained if n not in after]
    if still or gone:
        problems.append(f"{len(still) + len(gone)} of {len(trained)} IC parameters did not move: "
                        f"{_listing(still + [f'{n} (gone)' for n in gone])}")
    if problems:
        raise AssertionError("; ".join(problems))


def assert_exit_costs(model: nn.Module, example_input: Any, expected: Sequence[float], rtol: float = 0.0) -> None:
    """The cumulative per-exit costs of ``model`` are ``expected`` (within ``rtol``; 0: exactly).

    Costs follow ``earlyexit.metrics.exit_costs``: per sample, the stem and every stage up to the exit plus
    every head up to and including it; FLOPs = 2 x multiply-adds as ``torch.utils.flop_counter`` counts
    matrix products and convolutions (attention's score and value products included); element-wise ops,
    pooling and normalisation are free.

    Args:
        model: a multi-exit model (``earlyexit.MultiExitModel`` or anything with its ``stages``, ``heads``,
            ``exit_after``, ``stage`` and ``head``).
        example_input: an input batch; the counts are divided by its batch size.
        expected: one cumulative cost per exit, e.g. from another implementation or the golden numbers.
        rtol: allowed relative difference per exit.
    Raises:
        AssertionError: the number of exits differs, or naming each exit whose cost differs (with the ratio,
            which tells a multiply-add convention, 0.5, or a missing part).
    """
    ours = metrics.exit_costs(model, example_input)
    expected = [float(v) for v in expected]
    if len(ours) != len(expected):
        raise AssertionError(f"the model has {len(ours)} exits, {len(expected)} costs were expected "
                             f"(measured {ours})")
    bad = []
    for k, (m, e) in enumerate(zip(ours, expected)):
        if abs(m - e) > rtol * abs(e):
            ratio = f", ratio {m / e:.4g}" if e else ""
            bad.append(f"exit {k}: expected {e:.10g}, measured {m:.10g}{ratio}")
    if bad:
        raise AssertionError(f"exit costs differ at {len(bad)} of {len(ours)} exits (rtol {rtol:g}; FLOPs = 2 x "
                             f"multiply-adds, torch.utils.flop_counter): {_listing(bad)}")


def assert_curve_matches(logits: Any, labels: Any, costs: Sequence[float], their_curve: Mapping, *,
                         criterion: str | None = None, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Another implementation's threshold curve equals ``metrics.threshold_curve`` of the same logits.

    Args:
        logits: ``(E, N, C)`` logits of every exit (tensor or array); labels: ``(N,)``; costs: ``(E,)``
            cumulative costs.
        their_curve: a mapping with ``flops`` and ``accuracy`` per threshold (results.json's ``curve`` layout);
            its ``thresholds`` are swept when given (else as many evenly spaced ones as it has points), its
            ``criterion`` is used when given, and its ``exit_counts``, when given, must match exactly.
        criterion: the exit criterion when ``their_curve`` names none (default ``"confidence"``: leave when the
            max softmax is ``> t``).
        rtol, atol: tolerance of the ``flops`` and ``accuracy`` values.
    Raises:
        AssertionError: naming how many thresholds differ and the first of them (threshold, both values).
    """
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(labels)
    if "flops" not in their_curve or "accuracy" not in their_curve:
        raise AssertionError("their curve needs 'flops' and 'accuracy' (one value per threshold)")
    crit = their_curve.get("criterion") or criterion or "confidence"
    if criterion is not None and their_curve.get("criterion") not in (None, criterion):
        raise AssertionError(f"their curve uses the criterion {their_curve['criterion']!r}, expected {criterion!r}")
    n = len(their_curve["flops"])
    thresholds = their_curve.get("thresholds")
    thresholds = [float(t) for t in thresholds] if thresholds is not None else n
    ours = metrics.threshold_curve(logits, labels, costs, thresholds=thresholds, criterion=crit)
    T = len(ours["thresholds"])
    for key in ("flops", "accuracy"):
        if len(their_curve[key]) != T:
            raise AssertionError(f"their curve has {len(their_curve[key])} {key} values for {T} thresholds")
    bad = []
    for i in range(T):
        parts = []
        for key in ("flops", "accuracy"):
            a, b = float(their_curve[key][i]), ours[key][i]
            if not abs(a - b) <= atol + rtol * abs(b):
                parts.append(f"{key} theirs {a:.10g} vs ours {b:.10g}")
        if "exit_counts" in their_curve and [int(c) for c in their_curve["exit_counts"][i]] != ours["exit_counts"][i]:
            parts.append(f"exit_counts theirs {list(their_curve['exit_counts'][i])} vs ours {ours['exit_counts'][i]}")
        if parts:
            bad.append((i, parts))
    if bad:
        i, parts = bad[0]
        raise AssertionError(f"{crit} curve differs at {len(bad)} of {T} thresholds; first at threshold "
                             f"{ours['thresholds'][i]:.6g} (index {i}): {', '.join(parts)}")


__all__ = ["assert_phase_freezing", "assert_exit_costs", "assert_curve_matches"]
