"""Figures say what they show in words: legends name the differing settings ("mixed, phase 1 at lr 0.001"),
never a config path; a run's own figure says what the run is; the regimes keep their colours."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from earlyexit.config import ModelConfig, PhaseConfig, RunConfig, TrainConfig, to_dict
from earlyexit.reports import _md_spent, describe_field, describe_run, runs_figure, setting_words, stopping_words

from test_reports import make_run


def _with_config(d, cfg: RunConfig):
    (d / "config.json").write_text(json.dumps(to_dict(cfg)))
    return d


def _cfg(regime: str, lr1: float = 0.1, seed: int = 0) -> RunConfig:
    phases = (PhaseConfig(lr=(lr1,), epochs=8), PhaseConfig(lr=(0.1,), epochs=8), PhaseConfig(lr=(0.1,), epochs=8))
    return RunConfig(model=ModelConfig(name="resnet20", ic_after="every:1"),
                     train=TrainConfig(regime=regime, phases=phases, seed=seed))


@pytest.mark.parametrize("field,value,words", [
    ("train.phases[0].lr", [0.001], "phase 1 at lr 0.001"), ("train.phases[1].epochs", 16, "phase 2: 16 epochs"),
    ("model.ic_after", "every:2", "ICs every:2"), ("model.kwargs.head", "mlp1024", "head mlp1024"),
    ("train.weighting", "han", "weighting han")])
def test_fields_in_words(field, value, words):
    assert describe_field(field, value) == words


def test_a_run_says_what_it_is(tmp_path):
    d = _with_config(make_run(tmp_path, "mixed", 0), _cfg("mixed", lr1=0.001))
    assert describe_run(d) == "mixed: phase 1 8 epochs at lr 0.001, phase 2 8 epochs at lr 0.1; ICs every:1"


def test_a_run_with_early_stopping_says_its_epochs_are_a_ceiling(tmp_path):
    cfg = _cfg("joint")
    phases = (cfg.train.phases[0], replace(cfg.train.phases[1], epochs=40, patience=5), cfg.train.phases[2])
    d = _with_config(make_run(tmp_path, "joint", 0), replace(cfg, train=replace(cfg.train, phases=phases)))
    assert describe_run(d) == "joint: phase 2 up to 40 epochs (patience 5) at lr 0.1; ICs every:1"


def test_a_comparison_says_what_its_runs_share():
    assert setting_words(_cfg("joint")) == "ICs every:1"
    assert setting_words(RunConfig(model=ModelConfig(name="resnet20"), train=_cfg("joint").train)) == ""


def test_a_comparison_with_early_stopping_says_so():
    cfg = _cfg("joint")
    assert stopping_words(cfg) == ""
    phases = tuple(replace(ph, epochs=40, patience=5) for ph in cfg.train.phases)
    assert stopping_words(replace(cfg, train=replace(cfg.train, phases=phases))) == (
        "every phase up to 40 epochs, early stopping with patience 5")
    one = (cfg.train.phases[0], replace(cfg.train.phases[1], epochs=30, patience=3), cfg.train.phases[2])
    assert stopping_words(replace(cfg, train=replace(cfg.train, phases=one))) == (
        "phase 2 up to 30 epochs, early stopping with patience 3")


def test_mean_epochs_print_to_one_decimal():
    """Early-stopped runs spend different epochs per seed; the table prints their mean, not 14.6667."""
    spent = {"epochs": {"1": 18.0, "3": 44 / 3}, "passes": {"mean": 68.6}}
    assert _md_spent(spent) == "18/0/14.7 | 69"


def test_a_comparisons_figure_names_the_density(tmp_path, monkeypatch):
    """compare's curves.png says what sets the comparison apart (here its IC placement) beside the budget."""
    import earlyexit.compare as compare_mod
    from earlyexit.config import DataConfig

    notes = {}
    monkeypatch.setattr(compare_mod, "maybe_plot", lambda dirs, out, note=None, **kw: notes.setdefault(out.name, note))
    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name="mlp", ic_after="every:2", kwargs={"width": 8, "depth": 4}),
                    data=DataConfig(name="synthetic", train_size=100),
                    train=TrainConfig(phases=(pc, pc, pc), batch_size=50, device="cpu"))
    compare_mod.compare_regimes(cfg, [0], tmp_path / "c", budget="matched")
    assert notes["curves-matched.png"].startswith("matched budget") and "ICs every:2" in notes["curves-matched.png"]
    assert "width 8" in notes["curves-matched.png"]


def test_figure13_legend_in_words_and_regime_colours(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    dirs = []
    for seed in (0, 1):
        dirs.append(_with_config(make_run(tmp_path / "j", "joint", seed), _cfg("joint", seed=seed)))
        dirs.append(_with_config(make_run(tmp_path / "m", "mixed", seed), _cfg("mixed", seed=seed)))
        dirs.append(_with_config(make_run(tmp_path / "u", "mixed", seed, strength=3.5), _cfg("mixed", 0.001, seed)))
    fig = runs_figure(dirs)
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")}
    labels = sorted(lines)
    assert any("phase 1 at lr 0.001" in lb for lb in labels) and any("phase 1 at lr 0.1" in lb for lb in labels)
    assert not any("train." in lb or "[" in lb for lb in labels)  # no config paths
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mixed = [ln for lb, ln in lines.items() if lb.startswith("mixed")]
    joint = [ln for lb, ln in lines.items() if lb.startswith("joint")]
    assert len(mixed) == 2 and all(ln.get_color() == colours[2] for ln in mixed)  # mixed's colour, twice
    assert mixed[0].get_linestyle() != mixed[1].get_linestyle()
    assert joint and joint[0].get_color() == colours[0]
    plt.close(fig)
