"""``run``'s per-phase hyper-parameters: one value for every phase or ``P1;P2;P3``; bad input is one line, exit 2."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import earlyexit.runs
from earlyexit.cli import main
from earlyexit.config import PhaseConfig, RunConfig, TrainConfig

BASE = ["run", "--model", "mlp", "--dataset", "synthetic", "--device", "cpu"]


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """``run`` up to the config: ``run_experiment`` records what it was given instead of training."""
    seen = []

    def fake(cfg, out, **kw):
        seen.append(cfg)
        return {}

    monkeypatch.setattr(earlyexit.runs, "run_experiment", fake)
    return lambda *args: (_invoke(*args, "--out", str(tmp_path / "o")), seen[-1] if seen else None)


def _invoke(*args):
    return CliRunner().invoke(main, [*BASE, *args])


def test_one_value_or_one_per_phase(captured):
    r, cfg = captured("--epochs", "2;3;1", "--lr", "5e-4;1e-3,1e-4;1e-3", "--optimizer", "adamw;sgd;adamw",
                      "--weight-decay", "0;0.01;0.05", "--schedule", "constant;cosine;constant",
                      "--patience", "none;2;3", "--early-stop", "metric;per_exit;per_exit",
                      "--grad-clip", "1.5", "--grad-log-every", "5", "--regime", "+++")
    assert r.exit_code == 0, r.output
    p1, p2, p3 = cfg.train.phases
    assert (p1.epochs, p2.epochs, p3.epochs) == (2, 3, 1)
    assert (p1.lr, p2.lr, p3.lr) == ((5e-4,), (1e-3, 1e-4), (1e-3,))
    assert (p1.optimizer, p2.optimizer, p3.optimizer) == ("adamw", "sgd", "adamw")
    assert (p1.weight_decay, p2.weight_decay, p3.weight_decay) == (0.0, 0.01, 0.05)
    assert (p1.schedule, p2.schedule, p3.schedule) == ("constant", "cosine", "constant")
    assert (p1.patience, p2.patience, p3.patience) == (None, 2, 3)
    assert (p1.early_stop, p2.early_stop, p3.early_stop) == ("metric", "per_exit", "per_exit")
    assert cfg.train.grad_clip == 1.5 and cfg.train.grad_log_every == 5
    r, cfg = captured("--lr", "0.02,0.01", "--optimizer", "adamw", "--patience", "4", "--early-stop", "per_exit",
                      "--epochs", "1,2,3")
    assert r.exit_code == 0, r.output
    assert all(p.lr == (0.02, 0.01) and p.optimizer == "adamw" and p.patience == 4 and p.early_stop == "per_exit"
               for p in cfg.train.phases)
    assert [p.epochs for p in cfg.train.phases] == [1, 2, 3]


def test_the_cli_keeps_no_defaults_of_its_own(captured):
    r, cfg = captured()
    assert r.exit_code == 0, r.output
    d = PhaseConfig()
    assert cfg.train.phases == (d, d, d)
    t = TrainConfig()
    assert (cfg.train.grad_clip, cfg.train.grad_log_every, cfg.data.image_size) == (t.grad_clip, t.grad_log_every, None)
    assert cfg == RunConfig(model=cfg.model, data=cfg.data, train=TrainConfig(device="cpu"))
    r, cfg = captured("--optimizer", "adamw")
    assert all(p.lr == (1e-3,) for p in cfg.train.phases)  # the optimizer's default learning rate


@pytest.mark.parametrize("args,message", [
    (["--lr", "0.1;0.2"], "--lr: expected one value or three separated by ';' (phases 1;2;3), got 2 in '0.1;0.2'"),
    (["--lr", "fast"], "--lr: expected a number > 0, got 'fast'"),
    (["--lr", "0.1;-1;0.1"], "--lr: expected a number > 0, got '-1'"),
    (["--lr", "0.1;,;0.1"], "--lr: expected comma-separated learning rates, got ','"),
    (["--optimizer", "sgd;adam;sgd"], "--optimizer: expected one of sgd, adamw, got 'adam'"),
    (["--weight-decay", "-0.1"], "--weight-decay: expected a number >= 0, got '-0.1'"),
    (["--schedule", "step"], "--schedule: expected one of cosine, constant, got 'step'"),
    (["--patience", "0"], "--patience: expected an integer >= 1, got '0'"),
    (["--patience", "1.5;2;2"], "--patience: expected an integer >= 1, got '1.5'"),
    (["--early-stop", "sometimes"], "--early-stop: expected one of metric, per_exit, got 'sometimes'"),
    (["--grad-clip", "0"], "--grad-clip: expected a number > 0, got '0'"),
    (["--grad-clip", "nan"], "--grad-clip: expected a number > 0, got 'nan'"),
    (["--grad-log-every", "often"], "--grad-log-every: expected an integer >= 1, got 'often'"),
    (["--epochs", "1;2"], "--epochs: expected one value or three separated by ';' (phases 1;2;3), got 2 in '1;2'"),
    (["--epochs", "three"], "--epochs: expected an integer, got 'three'"),
])
def test_bad_per_phase_input_is_one_line_naming_the_flag(captured, args, message):
    r, cfg = captured(*args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.exit_code, r.output)
    assert r.output.strip() == f"error: {message}"
    assert cfg is None
