"""The exit rules at their edges: confidence leaves on ``> t`` (strict), entropy on ``<= t``, patience 0 never.

Checked on logits whose float32 softmax saturates at exactly 1.0 and at
thresholds equal to the scores themselves, where a ``>=`` rule and a ``>``
rule disagree. A replay model (its heads return slices of the input) lets
``inference.predict`` see exactly the logits the offline sweep sees, so the
two must agree sample by sample with no rounding margin.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from earlyexit.inference import predict
from earlyexit.methods import pbee
from earlyexit.metrics import (apply_thresholds, calibrate_thresholds, calibrated_curve, exit_decisions, exit_scores,
                               threshold_curve)
from earlyexit.models import MultiExitModel

SETTINGS = settings(max_examples=60, deadline=None)


# --- data and the replay model ------------------------------------------------------------

@st.composite
def saturating_logits(draw, max_exits: int = 5, max_classes: int = 5):
    """(E, N, C) float32 logits in which some rows have one class 60-200 above the rest (softmax == 1.0 in
    float32), some rows tie, the rest are moderate; labels (N,); increasing costs."""
    E = draw(st.integers(1, max_exits))
    N = draw(st.integers(1, 10))
    C = draw(st.integers(2, max_classes))
    arr = draw(hnp.arrays(np.float32, (E, N, C), elements=st.floats(-4, 4, width=32)))
    kind = draw(hnp.arrays(np.int8, (E, N), elements=st.integers(0, 2)))  # 0: as drawn, 1: saturated, 2: tied
    top = draw(hnp.arrays(np.int64, (E, N), elements=st.integers(0, C - 1)))
    gap = draw(st.floats(60, 200, width=32))
    for e in range(E):
        for n in range(N):
            if kind[e, n] == 1:
                arr[e, n, top[e, n]] += gap
            elif kind[e, n] == 2:
                arr[e, n] = arr[e, n, 0]
    labels = torch.from_numpy(draw(hnp.arrays(np.int64, (N,), elements=st.integers(0, C - 1))))
    costs = [float(c) for c in np.cumsum(draw(st.lists(st.floats(0.1, 10), min_size=E, max_size=E)))]
    return torch.from_numpy(arr), labels, costs


class _Slice(nn.Module):
    """Exit ``k``'s head: the ``k``-th logits row of an ``(N, E, C)`` input, unchanged."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.k]


def replay_model(E: int, C: int) -> MultiExitModel:
    """A MultiExitModel of E identity stages whose exit k returns input[:, k]: its logits are the input's."""
    return MultiExitModel(stem=nn.Identity(), stages=[nn.Identity() for _ in range(E)], head=_Slice(E - 1),
                          ic_after=list(range(E - 1)), make_head=lambda fi, c: _Slice(fi["k"]),
                          feature_info=[{"num_chs": C, "k": k} for k in range(E)], num_classes=C, input_shape=(E, C))


def _predict_exits(logits: torch.Tensor, criterion: str, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    E, _, C = logits.shape
    return predict(replay_model(E, C), logits.transpose(0, 1).contiguous(), criterion=criterion, threshold=threshold)


# --- confidence: strict -------------------------------------------------------------------

def test_saturated_softmax_is_exactly_one_in_float32():
    logits = torch.tensor([[[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # (2, 2, 3)
    s = exit_scores(logits, "confidence")
    assert s[0, 0] == 1.0 and s[0, 1] == pytest.approx(1 / 3)
    assert exit_decisions(logits, "confidence", 1.0).tolist() == [1, 1]  # 1.0 > 1.0 is false: stays in
    assert exit_decisions(logits, "confidence", math.nextafter(1.0, 0.0)).tolist() == [0, 1]
    third = float(s[0, 1])
    assert exit_decisions(logits, "confidence", third).tolist() == [0, 1]  # a score equal to t does not leave
    assert exit_decisions(logits, "confidence", math.nextafter(third, 0.0)).tolist() == [0, 0]


@SETTINGS
@given(saturating_logits())
def test_threshold_one_keeps_every_sample_to_the_last_exit(out):
    logits, labels, costs = out
    E, N, C = logits.shape
    assert bool((exit_decisions(logits, "confidence", 1.0) == E - 1).all())
    curve = threshold_curve(logits, labels, costs)  # default: 100 thresholds, the last one 1.0
    assert curve["thresholds"][-1] == 1.0
    assert curve["exit_counts"][-1][-1] == N and curve["flops"][-1] == pytest.approx(costs[-1])
    assert bool((apply_thresholds(logits, [1.0] * E) == E - 1).all())
    _, ex = _predict_exits(logits, "confidence", 1.0)
    assert bool((ex == E - 1).all())
    # threshold 0 lets every sample out at the first exit: every max softmax is >= 1/C > 0
    assert bool((exit_decisions(logits, "confidence", 0.0) == 0).all())


@SETTINGS
@given(saturating_logits(), st.sampled_from(["confidence", "entropy"]), st.data())
def test_inference_and_sweep_agree_at_the_scores_themselves(out, criterion, data):
    logits, labels, costs = out
    E, N, C = logits.shape
    s = exit_scores(logits, criterion)[:-1].flatten().tolist()  # the IC scores: thresholds where > and >= differ
    extra = [0.0, 1.0] if criterion == "confidence" else [0.0, math.log(C)]
    ts = data.draw(st.lists(st.sampled_from(s + extra), min_size=1, max_size=4))
    curve = threshold_curve(logits, labels, costs, thresholds=ts, criterion=criterion)
    for j, t in enumerate(ts):
        want = exit_decisions(logits, criterion, t)
        pred, got = _predict_exits(logits, criterion, t)
        assert torch.equal(got, want), (criterion, t)
        assert torch.equal(pred, logits.argmax(-1)[want, torch.arange(N)])
        assert torch.equal(apply_thresholds(logits, [t] * E, criterion=criterion), want)
        assert torch.bincount(want, minlength=E).tolist() == curve["exit_counts"][j]
        sc = exit_scores(logits, criterion)  # (E, N)
        for n in range(N):  # the rule itself: the first IC whose score passes t, else the last exit
            fires = [bool(sc[k, n] > t) if criterion == "confidence" else bool(sc[k, n] <= t) for k in range(E - 1)]
            assert int(want[n]) == (fires.index(True) if True in fires else E - 1)


# --- calibration under the strict rule ------------------------------------------------------

@pytest.mark.parametrize("mode", ["geometric", "global"])
def test_calibrated_confidence_thresholds_sit_just_below_a_score(mode):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 500, 5, generator=g)
    costs = [1.0, 2.0, 3.0, 4.0]
    s = exit_scores(logits, "confidence")  # (E, N)
    for target in (1.5, 2.5, 3.5):
        th = calibrate_thresholds(logits, costs, target, mode=mode)
        for k, t in enumerate(th[:-1]):
            if math.isfinite(t):  # the float64 just below an IC score (geometric: of that exit), which still leaves
                pool = s[k] if mode == "geometric" else s[:-1]
                assert bool((pool == math.nextafter(t, math.inf)).any()) and not bool((pool == t).any())


@pytest.mark.parametrize("mode", ["geometric", "global"])
def test_calibration_reaches_its_targets_on_saturated_scores(mode):
    """Half the samples are saturated (confidence exactly 1.0) at every IC: the calibrated threshold must still
    let them out (a threshold of 1.0 itself would let nobody out under the strict rule and miss the target)."""
    g = torch.Generator().manual_seed(1)
    E, N, C = 3, 400, 4
    logits = torch.randn(E, N, C, generator=g)
    logits[:, : N // 2, 0] += 150.0  # softmax == 1.0 in float32
    labels = torch.zeros(N, dtype=torch.long)
    costs = [1.0, 2.0, 3.0]
    assert bool((exit_scores(logits, "confidence")[:, : N // 2] == 1.0).all())
    targets = [1.5, 2.0, 2.5]
    curve = calibrated_curve(logits, logits, labels, costs, budgets=targets, mode=mode)
    for target, th, f, counts in zip(targets, curve["thresholds"], curve["val_flops"], curve["exit_counts"]):
        assert f <= target + (costs[-1] - costs[0]) / N + 1e-9  # within budget (geometric: up to one sample)
        assert counts[0] >= N // 2  # the saturated half left at the first IC
        assert th[0] < 1.0


def test_global_calibration_can_send_everyone_out_first():
    logits = torch.zeros(2, 10, 3)
    logits[0, :, 1] = 200.0  # every first-IC confidence is exactly 1.0
    th = calibrate_thresholds(logits, [1.0, 2.0], 1.0, mode="global")
    assert th[0] < 1.0 and bool((apply_thresholds(logits, th) == 0).all())


# --- patience 0: never leave early -------------------------------------------------------------

@SETTINGS
@given(saturating_logits())
def test_patience_zero_never_leaves_early(out):
    logits, labels, costs = out
    E, N, _ = logits.shape
    assert bool((exit_decisions(logits, "patience", 0) == E - 1).all())
    curve = threshold_curve(logits, labels, costs, thresholds=[0, 1], criterion="patience")
    assert curve["exit_counts"][0][-1] == N and curve["flops"][0] == pytest.approx(costs[-1])
    assert curve["exit_counts"][1][0] == N  # p = 1: the first exit
    for p in (0, 1, 2):
        _, ex = _predict_exits(logits, "patience", p)
        assert torch.equal(ex, exit_decisions(logits, "patience", p)), p


def test_pbee_patience_zero_uses_all_layers():
    assert pbee.patience_threshold(0) == 0
    assert [pbee.patience_threshold(t) for t in (1, 2, 5)] == [2, 3, 6]
    logits = torch.zeros(4, 6, 3)  # every IC predicts class 0: any patience >= 1 would fire early
    assert bool((exit_decisions(logits, "patience", pbee.patience_threshold(0)) == 3).all())
    assert bool((exit_decisions(logits, "patience", pbee.patience_threshold(1)) == 1).all())
    _, ex = _predict_exits(logits, "patience", pbee.patience_threshold(0))
    assert bool((ex == 3).all())
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="patience"):
            pbee.patience_threshold(bad)


def test_negative_or_fractional_patience_is_refused():
    logits, labels = torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long)
    for bad in (-1, 0.5):
        with pytest.raises(ValueError, match="patience"):
            threshold_curve(logits, labels, [1, 2], thresholds=[bad], criterion="patience")
        with pytest.raises(ValueError, match="patience"):
            _predict_exits(logits, "patience", bad)


@SETTINGS
@given(saturating_logits(), st.data())
def test_patience_against_a_naive_reference(out, data):
    """Patience ties are exact (runs of equal arg-max predictions): the sweep, ``exit_decisions`` and
    ``predict`` all leave at the first exit whose run of equal predictions reaches ``p`` (``>=``), else last."""
    logits, labels, costs = out
    E, N, _ = logits.shape
    ps = data.draw(st.lists(st.integers(0, E + 1), min_size=1, max_size=4))
    curve = threshold_curve(logits, labels, costs, thresholds=ps, criterion="patience")
    pred = logits.argmax(-1)  # (E, N)
    for j, p in enumerate(ps):
        want = []
        for n in range(N):
            run, leave = 0, E - 1
            for k in range(E):
                run = run + 1 if k > 0 and pred[k, n] == pred[k - 1, n] else 1
                if p > 0 and run >= p:
                    leave = k
                    break
            want.append(leave)
        want = torch.tensor(want)
        assert torch.equal(exit_decisions(logits, "patience", p), want), p
        assert torch.equal(_predict_exits(logits, "patience", p)[1], want), p
        assert torch.bincount(want, minlength=E).tolist() == curve["exit_counts"][j]
