"""Loss weightings: each scheme's values, and gradient equilibrium against its closed form."""


import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.models import MultiExitModel
from earlyexit.training import GradientEquilibrium, get_weighting, list_weightings, register_weighting


def test_registry():
    assert {"uniform", "sdn", "han", "pabee", "gradient-equilibrium"} <= set(list_weightings())
    with pytest.raises(ValueError, match="unknown weighting"):
        get_weighting("nope")
    register_weighting("double", lambda E, p: [2.0] * E)
    assert get_weighting("double")(3, 0.0) == [2.0] * 3


def test_uniform():
    assert get_weighting("uniform")(4, 0.3) == [1.0] * 4


def test_sdn_values():
    w = get_weighting("sdn")
    # Seven exits = six ICs: SDN's own maxima 0.15 ... 0.9.
    assert w(7, 1.0) == pytest.approx([0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0])
    assert w(7, 0.0) == pytest.approx([0.01] * 6 + [1.0])
    # Halfway: 0.01 + 0.5 * tau, below tau for every IC.
    assert w(7, 0.5) == pytest.approx([0.01 + 0.5 * t for t in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)] + [1.0])
    # Three ICs: maxima spread evenly up to 0.9.
    assert w(4, 1.0) == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert w(4, 0.25) == pytest.approx([0.01 + 0.075, 0.01 + 0.15, 0.01 + 0.225, 1.0])
    assert w(1, 0.5) == [1.0]


@settings(max_examples=50, deadline=None)
@given(E=st.integers(1, 12), p=st.floats(0, 1), q=st.floats(0, 1))
def test_sdn_monotone_and_capped(E, p, q):
    w = get_weighting("sdn")
    lo, hi = (p, q) if p <= q else (q, p)
    a, b = w(E, lo), w(E, hi)
    assert all(x <= y + 1e-12 for x, y in zip(a, b))  # non-decreasing in progress
    assert all(0.01 - 1e-12 <= x <= 0.9 + 1e-12 for x in b[:-1]) and b[-1] == 1.0
    assert all(x <= y + 1e-12 for x, y in zip(b[:-1], b[1:-1]))  # deeper ICs never weigh less


def test_han_values():
    w = get_weighting("han")
    assert w(4, 0.0) == pytest.approx([0.6, 0.6 + 0.8 / 3, 0.6 + 1.6 / 3, 1.4])
    v7 = w(7, 0.7)
    assert v7 == pytest.approx([0.6 + 0.8 * k / 6 for k in range(7)])
    assert sum(v7) / 7 == pytest.approx(1.0) and v7[0] == pytest.approx(0.6) and v7[-1] == pytest.approx(1.4)
    assert w(1, 0.0) == [1.0]


def test_pabee_values():
    w = get_weighting("pabee")
    assert w(4, 0.0) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    v7 = w(7, 0.5)
    assert v7 == pytest.approx([(k + 1) / 28 for k in range(7)]) and sum(v7) == pytest.approx(1.0)


def test_gradient_equilibrium_weights():
    w = get_weighting("gradient-equilibrium")
    assert w(4, 0.2) == [1.0] * 4 and w(7, 0.9) == [1.0] * 7


@pytest.mark.parametrize("name", ["uniform", "sdn", "han", "pabee", "gradient-equilibrium"])
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
    model = MultiExitModel(stem=nn.Identity(), stages=[_Lin(W) for W in Ws], head=_Lin(As[2]), exits=[0, 1],
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
    model = build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=4, exits=[0, 2]).double()
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
