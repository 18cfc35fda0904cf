"""Run settings from a TOML file, ``--set`` overrides and flags (``earlyexit.settings``), and experiment files
(``earlyexit.experiment``, ``python -m earlyexit experiment``).

A run given by a file, by flags and by the Python API with the same settings writes the same results.json; the
layers override each other in one order (file, ``--set``, flags); a bad file, key or value is one line naming
the key (exit code 2); a committed run's config.json loads to the config it always did.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import earlyexit.compare
import earlyexit.runs
from earlyexit.cli import main
from earlyexit.config import DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig, run_config_from_dict
from earlyexit.errors import ConfigError
from earlyexit.experiment import in_order, load_experiment
from earlyexit.results import Results
from earlyexit.schema import read_config_json
from earlyexit.settings import load_config, parse_set

ROOT = Path(__file__).parents[1]
MLP = '[model]\nname = "mlp"\n\n[data]\nname = "synthetic"\n\n[train]\ndevice = "cpu"\n'


def invoke(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r, *parts: str) -> str:
    """Exit code 2, no traceback, one line ``error: ...`` holding every part."""
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output, r.exc_info)
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for p in parts:
        assert p in lines[0], (p, lines[0])
    return lines[0]


@pytest.fixture
def captured(monkeypatch):
    """``run`` and ``compare`` up to the config: the library records what it was given instead of training."""
    seen = []

    def fake_run(cfg, out, **kw):
        seen.append(cfg)
        return {}

    def fake_compare(cfg, seeds, out, **kw):
        seen.append(cfg)
        return {"summary": []}

    monkeypatch.setattr(earlyexit.runs, "run_experiment", fake_run)
    monkeypatch.setattr(earlyexit.compare, "compare_regimes", fake_compare)

    def call(*args):
        r = invoke(list(args))
        assert r.exit_code == 0, r.output
        return seen[-1]
    return call


# --------------------------------------------------------------------------- one run, three ways


@settings(deadline=None, max_examples=3, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=st.sampled_from([0.05, 0.1, 0.3]), epochs=st.integers(1, 2), seed=st.integers(0, 3),
       batch=st.sampled_from([16, 32, 64]), regime=st.sampled_from(["joint", "disjoint", "mixed"]))
def test_a_file_the_flags_and_the_api_write_the_same_results(tmp_path_factory, lr, epochs, seed, batch, regime):
    d = tmp_path_factory.mktemp("three-ways")
    (d / "run.toml").write_text(f'{MLP}regime = "{regime}"\nseed = {seed}\nbatch_size = {batch}\n\n'
                                f"[train.phases]\nlr = {lr}\nepochs = {epochs}\n")
    r = invoke(["run", "--config", d / "run.toml", "--out", d / "file"])
    assert r.exit_code == 0, r.output
    r = invoke(["run", "--model", "mlp", "--dataset", "synthetic", "--device", "cpu", "--regime", regime, "--seed", seed,
                "--batch-size", batch, "--lr", lr, "--epochs", epochs, "--out", d / "flags"])
    assert r.exit_code == 0, r.output
    cfg = RunConfig(model=ModelConfig(name="mlp"), data=DataConfig(name="synthetic"),
                    train=TrainConfig(regime=regime, seed=seed, batch_size=batch, device="cpu",
                                      phases=(PhaseConfig(lr=lr, epochs=epochs),) * 3))
    earlyexit.runs.run_experiment(cfg, d / "api")
    results = [Results.from_json(d / way).comparable() for way in ("file", "flags", "api")]
    assert results[0] == results[1] == results[2]
    configs = [(d / way / "config.json").read_text() for way in ("file", "flags", "api")]
    assert configs[0] == configs[1] == configs[2]


# --------------------------------------------------------------------------- the layers


def test_set_overrides_one_key_and_flags_override_the_file(captured, tmp_path):
    f = tmp_path / "run.toml"
    f.write_text(f'{MLP}batch_size = 64\nweighting = "han"\n\n[[train.phases]]\nlr = 0.1\nepochs = 2\n\n'
                 "[[train.phases]]\nlr = [0.1, 0.05]\nepochs = 3\n\n[[train.phases]]\nepochs = 4\n")
    cfg = captured("run", "--config", f, "--out", tmp_path / "o")
    assert [p.lr for p in cfg.train.phases] == [(0.1,), (0.1, 0.05), (0.1,)]
    assert [p.epochs for p in cfg.train.phases] == [2, 3, 4] and cfg.train.batch_size == 64
    assert cfg.train.weighting == "han" and cfg.model.name == "mlp"
    cfg = captured("run", "--config", f, "--set", "train.phases.1.lr=0.05", "--set", "train.phases.epochs=5",
                   "--set", "model.ic_after=[1]", "--set", "data.train_size=100", "--out", tmp_path / "o")
    assert [p.lr for p in cfg.train.phases] == [(0.1,), (0.05,), (0.1,)]
    assert [p.epochs for p in cfg.train.phases] == [5, 5, 5]
    assert cfg.model.ic_after == (1,) and cfg.data.train_size == 100 and cfg.train.batch_size == 64
    # flags given on the command line override the file and --set; flags left at their defaults do not
    cfg = captured("run", "--config", f, "--set", "train.batch_size=32", "--batch-size", "16", "--lr", "0.2",
                   "--out", tmp_path / "o")
    assert cfg.train.batch_size == 16 and all(p.lr == (0.2,) for p in cfg.train.phases)
    assert [p.epochs for p in cfg.train.phases] == [2, 3, 4] and cfg.train.weighting == "han"
    # compare reads the same file; it sets the regime and the seed itself
    cfg = captured("compare", "--config", f, "--seeds", "3,4", "--epochs", "1", "--out", tmp_path / "c")
    assert cfg.train.seed == 3 and cfg.train.regime == "mixed" and cfg.train.batch_size == 64
    assert [p.epochs for p in cfg.train.phases] == [1, 1, 1]


def test_toml_null_and_one_table_for_every_phase(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[data]\nname = "synthetic"\ntrain_size = "none"\ndata_dir = "none"\n\n[train]\ngrad_clip = "none"\n\n'
                 "[train.phases]\npatience = 2\nweight_decay = 0\n")
    cfg = load_config(f)
    assert cfg.train.grad_clip is None and cfg.data.train_size is None and cfg.data.data_dir == "none"
    assert all(p.patience == 2 and p.weight_decay == 0.0 and isinstance(p.weight_decay, float)
               for p in cfg.train.phases)
    assert load_config(f, ["data.train_size=100", "train.grad_clip=1"]).data.train_size == 100
    assert parse_set("train.phases.2.lr=[0.1, 0.05]") == {"train": {"phases": [{}, {}, {"lr": [0.1, 0.05]}]}}
    assert parse_set("model.ic_after=every:2") == {"model": {"ic_after": "every:2"}}


@pytest.mark.parametrize("text,sets,parts", [
    ("[train]\nlrr = 1\n", [], ["unknown key train.lrr", "valid: regime, phases"]),
    ("[[train.phases]]\nlr = 0.1\nlrr = 1\n", [], ["unknown key train.phases[0].lrr"]),
    ("[modle]\nname = \"mlp\"\n", [], ["unknown key modle"]),
    ("", ["train.phases.1.lrr=0.05"], ["unknown key train.phases[1].lrr"]),
    ("", ["train.phases.3.lr=0.05"], ["--set train.phases.3.lr", "out of range"]),
    ("", ["train.seed"], ["--set expects KEY=VALUE"]),
    ("[train.phases]\nlr = \"fast\"\n", [], ["train.phases[0].lr[0] must be a number, got 'fast'"]),
    ("[train.phases]\nlr = -1.0\n", [], ["train.phases[0]: learning rate must be > 0"]),
    ("[train]\nseed = 1.5\n", [], ["train.seed must be an integer"]),
    ("[train]\nregime = \"sideways\"\n", [], ["train: unknown regime 'sideways'"]),
    ("[model]\nic_after = {a = 1}\n", [], ["model.ic_after must be"]),
    ("[train\n", [], ["is not valid TOML"]),
])
def test_a_bad_file_key_or_value_is_one_line_naming_it(text, sets, parts, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    args = ["run", "--config", f, *(a for s in sets for a in ("--set", s)), "--out", tmp_path / "o"]
    one_line_error(invoke(args), *parts)
    assert not (tmp_path / "o").exists()


def test_a_missing_file_is_one_line(tmp_path):
    one_line_error(invoke(["run", "--config", tmp_path / "nope.toml"]), "cannot read", "nope.toml")


# --------------------------------------------------------------------------- run folders


def _committed_configs() -> list[Path]:
    return sorted(ROOT.glob("results/*/*/config.json"))


def test_a_committed_run_folders_config_loads_to_the_config_it_always_did(captured, tmp_path):
    files = _committed_configs()
    if not files:
        pytest.skip("no committed run")
    for f in files:
        assert load_config(f) == run_config_from_dict(read_config_json(f)), f
    f = files[0]
    assert captured("run", "--config", f, "--out", tmp_path / "o") == run_config_from_dict(read_config_json(f))
    cfg = captured("run", "--config", f, "--set", "train.seed=7", "--out", tmp_path / "o")
    assert cfg.train.seed == 7 and cfg.model == run_config_from_dict(read_config_json(f)).model
    raw = json.loads(f.read_text())  # a config.json without a section is no run configuration
    del raw["train"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    one_line_error(invoke(["run", "--config", tmp_path / "config.json"]), "not a run configuration", "'train'")


# --------------------------------------------------------------------------- experiment files


EXPERIMENT = f'''# a test experiment: two runs, then their summary
[experiment]
presets = ["cpu", "big"]
command = "run"
out = "tiny"
regimes = ["joint", "mixed"]
run_name = "mlp-{{regime}}-s{{seed}}"
runs = ["tiny/mlp-joint-s?", "tiny/mlp-mixed-s?"]
vars = {{ name = "summary" }}

[[experiment.steps]]

[[experiment.steps]]
command = "summary"
out = "tiny/{{name}}.txt"

{MLP}batch_size = 32

[train.phases]
epochs = 1

[preset.big]
train.phases = {{ epochs = 2 }}
experiment.seeds = [0, 1]
'''


def test_an_experiment_runs_its_steps_and_skips_them_when_done(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(EXPERIMENT)
    root = tmp_path / "out"
    r = invoke(["experiment", f, "--root", root, "--dry"])
    assert r.exit_code == 0, r.output
    assert r.output.count(": new") == 3 and not root.exists()
    r = invoke(["experiment", f, "--root", root])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (root / "tiny").iterdir()) == ["mlp-joint-s0", "mlp-mixed-s0", "summary.txt"]
    assert (root / "tiny" / "summary.txt").read_text().count("seeds [0]") == 2
    cfg = load_config(root / "tiny" / "mlp-mixed-s0" / "config.json")
    assert cfg.train.regime == "mixed" and cfg.train.batch_size == 32 and cfg.train.phases[0].epochs == 1
    r = invoke(["experiment", f, "--root", root, "--dry"])
    assert r.output.count(": done") == 2 and r.output.count(": new") == 1  # the summary is written again


def test_presets_order_and_what_a_step_writes(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(EXPERIMENT)
    base = load_experiment(f, root="R")
    assert [s.out for s in base.steps] == [Path("R/tiny/mlp-joint-s0"), Path("R/tiny/mlp-mixed-s0"),
                                           Path("R/tiny/summary.txt")]
    big = load_experiment(f, preset="big", root="R")
    assert [s.config.train.seed for s in big.steps if s.command == "run"] == [0, 1, 0, 1]
    assert all(p.epochs == 2 for s in big.steps if s.config for p in s.config.train.phases)
    assert big.steps[-1].runs == ("R/tiny/mlp-joint-s?", "R/tiny/mlp-mixed-s?")
    (tmp_path / "first.toml").write_text('[experiment]\ncommand = "compare"\nout = "x"\nafter = ["tiny"]\n')
    (tmp_path / "gpu.toml").write_text('[experiment]\ncommand = "compare"\nout = "y"\npresets = ["gpu"]\n')
    files = sorted(tmp_path.glob("*.toml"))
    assert [e.name for e in in_order(files, preset="cpu")] == ["tiny", "first"]
    assert [e.name for e in in_order(files, preset="gpu")] == ["first", "gpu"]  # tiny is no gpu experiment
    r = invoke(["experiment", "--list", "--preset", "cpu", *files])
    assert r.exit_code == 0 and [Path(p).name for p in r.output.split()] == ["tiny.toml", "first.toml"]


@pytest.mark.parametrize("text,parts", [
    ('[experiment]\ncommand = "train"\nout = "x"\n', ["experiment.command must be one of run, compare"]),
    ('[experiment]\ncommand = "run"\nout = "x"\nbudgets = ["matched"]\n', ["experiment.budgets does not apply to run"]),
    ('[experiment]\ncommand = "compare"\nout = "x"\nbudget = "matched"\n', ["unknown key experiment.budget"]),
    ('[experiment]\ncommand = "compare"\nout = "x"\nbudgets = ["cheap"]\n', ["unknown budget 'cheap'"]),
    ('[experiment]\ncommand = "plot"\nout = "{nope}.png"\nruns = ["a"]\n', ["experiment.out names {nope}"]),
    ('[experiment]\ncommand = "compare"\nout = "x"\n[[experiment.steps]]\nmodel.nmae = "vit"\n',
     ["unknown key model.nmae"]),
    ('[model]\nname = "mlp"\n', ["no [experiment] table"]),
])
def test_a_bad_experiment_file_is_one_line(text, parts, tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    one_line_error(invoke(["experiment", f, "--root", tmp_path / "out"]), "bad.toml", *parts)
    with pytest.raises(ConfigError):
        load_experiment(f)


def test_a_misspelt_option_of_a_step_is_one_line_before_anything_runs(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(f'{EXPERIMENT}\n[[experiment.steps]]\ncommand = "plot"\nout = "tiny/c.png"\noptions = {{ nte = "x" }}\n')
    one_line_error(invoke(["experiment", f, "--root", tmp_path / "out"]), "bad.toml", "No such option '--nte'")
    assert not (tmp_path / "out").exists()


def test_an_eval_step_writes_each_run_under_another_criterion_beside_it(tmp_path):
    """``command = "eval"``: every run folder of the patterns evaluated into OUT/EXPERIMENT/RUN, the runs untouched;
    a second pass skips what is done."""
    from click.testing import CliRunner

    from earlyexit.cli import main

    root = tmp_path / "root"
    run = root / "exp" / "mlp-s0"
    r = CliRunner().invoke(main, ["run", "--model", "mlp", "--dataset", "synthetic", "--epochs", "1", "--batch-size",
                                  "32", "--device", "cpu", "--out", str(run)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    before = (run / "results.json").read_bytes()
    f = tmp_path / "entropy.toml"
    f.write_text('[experiment]\ncommand = "eval"\nout = "entropy"\nruns = ["exp/*-s?", "later/*-s?"]\n'
                 'options = { criterion = "entropy" }\n')
    for state in ("new", "done"):
        r = CliRunner().invoke(main, ["experiment", str(f), "--root", str(root)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert f"eval {root / 'entropy'}" in r.output and state in r.output
    res = json.loads((root / "entropy" / "exp" / "mlp-s0" / "results.json").read_text())
    assert res["curve"]["criterion"] == "entropy" and (run / "results.json").read_bytes() == before


def test_a_comparison_given_more_seeds_than_its_summary_covers_is_resumed_not_skipped(tmp_path):
    """Seeds added to a finished comparison (e.g. 2 -> 5) make its step "started", so the new seeds run."""
    from earlyexit.experiment import Step

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"budget": "paper", "seeds": [0, 1], "runs": {}, "summary": []}))
    assert Step("compare", out, seeds=(0, 1)).state() == "done"
    assert Step("compare", out, seeds=(0, 1, 2)).state() == "started"
    assert Step("compare", out, seeds=(0, 1), budget="matched").state() == "started"  # its own summary is absent
