"""Numerical rank of every backbone layer's output: the paper's Figure 3.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" compares the
training regimes by the numerical rank of the representation at each layer of
the backbone, measured on a whole evaluation split.

For each hooked layer (see ``layers.py``: every backbone ``Conv2d`` /
``Linear`` output, before normalisation and activation; the IC heads left out)
the outputs over the split form a matrix ``X`` of shape ``(N, k)``: one row per
sample, ``k = min(n_features, d)`` seeded random columns of the layer's ``d``
outputs. ``X`` itself is never held: its Gram matrix ``G = X^T X`` ``(k, k)`` is
accumulated batch by batch in float64 (the batch products in float32 under the
covariance rule, see ``layer_ranks``), with the column sums, and the rank is
read from the eigenvalues of ``G`` (or of the centred ``G - s s^T / N``). Two
rules (``tolerance=``):

- ``"covariance"``, the authors' protocol. Their code (the ``EarlyExitRepr``
  repository of the paper's authors, class ``RepresentationsSpectra`` in
  ``src/modules/tunnel_code.py``) hooks the backbone's Conv2d and Linear layers
  on the test loader, keeps at most ``MAX_REPR_SIZE`` (8000 in their scripts)
  random columns per layer, and takes ``torch.linalg.matrix_rank(torch.cov(X^T))``:
  the rank of the *centred covariance matrix* ``C = X_c^T X_c / (N - 1)``
  ``(k, k)`` with that function's default tolerance, i.e. eigenvalues of ``C``
  above ``rtol * lambda_max`` with ``rtol = k * eps`` (``eps`` of the
  activations' dtype, float32: ``1.19e-7``, so ``rtol = 7.2e-4`` at
  ``k = 6000``). In terms of the singular values of the centred ``X`` the cut is
  ``sqrt(k * eps) * s_max`` (2.7 % of the largest at ``k = 6000``). Here ``C``
  is formed in float64 (theirs is float32; its rounding, about ``1e-5 *
  lambda_max`` at ``N = 10,000``, is far below the cut) and the column subset is
  fixed per layer (theirs is redrawn, unseeded, for every batch); with
  ``columns="shared"`` every layer wide enough keeps the same indices.
- ``"numpy"``: the rank of ``X`` itself (``center=True``: of the centred ``X``)
  by ``numpy.linalg.matrix_rank``'s rule, singular values above
  ``max(N, k) * eps * s_max`` (or ``rtol * s_max``), a much finer cut: at
  ``N = 10,000`` almost every layer reaches ``min(N, k)``. In float64 the Gram
  matrix resolves singular values down to about ``1e-7 * s_max``, far below it.

Every row states its rule and tolerance, the ceiling ``min(N, k)`` and whether
the layer is saturated: its rank within ``saturation`` (1 %) of the ceiling,
where the rank says more about ``N`` and ``k`` than about the layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .layers import Batches, stream_layers


def rank_from_gram(gram: Tensor, n: int, *, rtol: float | None = None, eps: float | None = None) -> int:
    """Numerical rank of an ``(n, k)`` matrix ``X`` from its Gram matrix ``X^T X``.

    Args:
        gram: ``(k, k)`` symmetric positive semi-definite matrix (float64 recommended).
        n: number of rows of ``X``.
        rtol: singular values of ``X`` above ``rtol * s_max`` count; default ``max(n, k) * eps``.
        eps: machine epsilon of ``X``'s dtype (default: float32's).
    Returns:
        The rank, an int in ``[0, min(n, k)]``.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got {tuple(gram.shape)}")
    k = gram.shape[0]
    lam = torch.linalg.eigvalsh(gram.double())  # (k,) ascending
    s = lam.clamp_min(0).sqrt()  # (k,) singular values of X
    s_max = float(s.max()) if k else 0.0
    if s_max == 0.0:
        return 0
    if rtol is None:
        rtol = max(n, k) * (torch.finfo(torch.float32).eps if eps is None else eps)
    return min(int((s > rtol * s_max).sum()), n)


TOLERANCES = ("covariance", "numpy")
SATURATION = 0.01  # a rank within 1 % of min(N, k) is saturated


def rank_from_covariance(gram: Tensor, n: int, *, rtol: float | None = None,
                         eps: float | None = None) -> int:
    """Rank of the covariance ``C = G / (n - 1)`` by ``torch.linalg.matrix_rank``'s default rule (the authors').

    Args:
        gram: ``(k, k)`` centred Gram matrix ``X_c^T X_c`` (float64 recommended).
        n: number of rows of ``X`` (fewer than 2: no covariance, rank 0).
        rtol: eigenvalues of ``C`` above ``rtol * lambda_max`` count; default ``k * eps``.
        eps: machine epsilon of ``X``'s dtype (default: float32's).
    Returns:
        The rank, an int in ``[0, min(n - 1, k)]`` up to rounding.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got {tuple(gram.shape)}")
    k = gram.shape[0]
    if n < 2 or k == 0:
        return 0
    lam = torch.linalg.eigvalsh(gram.double() / (n - 1)).abs()  # (k,): singular values of the symmetric C
    lam_max = float(lam.max())
    if lam_max == 0.0:
        return 0
    if rtol is None:
        rtol = k * (torch.finfo(torch.float32).eps if eps is None else eps)
    return int((lam > rtol * lam_max).sum())


def rank_tolerance(tolerance: str, n: int, k: int, *, eps: float, rtol: float | None = None,
                   center: bool = False) -> dict:
    """The rule and the relative tolerance a rank was read with, as stated in each row of ``layer_ranks``."""
    if tolerance == "covariance":
        r = k * eps if rtol is None else rtol
        return {"rule": "covariance", "matrix": "centred covariance of the kept columns (k x k)",
                "on": "eigenvalues", "rtol": r, "eps": eps, "singular_value_rtol": math.sqrt(r)}
    r = max(n, k) * eps if rtol is None else rtol
    return {"rule": "numpy", "matrix": "centred activations (N x k)" if center else "activations (N x k)",
            "on": "singular values", "rtol": r, "eps": eps, "singular_value_rtol": r}


def layer_ranks(model: nn.Module, batches: Batches, *, n_features: int = 6000, seed: int = 0,
                layers: Sequence[str] | None = None, center: bool = False, rtol: float | None = None,
                max_samples: int | None = None, max_bytes: int = 2**30, tolerance: str = "numpy",
                columns: str = "layer", saturation: float = SATURATION) -> list[dict]:
    """Numerical rank of every backbone layer's output over a split (Figure 3).

    Args:
        model: a ``MultiExitModel`` (or any module), run in eval mode without gradients;
            its mode is restored and its weights are not touched.
        batches: ``(x, y)`` pairs (or bare inputs), e.g. ``lambda: split.batches(256)``;
            a callable or a re-iterable object lets the layers be split over several passes.
        n_features: columns kept per layer (``min(n_features, d)``, see ``layers.feature_subset``).
        seed: seed of the column subsets (the same for every model of one architecture).
        layers: qualified names of the layers to measure; None: all hooked layers.
        center: with ``tolerance="numpy"``, subtract the column means first (``"covariance"`` always centres).
        rtol: relative threshold (on the singular values of ``X`` for ``"numpy"``, on the eigenvalues
            of the covariance for ``"covariance"``); None: the rule's default (see the module docstring).
        max_samples: use at most this many samples; None: all.
        max_bytes: memory budget of the Gram accumulators of one pass (``8 k^2`` bytes per layer).
        tolerance: ``"numpy"`` (the rank of ``X``, the default) or ``"covariance"`` (the authors' rank
            of the centred covariance).
        columns: ``"layer"`` or ``"shared"`` column subsets (``layers.feature_subset``; the paper: shared).
        saturation: a rank ``>= (1 - saturation) * min(N, k)`` is flagged saturated.
    Returns:
        One dict per layer, in forward order: ``{"layer": name, "rank": int, "features": k,
        "samples": N, "dim": d, "ceiling": min(N, k), "saturated": bool, "tolerance": {"rule", "matrix",
        "on", "rtol", "eps", "singular_value_rtol"}}``.
    Raises:
        ValueError: on bad arguments, no data, or unknown layer names.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if tolerance not in TOLERANCES:
        raise ValueError(f"unknown tolerance {tolerance!r}; valid: {', '.join(TOLERANCES)}")
    if not 0 <= saturation < 1:
        raise ValueError(f"saturation must be in [0, 1), got {saturation}")
    grams: dict[str, Tensor] = {}  # layer -> (k, k) float64
    sums: dict[str, Tensor] = {}  # layer -> (k,) float64
    shifts: dict[str, Tensor] = {}  # layer -> (k,) the first batch's column means (covariance rule)
    dtypes: dict[str, torch.dtype] = {}  # layer -> dtype of its output
    fast = tolerance == "covariance"  # the coarse cut allows float32 batch products (see below)

    def sink(name: str, x: Tensor) -> None:  # x: (B, k)
        dtypes.setdefault(name, x.dtype)
        if name not in grams:
            grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            sums[name] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            if fast:
                shifts[name] = x.double().mean(0)
        if fast:
            # Shifted by the first batch's means, so that centring later cancels nothing large; each batch's
            # product in float32 (relative error ~1e-6 of the batch's Gram, against a cut at k * eps = 7e-4 of
            # the covariance's largest eigenvalue), accumulated in float64: twice as fast on wide layers.
            xs = x.double() - shifts[name]  # (B, k)
            grams[name] += (xs.float().T @ xs.float()).double()
            sums[name] += xs.sum(0)
            return
        x = x.double()
        grams[name].addmm_(x.T, x)  # += X_b^T X_b
        sums[name] += x.sum(0)

    ranks: dict[str, tuple[int, dict]] = {}

    def reduce(group: list[str], n: int) -> None:  # read the pass's ranks, then free their Gram matrices
        for name in group:
            g, s = grams.pop(name), sums.pop(name)
            dtype = dtypes[name]
            eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
            centred = center or tolerance == "covariance"
            if centred:  # with a shift m: sum_i (x_i - m)(x_i - m)^T - s s^T / n, s = sum_i (x_i - m)
                g = g - torch.outer(s, s) / n  # sum_i (x_i - mu)(x_i - mu)^T
            if tolerance == "covariance":
                r = rank_from_covariance(g, n, rtol=rtol, eps=eps)
            else:
                r = rank_from_gram(g, n, rtol=rtol, eps=eps)
            ranks[name] = (r, rank_tolerance(tolerance, n, g.shape[0], eps=eps, rtol=rtol, center=centred))

    info, n = stream_layers(model, batches, n_features=n_features, seed=seed, layers=layers, max_samples=max_samples,
                            bytes_per_layer=lambda k, d: 8 * k * (k + 1), max_bytes=max_bytes, sink=sink,
                            on_pass_end=reduce, columns=columns)
    rows = []
    for r in info:
        rank, tol = ranks[r["layer"]]
        ceiling = min(n, r["features"])
        rows.append({"layer": r["layer"], "rank": rank, "features": r["features"], "samples": n, "dim": r["dim"],
                     "ceiling": ceiling, "saturated": bool(rank >= (1.0 - saturation) * ceiling), "tolerance": tol})
    return rows
