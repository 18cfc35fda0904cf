"""Paired statistics over seeds (summary --pair, summary.json's pairs) and the decision rule, on fixtures with a
known answer; the training cost each configuration spent."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from earlyexit.cli import main
from earlyexit.pairs import markdown_pair, pair_summary, per_seed_values
from earlyexit.results import Results
from earlyexit.stats import decide, paired_bootstrap, paired_t, training_cost

from test_reports import make_run


# --- the statistics, against values worked out by hand -------------------------------------------------------

def test_paired_t_known_answer():
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.302653, half width 4.302653 / sqrt(3)
    t = paired_t([11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert t["n"] == 3 and t["mean"] == 2.0 and t["std"] == 1.0
    assert t["low"] == pytest.approx(2 - half, abs=1e-9) and t["high"] == pytest.approx(2 + half, abs=1e-9)
    assert t["p"] == pytest.approx(0.0742, abs=1e-3)  # t = 2 sqrt(3) = 3.464 on 2 degrees of freedom
    one = paired_t([0.9], [0.8])
    assert one["low"] is None and one["mean"] == pytest.approx(0.1)


def test_paired_t_is_paired():
    """A constant shift under large seed-to-seed variation: unpaired it would not be resolved, paired it is."""
    a, b = [0.70, 0.80, 0.90], [0.69, 0.79, 0.89]
    t = paired_t(a, b)
    assert t["std"] == pytest.approx(0.0, abs=1e-12) and t["low"] == pytest.approx(0.01) and decide(t, 1) == "reproduced"


def test_paired_t_refuses_unpaired_input():
    with pytest.raises(ValueError, match="same seeds"):
        paired_t([1.0, 2.0], [1.0])


@pytest.mark.parametrize("low,high,direction,verdict", [
    (0.1, 0.5, 1, "reproduced"), (-0.5, -0.1, 1, "contradicted"), (-0.1, 0.3, 1, "not resolved"),
    (-0.5, -0.1, -1, "reproduced"), (0.1, 0.5, -1, "contradicted"), (0.0, 0.3, 1, "not resolved"),
    (None, None, 1, "not resolved")])
def test_decision_rule(low, high, direction, verdict):
    assert decide({"low": low, "high": high}, direction) == verdict


def test_bootstrap_known_answer():
    # a right on 60 of 100, b on 50, b's hits inside a's: the difference is 0.1 on every resample of the pairs
    a = np.zeros(100, bool); a[:60] = True
    b = np.zeros(100, bool); b[:50] = True
    r = paired_bootstrap(a, b, resamples=500)
    assert r["mean"] == pytest.approx(0.1) and 0.03 < r["low"] < 0.1 < r["high"] < 0.17
    same = paired_bootstrap(a, a)
    assert same["low"] == same["high"] == 0.0


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=8), st.floats(-0.2, 0.2))
def test_interval_holds_the_mean_and_shifts_with_it(base, shift):
    a = [x + shift for x in base]
    t = paired_t(a, base)
    assert t["low"] - 1e-9 <= t["mean"] <= t["high"] + 1e-9
    assert t["mean"] == pytest.approx(shift, abs=1e-9)


def test_training_cost_counts_the_phases():
    # base 100, ICs 20 more: phase 1 = 3 x 100, phase 2 = 3 x 120, phase 3 = 100 + 3 x 20 (per sample, per epoch)
    phases = [{"phase": 1, "grid": [{"epochs": 8}]}, {"phase": 2, "grid": [{"epochs": 8}, {"epochs": 4}]}]
    c = training_cost(phases, 100.0, [40.0, 80.0, 120.0])
    assert c["epochs"] == {"1": 8, "2": 12} and c["backbone_epochs"] == 20
    assert c["passes"] == pytest.approx((8 * 300 + 12 * 360) / 100)
    d = training_cost([{"phase": 1, "grid": [{"epochs": 2}]}, {"phase": 3, "grid": [{"epochs": 5}]}], 100.0, [50, 120])
    assert d["passes"] == pytest.approx((2 * 300 + 5 * 160) / 100)


# --- pairs of run folders --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    strength = {"joint": 2.0, "disjoint": 3.0, "mixed": 4.0}
    return {reg: [make_run(root, reg, s, strength=strength[reg]) for s in (0, 1, 2)] for reg in strength}


def test_pair_summary_is_the_paired_t_of_each_table(runs):
    p = pair_summary(runs["mixed"], runs["joint"])
    assert p["seeds"] == [0, 1, 2] and set(p["tables"]) == {"calibrated_budgets", "paper_budgets", "budgets"}
    ra = [Results.from_json(d) for d in runs["mixed"]]
    rb = [Results.from_json(d) for d in runs["joint"]]
    for table in p["tables"]:
        va, vb = per_seed_values(ra, table), per_seed_values(rb, table)
        for budget, cell in p["tables"][table].items():
            if cell is None:
                continue
            want = paired_t([va[budget][s] for s in (0, 1, 2)], [vb[budget][s] for s in (0, 1, 2)])
            assert cell["mean"] == pytest.approx(want["mean"]) and cell["low"] == pytest.approx(want["low"])
            assert cell["verdict"] == decide(want, 1)
    # the calibrated table is each seed's results.json calibrated_budgets
    assert per_seed_values(ra, "calibrated_budgets")["max"] == {r.seed: r.calibrated_budgets["max"] for r in ra}
    # stronger signal wins at the largest budget: mixed > joint there
    assert p["tables"]["budgets"]["max"]["mean"] > 0


def test_pair_verdict_flips_with_the_claim(runs):
    up = pair_summary(runs["mixed"], runs["joint"], direction=1)["tables"]["budgets"]["max"]
    down = pair_summary(runs["mixed"], runs["joint"], direction=-1)["tables"]["budgets"]["max"]
    assert {up["verdict"], down["verdict"]} in ({"reproduced", "contradicted"}, {"not resolved"})


def test_pair_refuses_unpaired_seeds(tmp_path, runs):
    from earlyexit.errors import EarlyExitError

    other = make_run(tmp_path, "joint", 7)
    with pytest.raises(EarlyExitError, match="share no seed"):
        pair_summary(runs["mixed"], [other])
    with pytest.raises(EarlyExitError, match="one configuration"):
        pair_summary(runs["mixed"] + runs["joint"], runs["disjoint"])


def test_summary_pair_command_prints_and_writes(runs, tmp_path):
    dirs = [str(d) for r in runs.values() for d in r]
    out = tmp_path / "summary.json"
    r = CliRunner().invoke(main, ["summary", *dirs, "--pair", "*-mixed-*:*-joint-*", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "pair: resnet20 cifar10 ++- - resnet20 cifar10 -+-" in r.output and "validation-calibrated:" in r.output
    saved = json.loads(out.read_text())
    assert len(saved["pairs"]) == 1 and [g["regime"] for g in saved["summary"]] == ["++-", "-+-"]
    md = CliRunner().invoke(main, ["summary", *dirs, "--pair", "*-mixed-*:*-joint-*", "--markdown"])
    assert markdown_pair(pair_summary(runs["mixed"], runs["joint"])).strip() in md.output
    bad = CliRunner().invoke(main, ["summary", *dirs, "--pair", "*-nothing-*:*-joint-*"])
    assert bad.exit_code == 2 and "no run folder matches" in bad.output
    bad = CliRunner().invoke(main, ["summary", *dirs, "--pair", "mixed"])
    assert bad.exit_code == 2 and "expected A:B" in bad.output


def test_cosine_pair_known_answer(tmp_path):
    """Each seed's mean cosine per exit, paired by seed: mixed's cosines are joint's + 0.01 * (seed + 1) at the last
    IC, so the difference is 0.02 +- 0.01 over 3 seeds; logs of an unchosen grid point and of phase 1 are ignored."""
    from earlyexit.pairs import cosine_pair, markdown_cosine_pair, mean_cosines

    def log(d, cos_by_step, extra=()):
        lines = [{"phase": 2, "epoch": 1, "step": i, "cos": c, "lr": None} for i, c in enumerate(cos_by_step)]
        (d / "gradients.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [*lines, *extra]))

    a, b = [], []
    for s in range(3):
        ja, jb = make_run(tmp_path / "a", "mixed", s), make_run(tmp_path / "b", "joint", s)
        log(jb, [[0.1, 0.5, 0.6, 0.7], [0.3, 0.5, 0.6, 0.7]], extra=[{"phase": 1, "epoch": 1, "step": 0,
                                                                   "cos": [9.0, 9.0, 9.0, 9.0]}])
        log(ja, [[0.2, 0.5, 0.6 + 0.01 * (s + 1), None], [0.2, 0.5, 0.6 + 0.01 * (s + 1), None]])
        a.append(ja), b.append(jb)
    assert mean_cosines(b[0]) == pytest.approx([0.2, 0.5, 0.6, 0.7])
    assert mean_cosines(a[0])[-1] is None
    p = cosine_pair(a, b)
    assert p["exits"][0]["mean"] == pytest.approx(0.0, abs=1e-12) and p["exits"][3] is None
    c = p["exits"][2]
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert c["mean"] == pytest.approx(0.02) and c["low"] == pytest.approx(0.02 - half) and c["verdict"] == "not resolved"
    assert "| IC 1 | IC 2 | IC 3 | final |" in markdown_cosine_pair(p)
