"""Tests of the gradient cosines (Figure 4), the connectivity plane (Figure 2) and the landscape options.

Cosines are checked against plain per-exit ``backward()`` passes, the plane
against each model's own loss after the same BatchNorm re-estimation, and the
models are checked to come back unchanged.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.analysis import (connectivity_plane, exit_losses, gradient_cosine_record, gradient_cosines,
                                loss_surface, plane_basis, random_direction, reset_bn, shared_parameters)

NUM_CLASSES = 3


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3)


def _resnet(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=NUM_CLASSES, in_chans=1, image_size=8)


def _batches(n_batches: int = 2, size: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (size,), generator=g))
            for _ in range(n_batches)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _manual_cosines(model, x, y, weights):
    """cos(g_k, sum_j g_j) from one plain backward() per exit (train mode, stem + stages)."""
    params = [p for m in (model.stem, *model.stages) for p in m.parameters()]
    grads = []
    for k, w in enumerate(weights):
        m = copy.deepcopy(model).train()
        loss = w * F.cross_entropy(m(x)[k], y)
        loss.backward()
        mp = [p for mm in (m.stem, *m.stages) for p in mm.parameters()]
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in mp]
        grads.append(torch.cat(flat).double())
    assert len(grads[0]) == sum(p.numel() for p in params)
    total = sum(grads)
    return [float(g @ total / (g.norm() * total.norm())) for g in grads]


# --- gradient cosines ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [_mlp, _resnet])
def test_gradient_cosines_match_plain_backward_and_leave_the_model_alone(make):
    model = make()
    (x, y), = _batches(1)
    for p in model.backbone_parameters():  # frozen, as in phase 3: measured all the same, flags restored
        p.requires_grad_(False)
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    before = _state(model)
    weights = [0.2, 0.3, 0.5]
    cos = gradient_cosines(model, x, y, weights=weights)
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert _same(before, _state(model))  # weights and BatchNorm statistics untouched
    for p in model.backbone_parameters():
        p.requires_grad_(True)
    assert cos == pytest.approx(_manual_cosines(model, x, y, weights), abs=1e-5)
    assert all(-1.0 <= c <= 1.0 for c in cos)
    default = gradient_cosines(model, x, y)
    assert default == pytest.approx(_manual_cosines(model, x, y, [1 / 3] * 3), abs=1e-5)


class _Detached(nn.Module):
    """An IC head that reads the backbone's state without passing gradients back."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head(x.detach())


def test_exits_without_a_backbone_gradient_are_none():
    model = _mlp()
    (x, y), = _batches(1)
    model.heads[0] = _Detached(model.heads[0])
    cos = gradient_cosines(model, x, y)
    assert cos[0] is None and cos[1] is not None and cos[2] is not None
    only = gradient_cosines(model, x, y, weights=[1.0, 0.0, 0.0])  # the one live exit does not reach: all None
    assert only == [None, None, None]
    alone = gradient_cosines(model, x, y, weights=[0.0, 0.0, 2.0])
    assert alone[:2] == [None, None] and alone[2] == pytest.approx(1.0, abs=1e-9)
    rec = gradient_cosine_record(model, x, y, phase=2, epoch=1, step=5)
    assert rec == {"phase": 2, "epoch": 1, "step": 5, "cos": cos}
    with pytest.raises(ValueError, match="one value per exit"):
        gradient_cosines(model, x, y, weights=[1.0])
    assert len(shared_parameters(model, include_final_head=True)) == len(shared_parameters(model)) + 2


@settings(max_examples=10, deadline=None)
@given(w=st.lists(st.floats(0.05, 5.0), min_size=3, max_size=3), c=st.floats(0.1, 10.0))
def test_cosines_do_not_change_when_all_weights_scale(w, c):
    model = _mlp()
    (x, y), = _batches(1, 8)
    a = gradient_cosines(model, x, y, weights=w, train_mode=False)
    b = gradient_cosines(model, x, y, weights=[c * v for v in w], train_mode=False)
    assert a == pytest.approx(b, abs=1e-6)


# --- connectivity plane ----------------------------------------------------------------------

def _own_loss(model, batches, bn):
    m = copy.deepcopy(model)
    reset_bn(m, bn)
    return exit_losses(m, batches)[0]


def test_plane_points_of_the_models_carry_their_own_losses_mlp():
    pytest.importorskip("scipy")
    ref, a, b = _mlp(0), _mlp(1), _mlp(2)
    states = [_state(m) for m in (ref, a, b)]
    batches = _batches()
    w = [0.5, 0.25, 0.25]
    out = connectivity_plane(ref, a, b, batches, steps=5, weights=w)
    assert all(_same(s, _state(m)) for s, m in zip(states, (ref, a, b)))  # inputs untouched
    assert out["loss"].shape == (5, 5) and out["exit_loss"].shape == (3, 5, 5) and out["matched"]
    la = out["coords"]["a"][0]
    assert out["coords"]["ref"] == (0.0, 0.0) and out["coords"]["a"][1] == 0.0 and out["coords"]["b"][1] > 0
    assert out["xs"][1] == 0.0 and out["xs"][3] == pytest.approx(la) and out["ys"][1] == 0.0
    for name, model in (("ref", ref), ("a", a), ("b", b)):
        own = exit_losses(model, batches)[0]
        assert out["models"][name]["exit_loss"] == pytest.approx(own.tolist(), abs=1e-5)
        assert out["models"][name]["loss"] == pytest.approx(float(torch.tensor(w, dtype=torch.float64) @ own), abs=1e-5)
    assert torch.allclose(out["exit_loss"][:, 1, 1], exit_losses(ref, batches)[0], atol=1e-6)  # grid node (0, 0)
    assert torch.allclose(out["exit_loss"][:, 3, 1], exit_losses(a, batches)[0], atol=1e-5)  # grid node (|a|, 0)
    assert torch.allclose(out["loss"], torch.einsum("k,kij->ij", torch.tensor(w, dtype=torch.float64),
                                                    out["exit_loss"]))
    plain = connectivity_plane(ref, a, b, batches, steps=2, span=(0.0, 1.0), match=False)
    assert not plain["matched"] and plain["coords"]["a"][0] > la  # matching brings a closer to ref


def test_plane_reestimates_batchnorm_at_every_point():
    pytest.importorskip("scipy")
    ref, a, b = _resnet(0), _resnet(1), _resnet(2)
    batches, bn = _batches(1), _batches(1, seed=5)
    out = connectivity_plane(ref, a, b, batches, steps=2, span=(0.0, 1.0), bn_batches=bn)
    for name, model in (("ref", ref), ("a", a), ("b", b)):
        assert out["models"][name]["exit_loss"] == pytest.approx(_own_loss(model, batches, bn).tolist(), abs=1e-4)
    assert torch.allclose(out["exit_loss"][:, 0, 0], _own_loss(ref, batches, bn), atol=1e-6)
    assert not torch.allclose(out["exit_loss"][:, 0, 0], exit_losses(ref, batches)[0], atol=1e-3)  # stats did move


def test_plane_basis_is_orthonormal_and_rejects_a_line():
    ref, a, b = _mlp(0), _mlp(1), _mlp(2)
    basis = plane_basis(ref, a, b)
    u, v = basis["u"], basis["v"]
    assert float(u.norm()) == pytest.approx(1.0) and float(v.norm()) == pytest.approx(1.0)
    assert abs(float(u @ v)) < 1e-12
    theta_b = basis["origin"] + basis["coords"]["b"][0] * u + basis["coords"]["b"][1] * v
    assert torch.allclose(theta_b, torch.cat([p.detach().flatten().double() for p in b.parameters()]), atol=1e-9)
    with pytest.raises(ValueError, match="collinear"):
        plane_basis(ref, a, a)
    with pytest.raises(ValueError, match="same weights"):
        plane_basis(ref, ref, a)


# --- loss landscape options ----------------------------------------------------------------------

def test_loss_surface_total_and_uniform_directions():
    model = _mlp()
    batches = _batches(1)
    base = loss_surface(model, batches, steps=(3, 3), span=0.5)
    same = loss_surface(model, batches, steps=(3, 3), span=0.5, direction="gaussian")
    assert torch.equal(base["loss"], same["loss"]) and base["direction"] == "gaussian"
    assert torch.allclose(base["total"], base["loss"].mean(0))
    w = [1.0, 0.0, 2.0]
    weighted = loss_surface(model, batches, steps=(3, 3), span=0.5, weights=w)
    assert torch.allclose(weighted["total"], base["loss"][0] + 2 * base["loss"][2])
    part = loss_surface(model, batches, steps=3, exits=[-1], weights=w)
    assert torch.allclose(part["total"], 2 * part["loss"][0])
    uni = loss_surface(model, batches, steps=(3, 3), span=0.5, direction="uniform")
    assert torch.equal(uni["loss"][:, 1, 1], base["loss"][:, 1, 1])  # the centre is the model either way
    assert not torch.equal(uni["loss"][:, 0, 0], base["loss"][:, 0, 0])
    with pytest.raises(ValueError, match="direction"):
        loss_surface(model, batches, steps=3, direction="sphere")
    with pytest.raises(ValueError, match="weights"):
        loss_surface(model, batches, steps=3, weights=[1.0])


def test_uniform_directions_are_non_negative_and_filter_normalised():
    model = _resnet()
    d = random_direction(model, generator=torch.Generator().manual_seed(0), distribution="uniform")
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.all(d[name] == 0)
        else:
            assert torch.all(d[name] >= 0)
            assert torch.allclose(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-5)
