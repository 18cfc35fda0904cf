"""The gradient log during training (it must not change what is trained) and per-exit early stopping."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch
from torch import nn

from earlyexit.config import ConfigError, DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.io import load_checkpoint, load_weights
from earlyexit.models.heads import LinearHead
from earlyexit.models.multiexit import MultiExitModel
from earlyexit.runs import gradient_probe, run_experiment
from earlyexit.training.state import cpu_state

tr = importlib.import_module("earlyexit.training")
loop = importlib.import_module("earlyexit.training.loop")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=8, num_classes=10, train_samples=160, test_samples=40)


def _model(seed=0):
    """Three Linear + BatchNorm + ReLU + Dropout stages, dropout in the IC heads: every kind of hidden state."""
    torch.manual_seed(seed)

    def stage(d_in):
        return nn.Sequential(nn.Linear(d_in, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.3))

    def ic(fi, c):
        return nn.Sequential(nn.Dropout(0.2), nn.Linear(fi["num_chs"], c))

    return MultiExitModel(stem=nn.Flatten(), stages=[stage(64), stage(24), stage(24)], head=LinearHead(24, 10),
                          ic_after=[0, 1], make_head=ic, feature_info=[{"num_chs": 24}] * 3, num_classes=10,
                          input_shape=(1, 8, 8))


def _cfg(epochs=2, lr=(0.05, 0.02), **kw):
    pc = PhaseConfig(lr=lr, epochs=epochs)
    return TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu", **kw)


def _history(rec):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in rec.history]


def _train(data, probe=None, every=None, weighting=None, out=None):
    model = _model()
    rec = tr.train(model, data, regime="+++", config=_cfg(grad_log_every=every, weighting=weighting), probe=probe,
                   out_dir=out)
    return model, rec


@pytest.mark.parametrize("weighting", ["uniform", "gradient-equilibrium"])
def test_the_gradient_log_leaves_training_bit_identical(data, weighting):
    plain, rec0 = _train(data, weighting=weighting)
    logged, rec1 = _train(data, probe=gradient_probe, every=1, weighting=weighting)
    a, b = cpu_state(plain), cpu_state(logged)  # weights and BatchNorm statistics
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _history(rec0) == _history(rec1) and rec0.phases == rec1.phases
    assert all(p.requires_grad for p in logged.parameters())
    # every step of phases 2 and 3, for both grid points: 9 steps per epoch
    log = rec1.probe_log
    assert len(log) == 2 * 2 * 2 * 9 and {r["phase"] for r in log} == {2, 3}
    assert [(r["epoch"], r["step"]) for r in log[:10]] == [(1, s) for s in range(1, 10)] + [(2, 1)]
    assert {r["lr"] for r in log} == {0.05, 0.02} and {r["grid"] for r in log} == {0, 1}
    for r in log:
        assert len(r["cos"]) == 3
        if r["phase"] == 3:
            assert r["cos"][-1] is None  # the final exit does not train in phase 3
        assert all(c is None or -1.0 <= c <= 1.0 for c in r["cos"][:2 if r["phase"] == 3 else 3])
    assert any(c is not None and c < 0.999 for r in log for c in r["cos"])  # the exits do pull apart


def test_a_probe_that_disturbs_the_model_is_caught(data):
    """The comparison above can fail: a probe that updates BatchNorm's running statistics changes the weights."""
    plain, _ = _train(data)

    def leaky(model, x, y, **kw):
        was = model.training
        model.train()
        model(x)  # a forward in training mode moves the running statistics
        model.train(was)
        return {"cos": []}

    leaked, _ = _train(data, probe=leaky, every=3)
    a, b = cpu_state(plain), cpu_state(leaked)
    assert not all(torch.equal(a[k], b[k]) for k in a)

    def draws(model, x, y, **kw):  # randomness inside a probe is forked off: dropout's stream is untouched
        torch.rand(1000)
        return {"cos": []}

    drawn, _ = _train(data, probe=draws, every=2)
    c = cpu_state(drawn)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_grad_log_every_needs_a_probe_and_a_positive_interval(data):
    with pytest.raises(tr.TrainingError, match="grad_log_every needs a step probe"):
        tr.train(_model(), data, regime="+++", config=_cfg(grad_log_every=2))
    with pytest.raises(ConfigError, match="gradient log interval"):
        _cfg(grad_log_every=0)


class Kill(Exception):
    pass


def _killer(at):
    seen = []

    def log(event, **k):
        if event == "epoch":
            seen.append(1)
            if len(seen) == at:
                raise Kill

    return log


def test_the_gradient_log_is_rewritten_consistently_on_resume(data, tmp_path):
    full = _model()
    tr.train(full, data, regime="+++", config=_cfg(grad_log_every=4), probe=gradient_probe, out_dir=tmp_path / "a")
    part = _model()
    with pytest.raises(Kill):  # dies in phase 2, second grid point, epoch 2: that epoch's records are not kept
        tr.train(part, data, regime="+++", config=_cfg(grad_log_every=4), probe=gradient_probe, out_dir=tmp_path / "b",
                 log=_killer(8))
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert len(saved["probe_log"]) == (tmp_path / "b" / "gradients.jsonl").read_text().count("\n") > 0
    resumed = _model()
    rec = tr.train(resumed, data, regime="+++", config=_cfg(grad_log_every=4), probe=gradient_probe,
                   out_dir=tmp_path / "b", resume=True)
    assert (tmp_path / "a" / "gradients.jsonl").read_text() == (tmp_path / "b" / "gradients.jsonl").read_text()
    assert len(rec.probe_log) == (tmp_path / "b" / "gradients.jsonl").read_text().count("\n")
    a, b = cpu_state(full), cpu_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_experiment_with_and_without_the_gradient_log(tmp_path):
    pc = PhaseConfig(epochs=2, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name="mlp", kwargs={"width": 16, "depth": 3}),
                    data=DataConfig(name="synthetic"),
                    train=TrainConfig(regime="mixed", phases=(pc, pc, pc), batch_size=50, device="cpu"),
                    eval=EvalConfig(thresholds=5))
    run_experiment(cfg, tmp_path / "plain")
    logged_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_log_every=3))
    run_experiment(logged_cfg, tmp_path / "logged")
    wa, wb = (load_weights(next((tmp_path / d).glob("model.*"))) for d in ("plain", "logged"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ha, hb = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (tmp_path / d / "history.jsonl").read_text().splitlines()] for d in ("plain", "logged"))
    assert ha == hb
    assert not (tmp_path / "plain" / "gradients.jsonl").exists()
    rows = [json.loads(line) for line in (tmp_path / "logged" / "gradients.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 and {r["phase"] for r in rows} == {2}  # 9 steps per epoch: steps 1, 4, 7 of each
    assert all(set(r) == {"phase", "epoch", "step", "cos", "grid", "lr"} and len(r["cos"]) == 3 for r in rows)


# --- per-exit early stopping ---------------------------------------------------------------------------------

# validation accuracy of three exits per epoch: exits improve in turn, their mean does not
SEQ = [[.5, .5, .5], [.6, .4, .4], [.4, .55, .4], [.5, .5, .5], [.55, .5, .6], [.1, .1, .1], [.1, .1, .1]] + \
      [[.1, .1, .1]] * 5


def _scripted(monkeypatch, seq, start=0):
    calls = iter(seq[start:])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: list(next(calls)))


def _joint_cfg(early_stop, patience=2):
    pc = PhaseConfig(lr=(0.05,), epochs=len(SEQ), patience=patience, early_stop=early_stop)
    return TrainConfig(regime="joint", phases=(pc, pc, pc), batch_size=16, device="cpu")


def _states():
    states = []

    def log(event, **k):
        if event == "epoch":
            states.append(cpu_state(log.model))
    return log, states


@pytest.mark.parametrize("rule,epochs,best", [("per_exit", 7, 5), ("metric", 3, 1)])
def test_per_exit_early_stopping_on_a_scripted_validation(data, monkeypatch, rule, epochs, best):
    _scripted(monkeypatch, SEQ)
    model = _model()
    log, states = _states()
    log.model = model
    rec = tr.train(model, data, config=_joint_cfg(rule), log=log)
    assert len(rec.history) == epochs and rec.phases[0].best_epoch == best
    assert rec.phases[0].best_val == pytest.approx(sum(SEQ[best - 1]) / 3)
    final = cpu_state(model)
    assert all(torch.equal(final[k], states[best - 1][k]) for k in final)  # the weights of the best epoch
    assert not all(torch.equal(final[k], states[-1][k]) for k in final)


def test_per_exit_early_stopping_resumes_bit_exact(data, monkeypatch, tmp_path):
    # stops after epoch 5 (no exit improves in epochs 4 and 5) only if each exit's best survives the resume
    seq = SEQ[:4] + [[.55, .5, .5]] + [[.1, .1, .1]] * 7
    _scripted(monkeypatch, seq)
    full = _model()
    rec_full = tr.train(full, data, config=_joint_cfg("per_exit"), out_dir=tmp_path / "a")
    assert len(rec_full.history) == 5 and rec_full.phases[0].best_epoch == 3
    _scripted(monkeypatch, seq)
    with pytest.raises(Kill):
        tr.train(_model(), data, config=_joint_cfg("per_exit"), out_dir=tmp_path / "b", log=_killer(5))
    saved = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert saved["exit_best"] == [.6, .55, .5] and saved["bad"] == 1
    _scripted(monkeypatch, seq, start=len(saved["history"]))
    resumed = _model()
    rec = tr.train(resumed, data, config=_joint_cfg("per_exit"), out_dir=tmp_path / "b", resume=True)
    assert _history(rec) == _history(rec_full) and rec.phases == rec_full.phases
    a, b = cpu_state(full), cpu_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_per_exit_early_stopping_in_a_tiny_run(data):
    pc = PhaseConfig(lr=(0.3,), epochs=8, patience=1, early_stop="per_exit", schedule="constant")
    cfg = TrainConfig(regime="joint", phases=(pc, pc, pc), batch_size=16, device="cpu")
    model = _model()
    rec = tr.train(model, data, config=cfg)
    accs = [h["val_acc"] for h in rec.history]
    improved = [i for i, a in enumerate(accs)
                if i == 0 or any(v > max(b[k] for b in accs[:i]) for k, v in enumerate(a))]
    assert rec.phases[0].best_epoch == improved[-1] + 1  # the last epoch in which any exit improved
    if len(accs) < 8:  # stopped early: every exit stalled for the patience
        assert len(accs) - 1 - improved[-1] == 1
    assert tr.validate(model, data.val, [0, 1, 2], torch.device("cpu")) == accs[improved[-1]]
