"""Everything the package does, on a traced model (``torchvision:NAME``, ``models.from_module``): any phase string,
``score`` on its logits, ``predict`` that really skips work, the methods, channels-last training, DDP and the
analyses. Small models (MobileNetV3-small at 32 pixels) on synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import earlyexit as ee
from earlyexit.cli import main
from earlyexit.config import DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.metrics import exit_decisions
from earlyexit.models import state_batch_size
from earlyexit.runs import load_data, load_run, run_experiment

NAME = "torchvision:mobilenet_v3_small"
SIZE = 32


def _cfg(regime="mixed", *, method=None, seed=0, ic_after="every:4", **train):
    pc = PhaseConfig(epochs=1, lr=(0.05,))
    return RunConfig(model=ModelConfig(name=NAME, ic_after=ic_after),
                     data=DataConfig(name="synthetic", train_size=64, image_size=SIZE),
                     train=TrainConfig(regime=regime, phases=(pc, pc, pc), batch_size=32, device="cpu", seed=seed,
                                       **train),
                     eval=EvalConfig(thresholds=5), method=method)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the traced MobileNetV3 (mixed and joint, different seeds) and their results."""
    root = tmp_path_factory.mktemp("traced")
    out = {}
    for regime, seed in (("mixed", 0), ("joint", 1)):
        out[regime] = (root / regime, run_experiment(_cfg(regime, seed=seed), root / regime).to_dict())
    return out


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=SIZE, num_classes=10, train_samples=64, test_samples=32)


@pytest.mark.parametrize("regime", ["+++", "-++", "+--"])
def test_any_phase_string_trains(data, regime):
    torch.manual_seed(0)
    model = ee.build_model(NAME, num_classes=10, in_chans=1, image_size=SIZE, ic_after="every:4")
    pc = PhaseConfig(lr=(0.05,), epochs=1)
    rec = ee.train(model, data, regime=regime, config=TrainConfig(phases=(pc, pc, pc), batch_size=32, device="cpu"))
    assert [p for p in (1, 2, 3) if regime[p - 1] == "+"] == sorted({h["phase"] for h in rec.history})
    assert all(np.isfinite(h["train_loss"]) for h in rec.history)


def test_score_of_its_logits_is_its_results_json(runs, tmp_path):
    """The traced model's test and validation logits, written to a file and scored, give exactly the evaluation of
    its run's results.json."""
    out, results = runs["mixed"]
    model, cfg = load_run(out)
    splits = load_data(cfg)
    logits, labels = ee.evaluate(model, splits.test.batches(cfg.eval.batch_size))
    val_logits, val_labels = ee.evaluate(model, splits.val.batches(cfg.eval.batch_size))
    costs = ee.exit_costs(model, model.example_input(1))
    np.savez(tmp_path / "test.npz", logits=logits.numpy(), labels=labels.numpy(), costs=np.array(costs),
             base_flops=np.array(results["base_flops"]), stages=np.array(model.exit_after))
    np.savez(tmp_path / "val.npz", logits=val_logits.numpy(), labels=val_labels.numpy())
    scored = ee.score(tmp_path / "test.npz", val=tmp_path / "val.npz", thresholds=cfg.eval.thresholds)
    keys = ("base_flops", "exits", "curve", "budgets", "calibrated_geometric", "calibrated_global",
            "calibrated_budgets")
    expected = {k: results[k] for k in keys if k in results}
    assert "calibrated_budgets" in expected
    assert json.loads(json.dumps(scored["evaluations"][0])) == json.loads(json.dumps(expected))


def test_predict_exits_early_and_skips_the_later_stages(runs):
    """``predict`` gives the offline evaluation's decisions, and a sample that has left is not run further: each
    stage sees only the samples still inside."""
    model, cfg = load_run(runs["mixed"][0])
    model.eval()
    x = torch.cat([xb for xb, _ in load_data(cfg).test.batches(64)])[:32]
    with torch.no_grad():
        logits = torch.stack(model(x))  # (E, N, C)
    conf = logits[0].softmax(-1).amax(-1)
    t = float(conf.median())  # about half the samples leave at the first IC
    seen = []
    hooks = [s.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, state_batch_size(a[0]))))
             for i, s in enumerate(model.stages)]
    try:
        preds, exits = ee.predict(model, x, threshold=t)
        sizes = dict(seen)
        seen.clear()
        ee.predict(model, x, threshold=0.0)  # every sample passes: the batch stops after the first IC's stage
    finally:
        for h in hooks:
            h.remove()
    want = exit_decisions(logits, "confidence", t)
    assert torch.equal(exits, want) and 0 < int((want == 0).sum()) < len(x)
    assert torch.equal(preds, logits[want, torch.arange(len(x))].argmax(-1))
    first_ic = model.exit_after[0]
    assert sizes[first_ic] == len(x) and sizes[first_ic + 1] == int((want > 0).sum())
    assert max(i for i, _ in seen) == first_ic


@pytest.mark.parametrize("method", ["sdn", "pbee", "ztw", "gpf"])
def test_methods_train_on_a_traced_conv_net(method, tmp_path):
    results = run_experiment(_cfg("mixed", method=method), tmp_path / method)
    assert results.method == method and len(results.exits) == 4
    history = [json.loads(line) for line in (tmp_path / method / "history.jsonl").read_text().splitlines()]
    assert history and all(np.isfinite(h["train_loss"]) for h in history if "train_loss" in h)


def test_channels_last_training():
    """memory_format="channels_last": the traced graph trains with channels-last weights, hands them back
    contiguous, and follows the contiguous run to rounding."""
    data = load_dataset("synthetic", image_size=SIZE, in_chans=3, num_classes=10, train_samples=64, test_samples=16)
    layouts, recs, models = [], [], []
    for fmt in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        model = ee.build_model(NAME, num_classes=10, in_chans=3, image_size=SIZE, ic_after="every:4")
        conv = model.stages[0].get_submodule("features.0.0").weight  # (16, 3, 3, 3): the layouts differ

        def log(event, _conv=conv, _fmt=fmt, **k):
            if event == "epoch":
                layouts.append((_fmt, _conv.is_contiguous(memory_format=torch.channels_last)))

        pc = PhaseConfig(lr=(0.05,), epochs=1)
        recs.append(ee.train(model, data, regime="mixed", log=log,
                             config=TrainConfig(phases=(pc, pc, pc), batch_size=32, device="cpu", memory_format=fmt)))
        models.append(model)
    assert ("channels_last", True) in layouts and ("contiguous", False) in layouts
    assert all(layout == (fmt == "channels_last") for fmt, layout in layouts)
    assert all(t.is_contiguous() for t in models[0].state_dict().values())
    for a, b in zip(recs[0].history, recs[1].history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


DDP_SCRIPT = """
import sys, torch
from torch import nn
import earlyexit as ee
from earlyexit.models import from_module
from earlyexit.data import load_dataset

class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
    def forward(self, x):
        return torch.relu(x + self.conv(x))

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Sequential(Block(8), Block(8), Block(8)),
                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
model = from_module(net, input_shape=(1, 16, 16), ic_after="every:1")
data = load_dataset("synthetic", image_size=16, num_classes=10, train_samples=64, test_samples=16)
pc = ee.PhaseConfig(lr=(0.05,), epochs=1)
rec = ee.train(model, data, regime="+++", config=ee.TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu"))
if int(__import__("os").environ.get("RANK", 0)) == 0:
    torch.save({"state": model.state_dict(), "history": rec.history}, sys.argv[1])
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_a_traced_model_matches_one_process(tmp_path):
    """torchrun with two processes trains a traced model (a from_module net, no BatchNorm or dropout, so that the
    two runs can be compared) exactly as one process does, every phase."""
    script = tmp_path / "train_traced.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(ee.__file__).parents[1])}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, capture_output=True, env=env)
    for attempt in range(2):  # a rendezvous that loses a race with another test's sockets is launched once more
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(script), str(tmp_path / "two.pt")]
        r = subprocess.run(cmd, capture_output=True, env=env, text=True)
        if r.returncode == 0:
            break
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    assert [h["phase"] for h in one["history"]] == [h["phase"] for h in two["history"]] == [1, 2, 3]
    for a, b in zip(one["history"], two["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert one["state"].keys() == two["state"].keys()
    assert all(torch.allclose(one["state"][k], two["state"][k], atol=1e-5) for k in one["state"])


@pytest.mark.slow
def test_analyses_of_traced_runs(runs, tmp_path):
    """analyze --what rank,information,landscape,connectivity on two traced runs: every backbone layer measured,
    and the path between the runs both plain and weight-matched (the permutations read from the graph)."""
    out = tmp_path / "an" / "analysis.json"
    dirs = [str(runs[r][0]) for r in ("mixed", "joint")]
    r = CliRunner().invoke(main, ["analyze", *dirs, "--what", "rank,information,landscape,connectivity",
                                  "--max-samples", "32", "--features", "64", "--steps", "3", "--landscape-steps",
                                  "3,3", "--device", "cpu", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    first = json.loads(out.read_text())["runs"][0]
    layers = [row["layer"] for row in first["rank"]]
    assert layers[0] == "stages.0.features.0.0" and layers[-1] == "heads.3"  # every Conv2d and Linear of the backbone
    assert [row["layer"] for row in first["information"]] == layers
    assert len(first["landscape"]["total"]) == 3
    conn = first["connectivity"]
    assert conn["matched_path"] is not None and set(conn["summary"]) == {"plain", "matched"}
    assert len(conn["path"]["alphas"]) == 3
