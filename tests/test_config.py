"""Configs check themselves when built, and the library and the CLI share one set of defaults."""

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, strategies as st

from earlyexit.cli import main
from earlyexit.config import (METHOD_DEFAULTS, DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig,
                              run_config_from_dict, to_dict)
from earlyexit.errors import ConfigError, EarlyExitError


@pytest.mark.parametrize("build,pattern", [
    (lambda: PhaseConfig(optimizer="adam"), "unknown optimizer 'adam'"),
    (lambda: PhaseConfig(schedule="linear"), "unknown schedule 'linear'"),
    (lambda: PhaseConfig(metric="mena"), "unknown validation metric 'mena'"),
    (lambda: PhaseConfig(lr=(0.1, float("nan"))), "learning rate must be a finite number"),
    (lambda: PhaseConfig(lr=(-1.0,)), "learning rate must be > 0"),
    (lambda: PhaseConfig(lr=()), "at least one"),
    (lambda: PhaseConfig(weight_decay=float("inf")), "weight decay"),
    (lambda: PhaseConfig(patience=0), "patience must be >= 1"),
    (lambda: TrainConfig(weighting="heavy"), "unknown weighting 'heavy'"),
    (lambda: TrainConfig(regime="sideways"), "unknown regime 'sideways'"),
    (lambda: TrainConfig(regime="+-", phases=(PhaseConfig(),) * 3), "unknown regime"),
    (lambda: TrainConfig(regime="-+-", phases=(PhaseConfig(), PhaseConfig(epochs=0), PhaseConfig())), "phase 2 has 0"),
    (lambda: TrainConfig(batch_size=0), "batch size"),
    (lambda: EvalConfig(criterion="vibes"), "unknown criterion 'vibes'"),
    (lambda: RunConfig(method="magic"), "unknown method 'magic'"),
    (lambda: RunConfig(train=TrainConfig(regime="--+")), "needs a trained backbone"),
    (lambda: DataConfig(val_fraction=1.0), "validation fraction"),
])
def test_bad_values_fail_at_construction_with_one_line(build, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        build()
    assert isinstance(e.value, EarlyExitError) and "\n" not in str(e.value)


@given(st.text(min_size=1, max_size=12))
def test_any_unknown_optimizer_or_schedule_is_refused(name):
    for field, valid in (("optimizer", {"sgd", "adamw"}), ("schedule", {"cosine", "constant"})):
        if name in valid:
            continue
        with pytest.raises(ConfigError, match=f"unknown {field}"):
            PhaseConfig(**{field: name})


def test_lr_defaults_by_optimizer_and_regime_is_parsed_once():
    assert PhaseConfig().lr == (0.1,) and PhaseConfig(optimizer="adamw").lr == (1e-3,)
    assert PhaseConfig(lr=0.05).lr == (0.05,)
    assert TrainConfig(regime="disjoint").parsed_regime.phases == "+-+" and TrainConfig(regime="+++").parsed_regime.phases == "+++"


@pytest.mark.parametrize("method", sorted(METHOD_DEFAULTS))
def test_method_defaults_are_resolved_by_the_config(method):
    cfg = RunConfig(method=method)
    assert cfg.train.weighting == METHOD_DEFAULTS[method].weighting
    assert cfg.eval.criterion == METHOD_DEFAULTS[method].criterion
    explicit = RunConfig(method=method, train=TrainConfig(weighting="han"), eval=EvalConfig(criterion="entropy"))
    assert explicit.train.weighting == "han" and explicit.eval.criterion == "entropy"
    assert run_config_from_dict(to_dict(cfg)) == cfg


def test_plain_run_defaults():
    cfg = RunConfig()
    assert cfg.train.weighting == "mean" and cfg.eval.criterion == "confidence"
    assert TrainConfig().weighting is None and TrainConfig().loss_weighting == "mean"
    assert TrainConfig().grad_clip == "model"


def test_cli_defaults_are_the_configs():
    """`run` without options builds exactly RunConfig() but for the device and the output folder."""
    from earlyexit import runs

    seen = {}

    def fake(cfg, out, **kw):
        seen["cfg"] = cfg
        return {}

    mp = pytest.MonkeyPatch()
    mp.setattr(runs, "run_experiment", fake)
    try:
        r = CliRunner().invoke(main, ["run"])
    finally:
        mp.undo()
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == RunConfig()


@pytest.mark.slow
def test_library_and_cli_give_the_same_pbee_run(tmp_path):
    """run_experiment(RunConfig(method="pbee")) trains and evaluates exactly as `run --method pbee`."""
    from earlyexit.runs import run_experiment

    pc = PhaseConfig(epochs=1)
    cfg = RunConfig(model=ModelConfig(name="mlp"), data=DataConfig(name="synthetic"),
                    train=TrainConfig(phases=(pc, pc, pc), batch_size=32, device="cpu"), method="pbee")
    lib = run_experiment(cfg, tmp_path / "lib").to_dict()
    r = CliRunner().invoke(main, ["run", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--device", "cpu",
                                  "--epochs", "1", "--method", "pbee", "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    for res in (lib, cli):
        res.pop("timing")  # wall-clock time, the one part of results.json that differs between runs
    assert lib == cli and lib["weighting"] == "mean" and lib["curve"]["criterion"] == "patience"
    a = json.loads((tmp_path / "lib" / "config.json").read_text())
    b = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert a == b
