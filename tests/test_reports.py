"""Reports over run folders: the summary's two budget tables and the seeds-averaged figure.

Run folders are synthetic: a results.json written through ``Results`` from logits whose signal grows with
depth, so curves, static exits and budgets are those of a real evaluation.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from earlyexit.cli import main
from earlyexit.errors import EarlyExitError
from earlyexit.metrics import (average_curves, budget_table, calibrated_curve, static_points, threshold_curve,
                               ztw_budget_table)
from earlyexit.reports import (CALIBRATED_TITLE, PAPER_BUDGETS_TITLE, SEED_BUDGETS_TITLE, format_summary, plot_runs, runs_figure,
                               summarize_runs)
from earlyexit.results import Results

COSTS = [30.0, 55.0, 80.0, 105.0]  # per-exit costs; the backbone alone costs BASE
BASE = 100.0
REGIMES = {"joint": "-+-", "disjoint": "+-+", "mixed": "++-"}


def make_run(root: Path, regime: str, seed: int, *, strength: float = 3.0, model: str = "resnet20",
             base: float = BASE, criterion: str = "confidence", method: str | None = None) -> Path:
    """A run folder with the results.json of synthetic logits (E = 4 exits, 400 test samples)."""
    g = torch.Generator().manual_seed(1000 * seed + len(regime) + int(strength * 10))
    E, N, C = len(COSTS), 400, 10
    labels = torch.randint(0, C, (N,), generator=g)
    signal = torch.linspace(0.6, 1.0, E)[:, None, None] * strength * torch.rand(1, N, 1, generator=g)
    logits = torch.randn(E, N, C, generator=g) + signal * torch.nn.functional.one_hot(labels, C)  # (E, N, C)
    val = torch.randn(E, N, C, generator=g) + signal * torch.nn.functional.one_hot(labels, C)
    curve = threshold_curve(logits, labels, COSTS, criterion=criterion)
    statics = static_points(logits, labels, COSTS)
    evaluation = {"base_flops": base, "exits": [{**s, "stage": 2 * s["index"] + 1} for s in statics], "curve": curve,
                  "budgets": budget_table(curve, statics, base)}
    if criterion != "patience":
        evaluation["calibrated_geometric"] = calibrated_curve(val, logits, labels, COSTS, criterion=criterion)
        evaluation["calibrated_budgets"] = budget_table(evaluation["calibrated_geometric"], [], base)
    r = Results.build(regime=REGIMES[regime], regime_name=regime, model=model, dataset="cifar10", seed=seed,
                      evaluation=evaluation, method=method, weighting=None)
    d = root / f"{model}-{regime}-{criterion}-s{seed}"
    d.mkdir(parents=True)
    r.save(d)
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    strength = {"joint": 2.0, "disjoint": 3.0, "mixed": 4.0}
    return {reg: [make_run(root, reg, s, strength=strength[reg]) for s in (0, 1, 2)] for reg in strength}


# --- summary ---------------------------------------------------------------------------------

def test_summary_holds_both_tables(runs):
    dirs = runs["mixed"] + runs["joint"][:1]
    groups = summarize_runs(dirs)
    assert [(g["regime"], g["seeds"]) for g in groups] == [("++-", [0, 1, 2]), ("-+-", [0])]
    mixed = groups[0]
    rs = [Results.from_json(d) for d in runs["mixed"]]
    curves = [{"criterion": r.curve.criterion, "thresholds": r.curve.thresholds, "flops": r.curve.flops,
               "accuracy": r.curve.accuracy} for r in rs]
    assert mixed["paper_budgets"] == ztw_budget_table(curves, BASE)
    for k in ("25%", "50%", "75%", "100%", "max"):  # the per-seed table: each seed's own budgets, mean and std
        vals = [r.budgets[k] for r in rs]
        if None in vals:
            assert mixed["budgets"][k] is None
        else:
            assert mixed["budgets"][k]["mean"] == pytest.approx(statistics.mean(vals), rel=1e-12)
            assert mixed["budgets"][k]["std"] == pytest.approx(statistics.stdev(vals), rel=1e-12)
    assert mixed["paper_budgets"]["25%"] is None  # the first IC alone costs 30 % > 25 %
    assert mixed["paper_budgets"]["max"]["mean"] == pytest.approx(statistics.mean(r.exits[-1].accuracy for r in rs))
    assert groups[1]["paper_budgets"]["max"]["std"] == 0.0  # one seed


def test_summary_lines_and_command(runs):
    dirs = [str(d) for d in runs["mixed"] + runs["joint"]]
    r = CliRunner().invoke(main, ["summary", *dirs], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "resnet20 cifar10 ++- (seeds [0, 1, 2])"
    assert sum(PAPER_BUDGETS_TITLE in ln for ln in lines) == 2 and sum(SEED_BUDGETS_TITLE in ln for ln in lines) == 2
    g = summarize_runs(runs["mixed"])[0]
    assert lines[:len(format_summary(g))] == format_summary(g)
    paper = next(ln for ln in lines if PAPER_BUDGETS_TITLE in ln)
    assert "25%: -" in paper  # an empty budget prints as "-"
    m = g["paper_budgets"]["50%"]
    assert f"50%: {m['mean'] * 100:.2f}+-{m['std'] * 100:.2f}" in paper
    assert PAPER_BUDGETS_TITLE == "budget (paper's rule, curves averaged over seeds)"
    assert SEED_BUDGETS_TITLE == "best within budget (test-set oracle, per seed, mean +- std)"
    # the validation-calibrated table comes first, before the paper's rule and the oracle
    order = [next(i for i, ln in enumerate(lines) if t in ln) for t in (CALIBRATED_TITLE, PAPER_BUDGETS_TITLE,
                                                                         SEED_BUDGETS_TITLE)]
    assert order == sorted(order)


def test_summary_refuses_seeds_that_do_not_line_up(tmp_path, runs):
    other_base = make_run(tmp_path / "a", "mixed", 7, base=120.0)
    with pytest.raises(EarlyExitError, match="base_flops differ"):
        summarize_runs([runs["mixed"][0], other_base])
    # another exit criterion is another configuration (its own row, named), never pooled with the run's own
    entropy = make_run(tmp_path / "b", "mixed", 8, criterion="entropy")
    groups = summarize_runs([runs["mixed"][0], entropy])
    assert [(g["method"], g["criterion"]) for g in groups] == [(None, "confidence"), ("exit by entropy", "entropy")]
    r = CliRunner().invoke(main, ["summary", str(runs["mixed"][0]), str(entropy)])
    assert r.exit_code == 0 and "++- exit by entropy (seeds [8])" in r.output


def test_methods_are_separate_configurations(tmp_path, runs):
    pbee = make_run(tmp_path, "mixed", 0, method="pbee", criterion="patience")
    groups = summarize_runs([runs["mixed"][0], pbee])
    assert [(g["method"], g["criterion"]) for g in groups] == [(None, "confidence"), ("pbee", "patience")]
    assert format_summary(groups[1])[0] == "resnet20 cifar10 ++- pbee (seeds [0])"


# --- figure ----------------------------------------------------------------------------------

def test_figure_draws_mean_and_band_per_configuration(runs):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    dirs = runs["joint"] + runs["disjoint"] + runs["mixed"]
    fig = runs_figure(dirs)
    try:
        ax = fig.axes[0]
        lines = [ln for ln in ax.get_lines() if ln.get_label().endswith("3 seeds")]
        assert [ln.get_label() for ln in lines] == ["joint (-+-), 3 seeds", "disjoint (+-+), 3 seeds",
                                                    "mixed (++-), 3 seeds"]
        assert len({ln.get_color() for ln in lines}) == 3  # one colour per regime
        for ln, reg in zip(lines, ("joint", "disjoint", "mixed")):
            rs = [Results.from_json(d) for d in runs[reg]]
            avg = average_curves([{"criterion": r.curve.criterion, "thresholds": r.curve.thresholds,
                                   "flops": r.curve.flops, "accuracy": r.curve.accuracy} for r in rs])
            assert ln.get_xdata() == pytest.approx([f / BASE * 100 for f in avg["flops"]])
            assert ln.get_ydata() == pytest.approx([a * 100 for a in avg["accuracy"]])
            assert max(avg["accuracy_std"]) > 0
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 3
        for band, ln in zip(bands, lines):  # the band spans mean +- std around its line
            ys = band.get_paths()[0].vertices[:, 1]
            assert ys.min() < min(ln.get_ydata()) and ys.max() > max(ln.get_ydata()) - 1e-9
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "static exits (mean +- std)" in legend and "+- std over seeds" in legend
    finally:
        plt.close(fig)


def test_figure_note_is_a_second_title_line(runs):
    import matplotlib.pyplot as plt

    for note, want in ((None, "resnet20 on cifar10"), ("matched budget", "resnet20 on cifar10\nmatched budget")):
        fig = runs_figure(runs["joint"], note=note)
        try:
            assert fig.axes[0].get_title() == want
        finally:
            plt.close(fig)


def test_figure_keeps_single_runs_as_they_were(runs):
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    fig = runs_figure([runs["mixed"][0], runs["joint"][1]])
    try:
        ax = fig.axes[0]
        lines = ax.get_lines()
        assert [ln.get_label() for ln in lines] == ["mixed (++-), seed 0", "joint (-+-), seed 1"]
        r = Results.from_json(runs["mixed"][0])
        assert lines[0].get_ydata() == pytest.approx([a * 100 for a in r.curve.accuracy])
        assert not [c for c in ax.collections if isinstance(c, PolyCollection)]  # no band for one run
        points = ax.collections[0].get_offsets()
        assert points[:, 0].tolist() == pytest.approx([e.flops / BASE * 100 for e in r.exits])
    finally:
        plt.close(fig)


def test_plot_writes_files_and_calibrated_curves(tmp_path, runs):
    dirs = runs["joint"] + runs["mixed"]
    for name, curve in (("seeds.png", "curve"), ("cal.png", "calibrated_geometric")):
        plot_runs(dirs, tmp_path / name, curve=curve)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(main, ["plot", *map(str, dirs), "-o", str(tmp_path / "cli.svg"), "--curve", "geometric"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli.svg").read_text().lstrip().startswith("<?xml")


def test_results_json_keeps_its_budgets(runs):
    d = json.loads((runs["mixed"][0] / "results.json").read_text())
    assert set(d["budgets"]) == {"25%", "50%", "75%", "100%", "max"}
    assert all(v is None or isinstance(v, float) for v in d["budgets"].values())


def test_regimes_keep_their_colours_across_figures(runs):
    import matplotlib.pyplot as plt

    def colours(dirs):
        fig = runs_figure(dirs)
        try:
            return {ln.get_label().split(" ")[0]: ln.get_color() for ln in fig.axes[0].get_lines()}
        finally:
            plt.close(fig)

    a = colours(runs["joint"] + runs["mixed"])
    b = colours(runs["mixed"] + runs["disjoint"] + runs["joint"])
    assert a["joint"] == b["joint"] and a["mixed"] == b["mixed"] and len(set(b.values())) == 3


def test_figure_splits_runs_whose_configs_differ_and_refuses_a_seed_twice(runs, tmp_path):
    """Runs of one regime trained differently are two configurations, told apart by the fields that differ;
    fields seeds may differ in (data folder, gradient log) do not split; a seed drawn twice is refused."""
    import shutil

    import matplotlib.pyplot as plt

    dirs = []
    for tag, epochs in (("short", 2), ("long", 8)):
        for s, d in enumerate(runs["mixed"]):
            new = tmp_path / tag / Path(d).name
            shutil.copytree(d, new)
            cfg = {"model": {"name": "resnet20"}, "data": {"data_dir": f"/data/{tag}{s}"},
                   "train": {"seed": s, "grad_log_every": s or None, "phases": [{"epochs": epochs}, {"epochs": 8}]}}
            (new / "config.json").write_text(json.dumps(cfg))
            dirs.append(new)
    fig = runs_figure(dirs)
    try:
        assert [t for t in (ln.get_label() for ln in fig.axes[0].get_lines()) if not t.startswith("_")] == [
            "mixed (++-), phase 1: 2 epochs, 3 seeds", "mixed (++-), phase 1: 8 epochs, 3 seeds"]
    finally:
        plt.close(fig)
    with pytest.raises(EarlyExitError, match="both seed 0 of one configuration"):
        runs_figure(dirs, split_configs=False)  # pooled, as the matched-budget joint runs are
    with pytest.raises(EarlyExitError, match="both seed 1"):
        runs_figure(dirs[:3] + dirs[1:2])


def test_a_run_written_before_warmup_pools_with_one_that_says_warmup_0(runs, tmp_path):
    """A config.json without ``warmup`` trained without it: it pools with seeds whose files say ``warmup = 0``
    (the ViT every-block seeds 0-1 and 2-4) and not with seeds trained at the default warmup."""
    import shutil

    from earlyexit.reports import check_pool

    def with_config(d, name, warmup):
        new = tmp_path / name / Path(d).name
        shutil.copytree(d, new)
        phase = {"epochs": 5} if warmup is None else {"epochs": 5, "warmup": warmup}
        (new / "config.json").write_text(json.dumps({"model": {"name": "resnet20"}, "train": {"phases": [phase] * 3}}))
        return new

    old = with_config(runs["mixed"][0], "old", None)
    check_pool([old, with_config(runs["mixed"][1], "zero", 0)])
    with pytest.raises(EarlyExitError, match=r"differ in train.phases\[0\].warmup"):
        check_pool([old, with_config(runs["mixed"][1], "default", 20)])


def test_configurations_of_each_regime_keep_the_regime_colour_and_differ_in_line_style(runs, tmp_path):
    """Two configurations (e.g. IC densities) of two regimes: each regime keeps its colour, each
    configuration its line style, the same in both regimes."""
    import shutil

    import matplotlib.pyplot as plt

    dirs = []
    for regime in ("joint", "mixed"):
        for tag, exits in (("dense", "every:1"), ("sparse", "every:3")):
            for s, d in enumerate(runs[regime]):
                new = tmp_path / tag / Path(d).name
                shutil.copytree(d, new)
                cfg = {"model": {"name": "resnet20", "exits": exits}, "train": {"seed": s}}
                (new / "config.json").write_text(json.dumps(cfg))
                dirs.append(new)
    fig = runs_figure(dirs)
    try:
        drawn = {ln.get_label(): (ln.get_color(), ln.get_linestyle()) for ln in fig.axes[0].get_lines()
                 if not ln.get_label().startswith("_")}
    finally:
        plt.close(fig)
    joint_dense, joint_sparse = (drawn[f"joint (-+-), ICs {e}, 3 seeds"] for e in ("every:1", "every:3"))
    mixed_dense, mixed_sparse = (drawn[f"mixed (++-), ICs {e}, 3 seeds"] for e in ("every:1", "every:3"))
    assert joint_dense[0] == joint_sparse[0] != mixed_dense[0] == mixed_sparse[0]
    assert joint_dense[1] == mixed_dense[1] != joint_sparse[1] == mixed_sparse[1]
    alone = runs_figure(runs["joint"])  # a single configuration keeps the regime's colour and a solid line
    try:
        line = [ln for ln in alone.axes[0].get_lines() if not ln.get_label().startswith("_")][0]
        assert line.get_color() == joint_dense[0] and line.get_linestyle() == "-"
    finally:
        plt.close(alone)


def test_a_long_legend_sits_beside_the_axes(runs, tmp_path):
    """Nine configurations (three regimes at three IC densities): the legend is drawn right of the axes,
    so it hides no curve; a short legend stays inside."""
    import shutil

    import matplotlib.pyplot as plt

    dirs = []
    for regime in ("joint", "disjoint", "mixed"):
        for n in (1, 2, 3):
            for s, d in enumerate(runs[regime]):
                new = tmp_path / f"every{n}" / Path(d).name
                shutil.copytree(d, new)
                (new / "config.json").write_text(json.dumps({"model": {"exits": f"every:{n}"}, "train": {"seed": s}}))
                dirs.append(new)

    def legend_outside(dirs):
        fig = runs_figure(dirs)
        try:
            fig.canvas.draw()
            r = fig.canvas.get_renderer()
            ax = fig.axes[0]
            return ax.get_legend().get_window_extent(r).x0 >= ax.get_window_extent(r).x1
        finally:
            plt.close(fig)

    assert legend_outside(dirs)
    assert not legend_outside(runs["joint"] + runs["mixed"])


def test_a_weighting_other_than_the_default_is_its_own_configuration_and_named(tmp_path):
    from earlyexit.reports import group_runs, method_label, summarize_runs

    plain = make_run(tmp_path / "a", "joint", 0)
    han = make_run(tmp_path / "b", "joint", 0)
    r = Results.from_json(han)
    Results.build(regime=r.regime, regime_name=r.regime_name, model=r.model, dataset=r.dataset, seed=0,
                  evaluation={k: v for k, v in r.to_dict().items() if k in ("base_flops", "exits", "curve", "budgets",
                              "calibrated_geometric", "calibrated_budgets")},
                  method=None, weighting="han").save(han)
    assert method_label(Results.from_json(plain)) is None and method_label(Results.from_json(han)) == "weights han"
    assert [k[3] for k, _ in group_runs([plain, han])] == [None, "weights han"]
    assert [g["method"] for g in summarize_runs([plain, han])] == [None, "weights han"]


def test_an_exit_criterion_other_than_the_methods_own_is_its_own_configuration_and_named(tmp_path):
    """The entropy re-evaluation of a run (``eval --criterion entropy --out``) is another configuration than the run,
    named in every row; a method's own criterion (PBEE's patience) is not repeated."""
    import dataclasses

    from earlyexit.reports import group_runs, method_label

    plain = make_run(tmp_path / "a", "joint", 0)
    r = Results.from_json(plain)
    entropy = dataclasses.replace(r, curve=dataclasses.replace(r.curve, criterion="entropy"))
    assert method_label(entropy) == "exit by entropy"
    assert method_label(dataclasses.replace(r, method="pbee", curve=dataclasses.replace(r.curve, criterion="patience"))) \
        == "pbee"
    assert method_label(dataclasses.replace(r, method="pbee")) == "pbee, exit by confidence"
    (tmp_path / "e").mkdir()
    entropy.save(tmp_path / "e")
    assert [k[3] for k, _ in group_runs([plain, tmp_path / "e"])] == [None, "exit by entropy"]
