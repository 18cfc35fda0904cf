"""The paper's Table 1 budget rule, ``metrics.ztw_budget_table``, against hand-computed tables, a literal
reference of the rule, and ``budget_table`` (each run's best within budget), which it must differ from
exactly where the last threshold within a budget is not the best point within it."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from earlyexit.metrics import average_curves, budget_table, static_points, threshold_curve, ztw_budget_table

SETTINGS = settings(max_examples=80, deadline=None)
KEYS = ["25%", "50%", "75%", "100%", "max"]


def _curve(flops, acc, thresholds=None, criterion="confidence"):
    t = thresholds if thresholds is not None else [i / max(1, len(flops) - 1) for i in range(len(flops))]
    return {"criterion": criterion, "thresholds": t, "flops": list(flops), "accuracy": list(acc),
            "exit_counts": [[0] for _ in flops]}


# --- hand-computed tables ---------------------------------------------------------------------

def test_two_seeds_by_hand():
    a = _curve([20, 40, 90], [0.5, 0.7, 0.8])
    b = _curve([30, 60, 110], [0.6, 0.5, 0.9])
    # mean cost 25, 50, 100; mean accuracy 0.55, 0.60, 0.85; unbiased std of two values = |a - b| / sqrt(2)
    table = ztw_budget_table([a, b], 100.0)
    assert list(table) == KEYS
    s = math.sqrt(2) / 2
    expect = {"25%": (0.55, 0.1 * s),   # 25 fits (not above 25), 50 is the first above 25: index 0
              "50%": (0.60, 0.2 * s),   # 100 is the first above 50: index 1
              "75%": (0.60, 0.2 * s),
              "100%": (0.85, 0.1 * s),  # nothing is above 100: the last threshold
              "max": (0.85, 0.1 * s)}
    for k, (m, sd) in expect.items():
        assert table[k]["mean"] == pytest.approx(m, abs=1e-12) and table[k]["std"] == pytest.approx(sd, abs=1e-12), k
    assert ztw_budget_table([a, b], 100.0, fractions=(0.2,)) == {"20%": None, "max": table["max"]}  # 25 > 20 at once


def test_cells_need_not_grow_with_the_budget():
    c = _curve([10, 20, 30, 40], [0.5, 0.8, 0.6, 0.9])
    table = ztw_budget_table([c], 40.0)
    assert {k: v["mean"] for k, v in table.items()} == {"25%": 0.5, "50%": 0.8, "75%": 0.6, "100%": 0.9, "max": 0.9}
    assert table["75%"]["mean"] < table["50%"]["mean"]  # non-monotone: the threshold just within 75% is worse
    assert budget_table(c, [], 40.0)["75%"] == 0.8  # best within budget keeps the better, cheaper point


def test_first_threshold_above_the_budget_ends_the_walk():
    c = _curve([10, 30, 20, 40], [0.5, 0.6, 0.9, 0.7])  # the mean cost need not rise with the threshold
    assert ztw_budget_table([c], 100.0, fractions=(0.25,))["25%"]["mean"] == 0.5  # 20 fits, but 30 came first
    assert budget_table(c, [], 100.0, fractions=(0.25,))["25%"] == 0.9


def test_a_cost_at_the_budget_fits_up_to_float_rounding():
    at = _curve([50.0 * (1 + 1e-12), 80.0], [0.7, 0.8])  # 50 % of 100, off by float rounding: fits
    above = _curve([50.0 * (1 + 1e-6), 80.0], [0.7, 0.8])
    assert ztw_budget_table([at], 100.0, fractions=(0.5,))["50%"]["mean"] == 0.7
    assert ztw_budget_table([above], 100.0, fractions=(0.5,))["50%"] is None


def test_static_exits_do_not_enter():
    c = _curve([10, 20], [0.5, 0.6])
    statics = [{"index": 0, "flops": 5.0, "accuracy": 0.99}]
    assert ztw_budget_table([c], 40.0, fractions=(0.2,))["20%"] is None
    assert budget_table(c, statics, 40.0, fractions=(0.2,))["20%"] == 0.99


def test_one_seed_and_several():
    g = torch.Generator().manual_seed(0)
    curves = [_curve(torch.linspace(1, 4, 7).tolist(), torch.rand(7, generator=g).tolist()) for _ in range(3)]
    one = ztw_budget_table(curves[:1], 4.0)
    assert all(v["std"] == 0.0 for v in one.values() if v is not None)
    assert one["max"]["mean"] == curves[0]["accuracy"][-1]
    several = ztw_budget_table(curves, 4.0)
    last = [c["accuracy"][-1] for c in curves]
    assert several["max"]["mean"] == pytest.approx(statistics.mean(last), rel=1e-12)
    assert several["max"]["std"] == pytest.approx(statistics.stdev(last), rel=1e-12)
    avg = average_curves(curves)
    assert avg["seeds"] == 3 and avg["accuracy_std"][0] == pytest.approx(statistics.stdev(c["accuracy"][0] for c in curves))
    assert average_curves(curves[:1])["accuracy_std"] == [0.0] * 7


def test_entropy_curves_are_walked_from_the_largest_threshold():
    # entropy fires on H <= t: t = 0 lets nobody out (dearest), the largest t everyone (cheapest)
    ent = _curve([40, 30, 20, 10], [0.9, 0.6, 0.8, 0.5], thresholds=[0.0, 0.5, 1.0, 1.5], criterion="entropy")
    conf = _curve([10, 20, 30, 40], [0.5, 0.8, 0.6, 0.9])
    assert ztw_budget_table([ent], 40.0) == ztw_budget_table([conf], 40.0)


def test_bad_input():
    a = _curve([1, 2], [0.5, 0.6])
    with pytest.raises(ValueError, match="other thresholds"):
        ztw_budget_table([a, _curve([1, 2], [0.5, 0.6], thresholds=[0.0, 0.9])], 2.0)
    with pytest.raises(ValueError, match="other thresholds"):
        ztw_budget_table([a, _curve([1, 2, 3], [0.5, 0.6, 0.7])], 2.0)
    with pytest.raises(ValueError, match="criterion"):
        ztw_budget_table([a, _curve([1, 2], [0.5, 0.6], criterion="entropy")], 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        ztw_budget_table([], 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        ztw_budget_table(a, 2.0)  # one curve, not a list of curves
    with pytest.raises(ValueError, match="base_flops"):
        ztw_budget_table([a], 0.0)
    with pytest.raises(ValueError, match="length"):
        ztw_budget_table([{**a, "accuracy": [0.5]}], 2.0)


# --- the rule, literally, and the per-seed table -----------------------------------------------

def reference(curves, base, fractions):
    """The rule as stated, with plain Python statistics: walk the thresholds, stop at the first whose mean
    cost exceeds the budget, report the one before it."""
    T = len(curves[0]["flops"])
    cost = [statistics.mean(c["flops"][i] for c in curves) for i in range(T)]
    acc = [statistics.mean(c["accuracy"][i] for c in curves) for i in range(T)]
    sd = [statistics.stdev(c["accuracy"][i] for c in curves) if len(curves) > 1 else 0.0 for i in range(T)]
    out = {}
    for f in fractions:
        k = T - 1
        for i, c in enumerate(cost):
            if c > f * base * (1 + 1e-9):
                k = i - 1
                break
        out[f"{f * 100:g}%"] = None if k < 0 else (acc[k], sd[k])
    out["max"] = (acc[-1], sd[-1])
    return out


@st.composite
def seed_curves(draw):
    S, T = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    flops = st.lists(st.floats(0.5, 12, allow_nan=False), min_size=T, max_size=T)
    accs = st.lists(st.floats(0, 1), min_size=T, max_size=T)
    ts = [i / T for i in range(T)]
    return [_curve(draw(flops), draw(accs), thresholds=ts) for _ in range(S)]


@SETTINGS
@given(seed_curves(), st.floats(1, 10), st.lists(st.floats(0.05, 1.5), min_size=1, max_size=5, unique=True))
def test_matches_the_literal_rule(curves, base, fractions):
    table = ztw_budget_table(curves, base, fractions=fractions)
    ref = reference(curves, base, fractions)
    assert list(table) == list(ref)
    for k, want in ref.items():
        if want is None:
            assert table[k] is None, k
        else:
            assert table[k]["mean"] == pytest.approx(want[0], rel=1e-9, abs=1e-12), k
            assert table[k]["std"] == pytest.approx(want[1], rel=1e-6, abs=1e-9), k
    # the seeds' order does not matter
    rev = ztw_budget_table(curves[::-1], base, fractions=fractions)
    for k in table:
        assert (table[k] is None) == (rev[k] is None)
        if table[k] is not None:
            assert rev[k]["mean"] == pytest.approx(table[k]["mean"], rel=1e-9, abs=1e-12)
    # one seed: never above that seed's best within budget, and empty only where that is empty too
    one = ztw_budget_table(curves[:1], base, fractions=fractions)
    best = budget_table(curves[0], [], base, fractions=fractions)
    for k in one:
        if one[k] is not None:
            assert best[k] is not None and one[k]["mean"] <= best[k] + 1e-12


def test_differs_from_best_within_budget_exactly_where_it_should():
    """Random logits: accuracy is noise along the thresholds, so the last threshold within a budget is often not
    the best point within it. The two tables agree exactly in the cells where it is."""
    g = torch.Generator().manual_seed(0)
    E, N, C = 4, 300, 10
    costs, base = [1.0, 2.0, 3.0, 4.0], 3.5
    fractions = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    differ = 0
    for _ in range(3):
        logits, labels = 2 * torch.randn(E, N, C, generator=g), torch.randint(0, C, (N,), generator=g)
        curve = threshold_curve(logits, labels, costs)
        statics = static_points(logits, labels, costs)
        ztw = ztw_budget_table([curve], base, fractions=fractions)
        best = budget_table(curve, statics, base, fractions=fractions)
        for f in fractions:
            k = f"{f * 100:g}%"
            limit = f * base * (1 + 1e-9)
            fits = [a for c, a in zip(curve["flops"], curve["accuracy"]) if c <= limit]
            fits += [s["accuracy"] for s in statics if s["flops"] <= limit]
            over = next((i for i, c in enumerate(curve["flops"]) if c > limit), len(curve["flops"]))
            if over == 0:
                assert ztw[k] is None
                continue
            last = curve["accuracy"][over - 1]  # the confidence curve's cost rises with t: all before `over` fit
            assert ztw[k]["mean"] == last and best[k] == max(fits)
            assert (ztw[k]["mean"] == best[k]) == (last == max(fits))
            differ += ztw[k]["mean"] < best[k]
        assert ztw["max"]["mean"] == curve["accuracy"][-1] == statics[-1]["accuracy"]  # t = 1.0: nobody leaves early
    assert differ >= 3  # the rules really differ on such data
