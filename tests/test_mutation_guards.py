"""Tests that fail under four kinds of careless change that slipped past the rest of the suite (issue 22).

1. An analysis parameter silently ignored: every public parameter of ``earlyexit.analysis`` (rank,
   information, noisy information, per-layer rank, connectivity, landscape, gradients, cosines, plane) must
   change the output the way its definition says. Each test compares against the definition computed
   directly, with a value of the parameter that gives another answer than its default, so a function that
   dropped the parameter (kept the default) fails.
2. A layout claimed but not checked on every path: with ``memory_format="channels_last"`` every image batch
   that reaches the model in training (the step, the validation, the gradient probe) is channels-last; with
   ``"contiguous"`` none is.
3. A float guard dropped from one of two twins: both budget tables (the paper's Table 1 rule and each run's
   best within budget) count a point whose cost equals the budget up to float rounding.
4. A lock that is only half a lock: the OS lock (``flock``) of ``rundir.RunLock`` refuses a second owner on its
   own, whatever the pid file says (a dead pid, none yet), and ``compare`` (which takes the lock without
   ``run``'s pre-check) is refused too.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.analysis import (apply_permutation, binned_entropy, connectivity_plane, effective_rank,
                                exit_gradient_norms, exit_losses, feature_subset, filter_normalized_direction,
                                gradient_cosines, gradient_dominance, interpolate, interpolate_state,
                                interpolation_path, layer_information, layer_ranks, loss_surface,
                                mean_gradient_norms, mi_xz, mutual_information, numerical_rank, permutation_spec,
                                random_direction, random_projection, rank_from_gram, reset_bn, stage_features,
                                stage_information, stage_ranks, weight_matching)
from earlyexit.analysis.information import bin_codes
from earlyexit.analysis.rank import singular_values
from earlyexit.models.multiexit import MultiExitModel

NUM_CLASSES = 3
dg = torch.special.digamma


# --- tiny models and data -------------------------------------------------------------------------

class _Tokens(nn.Module):
    """A stem that turns ``(B, T, D)`` inputs into a BERT-like dict state (``pool`` then matters)."""

    def forward(self, x):
        return {"hidden": x, "mask": torch.ones(x.shape[:2], dtype=torch.long)}


class _Pool(nn.Module):
    def forward(self, s):
        return (s["hidden"][:, 0] if isinstance(s, dict) else s.flatten(1))


def _identity_model(width: int, *, tokens: bool = False) -> MultiExitModel:
    """Two identity stages (an IC after the first): the features of both exits are the input itself."""
    head = lambda fi, c: nn.Sequential(_Pool(), nn.Linear(width, c))  # noqa: E731
    return MultiExitModel(stem=_Tokens() if tokens else nn.Identity(), stages=[nn.Identity(), nn.Identity()],
                          head=head(None, NUM_CLASSES), ic_after=[0], make_head=head, feature_info=[{}, {}],
                          num_classes=NUM_CLASSES)


def _conv_model(in_chans: int = 1, seed: int = 0) -> MultiExitModel:
    """A tiny conv net with BatchNorm: stem, two conv-BN-ReLU stages, an IC after the first."""
    torch.manual_seed(seed)

    def block():
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def head(fi, c):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, c))

    model = MultiExitModel(stem=nn.Conv2d(in_chans, 4, 3, padding=1), stages=[block(), block()],
                           head=head(None, NUM_CLASSES), ic_after=[0], make_head=head, feature_info=[{}, {}],
                           num_classes=NUM_CLASSES)
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():  # non-trivial running statistics: eval and train mode then differ
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.5 * torch.randn(4, generator=g))
            m.running_var.copy_(0.5 + torch.rand(4, generator=g))
    return model


def _mlp(seed: int = 0) -> MultiExitModel:
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3)


def _images(n_batches: int = 2, size: int = 8, seed: int = 0, shift: float = 0.0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g) + shift, torch.randint(0, NUM_CLASSES, (size,), generator=g))
            for _ in range(n_batches)]


def _split(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _with_singular_values(n: int, d: int, s: list[float], seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """An ``(n, d)`` matrix whose singular values are exactly ``s`` (up to rounding)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(d, len(s), generator=g, dtype=torch.float64)).Q
    return ((u * torch.tensor(s, dtype=torch.float64)) @ v.T).to(dtype)


def _hooked_outputs(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Every Conv2d / Linear output of the backbone (IC heads left out), ``(N, d)``, gathered the plain way."""
    from earlyexit.analysis import backbone_layers

    got: dict[str, list] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: got.setdefault(n, []).append(o.detach().flatten(1)))
               for n, m in backbone_layers(model)]
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def _differs(a, b) -> bool:
    return not torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                              rtol=1e-9, atol=1e-12)


# ==================================================================================================
# 1. Every analysis parameter changes the output
# ==================================================================================================

# --- rank ------------------------------------------------------------------------------------------

def test_numerical_rank_tolerance_follows_the_dtype_and_centring():
    x64 = torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64))
    assert numerical_rank(x64) == 2  # 2 * eps(float64) * s_max is far below 1e-9
    assert numerical_rank(x64.float()) == 1  # 2 * eps(float32) * s_max = 2.4e-7 is above it
    x = _with_singular_values(12, 6, [10.0, 1.0, 0.01])
    assert numerical_rank(x) == 3 and numerical_rank(x, rtol=0.05) == 2 and numerical_rank(x, rtol=0.5) == 1
    assert numerical_rank(x, tol=0.5) == 2 and numerical_rank(x, tol=5.0) == 1 and numerical_rank(x, tol=20.0) == 0
    offset = 3.0 + _with_singular_values(12, 6, [2.0, 1.0])  # a constant row added: one more direction
    assert numerical_rank(offset) == 3 and numerical_rank(offset, center=True) == 2
    s = singular_values(offset, center=True)
    assert torch.allclose(s, torch.linalg.svdvals(offset - offset.mean(0)), atol=1e-12)
    assert torch.allclose(singular_values(offset, exact=False), torch.linalg.svdvals(offset), atol=1e-6)  # Gram route
    assert _differs(singular_values(offset), s)


def test_effective_rank_centres_when_asked():
    g = torch.Generator().manual_seed(0)
    x = 50.0 + torch.randn(20, 5, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    want = float(torch.exp(-(p * p.log()).sum()))
    assert effective_rank(x, center=True) == pytest.approx(want, rel=1e-9)
    assert effective_rank(x) < 1.5 < 4.0 < want  # raw: the constant dominates; centred: five similar directions


def test_stage_ranks_pass_every_parameter_on():
    x = _with_singular_values(12, 6, [10.0, 1.0, 0.01]).float()
    y = torch.arange(12) % NUM_CLASSES
    model, b = _identity_model(6), _split(x, y, 5)
    assert stage_ranks(model, b) == [3, 3]
    assert stage_ranks(model, b, rtol=0.05) == [2, 2]
    assert stage_ranks(model, b, tol=5.0) == [1, 1]
    assert stage_ranks(model, b, max_samples=1) == [1, 1]
    eff = stage_ranks(model, b, kind="effective")
    assert eff == [pytest.approx(effective_rank(x), rel=1e-9)] * 2 and eff[0] < 2.0
    off = 3.0 + _with_singular_values(12, 6, [2.0, 1.0]).float()
    ob = _split(off, y, 5)
    assert stage_ranks(model, ob) == [3, 3] and stage_ranks(model, ob, center=True) == [2, 2]
    # dict states: [CLS] is one direction for every sample, the mean over tokens spans all six
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(12, 3, 6, generator=g)
    tokens[:, 0] = torch.randn(12, 1, generator=g) * torch.randn(1, 6, generator=g)
    tm, tb = _identity_model(6, tokens=True), _split(tokens, y, 5)
    assert stage_ranks(tm, tb) == [1, 1] and stage_ranks(tm, tb, pool="mean") == [6, 6]
    feats = stage_features(tm, tb, pool="mean", max_samples=7)["features"][0]
    assert feats.shape == (7, 6) and torch.allclose(feats, tokens[:7].mean(1))


# --- information -----------------------------------------------------------------------------------

def test_projection_dimension_and_seed():
    f = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    p = random_projection(f, 3, seed=1)
    assert p.shape == (10, 3) and torch.equal(p, random_projection(f, 3, seed=1))
    assert _differs(p, random_projection(f, 3, seed=2))
    w = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / math.sqrt(3)
    assert torch.allclose(p, f.double() @ w)
    assert torch.equal(random_projection(f, None), f.double()) and torch.equal(random_projection(f, 8), f.double())


def test_bins_set_the_binned_entropy():
    x = torch.arange(64, dtype=torch.float64)[:, None]  # 64 distinct, evenly spaced values
    for bins in (1, 2, 8, 64):
        assert binned_entropy(x, bins=bins) == pytest.approx(math.log(bins), abs=1e-12)
        assert int(bin_codes(x, bins).max()) == bins - 1
    assert binned_entropy(x) == pytest.approx(math.log(30), abs=0.05)  # default 30 bins: uneven counts


def _psi(v: float) -> float:
    return float(dg(torch.tensor(float(v), dtype=torch.float64)))


def _ross(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """Ross (2014), literally, for data without singleton classes or distance ties."""
    n = len(y)
    d = torch.cdist(x.double(), x.double())
    total = 0.0
    for i in range(n):
        same = [j for j in range(n) if j != i and y[j] == y[i]]
        kc = min(k, len(same))
        r = sorted(float(d[i, j]) for j in same)[kc - 1]
        m = sum(1 for j in range(n) if j != i and float(d[i, j]) <= r)
        total += _psi(kc) - _psi(m) - _psi(len(same) + 1)
    return max(0.0, _psi(n) + total / n)


def _ksg(x: torch.Tensor, z: torch.Tensor, k: int) -> float:
    """Kraskov et al. (2004), algorithm 1 (max-norm), literally."""
    n = len(x)
    dx, dz = torch.cdist(x.double(), x.double(), p=float("inf")), torch.cdist(z.double(), z.double(), p=float("inf"))
    total = 0.0
    for i in range(n):
        eps = sorted(max(float(dx[i, j]), float(dz[i, j])) for j in range(n) if j != i)[k - 1]
        nx = sum(1 for j in range(n) if j != i and float(dx[i, j]) < eps)
        nz = sum(1 for j in range(n) if j != i and float(dz[i, j]) < eps)
        total += _psi(nx + 1) + _psi(nz + 1)
    return max(0.0, _psi(k) + _psi(n) - total / n)


def test_mutual_information_parameters():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(30) % NUM_CLASSES
    f = torch.randn(30, 4, generator=g, dtype=torch.float64) + 1.5 * torch.nn.functional.one_hot(y, 4).double()
    ross = {k: _ross(f, y, k) for k in (1, 3, 6)}
    assert len({round(v, 6) for v in ross.values()}) == 3  # k matters on this data
    for k, want in ross.items():
        assert mutual_information(f, y, k=k) == pytest.approx(want, abs=1e-9), k
    assert mutual_information(f, y) == pytest.approx(ross[3], abs=1e-9)  # default k = 3
    # dim / seed: the estimate of the seeded projection
    for dim, seed in ((2, 0), (2, 5), (1, 0)):
        want = mutual_information(random_projection(f, dim, seed=seed), y, seed=seed)
        assert mutual_information(f, y, dim=dim, seed=seed) == pytest.approx(want, abs=1e-12)
    assert len({round(mutual_information(f, y, dim=2, seed=s), 9) for s in (0, 5)} |
               {round(mutual_information(f, y), 9)}) == 3
    # bins: one bin knows nothing; a bin per sample knows the label (T determines Y)
    line = torch.arange(30, dtype=torch.float64)[:, None]
    h_y = math.log(NUM_CLASSES)
    assert mutual_information(line, y, method="binning", bins=1) == 0.0
    assert mutual_information(line, y, method="binning", bins=30) == pytest.approx(h_y, abs=1e-12)
    assert 0.0 < mutual_information(line, y, method="binning", bins=4) < h_y - 0.1
    # continuous targets: KSG with its k, and the target projected with its own seed
    z = f[:, :2] + 0.5 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    ksg = {k: _ksg(f, z, k) for k in (1, 4)}
    assert abs(ksg[1] - ksg[4]) > 1e-3
    for k, want in ksg.items():
        assert mutual_information(f, z, k=k) == pytest.approx(want, abs=1e-9), k
    want = mutual_information(random_projection(f, 1, seed=2), random_projection(z, 1, seed=2 + 7919), seed=2)
    assert mutual_information(f, z, dim=1, seed=2) == pytest.approx(want, abs=1e-12)
    assert mutual_information(f, z, method="binning", bins=2) != mutual_information(f, z, method="binning", bins=5)


def test_stage_information_passes_every_parameter_on():
    g = torch.Generator().manual_seed(0)
    n = 40
    y = torch.arange(n) % NUM_CLASSES
    tokens = torch.randn(n, 2, 6, generator=g)
    tokens[:, 0, :NUM_CLASSES] += 2.0 * torch.nn.functional.one_hot(y, NUM_CLASSES)  # [CLS] knows the label
    model, b = _identity_model(6, tokens=True), _split(tokens, y, 16)

    def direct(method="knn", max_samples=1024, dim=32, k=3, bin_dim=4, bins=8, seed=0, pool="cls"):
        got = stage_features(model, b, max_samples=max_samples, pool=pool)
        f, lab = got["features"][0], got["labels"]
        if method == "knn":
            i_ty = mutual_information(f, lab, method="knn", k=k, dim=dim, seed=seed)
        else:
            i_ty = mutual_information(f, lab, method="binning", bins=bins, dim=bin_dim, seed=seed)
        return i_ty, binned_entropy(random_projection(f, bin_dim, seed=seed), bins=bins)

    base = direct()
    got = stage_information(model, b)
    assert [(r["I_TY"], r["I_XT"]) for r in got] == [pytest.approx(base, abs=1e-12)] * 2
    p = torch.bincount(y).double() / n
    assert got[0]["H_Y"] == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    for kw in ({"method": "binning"}, {"max_samples": 12}, {"dim": 2}, {"k": 1}, {"bin_dim": 1}, {"bins": 3},
               {"seed": 4}, {"pool": "mean"}):
        want = direct(**kw)
        assert _differs(want, base), f"{kw} does not change the answer on this data: the test would be vacuous"
        assert stage_information(model, b, **kw)[0]["I_TY"] == pytest.approx(want[0], abs=1e-12), kw
        assert stage_information(model, b, **kw)[1]["I_XT"] == pytest.approx(want[1], abs=1e-12), kw


# --- Gaussian-noise I(X; Z) ------------------------------------------------------------------------

def test_mi_xz_falls_as_sigma_grows_from_log_n_to_zero():
    n = 16
    f = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))  # spread ~1
    sigmas = [1e-3, 0.3, 1.0, 3.0, 10.0, 1e3]
    for method in ("mc", "jensen"):
        vals = [mi_xz(f, sigma=s, method=method) for s in sigmas]
        assert all(a > b for a, b in zip(vals, vals[1:])), (method, vals)
        assert abs(vals[-1]) < 1e-3, method  # sigma far above the spread: Z forgets X
        assert vals[0] >= math.log(n) - 1e-6, method  # sigma far below the spread: every sample recognisable
        # the same answer for the same features and noise in other units
        assert mi_xz(7.0 * f, sigma=7.0, method=method) == pytest.approx(mi_xz(f, sigma=1.0, method=method), abs=1e-6)
    assert mi_xz(f, sigma=1e-3, method="mc") == pytest.approx(math.log(n), abs=1e-6)
    # seed: another noise draw, another estimate; ref_size: the reference subset
    assert mi_xz(f, sigma=1.0, method="mc", seed=1) != mi_xz(f, sigma=1.0, method="mc", seed=0)
    want = (4 * math.log(4) + (n - 4) * math.log(5)) / n  # 4 samples in R: log 4; the others add their own: log 5
    assert mi_xz(f, sigma=1e-3, method="mc", ref_size=4) == pytest.approx(want, abs=1e-6)


def test_layer_information_passes_every_parameter_on():
    model, batches = _mlp(), _images(3, 16)
    full = _hooked_outputs(model, batches)

    def direct(layer, sigma=0.5, method="jensen", ref_size=None, n_features=6000, max_samples=1024, seed=0, bins=8,
               bin_dim=4):
        f = full[layer][:max_samples]
        idx = feature_subset(layer, f.shape[1], n_features, seed)
        f = f if idx is None else f[:, idx]
        if method == "binning":
            return binned_entropy(random_projection(f, bin_dim, seed=seed), bins=bins)
        return mi_xz(f, sigma=sigma, method=method, ref_size=ref_size, seed=seed)

    layer = "stages.1.0"
    rows = layer_information(model, batches, sigma=0.5)
    assert {r["layer"]: r["mi"] for r in rows} == {k: pytest.approx(direct(k), abs=1e-9) for k in full}
    cases = [({"sigma": 2.0}, {}), ({"method": "mc"}, {}), ({"ref_size": 5}, {}), ({"n_features": 5}, {}),
             ({"max_samples": 20}, {}), ({"seed": 3, "n_features": 5}, {"n_features": 5}),  # the column subset
             ({"seed": 3, "method": "mc"}, {"method": "mc"}),  # the noise draw
             ({"seed": 3, "ref_size": 5}, {"ref_size": 5}),  # the reference subset
             ({"method": "binning"}, {}), ({"method": "binning", "bins": 3}, {"method": "binning"}),
             ({"method": "binning", "bin_dim": 2}, {"method": "binning"})]
    for kw, ref in cases:
        want = direct(layer, **kw)
        assert _differs(want, direct(layer, **ref)), f"{kw} does not change the answer here: the test would be vacuous"
        args = {"sigma": 0.5, **kw}
        (row,) = layer_information(model, batches, layers=[layer], **args)
        assert row["layer"] == layer and row["mi"] == pytest.approx(want, abs=1e-9), kw
    with pytest.raises(ValueError, match="one-shot"):  # max_bytes is the pass budget: one layer per pass here
        layer_information(model, iter(batches), sigma=0.5, max_bytes=1)


# --- per-layer rank --------------------------------------------------------------------------------

def test_rank_from_gram_uses_n_rtol_and_eps():
    x = torch.tensor([[1.0, 0.0], [0.0, 1e-4]], dtype=torch.float64)
    g = x.T @ x
    assert rank_from_gram(g, 2) == 2  # default rtol = max(n, k) * eps(float32) = 2.4e-7
    assert rank_from_gram(g, 1000) == 1  # 1000 * 1.2e-7 = 1.2e-4 > 1e-4
    assert rank_from_gram(g, 2, eps=torch.finfo(torch.float16).eps) == 1  # 2 * 9.8e-4
    assert rank_from_gram(g, 2, rtol=1e-5) == 2 and rank_from_gram(g, 2, rtol=1e-3) == 1
    assert rank_from_gram(torch.eye(3, dtype=torch.float64), 2) == 2  # never above the number of rows


def test_layer_ranks_pass_every_parameter_on():
    model, batches = _mlp(), _images(3, 16)
    with torch.no_grad():  # units 0-7 of the first layer are dead: a column subset's rank counts its live columns
        model.stages[0][0].weight[:8] = 0
        model.stages[0][0].bias[:8] = 0
    full = _hooked_outputs(model, batches)

    def direct(layer, n_features=6000, seed=0, center=False, rtol=None, max_samples=None):
        f = full[layer][:max_samples].double()
        idx = feature_subset(layer, f.shape[1], n_features, seed)
        f = f if idx is None else f[:, idx]
        if center:
            f = f - f.mean(0)
        s = torch.linalg.svdvals(f)
        rtol = max(f.shape) * torch.finfo(torch.float32).eps if rtol is None else rtol
        return int((s > rtol * s.max()).sum())

    rows = layer_ranks(model, batches)
    assert {r["layer"]: r["rank"] for r in rows} == {k: direct(k) for k in full}
    layer = "stages.0.0"
    assert direct(layer) == 8
    cases = [({"n_features": 5}, {}), ({"seed": 3, "n_features": 6}, {"n_features": 6}), ({"rtol": 0.7}, {}),
             ({"max_samples": 5}, {}), ({"center": True, "max_samples": 5}, {"max_samples": 5})]
    for kw, ref in cases:
        want = direct(layer, **kw)
        assert want != direct(layer, **ref), f"{kw} does not change the rank here: the test would be vacuous"
        (row,) = layer_ranks(model, batches, layers=[layer], **kw)
        assert row["rank"] == want, kw
    with pytest.raises(ValueError, match="one-shot"):
        layer_ranks(model, iter(batches), max_bytes=1)


# --- connectivity ----------------------------------------------------------------------------------

def test_reset_bn_uses_num_batches():
    bn = nn.Sequential(nn.BatchNorm1d(3))
    batches = [(torch.randn(8, 3, generator=torch.Generator().manual_seed(i)) + 10.0 * i, None) for i in range(3)]
    reset_bn(bn, batches, num_batches=1)
    assert torch.allclose(bn[0].running_mean, batches[0][0].mean(0), atol=1e-5)
    assert torch.allclose(bn[0].running_var, batches[0][0].var(0), atol=1e-5)
    reset_bn(bn, batches)
    assert torch.allclose(bn[0].running_mean, torch.stack([x.mean(0) for x, _ in batches]).mean(0), atol=1e-4)
    reset_bn(bn, batches, num_batches=2)
    assert torch.allclose(bn[0].running_mean, torch.stack([x.mean(0) for x, _ in batches[:2]]).mean(0), atol=1e-4)


def test_interpolation_alpha_steps_exits_and_batchnorm_batches():
    a, b = _conv_model(seed=0), _conv_model(seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    mid = interpolate_state(sa, sb, 0.25)
    for k, v in sa.items():
        if v.is_floating_point():
            assert torch.allclose(mid[k], 0.75 * v + 0.25 * sb[k], atol=1e-6), k
        else:
            assert torch.equal(mid[k], v), k  # integer entries from the nearer end
    assert all(torch.equal(interpolate_state(sa, sb, 0.75)[k], sb[k]) for k in sa if not sa[k].is_floating_point())
    batches, bn = _images(1, 8), _images(2, 8, seed=7, shift=1.0)
    plain = interpolation_path(a, b, batches, steps=3)
    assert plain["alphas"] == [0.0, 0.5, 1.0] and plain["loss"].shape == (3, 2)
    assert torch.allclose(plain["loss"][1], exit_losses(interpolate(a, b, 0.5), batches)[0])
    assert interpolation_path(a, b, batches, steps=5)["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    last = interpolation_path(a, b, batches, steps=3, exits=[-1])
    assert last["exits"] == [1] and torch.allclose(last["loss"][:, 0], plain["loss"][:, 1])
    for n in (None, 1):
        path = interpolation_path(a, b, batches, steps=3, bn_batches=iter(bn), bn_num_batches=n)
        want = exit_losses(reset_bn(interpolate(a, b, 0.5), bn[:n]), batches)[0]
        assert torch.allclose(path["loss"][1], want, atol=1e-6), n
        assert _differs(path["loss"][1], plain["loss"][1])
    one = interpolation_path(a, b, batches, steps=3, bn_batches=bn, bn_num_batches=1)["loss"]
    assert _differs(one, interpolation_path(a, b, batches, steps=3, bn_batches=bn)["loss"])


def test_weight_matching_seed_sweeps_and_permutations():
    a, b = _mlp(0), _mlp(1)
    spec = permutation_spec(b)
    out, perms = weight_matching(a, b, return_permutations=True)
    assert isinstance(perms, dict) and set(perms) == set(spec.sizes)
    moved = apply_permutation(b, spec, perms)
    assert all(torch.equal(out.state_dict()[k], moved.state_dict()[k]) for k in out.state_dict())
    same, ident = weight_matching(a, b, max_iter=0, return_permutations=True)  # no sweep: nothing moves
    assert all(torch.equal(p, torch.arange(len(p))) for p in ident.values())
    assert all(torch.equal(same.state_dict()[k], b.state_dict()[k]) for k in b.state_dict())

    def found(**kw):
        return {k: v.tolist() for k, v in weight_matching(a, b, return_permutations=True, **kw)[1].items()}

    converged = {k: v.tolist() for k, v in perms.items()}
    assert found(max_iter=1) != converged  # one sweep is not the fixed point here
    assert found(seed=1) != converged  # another visiting order ends elsewhere on this pair
    assert found(seed=0) == converged


# --- landscape -------------------------------------------------------------------------------------

def test_loss_surface_span_seed_direction_and_weights():
    model, batches = _conv_model(), _images(1, 8)

    def corner(span=1.0, seed=0, direction="gaussian", two_d=True):
        """The loss at (-span, -span) (or -span in 1-D) computed from the definition."""
        g = torch.Generator().manual_seed(seed)
        d1 = random_direction(model, generator=g, distribution=direction)
        d2 = random_direction(model, generator=g, distribution=direction) if two_d else None
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in m.named_parameters():
                w = p - span * d1[n]
                p.copy_(w - span * d2[n] if two_d else w)
        return exit_losses(m, batches)[0]

    base = loss_surface(model, batches, steps=(3, 3))
    assert base["alphas"] == [-1.0, 0.0, 1.0] and torch.allclose(base["loss"][:, 0, 0], corner(), atol=1e-6)
    for kw in ({"span": 0.3}, {"seed": 5}, {"direction": "uniform"}):
        out = loss_surface(model, batches, steps=(3, 3), **kw)
        want = corner(**kw)
        assert _differs(want, corner()) and torch.allclose(out["loss"][:, 0, 0], want, atol=1e-6), kw
    assert loss_surface(model, batches, steps=(3, 3), span=0.3)["betas"] == pytest.approx([-0.3, 0.0, 0.3])
    one = loss_surface(model, batches, steps=3)
    assert one["loss"].shape == (2, 3, 1) and torch.allclose(one["loss"][:, 0, 0], corner(two_d=False), atol=1e-6)
    assert loss_surface(model, batches, steps=5)["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    w = [0.2, 3.0]
    weighted = loss_surface(model, batches, steps=(3, 3), weights=w)
    assert torch.allclose(weighted["total"], 0.2 * base["loss"][0] + 3.0 * base["loss"][1])
    assert torch.allclose(base["total"], base["loss"].mean(0))
    last = loss_surface(model, batches, steps=(3, 3), exits=[-1])
    assert last["exits"] == [1] and torch.allclose(last["loss"][0], base["loss"][1])
    d0 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(0))
    d1 = filter_normalized_direction(model, generator=torch.Generator().manual_seed(1))
    assert any(_differs(d0[k], d1[k]) for k in d0)


def test_exit_losses_exits():
    model, batches = _conv_model(), _images(2, 8)
    loss, acc = exit_losses(model, batches)
    part_loss, part_acc = exit_losses(model, batches, exits=[-1])
    assert part_loss.shape == (1,) and torch.equal(part_loss, loss[1:]) and torch.equal(part_acc, acc[1:])
    model.eval()
    with torch.no_grad():
        want = sum(F.cross_entropy(model(x)[0], y, reduction="sum") for x, y in batches) / 16
    assert loss[0].item() == pytest.approx(want.item(), rel=1e-6)


# --- gradients and cosines -------------------------------------------------------------------------

def _per_exit_grads(model: MultiExitModel, x, y, params_of, *, train: bool, weights=None) -> list[torch.Tensor]:
    """Each exit's (weighted) loss gradient on ``params_of(model)``, flattened, by a plain backward()."""
    out = []
    for k in range(model.num_exits):
        m = copy.deepcopy(model).train(train)
        w = 1.0 if weights is None else weights[k]
        (w * F.cross_entropy(m(x)[k], y)).backward()
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                              for p in params_of(m)]))
    return out


def test_exit_gradient_norms_train_mode_and_mean_over_batches():
    model, batches = _conv_model(), _images(2, 8)
    x, y = batches[0]
    stage0 = lambda m: [*m.stem.parameters(), *m.stages[0].parameters()]  # noqa: E731
    for train in (False, True):
        got = exit_gradient_norms(model, x, y, train_mode=train)
        want = [float(g.norm()) for g in _per_exit_grads(model, x, y, stage0, train=train)]
        assert got[:, 0].tolist() == pytest.approx(want, rel=1e-4), train
    assert _differs(exit_gradient_norms(model, x, y, train_mode=True), exit_gradient_norms(model, x, y))
    mean = mean_gradient_norms(model, batches)
    assert torch.allclose(mean, (exit_gradient_norms(model, *batches[0]) + exit_gradient_norms(model, *batches[1])) / 2)
    p1 = mean_gradient_norms(model, batches, phase=1)  # keyword arguments reach exit_gradient_norms
    assert torch.all(p1[0] == 0) and torch.all(p1[1] > 0)
    assert torch.equal(gradient_dominance(model, x, y, phase=1)[1], torch.ones(2))
    tm = mean_gradient_norms(model, batches, train_mode=True)
    assert _differs(tm, mean)


def test_gradient_cosines_train_mode_final_head_and_weights():
    model, (x, y) = _conv_model(), _images(1, 8)[0]
    backbone = lambda m: [*m.stem.parameters(), *(p for s in m.stages for p in s.parameters())]  # noqa: E731
    with_head = lambda m: [*backbone(m), *m.heads[-1].parameters()]  # noqa: E731

    def manual(params_of, train, weights):
        g = _per_exit_grads(model, x, y, params_of, train=train, weights=weights)
        total = sum(g)
        return [float(gk @ total / (gk.norm() * total.norm())) for gk in g]

    cases = [({}, (backbone, True, [0.5, 0.5])), ({"train_mode": False}, (backbone, False, [0.5, 0.5])),
             ({"include_final_head": True}, (with_head, True, [0.5, 0.5])),
             ({"weights": [0.9, 0.1]}, (backbone, True, [0.9, 0.1]))]
    base = manual(*cases[0][1])
    for kw, args in cases:
        want = manual(*args)
        if kw:
            assert _differs(want, base), kw
        assert gradient_cosines(model, x, y, **kw) == pytest.approx(want, abs=1e-5), kw


# --- the plane through three models ----------------------------------------------------------------

def test_connectivity_plane_steps_span_match_weights_and_seed(monkeypatch):
    import earlyexit.analysis.plane as plane

    ref, a, b = _mlp(0), _mlp(1), _mlp(2)
    batches = _images(1, 8)
    seeds = []
    real = plane.weight_matching

    def spy(r, m, *, seed=0, **kw):
        seeds.append(seed)
        return real(r, m, seed=seed, **kw)

    monkeypatch.setattr(plane, "weight_matching", spy)
    out = connectivity_plane(ref, a, b, batches, steps=2, span=(0.0, 1.0), match=False, weights=[0.0, 0.0, 1.0])
    assert seeds == [] and out["matched"] is False
    la, (bx, lv) = out["coords"]["a"][0], out["coords"]["b"]
    assert out["xs"] == pytest.approx([0.0, la]) and out["ys"] == pytest.approx([0.0, lv])
    assert torch.allclose(out["loss"], out["exit_loss"][2])  # the weights pick the last exit's loss
    assert out["loss"][0, 0].item() == pytest.approx(exit_losses(ref, batches)[0][2].item(), rel=1e-5)
    assert out["loss"][1, 0].item() == pytest.approx(exit_losses(a, batches)[0][2].item(), rel=1e-5)
    wide = connectivity_plane(ref, a, b, batches, steps=3, span=(-0.5, 1.5), match=False)
    assert wide["xs"] == pytest.approx([-0.5 * la, 0.5 * la, 1.5 * la]) and wide["loss"].shape == (3, 3)
    assert torch.allclose(wide["loss"], wide["exit_loss"].mean(0))
    matched = connectivity_plane(ref, a, b, batches, steps=2, span=(0.0, 1.0), seed=7)
    assert seeds == [7, 7] and matched["matched"] is True
    assert matched["coords"]["a"][0] < la  # matching brings a closer to ref


# ==================================================================================================
# 2. channels-last on every path of the training loop
# ==================================================================================================

def _layouts_seen(fmt: str, monkeypatch) -> list[tuple[str, bool, bool]]:
    """Train a tiny conv net on 3-channel images in ``fmt``, with a probe every step; for every batch that
    reaches the model: (where: train / val / probe, the model's training flag, channels-last or not)."""
    from earlyexit.config import PhaseConfig, TrainConfig
    from earlyexit.data import load_dataset
    from earlyexit.runs import gradient_probe

    loop = importlib.import_module("earlyexit.training.loop")
    train = importlib.import_module("earlyexit.training").train
    data = load_dataset("synthetic", image_size=6, in_chans=3, num_classes=NUM_CLASSES, train_samples=20,
                        test_samples=4)
    model = _conv_model(in_chans=3)
    where = ["train"]
    seen = []

    def pre(module, args):
        (x,) = args
        assert x.dim() == 4 and x.shape[1] == 3 and min(x.shape[2:]) > 1  # a check that can fail
        seen.append((where[-1], model.training, x.is_contiguous(memory_format=torch.channels_last)))

    model.stem.register_forward_pre_hook(pre)
    real_validate = loop.validate

    def validate(*a, **k):
        where.append("val")
        try:
            return real_validate(*a, **k)
        finally:
            where.pop()

    def probe(*a, **k):
        where.append("probe")
        try:
            return gradient_probe(*a, **k)
        finally:
            where.pop()

    monkeypatch.setattr(loop, "validate", validate)
    pc = PhaseConfig(lr=(0.05,), epochs=1)
    cfg = TrainConfig(phases=(pc, pc, pc), batch_size=8, device="cpu", memory_format=fmt, grad_log_every=1)
    rec = train(model, data, regime="+++", config=cfg, probe=probe)
    assert len(rec.probe_log) == 4  # two steps in each of phases 2 and 3
    assert {w for w, _, _ in seen} == {"train", "val", "probe"}
    assert any(t for w, t, _ in seen if w == "train") and not any(t for w, t, _ in seen if w == "val")
    return seen


def test_every_batch_the_loop_feeds_is_channels_last(monkeypatch):
    seen = _layouts_seen("channels_last", monkeypatch)
    assert all(cl for _, _, cl in seen), [s for s in seen if not s[2]]


def test_no_batch_is_channels_last_when_contiguous(monkeypatch):
    seen = _layouts_seen("contiguous", monkeypatch)
    assert not any(cl for _, _, cl in seen), [s for s in seen if s[2]]


# ==================================================================================================
# 3. Both budget tables count a cost at the budget up to float rounding
# ==================================================================================================

def _curve(flops, acc):
    return {"criterion": "confidence", "thresholds": [i / max(1, len(flops) - 1) for i in range(len(flops))],
            "flops": list(flops), "accuracy": list(acc), "exit_counts": [[0] for _ in flops]}


def test_a_cost_one_ulp_above_the_budget_fits_both_tables():
    from earlyexit.metrics import budget_table, ztw_budget_table

    cost = 0.1 + 0.2  # 0.30000000000000004: one ulp above 0.3 = 30 % of a base cost of 1
    assert cost > 0.3 and cost == math.nextafter(0.3, 1.0)
    at = _curve([cost, 1.0], [0.7, 0.9])
    paper = ztw_budget_table([at], 1.0, fractions=(0.3,))
    best = budget_table(at, [], 1.0, fractions=(0.3,))
    assert paper["30%"] is not None and paper["30%"]["mean"] == 0.7
    assert best["30%"] == 0.7
    assert best["30%"] >= paper["30%"]["mean"]  # best within budget is never below the paper's rule (one seed)
    static = budget_table(_curve([1.0], [0.9]), [{"index": 0, "flops": cost, "accuracy": 0.6}], 1.0,
                          fractions=(0.3,))
    assert static["30%"] == 0.6  # a static exit at the budget fits too
    # two seeds whose costs are such sums: the averaged curve still fits
    share = sum([0.1] * 3)  # 0.30000000000000004 again, as a sum of three exits' shares
    assert share > 0.3
    two = ztw_budget_table([_curve([share, 0.5], [0.4, 0.8]), _curve([share, 0.5], [0.6, 0.8])], 1.0,
                           fractions=(0.3,))
    assert two["30%"]["mean"] == pytest.approx(0.5)
    assert budget_table(_curve([share, 0.5], [0.4, 0.8]), [], 1.0, fractions=(0.3,))["30%"] == 0.4
    # a real excess is no rounding: neither table counts it
    above = _curve([0.3 * (1 + 1e-6), 1.0], [0.7, 0.9])
    assert ztw_budget_table([above], 1.0, fractions=(0.3,))["30%"] is None
    assert budget_table(above, [], 1.0, fractions=(0.3,))["30%"] is None


@st.composite
def _near_budget_curves(draw):
    """One seed's curve with some costs landing on a budget up to float rounding (sums of shares)."""
    base = draw(st.sampled_from([1.0, 3.0, 7.5, 100.0, 12345.678]))
    fractions = draw(st.lists(st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 0.75, 1.0]), min_size=1, max_size=4,
                              unique=True))
    T = draw(st.integers(1, 8))
    flops = []
    for _ in range(T):
        if draw(st.booleans()):
            f = draw(st.sampled_from(fractions))
            parts = draw(st.integers(2, 7))
            c = sum([f * base / parts] * parts)  # the budget as a sum of shares: off by a few ulps either way
            c = draw(st.sampled_from([c, math.nextafter(c, math.inf), math.nextafter(c, -math.inf)]))
        else:
            c = draw(st.floats(0.01 * base, 1.2 * base, allow_nan=False))
        flops.append(c)
    acc = draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=T, max_size=T))
    return _curve(flops, acc), base, fractions


@settings(max_examples=150, deadline=None)
@given(_near_budget_curves())
def test_best_within_budget_is_never_below_the_paper_rule_for_one_seed(case):
    from earlyexit.metrics import budget_table, ztw_budget_table

    curve, base, fractions = case
    paper = ztw_budget_table([curve], base, fractions=fractions)
    best = budget_table(curve, [], base, fractions=fractions)
    for f in fractions:
        k = f"{f * 100:g}%"
        within = [a for c, a in zip(curve["flops"], curve["accuracy"]) if c <= f * base * (1 + 1e-12)]
        if within:  # a point at the budget up to rounding counts in the best-within-budget table
            assert best[k] is not None and best[k] >= max(within), k
        if curve["flops"][0] <= f * base * (1 + 1e-12):  # ... and starts the paper's walk
            assert paper[k] is not None, k
        if paper[k] is not None:
            assert best[k] is not None and best[k] >= paper[k]["mean"], k


# ==================================================================================================
# 4. The OS lock alone refuses a second owner
# ==================================================================================================

def _hold(out: str, mode: str, conn) -> None:
    """In another process: take ``out``'s OS lock, say so, and keep it until told to let go."""
    import fcntl

    from earlyexit.rundir import LOCK, RunLock

    if mode == "runlock":
        lock = RunLock(out).acquire()  # noqa: F841 (held until this process ends)
    else:  # the moment before an owner writes its pid: the file exists, flock-ed, still empty
        os.makedirs(out, exist_ok=True)
        fd = os.open(os.path.join(out, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
    conn.send(os.getpid())
    conn.poll(60)  # wait for the test's word (at most a minute)


@contextlib.contextmanager
def _holder(out: Path, mode: str):
    """Another process (forked: no second interpreter start) holding ``out``'s OS lock until the block ends."""
    pytest.importorskip("fcntl")
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_hold, args=(str(out), mode, theirs), daemon=True)
    child.start()
    try:
        assert ours.poll(30), "the lock holder did not start"
        assert ours.recv() == child.pid
        yield child
    finally:
        try:
            ours.send("let go")
        except OSError:
            pass
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
        ours.close()
        theirs.close()


def _dead_pid() -> int:
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=int)
    p.start()
    p.join()
    return p.pid


@pytest.mark.parametrize("pid_text", ["dead", "", "not-a-pid\n"], ids=["dead-pid", "empty", "garbage"])
def test_a_live_flock_is_refused_whatever_the_pid_file_says(tmp_path, pid_text):
    from earlyexit.errors import EarlyExitError
    from earlyexit.rundir import LOCK, RunLock, check_unlocked, lock_holder

    out = tmp_path / "run"
    with _holder(out, "runlock") as child:
        path = out / LOCK
        assert path.read_text().strip() == str(child.pid)
        text = f"{_dead_pid()}\n" if pid_text == "dead" else pid_text
        path.write_text(text)  # the same file (inode), still flock-ed by the child
        with pytest.raises(EarlyExitError, match="in use by another run"):
            RunLock(out).acquire()
        assert path.read_text() == text  # the refused acquirer wrote nothing
        assert lock_holder(out) is not None
        with pytest.raises(EarlyExitError, match="in use by another run"):
            check_unlocked(out)
    assert lock_holder(out) is None  # the holder is gone: the same folder is free again
    with RunLock(out):
        assert (out / LOCK).read_text().strip() == str(os.getpid())


def test_the_moment_before_the_owner_writes_its_pid(tmp_path):
    from earlyexit.errors import EarlyExitError
    from earlyexit.rundir import LOCK, RunLock, check_unlocked, lock_holder

    out = tmp_path / "run"
    with _holder(out, "raw"):
        assert (out / LOCK).read_text() == ""
        assert lock_holder(out) == -1
        with pytest.raises(EarlyExitError, match="another process"):
            RunLock(out).acquire()
        with pytest.raises(EarlyExitError, match="another process"):
            check_unlocked(out)
        assert (out / LOCK).read_text() == ""
    with RunLock(out):
        pass


@pytest.mark.parametrize("mode", ["runlock", "raw"])
def test_compare_is_refused_while_another_process_holds_the_os_lock(tmp_path, monkeypatch, mode):
    """``compare`` takes the folder's lock without ``run``'s pre-check: the OS lock alone must stop it."""
    import earlyexit.compare as compare
    from earlyexit.config import DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
    from earlyexit.errors import EarlyExitError
    from earlyexit.rundir import LOCK

    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name="mlp", kwargs={"width": 16, "depth": 3}), data=DataConfig(name="synthetic"),
                    train=TrainConfig(phases=(pc, pc, pc), batch_size=50, device="cpu"))
    entered = []
    monkeypatch.setattr(compare, "_compare", lambda *a, **k: entered.append(1) or {"entered": True})
    out = tmp_path / "cmp"
    with _holder(out, mode):
        if mode == "runlock":
            (out / LOCK).write_text(f"{_dead_pid()}\n")  # only the flock says the folder is taken
        with pytest.raises(EarlyExitError, match="in use by another run"):
            compare.compare_regimes(cfg, [0], out, resume=True)
        assert entered == []
    assert compare.compare_regimes(cfg, [0], out, resume=True) == {"entered": True}  # free again: it goes in
