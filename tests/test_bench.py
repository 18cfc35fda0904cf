"""Tests of the machine benchmark (earlyexit.bench): figures, table, bad input. No timing targets asserted."""

import math

import pytest
import torch

import earlyexit.inference  # noqa: F401  (the bench's inference section needs it)
from earlyexit.bench import run_bench
from earlyexit.bench.training import _PhaseStep, time_phases
from earlyexit.data import DataError, load_dataset
from earlyexit import build_model

KEYS = ("flops_ratio", "p2_over_p1", "p2_vs_flops", "p3_over_p1", "sweep_over_forward", "load_share",
        "p1_step_s", "p2_step_s", "p3_step_s", "p1_samples_per_s", "p2_samples_per_s", "p3_samples_per_s",
        "load_s", "forward_s", "sweep_s")


def test_run_bench_mlp_synthetic():
    lines = []
    res = run_bench(model="mlp", dataset="synthetic", batch_size=32, steps=2, warmup=1, device="cpu",
                    echo=lines.append)
    for k in KEYS:
        assert k in res, k
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert all(math.isfinite(v) for v in res.values() if isinstance(v, float))
    # The MLP's ICs add linear layers: all exits cost more than the backbone.
    assert res["flops_ratio"] > 1
    assert 0 < res["load_share"] < 1
    assert res["p2_vs_flops"] == pytest.approx(res["p2_over_p1"] / res["flops_ratio"])
    assert res["p1_samples_per_s"] == pytest.approx(32 / res["p1_step_s"])
    text = "\n".join(lines)
    for label in ("a) phase-2 / phase-1", "b) phase-3 / phase-1", "c) 100-threshold sweep", "d) loading share"):
        assert label in text
    assert any(w in text for w in ("PASS", "MISS"))
    assert "inference, confidence >" in text and "skipped" not in text
    assert "memory layout" in text and "auto picks contiguous for mlp" in text
    assert res["channels_last_speedup"] > 0 and "compiled_speedup" not in res


def test_time_phases_returns_step_and_load_times():
    splits = load_dataset("synthetic")
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=16, depth=3)
    out = time_phases(model, splits.train, batch_size=50, steps=1, warmup=0, device=torch.device("cpu"))
    assert set(out) == {"p1_step_s", "p2_step_s", "p3_step_s", "load_s", "p2_over_p1", "p3_over_p1"}
    # One timed round: the round's ratio is the ratio of the (single) step times.
    assert out["p2_over_p1"] == pytest.approx(out["p2_step_s"] / out["p1_step_s"])
    assert all(v > 0 for v in out.values())
    assert all(p.requires_grad for p in model.parameters())  # every parameter trainable again, as after train()


@pytest.mark.parametrize("phase", [1, 2, 3])
def test_phase_step_has_the_loop_semantics(phase):
    """Phase 1 leaves the ICs alone, phase 3 the backbone (weights and BatchNorm statistics), phase 2 moves both."""
    model = build_model("resnet20", num_classes=10, in_chans=1, image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step = _PhaseStep(model, phase, torch.device("cpu"), total_steps=1)
    step.enter()
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    step(x, y)
    after = model.state_dict()
    n_ic = model.num_exits - 1
    is_ic = lambda k: k.startswith(tuple(f"heads.{i}." for i in range(n_ic)))  # noqa: E731
    backbone_moved = any(not torch.equal(before[k], after[k]) for k in after if not is_ic(k))
    ics_moved = any(not torch.equal(before[k], after[k]) for k in after if is_ic(k))
    assert backbone_moved == (phase in (1, 2))
    assert ics_moved == (phase in (2, 3))
    assert len(step.exits) == (1 if phase == 1 else model.num_exits if phase == 2 else n_ic)


def test_run_bench_bad_input():
    with pytest.raises(ValueError, match="steps"):
        run_bench(model="mlp", dataset="synthetic", steps=0, echo=lambda s: None)
    with pytest.raises(DataError):
        run_bench(model="mlp", dataset="no-such-set", echo=lambda s: None)
    with pytest.raises(ValueError, match="smaller than one batch"):
        run_bench(model="mlp", dataset="synthetic", batch_size=10_000, steps=1, device="cpu", echo=lambda s: None)
    no_heads = build_model("mlp", num_classes=10, in_chans=1, image_size=8, width=8, depth=2, ic_after="none")
    with pytest.raises(ValueError, match="no IC heads"):
        _PhaseStep(no_heads, 3, torch.device("cpu"), total_steps=1)


def test_run_bench_inference_on_a_run_folder(tmp_path):
    from earlyexit.config import DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
    from earlyexit.runs import run_experiment

    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name="mlp"), data=DataConfig(name="synthetic"),
                    train=TrainConfig(regime="joint", phases=(pc, pc, pc), batch_size=50, device="cpu"))
    run_experiment(cfg, tmp_path / "run")
    lines = []
    res = run_bench(model="mlp", dataset="synthetic", batch_size=32, steps=1, warmup=0, device="cpu",
                    run_dir=str(tmp_path / "run"), echo=lines.append)
    assert "trained run" in "\n".join(lines)
    for b in (1, 64, 256):
        assert res[f"inference_b{b}_predict_ms"] > 0 and res[f"inference_b{b}_backbone_ms"] > 0
        assert 0 <= res[f"inference_b{b}_early_share"] <= 1


def test_time_layouts_steps_each_layout_and_the_compiled_model(monkeypatch):
    """Every variant is timed on its own copy in its own layout; the model passed in is left untouched."""
    from earlyexit.bench import training as bt
    from earlyexit.data import load_dataset
    from earlyexit.models import build_model

    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=10, in_chans=1, image_size=16, ic_after="every:3")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    seen, compiled = [], []
    real = bt._PhaseStep.__call__

    def spy(self, x, y):
        seen.append(next(self.model.stages[0].parameters()).is_contiguous(memory_format=torch.channels_last))
        return real(self, x, y)

    monkeypatch.setattr(bt._PhaseStep, "__call__", spy)
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or m)  # the wiring, not the compiler
    split = load_dataset("synthetic", image_size=16, in_chans=1, train_samples=64, test_samples=8).train
    res = bt.time_layouts(net, split, batch_size=8, steps=2, warmup=1, device=torch.device("cpu"), compile=True)
    assert set(res) == {"layout_contiguous_samples_per_s", "layout_channels_last_samples_per_s",
                        "layout_compiled_samples_per_s", "channels_last_speedup", "compiled_speedup", "compile_s"}
    assert len(compiled) == 1 and compiled[0] is not net
    assert len(seen) == 1 + 3 * 3  # the compile call, then (warm-up + steps) rounds of three variants
    assert sum(seen) == 1 + 3 * 2  # compiled (auto: channels-last for ResNet) and channels_last
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
