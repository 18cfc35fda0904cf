"""Mutual information ``I(X; Z)`` between the input and a noisy layer output: the paper's Figure 5.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" measures how
much of the input each backbone layer keeps with the Gaussian-noise estimator
of ``I(X; Z)``: a deterministic layer ``f`` is made stochastic by additive
noise, ``Z = f(X) + sigma * eps`` with ``eps ~ N(0, I)``, so that ``I(X; Z)`` is
finite. Over samples ``x_1 .. x_N`` with features ``f_i = f(x_i)`` (``D`` of them):

- ``z_i = f_i + sigma * eps_i``, one seeded noise draw per sample;
- ``log p(z_i | x_i) = log N(z_i; f_i, sigma^2 I)``;
- ``log p(z_i)``: ``p(z) = mean_j N(z; f_j, sigma^2 I)`` is a mixture over the
  samples, approximated over a reference set ``R_i`` either by the mean of the
  log densities ``mean_{j in R_i} log N(z_i; f_j, sigma^2 I)`` (``"jensen"``: by
  Jensen's inequality a lower bound of the mixture's log density, hence an
  upper estimate of the information) or by their log-mean-exp
  ``logsumexp_j(...) - log |R_i|`` (``"mc"``, Monte Carlo);
- ``I = mean_i [log p(z_i | x_i) - log p(z_i)]``, in nats.

The Gaussian normalisers cancel: only ``(||z_i - f_j||^2 - ||z_i - f_i||^2) /
(2 sigma^2)`` enters. The reference set is every sample (``ref_size=None``) or a
seeded random subset of ``ref_size`` samples, to which each sample's own term
is added when the subset misses it (the own term belongs to the full mixture).
Known values: ``N`` identical points give ``0``; ``N`` points far apart
(relative to ``sigma``) give ``log N`` with ``"mc"`` and the full reference set
(between ``log |R|`` and ``log(|R| + 1)`` with a subset); ``"jensen" >= "mc"``
always, sample by sample. No clamping: ``"mc"`` may
dip below 0 by noise when the points are closer than ``sigma``. The value
depends on ``sigma`` relative to the features' scale, so compare layers and
regimes at one ``sigma``.

``layer_information`` applies it to every backbone layer with the hooks and the
seeded column subsets of ``layers.py`` (the information is then that of the
kept columns). The binning estimate of the existing ``information`` module,
``H`` of the binned features (``I(X; T)`` of a deterministic network), stays
available as ``method="binning"``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .information import binned_entropy, random_projection
from .layers import Batches, stream_layers

MI_METHODS = ("jensen", "mc")
LAYER_MI_METHODS = ("jensen", "mc", "binning")


def _check_sigma(sigma: float) -> None:
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")


def mi_xz(features: Tensor, *, sigma: float, method: str = "jensen", ref_size: int | None = None, seed: int = 0,
          chunk: int = 512) -> float:
    """Gaussian-noise estimate of ``I(X; Z)``, ``Z = f(X) + sigma * eps``, in nats (see the module docstring).

    Args:
        features: ``(N, D)`` deterministic features ``f(x_i)``, one row per sample.
        sigma: standard deviation of the added noise (in the features' units).
        method: ``"jensen"`` (mean of the log densities) or ``"mc"`` (their log-mean-exp).
        ref_size: size of the reference set approximating ``p(z)``; None: all ``N`` samples.
        seed: seed of the noise and of the reference subset.
        chunk: rows processed at once (memory ``~ chunk * |R|`` float64).
    Returns:
        The estimate (a float; ``<= log(|R| + 1)`` with ``"mc"``).
    Raises:
        ValueError: on malformed features, a bad sigma, method or ref_size.
    """
    if method not in MI_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(MI_METHODS)}")
    _check_sigma(sigma)
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        got = getattr(features, "shape", type(features))
        raise ValueError(f"features must be a non-empty (N, D) tensor, got {got}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold non-finite values")
    if ref_size is not None and ref_size < 1:
        raise ValueError(f"ref_size must be >= 1, got {ref_size}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    n = features.shape[0]
    f = features.double()
    f = f - f.mean(0, keepdim=True)  # (N, D): distances do not move, rounding in the norms shrinks
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.device)  # (N, D)
    z = f + sigma * eps  # (N, D)
    if ref_size is None or ref_size >= n:
        ref = torch.arange(n, device=f.device)
    else:
        ref = torch.randperm(n, generator=g)[:ref_size].to(f.device)  # (M,)
    in_ref = torch.zeros(n, dtype=torch.bool, device=f.device)
    in_ref[ref] = True
    fr = f[ref]  # (M, D)
    fr_sq = (fr * fr).sum(1)  # (M,)
    two_var = 2.0 * sigma * sigma
    total = torch.zeros((), dtype=torch.float64, device=f.device)
    for lo in range(0, n, chunk):
        zc, fc = z[lo:lo + chunk], f[lo:lo + chunk]  # (c, D)
        own = ((zc - fc) ** 2).sum(1)  # (c,) ||z_i - f_i||^2
        d2 = ((zc * zc).sum(1, keepdim=True) + fr_sq[None, :] - 2.0 * zc @ fr.T).clamp_min(0)  # (c, M)
        a = -(d2 - own[:, None]) / two_var  # (c, M): log N(z_i; f_j) - log N(z_i; f_i)
        missing = ~in_ref[lo:lo + chunk]  # (c,) rows whose own term is not in R
        if method == "jensen":
            # the own term contributes 0 to the sum
            log_pz = a.sum(1) / (ref.numel() + missing.double())  # (c,)
        else:
            own_col = torch.where(missing, 0.0, -math.inf).to(a.dtype)[:, None]  # (c, 1): exp(0) = the own term
            log_pz = torch.logsumexp(torch.cat([a, own_col], 1), 1) - torch.log(ref.numel() + missing.double())
        total += (-log_pz).sum()
    return float(total / n)


def layer_information(model: nn.Module, batches: Batches, *, sigma: float, method: str = "jensen",
                      ref_size: int | None = None, n_features: int = 6000, max_samples: int | None = 1024,
                      seed: int = 0, layers: Sequence[str] | None = None, bins: int = 8, bin_dim: int | None = 4,
                      max_bytes: int = 2**30) -> list[dict]:
    """``I(X; Z)`` of every backbone layer (Figure 5), with the Gaussian-noise estimator ``mi_xz``.

    Args:
        model: a ``MultiExitModel`` (or any module), run in eval mode without gradients (mode restored).
        batches: ``(x, y)`` pairs or bare inputs; an iterable or a callable returning one (see ``layers.py``).
        sigma: noise standard deviation, the same for every layer.
        method: ``"jensen"`` or ``"mc"`` (see ``mi_xz``), or ``"binning"``: the plug-in entropy of the
            features binned after a random projection to ``bin_dim`` dimensions (``information.binned_entropy``),
            which equals ``I(X; T)`` of the deterministic layer (``sigma`` then unused).
        ref_size: reference set of ``mi_xz``; None: all samples.
        n_features: columns kept per layer (the seeded subsets of ``layers.feature_subset``).
        max_samples: samples used (the estimator is quadratic in them); None: the whole split.
        seed: seed of the column subsets, the noise and the reference subset.
        layers: qualified names of the layers to measure; None: all hooked layers.
        bins, bin_dim: the binning estimate's bins per unit and projection.
        max_bytes: memory budget of the features held in one pass (``4 N k`` bytes per layer).
    Returns:
        One dict per layer, in forward order: ``{"layer", "mi", "features", "samples", "dim", "sigma", "method"}``
        (``mi`` in nats).
    """
    if method not in LAYER_MI_METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(LAYER_MI_METHODS)}")
    if method != "binning":
        _check_sigma(sigma)
    feats: dict[str, list[Tensor]] = {}  # layer -> batches of (B, k) features on the CPU
    results: dict[str, float] = {}
    per_layer_rows = max_samples if max_samples is not None else 10_000  # a planning guess without a cap

    def sink(name: str, x: Tensor) -> None:  # x: (B, k)
        feats.setdefault(name, []).append(x.float().cpu())

    def reduce(group: list[str], n: int) -> None:  # estimate the pass's layers, then free their features
        for name in group:
            f = torch.cat(feats.pop(name))  # (N, k)
            if method == "binning":
                results[name] = binned_entropy(random_projection(f, bin_dim, seed=seed), bins=bins)
            else:
                results[name] = mi_xz(f, sigma=sigma, method=method, ref_size=ref_size, seed=seed)

    info, n = stream_layers(model, batches, n_features=n_features, seed=seed, layers=layers, max_samples=max_samples,
                            bytes_per_layer=lambda k, d: 4 * k * per_layer_rows, max_bytes=max_bytes, sink=sink,
                            on_pass_end=reduce)
    return [{"layer": r["layer"], "mi": results[r["layer"]], "features": r["features"], "samples": n, "dim": r["dim"],
             "sigma": None if method == "binning" else float(sigma), "method": method} for r in info]
