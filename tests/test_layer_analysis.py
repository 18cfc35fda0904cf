"""Tests of the per-layer analyses: numerical rank (Figure 3) and Gaussian-noise I(X; Z) (Figure 5).

Ranks are checked on layers whose output rank is known by construction and
against ``numpy.linalg.matrix_rank`` on the full activation matrix; the
information estimator on point sets with known answers (well-separated points,
identical points, clusters) and on the order of the bounds (the protocol's
own tests are in ``tests/test_analysis_protocol.py``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.analysis import backbone_layers, feature_subset, layer_information, layer_ranks, mi_xz, rank_from_gram

NUM_CLASSES = 3


def _mlp(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("mlp", num_classes=NUM_CLASSES, in_chans=1, image_size=8, width=16, depth=3)


def _batches(n_batches: int = 3, size: int = 16, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (size,), generator=g))
            for _ in range(n_batches)]


def _low_rank_(linear: nn.Linear, r: int, seed: int, bias: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = linear.weight.shape
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) / math.sqrt(r))
        linear.bias.copy_(torch.randn(out_f, generator=g) if bias else torch.zeros(out_f))


def _outputs(model: nn.Module, batches: list) -> dict[str, torch.Tensor]:
    """Every hooked layer's full (N, d) output, gathered the plain way."""
    got: dict[str, list] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: got.setdefault(n, []).append(o.detach().flatten(1)))
               for n, m in backbone_layers(model)]
    with torch.no_grad():
        for x, _ in batches:
            model.eval()(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


# --- rank ---------------------------------------------------------------------------------

def test_layer_ranks_see_a_rank_three_layer_and_match_numpy():
    model, batches = _mlp(), _batches()
    _low_rank_(model.stages[1][0], 3, seed=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = layer_ranks(model, batches, n_features=6000)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by = {r["layer"]: r for r in rows}
    assert [r["layer"] for r in rows] == ["stages.0.0", "stages.1.0", "stages.2.0", "heads.2.linear"]  # ICs left out
    assert by["stages.1.0"]["rank"] == 3
    assert by["stages.0.0"]["rank"] == 16 and by["heads.2.linear"]["rank"] == NUM_CLASSES
    assert all(r["samples"] == 48 and r["features"] == r["dim"] for r in rows)
    full = _outputs(model, batches)
    for r in rows:
        assert r["rank"] == int(np.linalg.matrix_rank(full[r["layer"]].numpy())), r["layer"]


def test_centring_removes_the_bias_direction():
    model, batches = _mlp(), _batches()
    _low_rank_(model.stages[1][0], 3, seed=2, bias=True)
    plain = {r["layer"]: r["rank"] for r in layer_ranks(model, batches)}
    centred = {r["layer"]: r["rank"] for r in layer_ranks(model, batches, center=True)}
    assert plain["stages.1.0"] == 4 and centred["stages.1.0"] == 3
    full = _outputs(model, batches)["stages.1.0"]
    assert centred["stages.1.0"] == int(np.linalg.matrix_rank((full - full.mean(0)).numpy()))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), d_in=st.integers(1, 12), d_out=st.integers(1, 12), r=st.integers(1, 12),
       seed=st.integers(0, 10_000))
def test_rank_from_streamed_gram_equals_numpy_on_the_activations(n, d_in, d_out, r, seed):
    layer = nn.Linear(d_in, d_out)
    _low_rank_(layer, r, seed)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed + 1))
    batches = [(x[i:i + 7], None) for i in range(0, n, 7)]  # several batches: the Gram matrix is streamed
    (row,) = layer_ranks(layer, batches)
    with torch.no_grad():
        X = layer(x).numpy()
    assert row["rank"] == int(np.linalg.matrix_rank(X)) and row["samples"] == n
    if n >= 3 * max(d_in, d_out):  # well-conditioned inputs: the rank by construction
        assert row["rank"] == min(r, d_in, d_out)


def test_rank_from_gram_thresholds():
    x = torch.tensor([[1.0, 0.0], [0.0, 1e-3]], dtype=torch.float64)
    g = x.T @ x
    assert rank_from_gram(g, 2) == 2 and rank_from_gram(g, 2, rtol=1e-2) == 1
    assert rank_from_gram(torch.zeros(3, 3), 5) == 0
    with pytest.raises(ValueError, match="square"):
        rank_from_gram(torch.zeros(2, 3), 2)


def test_column_subsets_are_seeded_per_layer_and_shared_across_models():
    torch.manual_seed(1)
    a = feature_subset("stages.1.0", 16, 5, seed=0)
    torch.manual_seed(2)
    assert torch.equal(a, feature_subset("stages.1.0", 16, 5, seed=0))  # global RNG state plays no part
    assert len(a) == 5 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 5
    assert not torch.equal(a, feature_subset("stages.1.0", 16, 5, seed=1))
    assert feature_subset("stages.1.0", 16, 16) is None and feature_subset("x", 4, None) is None
    batches = _batches()
    for seed in (0, 1):  # two models of one architecture: the same columns, each model's own values
        model = _mlp(seed)
        rows = {r["layer"]: r for r in layer_ranks(model, batches, n_features=5)}
        full = _outputs(model, batches)
        for name, r in rows.items():
            idx = feature_subset(name, r["dim"], 5)
            cols = full[name] if idx is None else full[name][:, idx]
            assert r["features"] == cols.shape[1] and r["rank"] == int(np.linalg.matrix_rank(cols.numpy()))


def test_layer_passes_respect_the_memory_budget():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=NUM_CLASSES, in_chans=1, image_size=8)
    batches = _batches(2, 8)
    one = layer_ranks(model, batches, n_features=20)
    assert layer_ranks(model, batches, n_features=20, max_bytes=1) == one  # one layer per pass, same answer
    assert layer_ranks(model, lambda: iter(batches), n_features=20, max_bytes=1) == one
    assert not any(r["layer"].startswith(("heads.0", "heads.1")) for r in one) and one[-1]["layer"] == "heads.2.fc"
    assert [r["rank"] for r in layer_ranks(model, iter(batches), n_features=20)] == [r["rank"] for r in one]
    with pytest.raises(ValueError, match="one-shot"):
        layer_ranks(model, iter(batches), n_features=20, max_bytes=1)
    sub = layer_ranks(model, batches, n_features=20, layers=["stem.conv1"], max_samples=10)
    assert len(sub) == 1 and sub[0]["samples"] == 10
    with pytest.raises(ValueError, match="unknown layer"):
        layer_ranks(model, batches, layers=["nope"])
    with pytest.raises(ValueError, match="no batches"):
        layer_ranks(model, [])


# --- I(X; Z) ------------------------------------------------------------------------------

def test_well_separated_points_carry_log_n():
    n = 24
    f = 100.0 * torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    assert mi_xz(f, sigma=0.1, method="mc") == pytest.approx(math.log(n), abs=1e-9)
    assert mi_xz(f, sigma=0.1, method="jensen") == pytest.approx(math.log(n), abs=1e-9)  # the pairwise bound too
    assert mi_xz(f, sigma=0.1, method="bhattacharyya") == pytest.approx(math.log(n), abs=1e-9)
    assert mi_xz(f, sigma=0.1, method="jensen-sampled") > 100 * math.log(n)  # the earlier one has no ceiling
    sub = mi_xz(f, sigma=0.1, method="mc", ref_size=6)  # own term added to a 6-sample reference set
    assert math.log(6) - 1e-9 <= sub <= math.log(7) + 1e-9


def test_clusters_of_identical_points_carry_log_k():
    centres = 50.0 * torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    f = centres.repeat_interleave(6, 0)  # 4 clusters of 6 identical points
    assert mi_xz(f, sigma=0.5, method="mc") == pytest.approx(math.log(4), abs=1e-9)
    assert mi_xz(f, sigma=0.5, method="jensen") == pytest.approx(math.log(4), abs=1e-9)
    same = torch.full((10, 3), 2.5)
    for method in ("mc", "jensen", "bhattacharyya", "jensen-sampled"):
        assert abs(mi_xz(same, sigma=0.3, method=method)) < 1e-9
        assert abs(mi_xz(same, sigma=0.3, method=method, ref_size=3)) < 1e-9


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 25), d=st.integers(1, 6), sigma=st.floats(0.05, 5.0), scale=st.floats(0.0, 10.0),
       ref=st.one_of(st.none(), st.integers(1, 25)), seed=st.integers(0, 1000))
def test_bounds_are_ordered_and_stay_below_log_of_the_reference(n, d, sigma, scale, ref, seed):
    f = scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    mc = mi_xz(f, sigma=sigma, method="mc", ref_size=ref, seed=seed)
    sampled = mi_xz(f, sigma=sigma, method="jensen-sampled", ref_size=ref, seed=seed)
    upper = mi_xz(f, sigma=sigma, method="jensen", ref_size=ref, seed=seed)
    lower = mi_xz(f, sigma=sigma, method="bhattacharyya", ref_size=ref, seed=seed)
    m = n if ref is None else min(ref, n)
    ceiling = math.log(m + (0 if m == n else 1)) + 1e-9
    assert sampled >= mc - 1e-9  # the mean of the logs is below the log of the mean, sample by sample
    assert 0.0 <= lower <= upper + 1e-12 and upper <= ceiling and mc <= ceiling
    for method, value in (("mc", mc), ("jensen", upper)):
        assert mi_xz(f, sigma=sigma, method=method, ref_size=ref, seed=seed, chunk=2) == pytest.approx(value, abs=1e-9)


def test_mi_xz_rejects_bad_input():
    f = torch.randn(5, 2)
    for kw, msg in (({"sigma": 0.0}, "sigma"), ({"sigma": 1.0, "method": "knn"}, "method"),
                    ({"sigma": 1.0, "ref_size": 0}, "ref_size")):
        with pytest.raises(ValueError, match=msg):
            mi_xz(f, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        mi_xz(torch.tensor([[float("nan")]]), sigma=1.0)


def test_layer_information_per_layer():
    model, batches = _mlp(), _batches()
    with torch.no_grad():  # a layer with a constant output keeps no information about the input
        model.stages[1][0].weight.zero_()
        model.stages[1][0].bias.fill_(0.7)
    mc = layer_information(model, batches, sigma=0.5, method="mc")
    jensen = layer_information(model, batches, sigma=0.5, method="jensen-sampled", max_bytes=1)
    assert [r["layer"] for r in mc] == ["stages.0.0", "stages.1.0", "stages.2.0", "heads.2.linear"]
    by = {r["layer"]: r["mi"] for r in mc}
    assert abs(by["stages.1.0"]) < 1e-9 and abs(by["stages.2.0"]) < 1e-9  # constant in, constant out
    assert 0.5 < by["stages.0.0"] <= math.log(48) + 1e-9
    assert all(j["mi"] >= m["mi"] - 1e-9 for j, m in zip(jensen, mc))
    assert all(r["samples"] == 48 and r["sigma"] == 0.5 and r["method"] == "mc" for r in mc)
    capped = layer_information(model, batches, sigma=0.5, method="mc", max_samples=20, n_features=4)
    assert all(r["samples"] == 20 and r["features"] == min(4, r["dim"]) for r in capped)
    binned = layer_information(model, batches, sigma=0.5, method="binning")
    assert binned[1]["mi"] == 0.0 and binned[0]["mi"] > 0 and binned[0]["sigma"] is None
    with pytest.raises(ValueError, match="method"):
        layer_information(model, batches, sigma=0.5, method="knn")
