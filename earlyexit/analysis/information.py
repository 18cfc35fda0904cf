"""Mutual information between the representations and the labels / inputs.

One of the analyses of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models", which studies the regimes in terms of information flow:
for the state ``T`` after each exit's stage, how much it tells about the
label ``Y`` (``I(T; Y)``) and how much of the input ``X`` it keeps
(``I(X; T)``), the two coordinates of the information plane
(Shwartz-Ziv & Tishby, 2017). All values are in nats.

Two standard estimators, both applied after an optional Gaussian random
projection of the features to ``dim`` dimensions (Johnson-Lindenstrauss:
distances, hence neighbourhoods, are roughly kept, and the estimators stay
usable on layers with thousands of units):

- ``"knn"`` (default): nearest-neighbour estimators. With discrete labels,
  Ross (2014), "Mutual information between discrete and continuous data
  sets" (the estimator behind scikit-learn's ``mutual_info_classif``):
  ``I = psi(N) - <psi(N_y)> + psi(k) - <psi(m)>``, where ``d_i`` is the
  distance (Euclidean) to the ``k``-th neighbour of sample ``i`` within its
  class, ``N_y`` the size of that class and ``m_i`` the number of samples of
  any class within ``d_i``; samples alone in their class are left out. With
  continuous targets, Kraskov, Stoegbauer & Grassberger (2004), algorithm 1
  (max-norm): ``I = psi(k) + psi(N) - <psi(n_x + 1) + psi(n_y + 1)>``. A
  ``1e-10``-scale jitter breaks ties, as scikit-learn does.
- ``"binning"``: Shwartz-Ziv & Tishby's estimator: every unit is cut into
  ``bins`` equal-width bins over the range of the matrix, each sample's tuple
  of bin indices is a discrete symbol, and plug-in entropies give
  ``I(T; Y) = H(T) + H(Y) - H(T, Y)``. For a deterministic network and
  distinct inputs ``I(X; T) = H(T)``; ``stage_information`` reports ``I(X; T)``
  this way whatever the method (``T`` is a function of ``X``: a kNN estimate
  between the two is meaningless).

Estimates are clamped at 0. Both are biased (kNN low in high dimension,
binning high with many bins and few samples): compare them across exits and
regimes at equal ``N``, ``dim``, ``k`` / ``bins``, not as absolute truths.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor

from ..models.multiexit import MultiExitModel
from .rank import stage_features

METHODS = ("knn", "binning")


# --- helpers -----------------------------------------------------------------------

def random_projection(features: Tensor, dim: int | None, *, seed: int = 0) -> Tensor:
    """Project ``(N, D)`` features to ``dim`` dimensions with a seeded Gaussian matrix scaled by ``1 / sqrt(dim)``.

    Args:
        features: ``(N, D)`` matrix.
        dim: target dimension; None, or ``dim >= D``, returns the features unchanged (as float64).
        seed: seed of the projection matrix (drawn on the CPU).
    Returns:
        ``(N, min(D, dim))`` float64 matrix.
    """
    x = features.double()
    if dim is None or dim >= x.shape[1]:
        return x
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[1], dim, generator=g, dtype=torch.float64) / math.sqrt(dim)  # (D, dim)
    return x @ w.to(x.device)  # (N, dim)


def _plugin_entropy(codes: Tensor) -> float:
    """Plug-in entropy (nats) of a 1-D tensor of integer symbols."""
    _, counts = torch.unique(codes, return_counts=True)
    p = counts.double() / codes.numel()
    return float(-(p * p.log()).sum())


def bin_codes(features: Tensor, bins: int) -> Tensor:
    """One integer symbol per row: the tuple of equal-width bin indices of its entries.

    Bins span the range of the whole matrix, as in Shwartz-Ziv & Tishby.

    Args:
        features: ``(N, D)`` matrix.
        bins: bins per unit.
    Returns:
        ``(N,)`` long tensor of symbols (equal rows of bin indices share a symbol).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    x = features.double()
    lo, hi = x.min(), x.max()
    width = (hi - lo) / bins
    if float(width) == 0.0:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    idx = ((x - lo) / width).floor().clamp(0, bins - 1).long()  # (N, D)
    return torch.unique(idx, dim=0, return_inverse=True)[1]  # (N,)


def binned_entropy(features: Tensor, *, bins: int = 30) -> float:
    """Plug-in entropy (nats) of the binned rows of ``features`` (see ``bin_codes``)."""
    return _plugin_entropy(bin_codes(features, bins))


def _jitter(x: Tensor, seed: int) -> Tensor:
    """Tiny seeded noise that breaks distance ties (duplicated rows) without moving anything measurable."""
    g = torch.Generator().manual_seed(seed + 1)
    scale = 1e-10 * max(1.0, float(x.abs().mean()))
    return x + scale * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def _mi_knn_discrete(x: Tensor, y: Tensor, k: int) -> float:
    """Ross (2014): I(X; Y) for continuous ``x`` (N, D) and discrete ``y`` (N,)."""
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    keep = counts[inverse] > 1  # a sample alone in its class has no neighbour to measure: it is left out
    if int(keep.sum()) < 2:
        raise ValueError("the k-NN estimator needs at least one class with two samples or more")
    x, y = x[keep], y[keep]
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    # The direct form: the matrix-product shortcut loses the tiny distances that the jitter creates.
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (N, N) Euclidean
    dist.fill_diagonal_(float("inf"))
    radius = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    k_used = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for c in range(len(counts)):
        members = (inverse == c).nonzero().squeeze(1)
        kc = min(k, members.numel() - 1)
        within = dist[members][:, members]  # (n_c, n_c)
        radius[members] = within.kthvalue(kc, dim=1).values  # distance to the kc-th neighbour of the same class
        k_used[members] = kc
    m = (dist <= radius[:, None]).sum(1).double()  # (N,) samples of any class inside that radius
    dg = torch.special.digamma
    n = torch.tensor(float(x.shape[0]), dtype=torch.float64)
    val = dg(n) - dg(counts[inverse].double()).mean() + dg(k_used).mean() - dg(m).mean()
    return max(0.0, float(val))


def _mi_ksg(x: Tensor, z: Tensor, k: int) -> float:
    """Kraskov et al. (2004), algorithm 1 (max-norm): I(X; Z) for continuous ``x`` (N, Dx) and ``z`` (N, Dz)."""
    n = x.shape[0]
    if n < k + 1:
        raise ValueError(f"the KSG estimator needs more than k={k} samples, got {n}")
    dx = torch.cdist(x, x, p=float("inf"))  # (N, N)
    dz = torch.cdist(z, z, p=float("inf"))  # (N, N)
    joint = torch.maximum(dx, dz)
    joint.fill_diagonal_(float("inf"))
    eps = joint.kthvalue(k, dim=1).values  # (N,) distance to the k-th joint neighbour
    dx.fill_diagonal_(float("inf"))
    dz.fill_diagonal_(float("inf"))
    nx = (dx < eps[:, None]).sum(1).double()  # (N,)
    nz = (dz < eps[:, None]).sum(1).double()  # (N,)
    dg = torch.special.digamma
    val = dg(torch.tensor(float(k), dtype=torch.float64)) + dg(torch.tensor(float(n), dtype=torch.float64)) \
        - (dg(nx + 1) + dg(nz + 1)).mean()
    return max(0.0, float(val))


# --- public API ----------------------------------------------------------------------

def mutual_information(features: Tensor, labels: Tensor, *, method: str = "knn", k: int = 3, bins: int = 30,
                       dim: int | None = None, seed: int = 0) -> float:
    """Estimate ``I(features; labels)`` in nats.

    Args:
        features: ``(N, D)`` representations (one row per sample).
        labels: ``(N,)`` integer class labels (discrete target), or an ``(N, D2)``
            float matrix (continuous target, e.g. another representation).
        method: ``"knn"`` (Ross for discrete labels, KSG for continuous ones) or
            ``"binning"`` (Shwartz-Ziv & Tishby; a continuous target is binned too).
        k: neighbours of the kNN estimators.
        bins: bins per unit of the binning estimator.
        dim: random projection of the features (and of a continuous target) to
            this many dimensions first; None keeps them.
        seed: seed of the projection and of the tie-breaking jitter.
    Returns:
        The estimate, ``>= 0``.
    Raises:
        ValueError: on mismatched or malformed inputs, or an unknown method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] < 2:
        got = getattr(features, "shape", type(features))
        raise ValueError(f"features must be an (N, D) tensor with N >= 2, got {got}")
    if not isinstance(labels, Tensor) or labels.dim() not in (1, 2) or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be ({features.shape[0]},) or ({features.shape[0]}, D), "
                         f"got {getattr(labels, 'shape', type(labels))}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold non-finite values")
    discrete = labels.dim() == 1
    if discrete and labels.dtype.is_floating_point:
        raise ValueError("1-D labels must be integer classes; pass continuous targets as an (N, D) matrix")
    x = random_projection(features, dim, seed=seed)
    if discrete:
        y = labels.to(x.device)
        if method == "binning":
            tx = bin_codes(x, bins)
            joint = tx * (int(y.max()) - int(y.min()) + 1) + (y - y.min())
            return max(0.0, _plugin_entropy(tx) + _plugin_entropy(y) - _plugin_entropy(joint))
        return _mi_knn_discrete(_jitter(x, seed), y, k)
    z = random_projection(labels, dim, seed=seed + 7919).to(x.device)
    if method == "binning":
        tx, tz = bin_codes(x, bins), bin_codes(z, bins)
        joint = tx * (int(tz.max()) + 1) + tz
        return max(0.0, _plugin_entropy(tx) + _plugin_entropy(tz) - _plugin_entropy(joint))
    return _mi_ksg(_jitter(x, seed), _jitter(z, seed + 1), k)


def label_entropy(labels: Tensor) -> float:
    """Plug-in entropy ``H(Y)`` (nats) of integer labels: the ceiling of ``I(T; Y)``."""
    return _plugin_entropy(torch.as_tensor(labels).reshape(-1))


def stage_information(model: MultiExitModel, batches: Iterable[Any], *, method: str = "knn",
                      max_samples: int = 1024, dim: int | None = 32, k: int = 3, bin_dim: int | None = 4,
                      bins: int = 8, seed: int = 0, pool: str = "cls") -> list[dict]:
    """Information-plane coordinates of the state after each exit's stage.

    ``I(T; Y)`` uses ``method``. ``I(X; T)`` is always the binning estimate:
    for a deterministic network and distinct inputs it equals ``H(T)`` of the
    binned (projected) features (Shwartz-Ziv & Tishby), whereas a kNN estimate
    between raw inputs and features is meaningless (``T`` is a function of
    ``X``, the true value infinite). Binned entropies saturate at ``log N``
    once every sample has its own bin pattern, hence the separate, low
    ``bin_dim`` and ``bins`` defaults (``bins ** bin_dim`` cells for ``N`` samples).

    Args:
        model: the multi-exit model (run in eval mode).
        batches: ``(x, y)`` pairs; the first ``max_samples`` samples are used.
        method: estimator of ``I(T; Y)``: ``"knn"`` or ``"binning"`` (see the module docstring).
        max_samples: samples used.
        dim: random projection of the features for the kNN estimator; None keeps them.
        k: neighbours of the kNN estimator.
        bin_dim: random projection of the features for the binning estimates; None keeps them.
        bins: bins per (projected) unit of the binning estimates.
        seed: seed of the projections and jitter.
        pool: how dict states become vectors (see ``rank.state_features``).
    Returns:
        One dict per exit: ``{"exit", "stage", "I_TY", "I_XT", "H_Y"}`` (nats;
        ``H_Y``, the labels' entropy, bounds ``I_TY``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    got = stage_features(model, batches, max_samples=max_samples, pool=pool)
    y = got["labels"]
    h_y = label_entropy(y)
    out = []
    for e, (f, s) in enumerate(zip(got["features"], got["stages"])):
        if method == "knn":
            i_ty = mutual_information(f, y, method="knn", k=k, dim=dim, seed=seed)
        else:
            i_ty = mutual_information(f, y, method="binning", bins=bins, dim=bin_dim, seed=seed)
        i_xt = binned_entropy(random_projection(f, bin_dim, seed=seed), bins=bins)
        out.append({"exit": e, "stage": s, "I_TY": i_ty, "I_XT": i_xt, "H_Y": h_y})
    return out
