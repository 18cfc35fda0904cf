"""Tests of the validation-calibrated budgets in earlyexit.metrics (MSDNet's budgeted protocol, Huang et al., ICLR 2018).

Global thresholds are checked against a brute-force sweep over every distinct
threshold (via ``threshold_curve``); geometric thresholds against the exact
per-exit counts that the geometric distribution prescribes; the per-exit rule
against ``exit_decisions`` and a naive per-sample loop. Hypothesis covers the
invariants (cost below the target, monotone in the target).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from earlyexit.metrics import (apply_thresholds, calibrate_thresholds, calibrated_curve, exit_decisions,
                               geometric_fractions, threshold_curve)

from strategies import exit_outputs  # tests/strategies.py

SETTINGS = settings(max_examples=40, deadline=None)
CRITERIA = ["confidence", "entropy"]
COSTS5 = [1.0, 2.0, 3.5, 5.0, 7.0]


# --- data ---------------------------------------------------------------------

def structured_logits(E: int, N: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose signal grows with depth, as in a trained early-exit model: (E, N, C), labels (N,)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    signal = torch.linspace(0.5, 4.0, E)[:, None, None] * torch.rand(1, N, 1, generator=g)  # (E, N, 1): easy and hard samples
    logits = torch.randn(E, N, C, generator=g) + signal * torch.nn.functional.one_hot(labels, C)  # (E, N, C)
    return logits, labels


def random_logits(E: int, N: int, C: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(E, N, C, generator=g), torch.randint(0, C, (N,), generator=g)




def realised_cost(logits: torch.Tensor, thresholds, costs, criterion: str) -> tuple[float, list[int]]:
    exits = apply_thresholds(logits, thresholds, criterion=criterion)  # (N,)
    counts = torch.bincount(exits, minlength=logits.shape[0])  # (E,)
    return float(counts.double() @ torch.tensor(costs, dtype=torch.float64) / logits.shape[1]), counts.tolist()


def scores(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """(E, N) float64 confidence or entropy, computed independently of the library."""
    p = torch.softmax(logits.double(), dim=-1)
    if criterion == "confidence":
        return p.amax(-1)
    return torch.special.entr(p).sum(-1)


# --- apply_thresholds ---------------------------------------------------------

@SETTINGS
@given(exit_outputs(max_classes=5), st.sampled_from(CRITERIA), st.floats(0, 2))
def test_equal_thresholds_match_exit_decisions(out, criterion, t):
    logits, _, _ = out
    E = logits.shape[0]
    got = apply_thresholds(logits, [t] * E, criterion=criterion)
    assert got.dtype == torch.long and got.shape == (logits.shape[1],)
    assert torch.equal(got, exit_decisions(logits, criterion, t))


@SETTINGS
@given(exit_outputs(max_classes=5), st.sampled_from(CRITERIA), st.data())
def test_apply_matches_naive_loop(out, criterion, data):
    logits, _, _ = out
    E, N, C = logits.shape
    top = 1.0 if criterion == "confidence" else math.log(C)
    t = data.draw(st.lists(st.floats(0, top), min_size=E, max_size=E))
    s = scores(logits, criterion)  # (E, N)
    assume(bool(((s - torch.tensor(t, dtype=torch.float64)[:, None]).abs() > 1e-4).all()))  # no float32 borderline
    expected = []
    for n in range(N):
        k = 0
        while k < E - 1 and not (s[k, n] > t[k] if criterion == "confidence" else s[k, n] <= t[k]):
            k += 1
        expected.append(k)
    assert apply_thresholds(logits, torch.tensor(t), criterion=criterion).tolist() == expected


def test_apply_thresholds_hand_made():
    # exit 0 confidences: 0.5 (uniform) and ~0.88; exit 1 is the last and takes the rest
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert apply_thresholds(logits, [0.8, 0.0]).tolist() == [1, 0]
    assert apply_thresholds(logits, [0.4, 0.0]).tolist() == [0, 0]
    assert apply_thresholds(logits, [math.inf, -math.inf]).tolist() == [1, 1]
    assert apply_thresholds(logits, [0.5, math.inf], criterion="entropy").tolist() == [1, 0]  # ln 2 = 0.69 > 0.5


# --- global mode --------------------------------------------------------------

@SETTINGS
@given(exit_outputs(max_classes=5), st.sampled_from(CRITERIA), st.floats(0, 1.2))
def test_global_is_the_best_single_threshold(out, criterion, frac):
    logits, labels, costs = out
    E = logits.shape[0]
    target = costs[0] + frac * (costs[-1] - costs[0])
    th = calibrate_thresholds(logits, costs, target, criterion=criterion, mode="global")
    assert len(th) == E and len(set(th[:-1])) <= 1
    assert th[-1] == (-math.inf if criterion == "confidence" else math.inf)  # the last exit always fires
    got, _ = realised_cost(logits, th, costs, criterion)
    assert got <= target * (1 + 1e-9)
    # brute force: every distinct threshold on the early exits' scores, plus one that never fires; confidence
    # leaves on c > t (strict), so its breakpoints are the floats just below the scores
    never = math.inf if criterion == "confidence" else -math.inf
    values = sorted(set(_lib_values(logits, criterion)[:-1].flatten().tolist()))
    if criterion == "confidence":
        values = [math.nextafter(v, -math.inf) for v in values]
    values = values + [never] if E > 1 else [never]
    curve = threshold_curve(logits, labels, costs, thresholds=values, criterion=criterion)
    best = max(f for f in curve["flops"] if f <= target * (1 + 1e-9))
    assert got == pytest.approx(best, rel=1e-12)


def _lib_values(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """The library's own float32 score values, so the brute force sweeps exactly the same breakpoints."""
    x = logits.float()
    if criterion == "confidence":
        return (x.amax(-1) - x.logsumexp(-1)).exp().double()
    return torch.stack([torch.special.entr(torch.softmax(v, dim=-1)).sum(-1) for v in x]).double()


@pytest.mark.parametrize("criterion", CRITERIA)
def test_global_endpoints(criterion):
    logits, _ = random_logits(4, 50, 5, seed=1)
    costs = [1.0, 2.0, 3.0, 4.0]
    first = calibrate_thresholds(logits, costs, 1.0, criterion=criterion, mode="global")
    assert bool((apply_thresholds(logits, first, criterion=criterion) == 0).all())
    for target in (4.0, 100.0):
        last = calibrate_thresholds(logits, costs, target, criterion=criterion, mode="global")
        assert bool((apply_thresholds(logits, last, criterion=criterion) == 3).all())


# --- geometric mode -----------------------------------------------------------

@SETTINGS
@given(st.lists(st.floats(0.1, 10), min_size=1, max_size=8), st.floats(0, 1))
def test_geometric_fractions_solve_the_target(steps, frac):
    costs = list(np.cumsum(steps))
    target = costs[0] + frac * (costs[-1] - costs[0])
    q = geometric_fractions(costs, target)
    assert len(q) == len(costs) and sum(q) == pytest.approx(1.0, abs=1e-12) and min(q) >= 0
    assert sum(a * c for a, c in zip(q, costs)) == pytest.approx(target, rel=1e-9, abs=1e-9)
    # q_k ∝ p^k: a constant ratio between neighbours, i.e. q_k q_{k+2} = q_{k+1}^2
    for a, b, c in zip(q, q[1:], q[2:]):
        assert a * c == pytest.approx(b * b, rel=1e-6, abs=1e-15)


def test_geometric_fractions_endpoints():
    assert geometric_fractions([1.0, 2.0, 3.0], 1.0) == [1.0, 0.0, 0.0]
    assert geometric_fractions([1.0, 2.0, 3.0], 3.0) == [0.0, 0.0, 1.0]
    assert geometric_fractions([1.0, 2.0, 3.0], 2.0) == pytest.approx([1 / 3] * 3)  # p = 1: uniform


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("make", [structured_logits, random_logits])
def test_geometric_exit_counts_follow_the_distribution(make, criterion):
    E, N = 5, 20000
    logits, _ = make(E, N, 10, seed=2)
    span = COSTS5[-1] - COSTS5[0]
    for target in (1.3, 2.5, 4.0, 6.1):
        q = geometric_fractions(COSTS5, target)
        th = calibrate_thresholds(logits, COSTS5, target, criterion=criterion, mode="geometric")
        got, counts = realised_cost(logits, th, COSTS5, criterion)
        # exactly floor(N * cumulative q) samples have left by each exit (continuous scores do not tie)
        gone = [math.floor(N * c + 1e-9) for c in np.cumsum(q)[:-1]] + [N]
        assert counts == np.diff([0] + gone).tolist()
        assert max(abs(c / N - qk) for c, qk in zip(counts, q)) <= 2 / N
        # rounding down only delays samples: at most (cost_last - cost_0) / N above the target, never below
        assert target - 1e-9 <= got <= target + span / N + 1e-9
        assert th[-1] == (-math.inf if criterion == "confidence" else math.inf)


def test_geometric_survives_ties():
    logits = torch.zeros(3, 100, 4)  # every confidence is 1/4: one big tie at every exit
    th = calibrate_thresholds(logits, [1.0, 2.0, 3.0], 2.0, mode="geometric")
    got, counts = realised_cost(logits, th, [1.0, 2.0, 3.0], "confidence")
    assert sum(counts) == 100 and counts[0] == 100 and got == 1.0  # the tie lets all leave; still within budget


# --- both modes ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["global", "geometric"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_same_data_reproduces_the_validation_cost(mode, criterion):
    logits, labels = structured_logits(5, 3000, 10, seed=3)
    curve = calibrated_curve(logits, logits, labels, COSTS5, criterion=criterion, mode=mode)
    assert curve["flops"] == curve["val_flops"]
    for target, th, f, counts in zip(curve["targets"], curve["thresholds"], curve["val_flops"], curve["exit_counts"]):
        assert th == calibrate_thresholds(logits, COSTS5, target, criterion=criterion, mode=mode)
        got, got_counts = realised_cost(logits, th, COSTS5, criterion)
        assert got_counts == counts and got == pytest.approx(f, rel=1e-14)
        if mode == "global":
            assert f <= target * (1 + 1e-9)
            assert f == pytest.approx(threshold_curve(logits, labels, COSTS5, [th[0]], criterion)["flops"][0], rel=1e-14)
        else:
            assert target - 1e-9 <= f <= target + (COSTS5[-1] - COSTS5[0]) / 3000 + 1e-9


@pytest.mark.parametrize("mode", ["global", "geometric"])
def test_calibrated_on_validation_holds_on_test(mode):
    val, _ = structured_logits(5, 20000, 10, seed=4)
    test, labels = structured_logits(5, 20000, 10, seed=5)
    curve = calibrated_curve(val, test, labels, COSTS5, mode=mode)
    gap = max(abs(f - t) for f, t in zip(curve["flops"], curve["targets"]))
    assert gap < 0.02 * (COSTS5[-1] - COSTS5[0])  # same distribution: the budget transfers
    assert curve["accuracy"][-1] == pytest.approx(float((test[-1].argmax(-1) == labels).double().mean()))


@SETTINGS
@given(exit_outputs(max_classes=5), st.sampled_from(CRITERIA), st.lists(st.floats(0, 1.2), min_size=2, max_size=6))
def test_global_monotone_in_target(out, criterion, fracs):
    logits, labels, costs = out
    targets = sorted(costs[0] + f * (costs[-1] - costs[0]) for f in fracs)
    curve = calibrated_curve(logits, logits, labels, costs, budgets=targets, criterion=criterion, mode="global")
    v = curve["val_flops"]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(v, v[1:]))
    assert all(f <= t * (1 + 1e-9) for f, t in zip(v, targets))


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 300), st.integers(0, 10**6), st.sampled_from(CRITERIA),
       st.lists(st.floats(0, 1.2), min_size=2, max_size=6))
def test_geometric_monotone_in_target(E, N, seed, criterion, fracs):
    logits, labels = random_logits(E, N, 6, seed)
    s = _lib_values(logits, criterion)  # (E, N)
    assume(all(len(set(row)) == N for row in s.tolist()))  # ties may let extra samples out early
    costs = [1.0 + 1.5 * k for k in range(E)]
    targets = sorted(costs[0] + f * (costs[-1] - costs[0]) for f in fracs)
    curve = calibrated_curve(logits, logits, labels, costs, budgets=targets, criterion=criterion, mode="geometric")
    v = curve["val_flops"]
    assert all(a <= b * (1 + 1e-12) for a, b in zip(v, v[1:]))
    reach = [min(t, costs[-1]) for t in targets]  # above the last exit's cost everyone simply goes there
    assert all(t - 1e-9 <= f <= t + (costs[-1] - costs[0]) / N + 1e-9 for f, t in zip(v, reach))


def test_curve_fields_and_defaults():
    val, _ = structured_logits(5, 200, 10, seed=6)
    test, labels = structured_logits(5, 150, 10, seed=7)
    curve = calibrated_curve(val, test, labels, COSTS5)
    assert set(curve) == {"criterion", "mode", "targets", "thresholds", "flops", "accuracy", "val_flops", "exit_counts"}
    assert (curve["criterion"], curve["mode"]) == ("confidence", "geometric")
    assert curve["targets"] == pytest.approx(np.linspace(1.0, 7.0, 40).tolist())
    assert all(len(curve[k]) == 40 for k in ("thresholds", "flops", "accuracy", "val_flops", "exit_counts"))
    assert all(len(th) == 5 for th in curve["thresholds"]) and all(sum(c) == 150 for c in curve["exit_counts"])
    assert curve["flops"][0] == 1.0 and curve["flops"][-1] == 7.0  # the endpoints are the static exits
    shared = threshold_curve(test, labels, COSTS5, 5)
    assert set(shared) - {"thresholds"} <= set(curve)


def test_single_exit():
    logits, labels = random_logits(1, 20, 3, seed=8)
    assert calibrate_thresholds(logits, [2.0], 5.0) == [-math.inf]
    curve = calibrated_curve(logits, logits, labels, [2.0], criterion="entropy", mode="global")
    assert curve["flops"] == [2.0] * 40 and curve["thresholds"][0] == [math.inf]


def test_bad_input_raises():
    logits, labels = random_logits(3, 10, 4, seed=9)
    costs = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="patience"):
        calibrate_thresholds(logits, costs, 2.0, criterion="patience")
    with pytest.raises(ValueError, match="patience"):
        apply_thresholds(logits, [2, 2, 2], criterion="patience")
    with pytest.raises(ValueError, match="patience"):
        calibrated_curve(logits, logits, labels, costs, criterion="patience")
    with pytest.raises(ValueError, match="criterion"):
        calibrate_thresholds(logits, costs, 2.0, criterion="margin")
    with pytest.raises(ValueError, match="mode"):
        calibrate_thresholds(logits, costs, 2.0, mode="linear")
    with pytest.raises(ValueError, match="first exit"):
        calibrate_thresholds(logits, costs, 0.5)
    with pytest.raises(ValueError, match="finite"):
        calibrate_thresholds(logits, costs, math.nan)
    with pytest.raises(ValueError, match="non-decreasing"):
        calibrate_thresholds(logits, [1.0, 3.0, 2.0], 2.0)
    with pytest.raises(ValueError, match="costs"):
        calibrate_thresholds(logits, [1.0, 2.0], 2.0)
    with pytest.raises(ValueError, match="thresholds"):
        apply_thresholds(logits, [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        apply_thresholds(logits, [0.5, math.nan, 0.5])
    with pytest.raises(ValueError, match="costs"):  # validation and test from models with different exits
        calibrated_curve(logits, logits[:2], labels, costs)
    with pytest.raises(ValueError, match="budgets"):
        calibrated_curve(logits, logits, labels, costs, budgets=[])
    with pytest.raises(ValueError, match="logits"):
        calibrate_thresholds(logits[0], costs, 2.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 40), st.integers(2, 5), st.integers(0, 10_000))
def test_patience_calibration_picks_the_largest_patience_within_each_target_on_validation(E, N, C, seed):
    """PBEE's patience calibrated on validation (mode ``global``): per target, the patience chosen is the largest
    whose validation cost fits (brute force over 1..E), and the test side is ``exit_decisions`` at that patience."""
    val, _ = random_logits(E, N, C, seed)
    test, labels = random_logits(E, N + 3, C, seed + 1)
    costs = [float(k + 1) for k in range(E)]
    curve = calibrated_curve(val, test, labels, costs, criterion="patience", mode="global")
    cost = torch.tensor(costs, dtype=torch.float64)
    val_cost = {p: float(cost[exit_decisions(val, "patience", p)].mean()) for p in range(1, E + 1)}
    for target, row, f, a, vf in zip(curve["targets"], curve["thresholds"], curve["flops"], curve["accuracy"],
                                     curve["val_flops"]):
        p = int(row[0])
        assert row == [float(p)] * E
        assert p == max(q for q, c in val_cost.items() if c <= target + 1e-9 * target)
        assert vf == pytest.approx(val_cost[p])
        exits = exit_decisions(test, "patience", p)
        assert f == pytest.approx(float(cost[exits].mean()))
        assert a == pytest.approx(float((test[exits, torch.arange(N + 3)].argmax(-1) == labels).double().mean()))


@pytest.mark.parametrize("mode", ["geometric", "global"])
@pytest.mark.parametrize("seed", range(6))
def test_two_classes_entropy_calibrates_as_the_maximum(mode, seed):
    """With two classes the entropy is a decreasing function of the maximum softmax, so both criteria order the
    samples alike and thresholds calibrated on validation let the same samples out at every exit: the curves
    are equal (RESULTS.md section 10, BERT on SST-2, whose validation-calibrated tables agree under both).
    Exactly so while the float32 maxima do not tie: near saturation they move in steps of 6e-8 and tie samples
    whose entropies differ (logits 3x these break the equality at a few targets)."""
    g = torch.Generator().manual_seed(seed)
    E, costs = 4, [1.0, 2.0, 3.0, 4.0]
    val, test = (torch.randn(E, n, 2, generator=g) for n in (300, 400))  # far from saturation: no float32 ties
    labels = torch.randint(0, 2, (400,), generator=g)
    conf = calibrated_curve(val, test, labels, costs, criterion="confidence", mode=mode)
    ent = calibrated_curve(val, test, labels, costs, criterion="entropy", mode=mode)
    assert ent["exit_counts"] == conf["exit_counts"]
    assert ent["accuracy"] == conf["accuracy"] and ent["flops"] == conf["flops"]
