"""The paper's protocols of the analyses (issue 20): rank, information, landscapes, connectivity, figures.

- Rank (Figure 3): the authors' rule, ``torch.linalg.matrix_rank(torch.cov(X^T))`` with its default
  tolerance, on the same seeded columns for every layer wide enough; each row states its tolerance,
  its ceiling ``min(N, k)`` and whether it is saturated.
- Information (Figure 5): the Jensen (Kolchinsky-Tracey pairwise) upper bound and the Bhattacharyya lower
  bound against their formulas, Monte Carlo between them on average, and a noise scaled per layer so that
  rescaling a layer changes nothing.
- Landscapes (appendix A): BatchNorm re-estimated at every grid point on a copy, and the summary numbers
  on a surface whose answers are known.
- Connectivity: the barrier of the weighted total; figures: one colour scale over the runs drawn together,
  a fixed one passed through, titles that say what the run is.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from earlyexit import build_model
from earlyexit.analysis import (exit_losses, feature_scale, feature_subset, landscape_summary, layer_information,
                                layer_ranks, loss_surface, mi_xz, pairwise_bounds, rank_from_covariance, reset_bn)
from earlyexit.analyze import _barriers, describe, write_figures

NUM_CLASSES = 3
EPS32 = torch.finfo(torch.float32).eps


def _batches(n_batches: int = 3, size: int = 16, seed: int = 0, shape=(1, 8, 8)) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, NUM_CLASSES, (size,), generator=g))
            for _ in range(n_batches)]


from test_layer_analysis import _outputs  # noqa: E402  (every hooked layer's full output, the plain way)


# --- columns ------------------------------------------------------------------------------------------

def test_shared_columns_are_the_same_for_every_layer_its_width_allows():
    a = feature_subset("stages.0.0", 1000, 50, seed=3, columns="shared")
    assert torch.equal(a, feature_subset("stages.2.1.conv2", 1000, 50, seed=3, columns="shared"))  # name plays no part
    assert len(a) == 50 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 50
    assert not torch.equal(a, feature_subset("stages.0.0", 1000, 50, seed=4, columns="shared"))
    for wide in (1500, 5000, 9000):  # a wider layer keeps, below the narrower width, only indices the narrower keeps
        b = feature_subset("x", wide, 50, seed=3, columns="shared")
        assert set(b[b < 1000].tolist()) <= set(a.tolist())
    assert feature_subset("x", 40, 50, columns="shared") is None  # fewer outputs than features: all of them
    per_layer = feature_subset("stages.0.0", 1000, 50, seed=3)
    assert not torch.equal(per_layer, feature_subset("stages.2.1.conv2", 1000, 50, seed=3))  # the default differs
    with pytest.raises(ValueError, match="columns"):
        feature_subset("x", 10, 5, columns="random")


# --- rank ---------------------------------------------------------------------------------------------

def test_covariance_rank_is_torch_matrix_rank_of_torch_cov():
    g = torch.Generator().manual_seed(0)
    n, k = 200, 40
    # singular values spread from 1 down to 1e-4: some above the authors' cut sqrt(k * eps) ~ 2.2e-3, some below
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, k, dtype=torch.float64)
    x = (u * s) @ v.T + 5.0  # a large mean: only the centred covariance is meant
    xc = x - x.mean(0)
    gram = xc.T @ xc
    want = int(torch.linalg.matrix_rank(torch.cov(x.T), rtol=k * EPS32))  # the authors' rule, in float64
    assert rank_from_covariance(gram, n) == want
    assert 0 < want < k  # the data straddle the cut: the test could fail
    assert rank_from_covariance(gram, n, rtol=1e-12) == k and rank_from_covariance(gram, n, rtol=0.9) == 1
    assert rank_from_covariance(gram, 1) == 0 and rank_from_covariance(torch.zeros(3, 3), 5) == 0


def test_layer_ranks_by_the_authors_rule_state_tolerance_ceiling_and_saturation():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3)
    with torch.no_grad():  # a rank-3 second layer with a bias: 3 after centring
        lin = model.stages[1][0]
        lin.weight.copy_(torch.randn(16, 3) @ torch.randn(3, 16))
        lin.bias.copy_(torch.randn(16))
    batches = _batches(4, 16)
    full = _outputs(model, batches)
    rows = {r["layer"]: r for r in layer_ranks(model, batches, tolerance="covariance", columns="shared",
                                               n_features=12)}
    for name, r in rows.items():
        idx = feature_subset(name, r["dim"], 12, columns="shared")
        cols = (full[name] if idx is None else full[name][:, idx]).double()
        k = cols.shape[1]
        assert r["rank"] == int(torch.linalg.matrix_rank(torch.cov(cols.T), rtol=k * EPS32)), name
        assert r["ceiling"] == min(64, k) and r["samples"] == 64
        assert r["tolerance"] == {"rule": "covariance", "matrix": "centred covariance of the kept columns (k x k)",
                                  "on": "eigenvalues", "rtol": pytest.approx(k * EPS32), "eps": EPS32,
                                  "singular_value_rtol": pytest.approx(math.sqrt(k * EPS32))}
        assert r["saturated"] == (r["rank"] >= 0.99 * r["ceiling"])
    assert rows["stages.1.0"]["rank"] == 3 and not rows["stages.1.0"]["saturated"]
    assert rows["stages.0.0"]["saturated"]  # random weights on random inputs: every kept column independent
    numpy_rule = {r["layer"]: r for r in layer_ranks(model, batches, n_features=12)}
    assert numpy_rule["stages.1.0"]["rank"] == 4 and numpy_rule["stages.1.0"]["tolerance"]["rule"] == "numpy"
    with pytest.raises(ValueError, match="tolerance"):
        layer_ranks(model, batches, tolerance="svd")


# --- information --------------------------------------------------------------------------------------

def _kt(f: torch.Tensor, s: float) -> float:
    d2 = torch.cdist(f.double(), f.double()) ** 2
    return float(-torch.log(torch.exp(-d2 / (2 * s * s)).mean(1)).mean())


def test_pairwise_bounds_follow_their_formulas_and_bracket_monte_carlo():
    f = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    for sigma in (0.3, 1.0, 3.0):
        upper, lower = pairwise_bounds(f, [sigma, 2 * sigma])
        assert upper == pytest.approx(_kt(f, sigma), abs=1e-10) and lower == pytest.approx(_kt(f, 2 * sigma), abs=1e-10)
        assert mi_xz(f, sigma=sigma) == pytest.approx(upper, abs=1e-12)  # "jensen" is the default method
        assert mi_xz(f, sigma=sigma, method="bhattacharyya") == pytest.approx(lower, abs=1e-12)
        assert mi_xz(f, sigma=sigma, dtype=torch.float32) == pytest.approx(upper, rel=1e-4)
        mc = sum(mi_xz(f, sigma=sigma, method="mc", seed=s) for s in range(40)) / 40
        assert lower - 0.05 <= mc <= upper + 0.05, (sigma, lower, mc, upper)  # the true value lies between
    vals = [mi_xz(f, sigma=s) for s in (0.01, 0.3, 1.0, 3.0, 100.0)]
    assert vals[0] == pytest.approx(math.log(40), abs=1e-9) and vals[-1] < 1e-2
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_feature_scale():
    f = torch.randn(30, 5, generator=torch.Generator().manual_seed(2))
    i, j = torch.triu_indices(30, 30, 1)
    assert feature_scale(f, "median") == pytest.approx(float(torch.cdist(f.double(), f.double())[i, j].median()))
    assert feature_scale(f, "std") == pytest.approx(float(((f - f.mean(0)).double() ** 2).sum(1).mean().sqrt()))
    assert feature_scale(f, "absolute") == 1.0 and feature_scale(torch.ones(4, 3), "median") == 0.0
    sub = feature_scale(f, "median", samples=10, seed=1)
    assert sub != feature_scale(f, "median") and sub == feature_scale(f, "median", samples=10, seed=1)


def test_a_relative_sigma_makes_information_blind_to_a_layers_scale():
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3)
    batches = _batches(3, 16)
    kw = dict(sigma=0.3, sigma_ref="median", also=("mc", "bhattacharyya"), max_samples=None)
    base = {r["layer"]: r for r in layer_information(model, batches, **kw)}
    big = copy.deepcopy(model)
    with torch.no_grad():  # the first layer's output, 50 times larger (the next layer scaled back: same rest)
        big.stages[0][0].weight.mul_(50)
        big.stages[0][0].bias.mul_(50)
        big.stages[1][0].weight.div_(50)
    rows = {r["layer"]: r for r in layer_information(big, batches, **kw)}
    r0, b0 = rows["stages.0.0"], base["stages.0.0"]
    assert r0["scale"] == pytest.approx(50 * b0["scale"], rel=1e-5) and r0["sigma"] == pytest.approx(0.3 * r0["scale"])
    for key in ("mi", "mi_mc", "mi_bhattacharyya"):
        assert r0[key] == pytest.approx(b0[key], abs=1e-5), key
    assert r0["mi_bhattacharyya"] <= r0["mi"] <= r0["log_n"] == pytest.approx(math.log(48))
    absolute = {r["layer"]: r["mi"] for r in layer_information(big, batches, sigma=0.3, max_samples=None)}
    assert absolute["stages.0.0"] != pytest.approx(r0["mi"], abs=1e-3)  # an absolute sigma does see the scale
    assert r0["sigma_ref"] == "median" and r0["sigma_scale"] == 0.3 and r0["method"] == "jensen"


# --- landscapes ---------------------------------------------------------------------------------------

def _resnet():
    torch.manual_seed(0)
    return build_model("resnet20", num_classes=NUM_CLASSES, in_chans=1, image_size=8)


def test_landscape_reestimates_batchnorm_at_every_point_on_a_copy():
    model = _resnet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches, bn = _batches(1, 8), _batches(2, 8, seed=7)
    out = loss_surface(model, batches, steps=(3, 3), span=0.5, bn_batches=bn)
    assert out["bn_reset"] is True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights and statistics intact
    own = reset_bn(copy.deepcopy(model), bn)
    assert torch.allclose(out["loss"][:, 1, 1], exit_losses(own, batches)[0], atol=1e-6)  # the centre, re-estimated
    plain = loss_surface(model, batches, steps=(3, 3), span=0.5)
    assert plain["bn_reset"] is False and torch.equal(plain["loss"][:, 1, 1], exit_losses(model, batches)[0])
    assert not torch.allclose(out["loss"][:, 0, 0], plain["loss"][:, 0, 0])  # off-centre, the statistics matter
    uni = loss_surface(model, batches, steps=(3, 3), span=0.5, bn_batches=bn, direction="uniform")
    assert torch.allclose(uni["loss"][:, 1, 1], out["loss"][:, 1, 1]) and uni["direction"] == "uniform"
    mlp = build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=8, depth=2)
    assert loss_surface(mlp, batches, steps=3, bn_batches=bn)["bn_reset"] is False  # nothing to re-estimate


def test_landscape_summary_of_a_known_bowl():
    a = torch.linspace(-1, 1, 5, dtype=torch.float64)
    bowl = 1.0 + 2.0 * a[:, None] ** 2 + 0.5 * a[None, :] ** 2  # curvature 4 along alpha, 1 along beta
    surface = {"alphas": a.tolist(), "betas": a.tolist(), "exits": [0, 1], "loss": torch.stack([bowl, bowl + 1]),
               "total": bowl + 0.5, "direction": "gaussian", "bn_reset": True}
    out = landscape_summary(surface, radii=(0.5, 1.0), margins=(0.1, 1.0))
    t = out["total"]
    assert t["centre"] == pytest.approx(1.5) and t["centre_is_min"] and t["min"] == pytest.approx(1.5)
    assert t["curvature"] == {"alpha": pytest.approx(4.0), "beta": pytest.approx(1.0)}
    assert t["max_rise_within"]["0.5"] == pytest.approx(0.5) and t["max_rise_within"]["1"] == pytest.approx(2.0)
    # rises on the grid: 2 a^2 + b^2 / 2; within 0.1 only the centre ((0, +-0.5) rise 0.125)
    assert t["share_within"]["0.1"] == pytest.approx(1 / 25)
    assert out["exits"][1]["centre"] == pytest.approx(2.0) and out["bn_reset"] is True
    tilted = dict(surface, total=bowl + 2 * a[:, None])  # the minimum moves off the centre
    assert not landscape_summary(tilted)["total"]["centre_is_min"]


# --- connectivity and figures -------------------------------------------------------------------------

def test_barrier_of_the_weighted_total():
    loss = torch.tensor([[1.0, 0.2], [3.0, 0.4], [1.0, 0.6]], dtype=torch.float64)  # (S, E)
    path = {"exits": [0, 1], "loss": loss, "loss_barrier": torch.tensor([2.0, 0.0], dtype=torch.float64),
            "accuracy_barrier": torch.tensor([0.1, 0.2], dtype=torch.float64)}
    out = _barriers(path, None, [0.5, 1.0])
    assert set(out) == {"plain"}
    assert out["plain"]["total_loss"] == pytest.approx([0.7, 1.9, 1.1])
    assert out["plain"]["total_barrier"] == pytest.approx(1.9 - 0.9) and out["plain"]["final_exit_barrier"] == 0.0


def _result(regime: str, seed: int, scale: float) -> dict:
    a = [-1.0, 0.0, 1.0]
    loss = torch.tensor([[[2.0, 1.0, 2.0]] * 3], dtype=torch.float64) * scale
    return {"run": f"runs/{regime}-s{seed}", "model": "resnet20", "dataset": "fashion-mnist", "regime": regime,
            "regime_name": regime, "seed": seed, "split": "test",
            "landscape": {"alphas": a, "betas": a, "exits": [0], "loss": loss, "total": loss[0], "direction": "uniform",
                          "bn_reset": True}}


def test_landscapes_drawn_together_share_one_colour_scale_and_titles_say_the_run(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import earlyexit.analysis.figures as figures

    seen = []
    real = figures.plot_loss_landscape

    def spy(surface, out_file, **kw):
        seen.append(kw)
        return real(surface, out_file, **kw)

    monkeypatch.setattr(figures, "plot_loss_landscape", spy)
    results = [_result("joint", 0, 1.0), _result("mixed", 1, 3.0)]
    written = write_figures(results, tmp_path / "a", echo=lambda m: None)
    assert [p.name for p in written] == ["a-landscape-joint.png", "a-landscape-mixed.png"]
    assert [(k["vmin"], k["vmax"]) for k in seen] == [(1.0, 6.0), (1.0, 6.0)]  # the range over both runs
    assert "joint regime, seed 0 (resnet20 on fashion-mnist)" in seen[0]["title"] and "uniform" in seen[0]["title"]
    seen.clear()
    write_figures(results[:1], tmp_path / "b", echo=lambda m: None, landscape_range=(0.0, 9.0))
    assert (seen[0]["vmin"], seen[0]["vmax"]) == (0.0, 9.0)
    assert describe(results[1]) == "mixed regime, seed 1 (resnet20 on fashion-mnist)"


def test_plane_figure_takes_a_fixed_colour_scale(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import earlyexit.analysis.figures as figures

    captured = {}
    real = figures._contour

    def spy(fig, ax, xs, ys, z, levels, label, vmin=None, vmax=None):
        captured.update(vmin=vmin, vmax=vmax)
        return real(fig, ax, xs, ys, z, levels, label, vmin=vmin, vmax=vmax)

    monkeypatch.setattr(figures, "_contour", spy)
    xs = [0.0, 1.0, 2.0]
    plane = {"xs": xs, "ys": xs, "loss": torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) + 0.5,
             "coords": {"ref": (0.0, 0.0), "a": (1.0, 0.0), "b": (0.5, 1.0)}, "matched": True}
    out = figures.plot_connectivity_plane(plane, tmp_path / "p.png", vmin=0.0, vmax=2.5)
    assert out.is_file() and captured == {"vmin": 0.0, "vmax": 2.5}
    with pytest.raises(ValueError, match="vmin < vmax"):
        figures.plot_connectivity_plane(plane, tmp_path / "q.png", vmin=3.0, vmax=1.0)
