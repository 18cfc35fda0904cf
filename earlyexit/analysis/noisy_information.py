"""Mutual information ``I(X; Z)`` between the input and a noisy layer output: the paper's Figure 5.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" measures how
much of the input each backbone layer keeps with the Gaussian-noise model of
Saxe et al. (2018): a deterministic layer ``f`` is made stochastic by additive
noise, ``Z = f(X) + sigma * eps`` with ``eps ~ N(0, I)``, so that ``I(X; Z)`` is
finite. Over samples ``x_1 .. x_N`` (each of weight ``1/N``) with features
``f_i = f(x_i)`` (``D`` of them), ``Z`` is a mixture of ``N`` Gaussians
``N(f_i, sigma^2 I)`` and ``I(X; Z) = H(Z) - H(Z | X)``, which only the mixture
entropy makes hard. Estimators (``method=``), all in nats:

- ``"jensen"``: the pairwise-distance upper bound of Kolchinsky & Tracey (2017),
  the one Saxe et al. use (their "KDE" estimate), which follows from Jensen's
  inequality:
  ``I <= -1/N sum_i log(1/N sum_j exp(-||f_i - f_j||^2 / (2 sigma^2)))``
  (``||f_i - f_j||^2 / (2 sigma^2)`` is the KL divergence between the two
  components). It needs no noise draw, lies in ``[0, log N]`` (``log N`` when
  all points are far apart against ``sigma``, 0 when they coincide) and falls
  as ``sigma`` grows.
- ``"bhattacharyya"``: the matching lower bound (Kolchinsky & Tracey), the same
  sum with the Bhattacharyya distance ``||f_i - f_j||^2 / (8 sigma^2)``, i.e.
  ``"jensen"`` at ``2 sigma``. The true ``I(X; Z)`` lies between the two.
- ``"mc"``: Monte Carlo, one seeded noise draw per sample, ``z_i = f_i + sigma
  eps_i``, and ``I = mean_i [log p(z_i | x_i) - log p(z_i)]`` with the mixture
  density ``log p(z_i) = logmeanexp_j log N(z_i; f_j, sigma^2 I)``; it stays
  below ``log N`` and is unbiased for the mixture up to the noise of one draw.
- ``"jensen-sampled"``: the estimator this module called ``"jensen"`` before:
  the same noise draws, with ``log p(z_i)`` replaced by the *mean* of the log
  densities (Jensen's lower bound on the log of the mixture). It grows like
  ``1 / sigma^2`` without the ``log N`` ceiling, so it saturates nothing and
  says little; kept for comparison only.

The reference set of the mixture is every sample (``ref_size=None``) or a
seeded random subset of ``ref_size`` samples, to which each sample's own term
is added when the subset misses it (so every estimate stays within
``log(|R| + 1)``). The Gaussian normalisers cancel: only squared distances over
``2 sigma^2`` enter, computed as ``|a|^2 + |b|^2 - 2 <a, b>`` on centred
features, the products in ``dtype`` (float64 by default; float32 halves the
time on wide layers, at a relative error near ``1e-6`` of the squared
distances, far below ``sigma^2`` at the scales used here).

``sigma`` is in the features' units unless ``layer_information`` scales it per
layer (``sigma_ref=``): ``sigma_l = sigma * scale_l`` with ``scale_l`` the
median pairwise distance of the layer's features (``"median"``, over a seeded
subset of ``scale_samples`` rows) or their RMS distance to the mean
(``"std"``, ``sqrt(trace Cov)``; the RMS pairwise distance is ``sqrt(2)`` times
it). Layers differ in scale by orders of magnitude, and one absolute ``sigma``
for all of them saturates some at ``log N`` and zeroes others; a relative one
asks the same question of every layer: how many samples stay distinguishable
once noise of a fixed share of the layer's own spread is added. The kept
columns are the seeded subsets of ``layers.py`` (the information is that of
the kept columns). The binning estimate of ``information``, ``H`` of the
binned features (``I(X; T)`` of a deterministic network), stays available as
``method="binning"``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .information import binned_entropy, random_projection
from .layers import Batches, stream_layers

MI_METHODS = ("jensen", "mc", "bhattacharyya", "jensen-sampled")
PAIRWISE = {"jensen": 1.0, "bhattacharyya": 2.0}  # method -> factor on sigma
LAYER_MI_METHODS = MI_METHODS + ("binning",)
SIGMA_REFS = ("absolute", "median", "std")


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")


def _check_features(features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        got = getattr(features, "shape", type(features))
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {got}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold non-finite values")


def _reference(n: int, ref_size: int | None, g: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(ref, in_ref)``: the reference indices and a mask of the samples they hold."""
    if ref_size is None or ref_size >= n:
        ref = torch.arange(n, device=device)
    else:
        ref = torch.randperm(n, generator=g)[:ref_size].to(device)  # (M,)
    in_ref = torch.zeros(n, dtype=torch.bool, device=device)
    in_ref[ref] = True
    return ref, in_ref


def _sq_dist(a: Tensor, b: Tensor, b_sq: Tensor, dtype: torch.dtype) -> Tensor:
    """``(c, M)`` float64 squared distances between the rows of ``a`` and ``b`` (``b_sq``: ``|b|^2``)."""
    cross = (a.to(dtype) @ b.to(dtype).T).double()  # (c, M)
    return ((a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * cross).clamp_min(0)


def pairwise_bounds(features: Tensor, sigmas: Sequence[float], *, ref_size: int | None = None, seed: int = 0,
                    chunk: int = 512, dtype: torch.dtype = torch.float64) -> list[float]:
    """``-1/N sum_i log(1/|R_i| sum_{j in R_i} exp(-||f_i - f_j||^2 / (2 s^2)))`` for every ``s`` in ``sigmas``.

    One pass over the distances serves every ``s``: ``"jensen"`` is ``s = sigma``, ``"bhattacharyya"``
    ``s = 2 sigma`` (see the module docstring). ``R_i`` is the reference set plus ``i`` itself.

    Args:
        features: ``(N, D)`` deterministic features.
        sigmas: positive widths.
        ref_size: reference subset size; None: all samples.
        seed: seed of the reference subset.
        chunk: rows processed at once.
        dtype: dtype of the distance products.
    Returns:
        One value (nats) per width, each in ``[0, log(|R| + 1)]``.
    """
    _check_features(features)
    for s in sigmas:
        _check_sigma(s)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = features.shape[0]
    f = features.double()
    f = f - f.mean(0, keepdim=True)  # (N, D): distances do not move, rounding in the norms shrinks
    ref, in_ref = _reference(n, ref_size, torch.Generator().manual_seed(seed), f.device)
    fr = f[ref]  # (M, D)
    fr_sq = (fr * fr).sum(1)  # (M,)
    totals = [0.0] * len(sigmas)
    for lo in range(0, n, chunk):
        d2 = _sq_dist(f[lo:lo + chunk], fr, fr_sq, dtype)  # (c, M)
        missing = ~in_ref[lo:lo + chunk]  # (c,) rows whose own term (exp(0) = 1) is not in R
        own = torch.where(missing, 0.0, -math.inf).to(d2.dtype)[:, None]  # (c, 1)
        count = torch.log(ref.numel() + missing.double())  # (c,)
        for k, s in enumerate(sigmas):
            log_mean = torch.logsumexp(torch.cat([-d2 / (2.0 * s * s), own], 1), 1) - count  # (c,)
            totals[k] += float((-log_mean).sum())
    return [max(t / n, 0.0) for t in totals]


def _sampled(f: Tensor, sigma: float, method: str, ref_size: int | None, seed: int, chunk: int) -> float:
    """The noise-draw estimators ``"mc"`` and ``"jensen-sampled"`` (see the module docstring)."""
    n = f.shape[0]
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.device)  # (N, D)
    z = f + sigma * eps  # (N, D)
    ref, in_ref = _reference(n, ref_size, g, f.device)
    fr = f[ref]  # (M, D)
    fr_sq = (fr * fr).sum(1)  # (M,)
    two_var = 2.0 * sigma * sigma
    total = torch.zeros((), dtype=torch.float64, device=f.device)
    for lo in range(0, n, chunk):
        zc, fc = z[lo:lo + chunk], f[lo:lo + chunk]  # (c, D)
        own = ((zc - fc) ** 2).sum(1)  # (c,) ||z_i - f_i||^2
        d2 = _sq_dist(zc, fr, fr_sq, torch.float64)  # (c, M)
        a = -(d2 - own[:, None]) / two_var  # (c, M): log N(z_i; f_j) - log N(z_i; f_i)
        missing = ~in_ref[lo:lo + chunk]  # (c,) rows whose own term is not in R
        if method == "jensen-sampled":
            log_pz = a.sum(1) / (ref.numel() + missing.double())  # (c,): the own term contributes 0
        else:
            own_col = torch.where(missing, 0.0, -math.inf).to(a.dtype)[:, None]  # (c, 1): exp(0) = the own term
            log_pz = torch.logsumexp(torch.cat([a, own_col], 1), 1) - torch.log(ref.numel() + missing.double())
        total += (-log_pz).sum()
    return float(total / n)


def mi_xz(features: Tensor, *, sigma: float, method: str = "jensen", ref_size: int | None = None, seed: int = 0,
          chunk: int = 512, dtype: torch.dtype = torch.float64) -> float:
    """Gaussian-noise estimate of ``I(X; Z)``, ``Z = f(X) + sigma * eps``, in nats (see the module docstring).

    Args:
        features: ``(N, D)`` deterministic features ``f(x_i)``, one row per sample.
        sigma: standard deviation of the added noise (in the features' units).
        method: ``"jensen"`` (the pairwise upper bound), ``"bhattacharyya"`` (the lower bound), ``"mc"``
            (Monte Carlo) or ``"jensen-sampled"`` (the earlier, unbounded estimator).
        ref_size: size of the reference set approximating ``p(z)``; None: all ``N`` samples.
        seed: seed of the noise (sampled methods) and of the reference subset.
        chunk: rows processed at once (memory ``~ chunk * |R|`` float64).
        dtype: dtype of the distance products of the pairwise bounds (the sampled ones use float64).
    Returns:
        The estimate (a float; ``<= log(|R| + 1)`` except with ``"jensen-sampled"``).
    Raises:
        ValueError: on malformed features, a bad sigma, method or ref_size.
    """
    if method not in MI_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(MI_METHODS)}")
    _check_sigma(sigma)
    _check_features(features)
    if ref_size is not None and ref_size < 1:
        raise ValueError(f"ref_size must be >= 1, got {ref_size}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if method in PAIRWISE:
        return pairwise_bounds(features, [PAIRWISE[method] * sigma], ref_size=ref_size, seed=seed, chunk=chunk,
                               dtype=dtype)[0]
    f = features.double()
    f = f - f.mean(0, keepdim=True)
    return _sampled(f, sigma, method, ref_size, seed, chunk)


def feature_scale(features: Tensor, ref: str = "median", *, samples: int = 1000, seed: int = 0) -> float:
    """The spread of a layer's features that a relative ``sigma`` is measured in.

    Args:
        features: ``(N, D)`` features.
        ref: ``"median"`` (median Euclidean distance over the pairs of a seeded subset of ``samples``
            rows), ``"std"`` (``sqrt(trace Cov)``, the RMS distance to the mean) or ``"absolute"`` (1.0).
        samples: rows of the subset for ``"median"``.
        seed: seed of the subset.
    Returns:
        The scale (0.0 when the features do not vary).
    """
    if ref not in SIGMA_REFS:
        raise ValueError(f"unknown sigma reference {ref!r}; valid: {', '.join(SIGMA_REFS)}")
    if ref == "absolute":
        return 1.0
    _check_features(features)
    f = features.double()
    if ref == "std":
        return float(((f - f.mean(0, keepdim=True)) ** 2).sum(1).mean().sqrt())
    if samples < 2:
        raise ValueError(f"samples must be >= 2, got {samples}")
    if f.shape[0] > samples:
        f = f[torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(seed))[:samples]]
    if f.shape[0] < 2:
        return 0.0
    f = f - f.mean(0, keepdim=True)
    i, j = torch.triu_indices(f.shape[0], f.shape[0], offset=1)
    d = torch.cdist(f, f)[i, j]  # (n (n - 1) / 2,)
    return float(d.median())


def layer_information(model: nn.Module, batches: Batches, *, sigma: float, method: str = "jensen",
                      ref_size: int | None = None, n_features: int = 6000, max_samples: int | None = 1024,
                      seed: int = 0, layers: Sequence[str] | None = None, bins: int = 8, bin_dim: int | None = 4,
                      max_bytes: int = 2**30, sigma_ref: str = "absolute", scale_samples: int = 1000,
                      also: Sequence[str] = (), also_ref_size: int | None = None,
                      dtype: torch.dtype = torch.float64, columns: str = "layer") -> list[dict]:
    """``I(X; Z)`` of every backbone layer (Figure 5), with the estimators of ``mi_xz``.

    Args:
        model: a ``MultiExitModel`` (or any module), run in eval mode without gradients (mode restored).
        batches: ``(x, y)`` pairs or bare inputs; an iterable or a callable returning one (see ``layers.py``).
        sigma: noise standard deviation: absolute, or the factor ``s`` on each layer's scale (``sigma_ref``).
        method: the estimator of ``mi`` (see ``mi_xz``), or ``"binning"``: the plug-in entropy of the
            features binned after a random projection to ``bin_dim`` dimensions (``information.binned_entropy``),
            which equals ``I(X; T)`` of the deterministic layer (``sigma`` then unused).
        ref_size: reference set of ``method``; None: all samples.
        n_features: columns kept per layer (the seeded subsets of ``layers.feature_subset``).
        max_samples: samples used (the estimators are quadratic in them); None: the whole split.
        seed: seed of the column subsets, the noise, the reference subsets and the scale's subset.
        layers: qualified names of the layers to measure; None: all hooked layers.
        bins, bin_dim: the binning estimate's bins per unit and projection.
        max_bytes: memory budget of the features held in one pass (``4 N k`` bytes per layer).
        sigma_ref: ``"absolute"`` (``sigma`` in feature units, the same for every layer), ``"median"`` or
            ``"std"`` (``sigma_l = sigma * feature_scale(layer)``).
        scale_samples: rows of the subset of the ``"median"`` scale.
        also: further estimators reported beside ``mi`` as ``mi_<name>`` (e.g. ``("mc", "bhattacharyya")``).
        also_ref_size: reference set of the ``also`` estimators; None: all samples.
        dtype: dtype of the distance products of the pairwise bounds.
        columns: ``"layer"`` or ``"shared"`` column subsets.
    Returns:
        One dict per layer, in forward order: ``{"layer", "mi", "features", "samples", "dim", "sigma", "method",
        "sigma_ref", "sigma_scale", "scale", "log_n", "ref_size"}`` plus ``mi_<name>`` per ``also`` estimator
        and ``also_ref_size``
        (``mi`` in nats; ``sigma`` the noise used at that layer; ``log_n`` the ceiling ``log N``).
    """
    if method not in LAYER_MI_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(LAYER_MI_METHODS)}")
    bad = [m for m in also if m not in MI_METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r} in also; valid: {', '.join(MI_METHODS)}")
    if sigma_ref not in SIGMA_REFS:
        raise ValueError(f"unknown sigma reference {sigma_ref!r}; valid: {', '.join(SIGMA_REFS)}")
    if method != "binning" or also:
        _check_sigma(sigma)
    feats: dict[str, list[Tensor]] = {}  # layer -> batches of (B, k) features on the CPU
    results: dict[str, dict] = {}
    per_layer_rows = max_samples if max_samples is not None else 10_000  # a planning guess without a cap

    def sink(name: str, x: Tensor) -> None:  # x: (B, k)
        feats.setdefault(name, []).append(x.float().cpu())

    def estimate(f: Tensor, names: Sequence[str], s: float, ref: int | None) -> dict[str, float]:
        out = {}
        pairwise = [m for m in names if m in PAIRWISE]
        if pairwise:
            vals = pairwise_bounds(f, [PAIRWISE[m] * s for m in pairwise], ref_size=ref, seed=seed, dtype=dtype)
            out.update(zip(pairwise, vals))
        for m in names:
            if m not in PAIRWISE:
                out[m] = mi_xz(f, sigma=s, method=m, ref_size=ref, seed=seed)
        return out

    def reduce(group: list[str], n: int) -> None:  # estimate the pass's layers, then free their features
        for name in group:
            f = torch.cat(feats.pop(name))  # (N, k)
            scale = feature_scale(f, sigma_ref, samples=scale_samples, seed=seed)
            s = sigma * scale
            row: dict = {"scale": scale, "sigma": None if method == "binning" else s}
            if method == "binning":
                row["mi"] = binned_entropy(random_projection(f, bin_dim, seed=seed), bins=bins)
            if s == 0.0:  # every sample has the same features: Z forgets X whatever the noise
                row.update({"mi": row.get("mi", 0.0), **{f"mi_{m}": 0.0 for m in also}})
            else:
                if method != "binning":
                    row["mi"] = estimate(f, [method], s, ref_size)[method]
                row.update({f"mi_{m}": v for m, v in estimate(f, list(also), s, also_ref_size).items()})
            results[name] = row

    info, n = stream_layers(model, batches, n_features=n_features, seed=seed, layers=layers, max_samples=max_samples,
                            bytes_per_layer=lambda k, d: 4 * k * per_layer_rows, max_bytes=max_bytes, sink=sink,
                            on_pass_end=reduce, columns=columns)
    rows = []
    for r in info:
        res = results[r["layer"]]
        rows.append({"layer": r["layer"], "mi": res["mi"], "features": r["features"], "samples": n, "dim": r["dim"],
                     "sigma": res["sigma"], "method": method, "sigma_ref": sigma_ref,
                     "sigma_scale": None if method == "binning" and not also else float(sigma),
                     "scale": res["scale"], "log_n": math.log(n), "ref_size": ref_size,
                     **({"also_ref_size": also_ref_size} if also else {}),
                     **{k: v for k, v in res.items() if k.startswith("mi_")}})
    return rows
