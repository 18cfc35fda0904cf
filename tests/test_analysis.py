"""Tests of earlyexit.analysis: rank, gradient dominance, mutual information, mode connectivity, loss landscapes.

Tiny models (the MLP and a CIFAR ResNet-8 on 8x8 images) and the synthetic
dataset; estimators are checked on cases with known answers, gradients
against a plain ``backward()``, weight matching by function preservation
and by recovering a permuted copy exactly.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.analysis.rank import singular_values
from earlyexit.analysis import (apply_permutation, dominance_from_norms, effective_rank, exit_gradient_norms,
                                exit_losses, filter_normalized_direction, gradient_dominance, interpolation_path,
                                loss_barrier, loss_surface, mutual_information, numerical_rank, permutation_spec,
                                reset_bn, stage_features, stage_information, stage_parameter_groups, stage_ranks,
                                state_features, weight_matching)
from earlyexit.data import load_dataset
from earlyexit.metrics import evaluate
from earlyexit.models.resnet import Bottleneck, cifar_resnet, resnet
from earlyexit.training import set_trainable

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=8, num_classes=NUM_CLASSES, train_samples=128, test_samples=64)


@pytest.fixture(scope="module")
def test_batches(data):
    return list(data.test.batches(32))


def _mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3, **kw)


def _resnet(seed=0):
    torch.manual_seed(seed)
    model = cifar_resnet(8, num_classes=NUM_CLASSES, in_chans=1, image_size=8, ic_after=[0, 1])  # ICs after blocks 1, 2
    _randomise_norms(model, seed)
    return model


def _randomise_norms(model, seed):
    """Non-trivial BatchNorm parameters and statistics, so that a wrong permutation of them shows."""
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- rank ------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(2, 40), r=st.integers(1, 40), seed=st.integers(0, 1000))
def test_numerical_rank_of_a_low_rank_product(n, d, r, seed):
    r = min(r, n, d)
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, r, generator=g)).Q  # (n, r) orthonormal columns
    v = torch.linalg.qr(torch.randn(d, r, generator=g)).Q  # (d, r)
    s = 1 + torch.rand(r, generator=g)  # singular values in [1, 2)
    x = (u * s) @ v.T  # (n, d) of rank r
    assert numerical_rank(x) == r
    assert numerical_rank(x) == int(torch.linalg.matrix_rank(x))  # the same default tolerance as torch
    assert numerical_rank(x, rtol=0.4) == r and numerical_rank(x, rtol=0.6) <= r
    assert numerical_rank(x, tol=2.0) == 0


def test_rank_thresholds_and_effective_rank():
    x = torch.diag(torch.tensor([1.0, 0.1, 1e-3, 0.0]))
    assert numerical_rank(x) == 3
    assert numerical_rank(x, rtol=0.05) == 2
    assert numerical_rank(x, tol=0.5) == 1
    assert numerical_rank(torch.zeros(3, 5)) == 0
    assert numerical_rank(torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64)), rtol=1e-10) == 2  # exact SVD route
    wide = torch.randn(20, 300)
    assert torch.allclose(singular_values(wide, exact=False), singular_values(wide), rtol=1e-9)  # Gram route
    assert torch.allclose(singular_values(wide.T, exact=False), singular_values(wide.T), rtol=1e-9)
    q = torch.linalg.qr(torch.randn(10, 4)).Q  # equal singular values: the effective rank is the rank
    assert effective_rank(q) == pytest.approx(4.0, abs=1e-9)
    assert effective_rank(torch.outer(torch.randn(6), torch.randn(3))) == pytest.approx(1.0, abs=1e-6)
    assert 1.0 < effective_rank(x) < 3.0
    with pytest.raises(ValueError, match="not both"):
        numerical_rank(x, tol=1.0, rtol=0.1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        numerical_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        numerical_rank(torch.tensor([[1.0, float("nan")]]))


def test_stage_ranks_see_a_bottleneck(test_batches):
    model = _mlp()
    with torch.no_grad():  # stage 1 keeps only 3 of its 16 units alive: its representation has rank <= 3
        model.stages[1][0].weight[3:] = 0
        model.stages[1][0].bias[3:] = 0
    ranks = stage_ranks(model, test_batches)
    assert len(ranks) == model.num_exits
    assert ranks[1] == 3
    assert ranks[0] > 3  # (ReLU and biases can raise the rank again after the bottleneck)
    eff = stage_ranks(model, test_batches, kind="effective")
    assert all(isinstance(v, float) for v in eff) and eff[1] <= 3
    feats = stage_features(model, test_batches, max_samples=40)
    assert [f.shape for f in feats["features"]] == [torch.Size([40, 16])] * 3 and feats["labels"].shape == (40,)
    with pytest.raises(ValueError, match="kind"):
        stage_ranks(model, test_batches, kind="bogus")


def test_state_features_of_pytree_states():
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(state_features({"hidden": h, "mask": mask}), h[:, 0])
    mean = state_features({"hidden": h, "mask": mask}, pool="mean")
    assert torch.allclose(mean[0], h[0, :2].mean(0)) and torch.allclose(mean[1], h[1].mean(0))
    scales = [torch.randn(2, 4, 8, 8), torch.randn(2, 6, 2, 2)]
    assert torch.equal(state_features(scales), scales[-1].flatten(1))
    assert state_features(torch.randn(2, 3, 4)).shape == (2, 12)
    with pytest.raises(ValueError, match="pool"):
        state_features(h, pool="max")
    with pytest.raises(ValueError, match="hidden"):
        state_features({"x": h})


# --- gradients -------------------------------------------------------------------------

def test_exit_gradient_norms_match_backward_and_vanish_after_the_exit(test_batches):
    model = _resnet()
    x, y = test_batches[0]
    norms = exit_gradient_norms(model, x, y)
    E, S = model.num_exits, len(model.stages)
    assert norms.shape == (E, S)
    groups = stage_parameter_groups(model)
    model.eval()
    for k in range(E):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x)[k], y).backward()
        for s in range(S):
            ref = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for _, p in groups[s] if p.grad is not None))
            assert norms[k, s].item() == pytest.approx(ref, rel=1e-5, abs=1e-8)
            if s > model.exit_after[k]:
                assert norms[k, s] == 0  # exit k never reaches the stages after it
            else:
                assert norms[k, s] > 0
    dom = gradient_dominance(model, x, y)
    assert torch.allclose(dom.sum(0), torch.ones(S))
    assert torch.allclose(dom, dominance_from_norms(norms))


def test_exit_gradient_norms_follow_phases_and_frozen_parameters(test_batches):
    model = _resnet()
    x, y = test_batches[0]
    full = exit_gradient_norms(model, x, y)
    p1 = exit_gradient_norms(model, x, y, phase=1)  # phase 1: the ICs' losses do not count
    assert torch.all(p1[:-1] == 0) and torch.allclose(p1[-1], full[-1])
    assert torch.allclose(exit_gradient_norms(model, x, y, phase=2), full)
    assert torch.all(exit_gradient_norms(model, x, y, phase=3) == 0)  # phase 3: the backbone is frozen
    set_trainable(model, 3)
    flags = [p.requires_grad for p in model.parameters()]
    assert torch.all(exit_gradient_norms(model, x, y) == 0)
    assert torch.allclose(exit_gradient_norms(model, x, y, respect_trainable=False), full)
    assert [p.requires_grad for p in model.parameters()] == flags  # the flags are restored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exit_gradient_norms(model, x, y, train_mode=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics restored
    with pytest.raises(ValueError, match="phase"):
        exit_gradient_norms(model, x, y, phase=4)


# --- mutual information ------------------------------------------------------------------

@pytest.mark.parametrize("method", ["knn", "binning"])
def test_mutual_information_of_labels_with_themselves_is_their_entropy(method):
    y = torch.arange(400) % NUM_CLASSES
    onehot = torch.nn.functional.one_hot(y).float()
    assert mutual_information(onehot, y, method=method) == pytest.approx(math.log(NUM_CLASSES), abs=0.01)
    assert mutual_information(3 * onehot, y, method=method, dim=2) == pytest.approx(math.log(NUM_CLASSES), abs=0.01)


def test_mutual_information_of_independent_noise_is_near_zero():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(1000) % NUM_CLASSES
    noise = torch.randn(1000, 4, generator=g)
    assert mutual_information(noise, y) < 0.05
    assert mutual_information(noise[:, :2], y, method="binning", bins=4) < 0.05


def test_ksg_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(1)
    rho = 0.8
    a = torch.randn(1000, 1, generator=g)
    b = rho * a + math.sqrt(1 - rho**2) * torch.randn(1000, 1, generator=g)
    assert mutual_information(a, b) == pytest.approx(-0.5 * math.log(1 - rho**2), abs=0.06)
    assert mutual_information(a, torch.randn(1000, 1, generator=g)) < 0.05


def test_mutual_information_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        mutual_information(torch.randn(4, 2), torch.arange(4), method="bogus")
    with pytest.raises(ValueError, match="labels"):
        mutual_information(torch.randn(4, 2), torch.arange(5))
    with pytest.raises(ValueError, match="integer"):
        mutual_information(torch.randn(4, 2), torch.rand(4))


def test_stage_information_per_exit(test_batches):
    model = _mlp()
    for method in ("knn", "binning"):
        info = stage_information(model, test_batches, method=method, dim=8, bin_dim=2, bins=4)
        assert [d["exit"] for d in info] == list(range(model.num_exits))
        assert [d["stage"] for d in info] == model.exit_after
        for d in info:
            assert 0 <= d["I_TY"] <= d["H_Y"] + 0.05
            assert 0 <= d["I_XT"] <= 2 * math.log(4) + 1e-9  # at most bins ** bin_dim cells


# --- connectivity -------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_mlp, _resnet])
def test_interpolation_endpoints_reproduce_the_models(make, test_batches):
    a, b = make(0), make(1)
    path = interpolation_path(a, b, test_batches, steps=3)
    for model, row in ((a, 0), (b, -1)):
        logits, labels = evaluate(model, test_batches)
        acc = (logits.argmax(-1) == labels).double().mean(1)  # (E,)
        loss = torch.stack([torch.nn.functional.cross_entropy(l, labels).double() for l in logits])
        assert torch.equal(path["accuracy"][row], acc)
        assert torch.allclose(path["loss"][row], loss, rtol=1e-6)
    assert path["loss"].shape == (3, a.num_exits) and path["alphas"] == [0.0, 0.5, 1.0]
    assert torch.allclose(path["loss_barrier"], loss_barrier(path["loss"]))


def test_barrier_of_a_model_with_itself_is_zero(data, test_batches):
    model = _resnet()
    bn = list(data.train.batches(32))[:2]
    path = interpolation_path(model, model, test_batches, steps=4, bn_batches=bn)
    assert torch.all(path["loss_barrier"].abs() < 1e-9) and torch.all(path["accuracy_barrier"].abs() < 1e-9)
    assert loss_barrier(torch.tensor([1.0, 3.0, 2.0])).item() == pytest.approx(1.5)


def test_reset_bn_recomputes_the_batch_statistics(data):
    model = _resnet().eval()
    x, _ = next(iter(data.train.batches(64)))
    before = {k: v.clone() for k, v in model.state_dict().items() if "bn" not in k and "downsample.1" not in k}
    reset_bn(model, [(x, None)])
    with torch.no_grad():
        h = model.stem.conv1(x)  # (B, 16, 8, 8)
    assert torch.allclose(model.stem.bn1.running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.stem.bn1.running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4)
    assert model.stem.bn1.momentum == 0.1 and not any(m.training for m in model.modules())  # modes restored
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # weights untouched
    with pytest.raises(ValueError, match="at least one batch"):
        reset_bn(model, [])


def _bottleneck_resnet(seed):
    torch.manual_seed(seed)
    model = resnet(block=Bottleneck, depths=(1, 2), widths=(4, 8), stem_width=8, imagenet_stem=True,
                   num_classes=NUM_CLASSES, in_chans=1, image_size=16, ic_after=[0, 1])
    _randomise_norms(model, seed)
    return model


@pytest.mark.parametrize("make,size", [(_mlp, 8), (_resnet, 8), (_bottleneck_resnet, 16)])
def test_weight_matching_preserves_the_function_and_moves_towards_a(make, size):
    pytest.importorskip("scipy")
    a, b = make(0), make(1)
    matched = weight_matching(a, b)
    x = torch.randn(16, 1, size, size)
    b.eval(), matched.eval()
    with torch.no_grad():
        diff = max(float((u - v).abs().max()) for u, v in zip(b(x), matched(x)))
    assert diff < 1e-4
    assert (_flat(a) - _flat(matched)).norm() < (_flat(a) - _flat(b)).norm()
    assert _state_equal(b, make(1))  # model_b is left unchanged


@pytest.mark.parametrize("make", [_mlp, _resnet])
def test_weight_matching_recovers_a_permuted_copy(make):
    pytest.importorskip("scipy")
    a = make(0)
    spec = permutation_spec(a)
    g = torch.Generator().manual_seed(3)
    shuffled = apply_permutation(a, spec, {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()})
    assert not _state_equal(a, shuffled)
    assert _state_equal(weight_matching(a, shuffled), a)


def test_weight_matching_rejects_other_architectures():
    pytest.importorskip("scipy")
    with pytest.raises(ValueError, match="same architecture"):
        weight_matching(_mlp(0), _mlp(1, ic_after=[0]))
    from earlyexit.models.multiexit import MultiExitModel
    from earlyexit.models.heads import LinearHead

    odd = MultiExitModel(stem=nn.Identity(), stages=[nn.Linear(4, 4), nn.Linear(4, 4)], head=LinearHead(4, 2),
                         ic_after=[], make_head=lambda fi, c: LinearHead(4, c), feature_info=[{"num_chs": 4}] * 2,
                         num_classes=2)
    with pytest.raises(ValueError, match="supports the MLP and ResNet"):
        weight_matching(odd, odd)


# --- landscape ---------------------------------------------------------------------------

def test_loss_surface_centre_is_the_model_and_weights_are_restored(test_batches):
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = loss_surface(model, test_batches, steps=(3, 5), span=0.5)
    assert out["loss"].shape == (model.num_exits, 3, 5) and out["accuracy"].shape == (model.num_exits, 3, 5)
    assert out["alphas"][1] == 0.0 and out["betas"][2] == 0.0
    loss, acc = exit_losses(model, test_batches)
    assert torch.equal(out["loss"][:, 1, 2], loss) and torch.equal(out["accuracy"][:, 1, 2], acc)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical weights and BN buffers
    assert not torch.equal(out["loss"][:, 0, 0], loss)  # off-centre points do move
    one = loss_surface(model, test_batches, steps=5, exits=[-1])
    assert one["loss"].shape == (1, 5, 1) and one["exits"] == [model.num_exits - 1]
    with pytest.raises(ValueError, match="steps"):
        loss_surface(model, test_batches, steps=(3, 3, 3))


def test_filter_normalised_directions():
    model = _resnet()
    d = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.all(d[name] == 0)
        else:
            assert torch.allclose(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5)


# --- a run folder -------------------------------------------------------------------------

def test_analyze_run_on_a_trained_run(tmp_path):
    """The earlier per-exit estimators stay reachable (tests/test_analyze.py covers the paper's)."""
    from earlyexit.analyze import analyze_run
    from earlyexit.config import DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
    from earlyexit.runs import run_experiment

    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name="mlp", kwargs={"width": 16, "depth": 3}), data=DataConfig(name="synthetic"),
                    train=TrainConfig(regime="joint", phases=(pc, pc, pc), batch_size=50, device="cpu"),
                    eval=EvalConfig(thresholds=5))
    run_experiment(cfg, tmp_path / "run")
    what = ("rank-exits", "gradient-norms", "information", "landscape", "connectivity")
    res = analyze_run(tmp_path / "run", what=what, max_samples=64, device="cpu", other=tmp_path / "run",
                      landscape_steps=(3, 3), path_steps=3, mi_method="knn")
    json.dumps(res, allow_nan=False)
    E = len(res["exit_after"])
    assert len(res["rank-exits"]["numerical"]) == E and len(res["information"]) == E
    assert {"I_TY", "I_XT", "H_Y"} <= set(res["information"][0])
    assert len(res["gradient-norms"]["norms"]) == E and len(res["gradient-norms"]["norms"][0]) == 3
    assert len(res["landscape"]["loss"]) == E
    assert max(abs(v) for v in res["connectivity"]["path"]["loss_barrier"]) < 1e-9
    assert res["connectivity"]["matched_path"] is not None
    with pytest.raises(ValueError, match="unknown analysis"):
        analyze_run(tmp_path / "run", what=("bogus",))
    with pytest.raises(ValueError, match="second run"):
        analyze_run(tmp_path / "run", what=("connectivity",))
