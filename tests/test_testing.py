"""``earlyexit.testing``: each helper passes on our own models and catches a planted bug, saying what differs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import earlyexit as ee
from earlyexit.config import PhaseConfig
from earlyexit.testing import assert_curve_matches, assert_exit_costs, assert_phase_freezing
from earlyexit.training.optim import make_optimizer
from earlyexit.training.phases import phase_exits, set_mode, set_trainable
from earlyexit.training.step import RunningSums, StepSetup, train_step
from earlyexit.weighting import get_weighting

GOLDEN_FLOPS = json.loads((Path(__file__).parent / "golden" / "flops.json").read_text())["models"]


# --- assert_phase_freezing ---------------------------------------------------------------------------

def _batch(model, n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *model.input_shape, generator=g), torch.randint(0, model.num_classes, (n,), generator=g)


def phase3_step(batch, *, bug: str | None = None):
    """One phase-3 step through the package's own training step; ``bug`` plants a mistake."""
    x, y = batch

    def step(model):
        set_trainable(model, 2 if bug == "trains backbone" else 3)
        set_mode(model, 3)
        if bug == "batchnorm in train mode":
            model.train()  # forgets to keep the backbone in eval mode: its BatchNorm statistics move
        params = [p for p in model.parameters() if p.requires_grad]
        if bug == "first IC only":
            params = list(model.heads[0].parameters())
        pc = PhaseConfig(lr=0.05)
        exits = phase_exits(model, 3)
        setup = StepSetup(net=model, num_exits=model.num_exits, phase=3, exits=exits, weighting=get_weighting("uniform"),
                          opt=make_optimizer(params, pc, 0.05), params=params, pc=pc, lr=0.05, total=1,
                          device=torch.device("cpu"), grad_clip=None, on_non_finite=lambda loss, i: None)
        train_step(setup, x, y, step=0, index=0, sums=RunningSums.zeros(len(exits), torch.device("cpu")))

    return step


def _resnet():
    torch.manual_seed(0)
    return ee.build_model("resnet20", num_classes=10, in_chans=1, image_size=16)


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_phase_three_of_the_package_freezes_the_backbone(name):
    torch.manual_seed(0)
    model = _resnet() if name == "resnet20" else ee.build_model("mlp", num_classes=10, in_chans=1, image_size=8)
    assert_phase_freezing(phase3_step(_batch(model)), model)


def test_batchnorm_left_in_train_mode_is_caught():
    model = _resnet()
    assert any("running_mean" in n for n, _ in model.named_buffers())
    with pytest.raises(AssertionError, match=r"phase 3 changed \d+ of \d+ backbone tensors: stem\.bn1\.running_mean "
                                             r"\(buffer, max \|change\| [0-9.e-]+\)") as e:
        assert_phase_freezing(phase3_step(_batch(model), bug="batchnorm in train mode"), model)
    assert "parameter" not in str(e.value)  # only the statistics moved, not the frozen weights


def test_a_trained_backbone_is_caught():
    model = _resnet()
    with pytest.raises(AssertionError, match=r"backbone tensors: stem\.\S+ \(parameter, max \|change\|"):
        assert_phase_freezing(phase3_step(_batch(model), bug="trains backbone"), model)


def test_an_ic_that_does_not_move_is_caught():
    model = _resnet()
    with pytest.raises(AssertionError, match=r"of \d+ IC parameters did not move: heads\.1\.") as e:
        assert_phase_freezing(phase3_step(_batch(model), bug="first IC only"), model)
    assert "heads.0." not in str(e.value) and "backbone" not in str(e.value)


def test_other_models_name_their_backbone_and_ics():
    class Theirs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
            self.ic = nn.Linear(8, 3)

    net = Theirs()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))

    def good_step(m):
        m.body.eval()
        m.ic.train()
        opt = torch.optim.SGD(m.ic.parameters(), lr=0.1)
        with torch.no_grad():
            h = m.body(x)
        nn.functional.cross_entropy(m.ic(h), y).backward()
        opt.step()

    def bad_step(m):
        m.train()  # the BatchNorm in the body updates its statistics, and the IC is never stepped
        m.body(x)

    assert_phase_freezing(good_step, net, backbone=[net.body], ics=[net.ic])
    with pytest.raises(AssertionError, match=r"body\.1\.running_mean .*IC parameters did not move: ic\.weight"):
        assert_phase_freezing(bad_step, net, backbone=[net.body], ics=[net.ic])
    with pytest.raises(AssertionError, match="has no IC parameters"):
        assert_phase_freezing(good_step, net, backbone=[net.body], ics=[])


# --- assert_exit_costs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20", "vit", "mlp"])
def test_exit_costs_match_the_golden_numbers(name):
    g = GOLDEN_FLOPS[name]
    model = ee.build_model(name, **g["build"])
    assert_exit_costs(model, model.example_input(1), g["exits"])
    assert_exit_costs(model, model.example_input(3), g["exits"])  # per sample, whatever the batch


def test_exit_costs_catch_a_convention_or_a_missing_part():
    g = GOLDEN_FLOPS["resnet20"]
    model = ee.build_model("resnet20", **g["build"])
    x = model.example_input(1)
    macs = [c / 2 for c in g["exits"]]
    with pytest.raises(AssertionError, match=r"differ at 3 of 3 exits .*exit 0: expected 22991872, measured 45983744, "
                                             r"ratio 2"):
        assert_exit_costs(model, x, macs)
    not_cumulative = [g["exits"][0]] + [b - a for a, b in zip(g["exits"], g["exits"][1:])]
    with pytest.raises(AssertionError, match=r"differ at 2 of 3 exits .*exit 1:"):
        assert_exit_costs(model, x, not_cumulative)
    with pytest.raises(AssertionError, match="the model has 3 exits, 2 costs were expected"):
        assert_exit_costs(model, x, g["exits"][:2])
    near = [c * (1 + 1e-4) for c in g["exits"]]
    assert_exit_costs(model, x, near, rtol=1e-3)
    with pytest.raises(AssertionError, match="rtol 1e-05"):
        assert_exit_costs(model, x, near, rtol=1e-5)


# --- assert_curve_matches ------------------------------------------------------------------------------

def _logits(seed: int = 0, E: int = 4, N: int = 200, C: int = 5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = torch.randn(E, N, C, generator=g) + 2.5 * torch.linspace(0.3, 1, E)[:, None, None] * \
        nn.functional.one_hot(labels, C)
    logits[0, :3] = 0.0
    logits[0, torch.arange(3), labels[:3]] = 100.0  # saturated: float32 confidence is exactly 1.0
    return logits, labels


COSTS = [10.0, 25.0, 45.0, 70.0]


def their_curve(logits: np.ndarray, labels: np.ndarray, costs, *, criterion="confidence", n=100, bug=None):
    """An independent NumPy implementation of the threshold sweep (another project's, say)."""
    E, N, C = logits.shape
    x = logits.astype(np.float32)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if criterion == "confidence":
        score, ts = p.max(-1), np.linspace(0, 1, n)
    else:
        score, ts = -(p * np.log(np.where(p > 0, p, 1))).sum(-1), np.linspace(0, np.log(C), n)
    cum = np.asarray(costs, dtype=np.float64)
    if bug == "per-stage costs":
        cum = np.diff(np.concatenate([[0.0], cum]))
    correct = logits.argmax(-1) == labels[None]
    flops, acc, counts = [], [], []
    for t in ts:
        if criterion == "confidence":
            fire = score >= t if bug == ">=" else score > t
        else:
            fire = score <= t
        fire[-1] = True
        ex = fire.argmax(0)
        flops.append(float(cum[ex].mean()))
        acc.append(float(correct[ex, np.arange(N)].mean()))
        counts.append(np.bincount(ex, minlength=E).tolist())
    return {"criterion": criterion, "thresholds": ts.tolist(), "flops": flops, "accuracy": acc, "exit_counts": counts}


@pytest.mark.parametrize("criterion", ["confidence", "entropy"])
def test_an_independent_implementation_matches(criterion):
    logits, labels = _logits()
    theirs = their_curve(logits.numpy(), labels.numpy(), COSTS, criterion=criterion)
    assert_curve_matches(logits, labels, COSTS, theirs, rtol=1e-6)  # float32 softmax in another order
    assert_curve_matches(logits.numpy(), labels.numpy(), COSTS, {k: theirs[k] for k in ("flops", "accuracy")},
                         criterion=criterion, rtol=1e-6)


def test_a_non_strict_confidence_rule_is_caught():
    logits, labels = _logits()
    theirs = their_curve(logits.numpy(), labels.numpy(), COSTS, bug=">=")
    with pytest.raises(AssertionError, match=r"confidence curve differs at 1 of 100 thresholds; first at threshold 1 "
                                             r"\(index 99\): flops theirs 69.1 vs ours 70, "
                                             r"exit_counts theirs \[3, 0, 0, 197\] vs ours \[0, 0, 0, 200\]$"):
        assert_curve_matches(logits, labels, COSTS, theirs, rtol=1e-6)


def test_per_stage_costs_are_caught():
    logits, labels = _logits()
    theirs = their_curve(logits.numpy(), labels.numpy(), COSTS, bug="per-stage costs")
    with pytest.raises(AssertionError, match=r"differs at \d+ of 100 thresholds; first at threshold [0-9.]+ "
                                             r"\(index \d+\): flops theirs [0-9.]+ vs ours [0-9.]+$") as e:
        assert_curve_matches(logits, labels, COSTS, theirs, rtol=1e-6)
    assert "accuracy" not in str(e.value)  # the same samples leave at the same exits; only the cost is wrong


def test_curve_shape_and_criterion_mistakes_are_caught():
    logits, labels = _logits()
    theirs = their_curve(logits.numpy(), labels.numpy(), COSTS)
    with pytest.raises(AssertionError, match="has 99 flops values for 100 thresholds"):
        assert_curve_matches(logits, labels, COSTS, {**theirs, "flops": theirs["flops"][:-1]})
    with pytest.raises(AssertionError, match="uses the criterion 'confidence', expected 'entropy'"):
        assert_curve_matches(logits, labels, COSTS, theirs, criterion="entropy")
    counts = [list(c) for c in theirs["exit_counts"]]
    counts[50] = counts[50][::-1]
    with pytest.raises(AssertionError, match=r"index 50\): exit_counts theirs"):
        assert_curve_matches(logits, labels, COSTS, {**theirs, "exit_counts": counts}, rtol=1e-6)
    with pytest.raises(AssertionError, match="needs 'flops' and 'accuracy'"):
        assert_curve_matches(logits, labels, COSTS, {"flops": theirs["flops"]})
