"""Tests of earlyexit.metrics: FLOP counts, one-pass evaluation, threshold sweeps and budgets.

The sweeps are checked against a naive per-sample Python reference and by
hypothesis properties (monotonicity in the threshold, cost bounds); the FLOP
counts against closed forms and against torchvision's ResNet-50.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.device import autocast_context
from earlyexit.metrics import (accuracy_per_exit, backbone_cost, budget_table, evaluate, exit_costs, exit_decisions,
                               static_points, threshold_curve)
from earlyexit.tree import to_device
from earlyexit.models import MultiExitModel
from earlyexit.models.heads import PoolLinearHead

from strategies import exit_outputs  # tests/strategies.py

SETTINGS = settings(max_examples=60, deadline=None)


# --- naive reference ----------------------------------------------------------

def _softmax64(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def naive_curve(logits: torch.Tensor, labels: torch.Tensor, costs, thresholds, criterion: str, margin: float = 1e-4):
    """Per-sample loops in float64; rejects examples with a score within ``margin`` of a threshold."""
    E, N, _ = logits.shape
    rows = logits.tolist()
    preds = [[row.index(max(row)) for row in rows[k]] for k in range(E)]  # first maximal index, as torch.argmax
    flops, acc, counts = [], [], []
    for t in thresholds:
        total, hits, cnt = 0.0, 0, [0] * E
        for n in range(N):
            leave, run = E - 1, 0
            for k in range(E):
                p = _softmax64(rows[k][n])
                if criterion == "confidence":
                    assume(abs(max(p) - t) > margin)
                    fires = max(p) > t
                elif criterion == "entropy":
                    h = -sum(q * math.log(q) for q in p if q > 0)
                    assume(abs(h - t) > margin)
                    fires = h <= t
                else:
                    run = run + 1 if k > 0 and preds[k][n] == preds[k - 1][n] else 1
                    fires = run >= t
                if fires:
                    leave = k
                    break
            total += costs[leave]
            hits += int(preds[leave][n] == int(labels[n]))
            cnt[leave] += 1
        flops.append(total / N)
        acc.append(hits / N)
        counts.append(cnt)
    return flops, acc, counts


# --- threshold sweeps ---------------------------------------------------------

@SETTINGS
@given(exit_outputs(), st.sampled_from(["confidence", "entropy", "patience"]))
def test_curve_matches_naive_reference(out, criterion):
    logits, labels, costs = out
    # scores within the reference's margin of a threshold (e.g. a uniform row) are rejected, not compared
    curve = threshold_curve(logits, labels, costs, thresholds=89, criterion=criterion)
    flops, acc, counts = naive_curve(logits, labels, costs, curve["thresholds"], criterion)
    assert curve["criterion"] == criterion
    assert curve["exit_counts"] == counts
    assert curve["flops"] == pytest.approx(flops, rel=1e-12)
    assert curve["accuracy"] == pytest.approx(acc, rel=1e-12)


@SETTINGS
@given(exit_outputs())
def test_confidence_monotone_in_threshold(out):
    logits, labels, costs = out
    t = torch.linspace(0, 1, 100).tolist()
    curve = threshold_curve(logits, labels, costs, criterion="confidence")
    assert curve["thresholds"] == pytest.approx(t)
    assert all(a <= b + 1e-9 for a, b in zip(curve["flops"], curve["flops"][1:]))
    exits = torch.stack([exit_decisions(logits, "confidence", v) for v in t])  # (T, N)
    assert bool((exits[1:] >= exits[:-1]).all())  # every sample leaves no earlier as t grows
    assert exits.dtype == torch.long and exits.shape == (100, logits.shape[1])
    # exit_decisions agrees with the curve's histogram
    counts = [torch.bincount(e, minlength=logits.shape[0]).tolist() for e in exits]
    assert counts == curve["exit_counts"]


@SETTINGS
@given(exit_outputs())
def test_entropy_monotone_in_threshold(out):
    logits, labels, costs = out
    C = logits.shape[-1]
    curve = threshold_curve(logits, labels, costs, thresholds=50, criterion="entropy")
    assert curve["thresholds"][0] == 0 and curve["thresholds"][-1] == pytest.approx(math.log(C))
    # a larger entropy threshold fires sooner: cost and every exit are non-increasing in t
    assert all(a >= b - 1e-9 for a, b in zip(curve["flops"], curve["flops"][1:]))
    exits = torch.stack([exit_decisions(logits, "entropy", v) for v in curve["thresholds"]])  # (T, N)
    assert bool((exits[1:] <= exits[:-1]).all())


@SETTINGS
@given(exit_outputs())
def test_patience_monotone_and_bounds(out):
    logits, labels, costs = out
    E = logits.shape[0]
    curve = threshold_curve(logits, labels, costs, criterion="patience")
    assert curve["thresholds"] == [float(p) for p in range(1, E + 1)]
    assert all(a <= b + 1e-9 for a, b in zip(curve["flops"], curve["flops"][1:]))
    assert bool((exit_decisions(logits, "patience", 1) == 0).all())  # p = 1: leave at the first exit
    assert bool((exit_decisions(logits, "patience", E + 1) == E - 1).all())  # unreachable patience: the last exit


@SETTINGS
@given(exit_outputs(), st.sampled_from(["confidence", "entropy", "patience"]))
def test_average_cost_between_first_and_last(out, criterion):
    logits, labels, costs = out
    curve = threshold_curve(logits, labels, costs, thresholds=20, criterion=criterion)
    for f, c in zip(curve["flops"], curve["exit_counts"]):
        assert costs[0] - 1e-9 <= f <= costs[-1] + 1e-9
        assert sum(c) == logits.shape[1] and len(c) == logits.shape[0]
    assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])


@SETTINGS
@given(exit_outputs())
def test_confidence_extremes(out):
    logits, labels, costs = out
    E, N, _ = logits.shape
    assert bool((exit_decisions(logits, "confidence", 0.0) == 0).all())
    assert bool((exit_decisions(logits, "confidence", 1.01) == E - 1).all())
    curve = threshold_curve(logits, labels, costs, thresholds=[0.0, 1.5])
    assert curve["exit_counts"][0][0] == N and curve["exit_counts"][1][-1] == N
    assert curve["flops"] == pytest.approx([costs[0], costs[-1]])
    acc = accuracy_per_exit(logits, labels)
    assert curve["accuracy"] == pytest.approx([acc[0], acc[-1]])


def test_static_points_and_accuracy_per_exit():
    labels = torch.tensor([0, 1, 1, 0])
    logits = torch.tensor([[[2.0, 0], [2, 0], [0, 2], [2, 0]],    # exit 0: 3 of 4 right
                           [[2.0, 0], [0, 2], [0, 2], [2, 0]]])   # exit 1: all right
    assert accuracy_per_exit(logits, labels) == [0.75, 1.0]
    assert static_points(logits, labels, [1.0, 3.0]) == [{"index": 0, "flops": 1.0, "accuracy": 0.75},
                                                         {"index": 1, "flops": 3.0, "accuracy": 1.0}]


def test_bad_input_raises():
    logits, labels = torch.zeros(2, 3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="criterion"):
        threshold_curve(logits, labels, [1, 2], criterion="margin")
    with pytest.raises(ValueError, match="costs"):
        threshold_curve(logits, labels, [1, 2, 3])
    with pytest.raises(ValueError, match="labels"):
        threshold_curve(logits, labels[:2], [1, 2])
    with pytest.raises(ValueError, match="logits"):
        accuracy_per_exit(logits[0], labels)
    with pytest.raises(ValueError, match="patience"):
        threshold_curve(logits, labels, [1, 2], thresholds=[0.5], criterion="patience")
    with pytest.raises(ValueError, match="thresholds"):
        threshold_curve(logits, labels, [1, 2], thresholds=0)
    with pytest.raises(ValueError, match="base_flops"):
        budget_table({"flops": [], "accuracy": []}, [], 0.0)


# --- budgets -----------------------------------------------------------------

def test_budget_table_hand_made():
    curve = {"flops": [10.0, 20.0, 30.0, 40.0], "accuracy": [0.5, 0.6, 0.7, 0.65]}
    statics = [{"index": 0, "flops": 15.0, "accuracy": 0.55}, {"index": 1, "flops": 45.0, "accuracy": 0.8}]
    table = budget_table(curve, statics, 40.0)
    assert table == {"25%": 0.5, "50%": 0.6, "75%": 0.7, "100%": 0.7, "max": 0.8}
    # a static point can win a budget; an empty budget is None
    table = budget_table(curve, [{"index": 0, "flops": 5.0, "accuracy": 0.9}], 40.0, fractions=(0.1, 0.2))
    assert table == {"10%": None, "20%": 0.9, "max": 0.9}


# --- FLOPs -------------------------------------------------------------------

class _Scale(nn.Module):
    """A stem that reads a dict input (a pytree state, as BERT's)."""

    def forward(self, d: dict) -> torch.Tensor:
        return d["x"] * d["scale"][:, None, None, None]


def _conv_model(*, dict_input: bool = False, dropout: float = 0.0) -> MultiExitModel:
    """Two conv stages (the first grouped) with a flatten-linear IC and a pool-linear final head."""
    stages = [nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Dropout(dropout)),
              nn.Conv2d(8, 6, 1, stride=2)]
    info = [{"num_chs": 8, "size": (6, 6)}, {"num_chs": 6, "size": (3, 3)}]
    return MultiExitModel(stem=_Scale() if dict_input else nn.Identity(), stages=stages, head=PoolLinearHead(6, 5),
                          ic_after=[0], make_head=lambda fi, c: nn.Sequential(nn.Flatten(), nn.Linear(8 * 36, c)),
                          feature_info=info, num_classes=5, input_shape=(4, 6, 6))


def test_conv_and_linear_costs_equal_closed_forms():
    model = _conv_model()
    conv1 = 2 * 4 * 8 * 3 * 3 * 6 * 6 / 2  # 2 Cin Cout k k Hout Wout / groups
    conv2 = 2 * 8 * 6 * 1 * 1 * 3 * 3
    ic = 2 * (8 * 36) * 5                  # 2 in out
    fc = 2 * 6 * 5
    x = torch.randn(3, 4, 6, 6)            # batch 3: the counts are per sample
    model.train()
    assert exit_costs(model, x) == [conv1 + ic, conv1 + ic + conv2 + fc]
    assert backbone_cost(model, x) == conv1 + conv2 + fc
    assert model.training  # the flag is restored


def test_costs_of_pytree_input():
    model = _conv_model(dict_input=True)
    x = {"x": torch.randn(2, 4, 6, 6), "scale": torch.ones(2)}
    ref = exit_costs(_conv_model(), torch.randn(1, 4, 6, 6))
    assert exit_costs(model, x) == ref
    with pytest.raises(ValueError, match="batch"):
        exit_costs(model, {"x": [], "scale": ()})


@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("mlp", {"depth": 4, "width": 16})])
def test_exit_costs_strictly_increasing(name, kw):
    model = build_model(name, num_classes=10, **kw)
    costs = exit_costs(model, model.example_input(2))
    assert len(costs) == model.num_exits >= 2
    assert all(a < b for a, b in zip(costs, costs[1:]))
    # the ICs make the last exit dearer than the backbone alone
    assert backbone_cost(model, model.example_input(1)) < costs[-1]


def test_resnet50_backbone_cost_matches_torchvision():
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    t0 = time.perf_counter()
    model = build_model("resnet50", num_classes=1000, image_size=224)
    ours = backbone_cost(model, model.example_input(1))
    ref_model = torchvision.models.resnet50().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ref_model(torch.zeros(1, 3, 224, 224))
    ref = counter.get_total_flops()
    assert ref == pytest.approx(8.18e9, rel=0.01)  # torchvision's published 4.09 GMACs
    assert ours == ref  # exact: the same convolutions and linear layers, counted by the same rule
    assert time.perf_counter() - t0 < 120


# --- evaluation ---------------------------------------------------------------

def test_evaluate_shapes_and_last_exit():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=7, in_chans=1, depth=3, width=16, image_size=8)
    xs = [torch.randn(b, 1, 8, 8) for b in (5, 3)]
    ys = [torch.randint(0, 7, (b,)) for b in (5, 3)]
    model.train()
    logits, labels = evaluate(model, zip(xs, ys))
    assert model.training
    assert logits.shape == (model.num_exits, 8, 7) and logits.dtype == torch.float32 and logits.device.type == "cpu"
    assert torch.equal(labels, torch.cat(ys))
    with torch.no_grad():
        ref = model.eval()(torch.cat(xs))
    torch.testing.assert_close(logits[-1], ref[-1])
    torch.testing.assert_close(logits, torch.stack(ref))


def test_evaluate_pytree_input_eval_mode():
    torch.manual_seed(0)
    model = _conv_model(dict_input=True, dropout=0.9)  # train-mode dropout would change the logits
    x = {"x": torch.randn(4, 4, 6, 6), "scale": torch.rand(4)}
    y = torch.tensor([0, 1, 2, 3])
    model.train()
    logits, labels = evaluate(model, [(x, y)], device="cpu")
    assert model.training
    with torch.no_grad():
        ref = model.eval()(x)
    torch.testing.assert_close(logits, torch.stack(ref))
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        evaluate(model, [x])


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # building the CUDA context on a CPU-only machine
def test_to_device_and_autocast_context():
    tree = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.ones(3), None)], "c": "text"}
    out = to_device(tree, "cpu")
    assert out["c"] == "text" and out["b"][1][1] is None and isinstance(out["b"][1], tuple)
    assert torch.equal(out["b"][1][0], torch.ones(3))
    with autocast_context("cpu"):
        y = nn.Linear(3, 2)(torch.ones(1, 3))
    assert y.dtype == torch.float32
    assert isinstance(autocast_context("cuda"), torch.autocast)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_evaluate_cuda_bf16():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=7, in_chans=1, depth=3, width=16, image_size=8).cuda()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 7, (6,))
    logits, labels = evaluate(model, [(x, y)])
    assert logits.dtype == torch.float32 and logits.device.type == "cpu" and labels.device.type == "cpu"
    with torch.no_grad():
        ref = torch.stack(model.eval()(x.cuda())).cpu()
    torch.testing.assert_close(logits, ref, atol=5e-2, rtol=5e-2)  # bf16 autocast
    curve = threshold_curve(logits.cuda(), labels.cuda(), [1.0, 2.0, 3.0])
    assert sum(curve["exit_counts"][0]) == 6
