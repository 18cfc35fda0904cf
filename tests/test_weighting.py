"""Loss weightings: each scheme's values, the weights each phase uses, and gradient equilibrium against its closed form."""


from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.config import DEFAULT_WEIGHTING, METHOD_DEFAULTS, PhaseConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.errors import ConfigError
from earlyexit.models import MultiExitModel
from earlyexit.training import GradientEquilibrium, get_weighting, list_weightings, register_weighting, train
from earlyexit.training.phases import phase_exits, phase_loss_weights, set_trainable
from earlyexit.training.step import RunningSums, StepSetup, train_step, training_point
from earlyexit.weighting import TrainingPoint, weights_at


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0)


def test_registry():
    names = set(list_weightings())
    assert {"mean", "sum", "uniform", "sdn", "han", "han-decreasing", "pabee", "gradient-equilibrium"} <= names
    assert get_weighting("uniform") is get_weighting("sum")  # the old name is an alias
    with pytest.raises(ValueError, match="unknown weighting"):
        get_weighting("nope")
    register_weighting("double", lambda E, p: [2.0] * E)
    assert get_weighting("double")(3, 0.0) == [2.0] * 3
    # a plain (num_exits, progress) callable is asked through weights_at as well
    assert weights_at(get_weighting("double"), 2, TrainingPoint(phase=3, epoch=4, epochs=9, progress=0.5)) == [2.0] * 2


def test_defaults_follow_the_papers_code():
    assert DEFAULT_WEIGHTING == "mean" and TrainConfig().loss_weighting == "mean"
    assert {m: d.weighting for m, d in METHOD_DEFAULTS.items()} == {
        "sdn": "sdn", "pbee": "mean", "ztw": "mean", "gpf": "pabee"}


def test_mean_and_sum():
    assert get_weighting("mean")(4, 0.3) == pytest.approx([0.25] * 4)
    assert get_weighting("mean")(1, 0.0) == [1.0]
    assert get_weighting("sum")(4, 0.3) == [1.0] * 4


@pytest.mark.parametrize("E", [2, 3, 7])
def test_phase_weights_under_mean(E):
    """Phase 1: the final exit alone, weight 1; phase 2: 1/E each; phase 3: each IC 1/E, E counting the frozen final exit."""
    w = get_weighting("mean")
    point = TrainingPoint(phase=2)
    assert phase_loss_weights(1, w, E, [E - 1], replace(point, phase=1)) == [1.0]
    assert phase_loss_weights(2, w, E, list(range(E)), point) == pytest.approx([1 / E] * E)
    assert phase_loss_weights(3, w, E, list(range(E - 1)), replace(point, phase=3)) == pytest.approx([1 / E] * (E - 1))


def _step_loss(model, phase, weighting, x, y):
    """The loss train_step reports (lr 0: the model is not changed) in ``phase``."""
    set_trainable(model, phase)
    params = [p for p in model.parameters() if p.requires_grad]
    pc = PhaseConfig(epochs=1)
    setup = StepSetup(net=model, num_exits=model.num_exits, phase=phase, exits=phase_exits(model, phase),
                      weighting=get_weighting(weighting), opt=torch.optim.SGD(params, lr=0.0), params=params, pc=pc,
                      lr=0.0, total=1, device=torch.device("cpu"), grad_clip=None,
                      on_non_finite=lambda loss, s: (_ for _ in ()).throw(RuntimeError("non-finite")))
    return float(train_step(setup, x, y, step=0, index=0, sums=RunningSums.zeros(len(setup.exits), setup.device)).detach())


def test_train_step_averages_the_exits_in_every_phase():
    model = build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=4, ic_after=[0, 2]).eval()
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        ce = [float(F.cross_entropy(o, y)) for o in model(x)]
    E = len(ce)
    assert _step_loss(model, 2, "mean", x, y) == pytest.approx(sum(ce) / E, rel=1e-5)
    assert _step_loss(model, 3, "mean", x, y) == pytest.approx(sum(ce[:-1]) / E, rel=1e-5)  # 1/E per IC
    assert _step_loss(model, 1, "mean", x, y) == pytest.approx(ce[-1], rel=1e-5)
    assert _step_loss(model, 2, "sum", x, y) == pytest.approx(sum(ce), rel=1e-5)
    assert _step_loss(model, 3, "sdn", x, y) == pytest.approx(sum(ce[:-1]), rel=1e-5)  # SDN's IC-only step


def test_sdn_steps_once_per_epoch_to_sdns_maxima():
    w = get_weighting("sdn")
    at = lambda E, epoch, epochs=3, progress=0.0: w.at(E, TrainingPoint(phase=2, epoch=epoch, epochs=epochs,  # noqa: E731
                                                                         progress=progress))
    # Two ICs, three epochs: 0.01 + e * tau / 3 in epoch e = 1, 2, 3, capped at tau = 0.15, 0.30.
    assert at(3, 0) == pytest.approx([0.01 + 0.05, 0.01 + 0.10, 1.0])
    assert at(3, 1) == pytest.approx([0.01 + 0.10, 0.01 + 0.20, 1.0])
    assert at(3, 2) == pytest.approx([0.15, 0.30, 1.0])
    # constant within an epoch, whatever the progress
    assert at(3, 1, progress=0.34) == at(3, 1, progress=0.66)
    # SDN's maxima 0.15 (k + 1) for any number of ICs, not spread to reach 0.9
    assert at(4, 2) == pytest.approx([0.15, 0.30, 0.45, 1.0])
    assert at(7, 9, epochs=10) == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
    assert at(1, 0) == [1.0]
    # phase 3: SDN's IC-only step sums the ICs' losses
    assert w.at(4, TrainingPoint(phase=3, epoch=0, epochs=3)) == [1.0] * 4
    # called without an epoch, the ramp is continuous in progress
    assert w(3, 0.0) == pytest.approx([0.01, 0.01, 1.0]) and w(3, 1.0) == pytest.approx([0.15, 0.30, 1.0])


def test_sdn_ramp_length_in_the_name():
    w = get_weighting("sdn:6")
    at = lambda epoch, epochs: w.at(3, TrainingPoint(phase=2, epoch=epoch, epochs=epochs))  # noqa: E731
    assert at(2, 3) == pytest.approx([0.01 + 3 * 0.15 / 6, 0.01 + 3 * 0.30 / 6, 1.0])
    assert at(2, 3) == at(2, 100)  # the phase's length (or early stopping) does not move the ramp
    assert at(5, 100) == pytest.approx([0.15, 0.30, 1.0])
    assert TrainConfig(weighting="sdn:6").loss_weighting == "sdn:6"
    for bad in ("sdn:0", "sdn:x", "sdn:", "sdn:1.5"):
        with pytest.raises(ValueError, match="sdn:EPOCHS"):
            get_weighting(bad)
        with pytest.raises(ConfigError, match="sdn:EPOCHS"):
            TrainConfig(weighting=bad)


@settings(max_examples=50, deadline=None)
@given(E=st.integers(1, 12), epochs=st.integers(1, 20), a=st.integers(0, 19), b=st.integers(0, 19))
def test_sdn_monotone_and_capped(E, epochs, a, b):
    w = get_weighting("sdn")
    lo, hi = sorted((a % epochs, b % epochs))
    wa, wb = (w.at(E, TrainingPoint(phase=2, epoch=e, epochs=epochs)) for e in (lo, hi))
    assert all(x <= y + 1e-12 for x, y in zip(wa, wb))  # non-decreasing over epochs
    assert all(0.01 < x <= 0.15 * (k + 1) + 1e-12 for k, x in enumerate(wb[:-1])) and wb[-1] == 1.0
    assert all(x <= y + 1e-12 for x, y in zip(wb[:-1], wb[1:-1]))  # deeper ICs never weigh less
    last = w.at(E, TrainingPoint(phase=2, epoch=epochs - 1, epochs=epochs))
    assert last[:-1] == pytest.approx([0.15 * (k + 1) for k in range(E - 1)])  # the maxima in the last epoch


def test_training_point_of_a_step():
    pc = PhaseConfig(epochs=3)
    setup = SimpleNamespace(phase=2, pc=pc, total=30)  # 10 steps per epoch
    assert training_point(setup, 0) == TrainingPoint(phase=2, epoch=0, epochs=3, progress=0.0)
    assert training_point(setup, 19) == TrainingPoint(phase=2, epoch=1, epochs=3, progress=19 / 30)
    assert training_point(setup, 29).epoch == 2


def test_the_loop_asks_with_phase_and_epoch(data):
    """The loop passes each step's phase and epoch to a weighting with ``at``: one set of weights per epoch."""
    seen = []

    class Recorder:
        def __call__(self, E, progress):
            raise AssertionError("the loop should call at()")

        def at(self, E, point):
            seen.append((point.phase, point.epoch, point.epochs))
            return [1.0 / E] * E

    register_weighting("recorder", Recorder())
    pc = PhaseConfig(epochs=2, lr=(0.05,))
    cfg = TrainConfig(phases=(pc, pc, pc), batch_size=32, device="cpu", weighting="recorder")
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=8, depth=3, ic_after=[0])
    train(model, data, regime="-++", config=cfg)
    assert sorted(set(seen)) == [(2, 0, 2), (2, 1, 2), (3, 0, 2), (3, 1, 2)]


def test_han_lines():
    up, down = get_weighting("han"), get_weighting("han-decreasing")
    assert up(4, 0.0) == pytest.approx([x / 4 for x in (0.6, 0.6 + 0.8 / 3, 0.6 + 1.6 / 3, 1.4)])
    assert down(4, 0.9) == pytest.approx(list(reversed(up(4, 0.0))))
    for w in (up, down):
        v = w(7, 0.7)
        assert sum(v) == pytest.approx(1.0)  # mean 1 before the division by E: the scale of "mean"
        assert sorted([v[0], v[-1]]) == pytest.approx([0.6 / 7, 1.4 / 7])
        assert w(1, 0.0) == [1.0]
    assert all(a < b for a, b in zip(up(5, 0.0), up(5, 0.0)[1:]))
    assert all(a > b for a, b in zip(down(5, 0.0), down(5, 0.0)[1:]))


def test_pabee_values():
    w = get_weighting("pabee")
    assert w(4, 0.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    v7 = w(7, 0.5)
    assert v7 == pytest.approx([(k + 1) / 28 for k in range(7)]) and sum(v7) == pytest.approx(1.0)


def test_gradient_equilibrium_weights():
    w = get_weighting("gradient-equilibrium")
    assert w(4, 0.2) == [1.0] * 4 and w(7, 0.9) == [1.0] * 7


@pytest.mark.parametrize("name", ["mean", "sum", "sdn", "sdn:4", "han", "han-decreasing", "pabee", "gradient-equilibrium"])
def test_bad_input(name):
    w = get_weighting(name)
    with pytest.raises(ValueError, match="num_exits"):
        w(0, 0.5)
    with pytest.raises(ValueError, match="progress"):
        w(3, 1.5)


# --- gradient equilibrium: closed form ------------------------------------------

class _Lin(nn.Module):
    def __init__(self, W):
        super().__init__()
        self.W = nn.Parameter(W.clone())

    def forward(self, x):
        return x @ self.W.T  # (B, out)


def _linear_model(D=3, C=2, seed=0):
    """Three bias-free linear stages, ICs after stages 0 and 1, the final head after stage 2."""
    g = torch.Generator().manual_seed(seed)
    Ws = [torch.randn(D, D, generator=g, dtype=torch.float64) for _ in range(3)]
    As = [torch.randn(C, D, generator=g, dtype=torch.float64) for _ in range(3)]
    heads = iter([_Lin(A) for A in As[:2]])
    model = MultiExitModel(stem=nn.Identity(), stages=[_Lin(W) for W in Ws], head=_Lin(As[2]), ic_after=[0, 1],
                           make_head=lambda fi, c: next(heads), feature_info=[{"num_chs": D}] * 3, num_classes=C)
    return model, Ws, As


def test_gradient_equilibrium_closed_form():
    """Linear losses L_k = sum(r_k * logits_k): every gradient can be written down by hand."""
    model, (W1, W2, W3), (A0, A1, A2) = _linear_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)  # (B, D)
    r = [torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3)]  # dL_k / dlogits_k
    with GradientEquilibrium().prepare(model):
        outs = model(x)
        sum((o * rk).sum() for o, rk in zip(outs, r)).backward()
    h0, h1 = x @ W1.T, x @ W1.T @ W2.T  # (B, D)
    # Gradients at the stage outputs, exit by exit: d L_k / d h_i = (upstream) r_k A_k W...
    d0 = r[0] @ A0  # exit 0 at h0
    d1_h1, d2_h2 = r[1] @ A1, r[2] @ A2
    d1_h0, d2_h1 = d1_h1 @ W2, d2_h2 @ W3
    d2_h0 = d2_h1 @ W2
    # Stage 0 feeds 3 exits, stage 1 feeds 2, stage 2 feeds 1: each gets the mean of its exits' gradients.
    gW1 = ((d0 + d1_h0 + d2_h0) / 3).T @ x
    gW2 = ((d1_h1 + d2_h1) / 2).T @ h0
    gW3 = d2_h2.T @ h1
    torch.testing.assert_close(model.stages[0].W.grad, gW1)
    torch.testing.assert_close(model.stages[1].W.grad, gW2)
    torch.testing.assert_close(model.stages[2].W.grad, gW3)
    # Head parameters keep their plain gradients (only the gradient into the state is rescaled).
    torch.testing.assert_close(model.heads[0].W.grad, r[0].T @ h0)
    torch.testing.assert_close(model.heads[1].W.grad, r[1].T @ h1)
    torch.testing.assert_close(model.heads[2].W.grad, r[2].T @ (h1 @ W3.T))
    # Without GE the stage-0 gradient is the sum, i.e. 3x the mean.
    model.zero_grad()
    outs = model(x)
    sum((o * rk).sum() for o, rk in zip(outs, r)).backward()
    torch.testing.assert_close(model.stages[0].W.grad, 3 * gW1)


def test_gradient_equilibrium_remove_and_subset():
    model, *_ = _linear_model()
    x = torch.randn(4, 3, dtype=torch.float64)

    def grads(exits=None, hooked=True):
        model.zero_grad()
        handle = GradientEquilibrium().prepare(model, exits=exits) if hooked else None
        outs = model(x, exits=exits)
        sum(o.square().sum() for o in outs).backward()
        if handle is not None:
            handle.remove()
        return [p.grad.clone() for p in model.stages.parameters()]

    plain = grads(hooked=False)
    grads()  # install and remove
    assert all(torch.equal(a, b) for a, b in zip(grads(hooked=False), plain))
    # Only the final exit trained (phase 1): nothing to balance, gradients unchanged.
    final_plain = grads(exits=[-1], hooked=False)
    final_ge = grads(exits=[-1])
    assert all(torch.equal(a, b) for a, b in zip(final_plain, final_ge))


def _per_exit_stage_grads(model, x):
    """d L_k / d theta for every backbone parameter, exit by exit (no hooks)."""
    params = [p for p in model.backbone_parameters() if p.requires_grad]
    outs = model(x)
    per = [torch.autograd.grad(o.square().sum(), params, retain_graph=True, allow_unused=True) for o in outs]
    return params, [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in per]


def test_gradient_equilibrium_mean_rule_on_mlp():
    """On a real backbone: each stage's gradient is the mean over the exits that depend on it."""
    model = build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=4, ic_after=[0, 2]).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    params, per = _per_exit_stage_grads(model, x)
    model.zero_grad()
    with GradientEquilibrium().prepare(model):
        sum(o.square().sum() for o in model(x)).backward()
    names = {id(p): n for n, p in model.named_parameters()}
    for j, p in enumerate(params):
        name = names[id(p)]
        if name.startswith("stages."):
            s = int(name.split(".")[1])
            deps = [k for k, e in enumerate(model.exit_after) if e >= s]
            expected = sum(per[k][j] for k in deps) / len(deps)
        else:  # the final head
            expected = per[-1][j]
        torch.testing.assert_close(p.grad, expected, msg=name)


@pytest.mark.parametrize("name", ["resnet20", "msdnet_cifar", "vit", "bert_tiny"])
def test_gradient_equilibrium_runs_on_backbones(name):
    """The hooks accept every state kind (tensor, list of scales, token dict) and change only gradients."""
    kw = {"bert_tiny": dict(num_classes=3)}.get(name, dict(num_classes=4, image_size=16))
    if name == "vit":
        kw.update(width=32, depth=3, num_heads=2)
    if name == "msdnet_cifar":
        kw.update(num_blocks=3)
    model = build_model(name, **kw)
    model.eval()  # no dropout: the two forwards must agree
    x = model.example_input(2) if name == "bert_tiny" else torch.randn(2, 3, 16, 16)
    ref = [o.detach() for o in model(x)]
    with GradientEquilibrium().prepare(model):
        outs = model(x)
        sum(o.sum() for o in outs).backward()
    assert all(torch.equal(a, b.detach()) for a, b in zip(ref, outs))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.stages[0].parameters())


def _stage_output_grads(model, x, loss_of):
    """Gradients reaching each tensor of the state after stage 0 (a list of scales for MSDNet)."""
    kept = []

    def keep(module, args, out):
        for t in out:
            t.retain_grad()
        kept.extend(out)

    h = model.stages[0].register_forward_hook(keep)
    try:
        loss_of(model(x)).backward()
    finally:
        h.remove()
    return [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in kept]


def test_gradient_equilibrium_on_msdnet_rescales_only_the_coarsest_scale():
    """IMTA on MSDNet: the classifiers read the coarsest scale, and only its gradient is averaged over the exits;
    the finer scales, read by the next block alone, keep their plain gradients."""
    torch.manual_seed(0)
    model = build_model("msdnet_cifar", num_classes=4, image_size=16, num_blocks=2).double().eval()  # one IC, the final head
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    r = [torch.randn(2, 4, dtype=torch.float64) for _ in range(2)]
    own = [_stage_output_grads(model, x, lambda outs, k=k: (outs[k] * r[k]).sum()) for k in range(2)]  # per exit
    with GradientEquilibrium().prepare(model):
        ge = _stage_output_grads(model, x, lambda outs: sum((o * rk).sum() for o, rk in zip(outs, r)))
    *finer, coarse = range(len(ge))
    assert finer  # MSDNet's state after the first block holds several scales
    torch.testing.assert_close(ge[coarse], (own[0][coarse] + own[1][coarse]) / 2)  # the mean over the two exits
    for s in finer:
        assert own[0][s].abs().sum() == 0  # the IC does not read the finer scales
        torch.testing.assert_close(ge[s], own[1][s])  # plain gradient, not halved
    # the old rule (the whole state rescaled) would have halved the finer scales' gradients
    assert any(own[1][s].abs().sum() > 0 for s in finer)
    assert model.map_ic_input([1, 2, 3], lambda t: -t) == [1, 2, -3]


def test_rewired_models_keep_what_their_ics_read():
    from earlyexit.methods import ztw

    msd = ztw.apply(build_model("msdnet_cifar", num_classes=4, image_size=16, num_blocks=2))
    assert msd.map_ic_input(["fine", 1.0], lambda t: 2 * t) == ["fine", 2.0]
    plain = ztw.apply(build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=3))
    assert plain.map_ic_input(1.0, lambda t: 2 * t) == 2.0
