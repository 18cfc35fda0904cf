"""Numerical rank of every backbone layer's output: the paper's Figure 3.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" compares the
training regimes by the numerical rank of the representation at each layer of
the backbone, measured on a whole evaluation split.

For each hooked layer (see ``layers.py``: every backbone ``Conv2d`` /
``Linear`` output, before normalisation and activation; the IC heads left out)
the outputs over the split form a matrix ``X`` of shape ``(N, k)``: one row per
sample, ``k = min(n_features, d)`` seeded random columns of the layer's ``d``
outputs. ``X`` itself is never held: its Gram matrix ``G = X^T X`` ``(k, k)`` is
accumulated in float64 batch by batch (with the column sums, for the centred
variant), and the rank is read from the eigenvalues ``lambda_i`` of ``G``:
the singular values of ``X`` are ``s_i = sqrt(lambda_i)``, and ``s_i`` counts when
``s_i > rtol * s_max`` with ``rtol = max(N, k) * eps`` by default, ``eps`` the
machine epsilon of the layer's output dtype (float32 for a float32 model). This
is the rule of ``numpy.linalg.matrix_rank`` (and ``torch.linalg.matrix_rank``) on
``X`` itself, so the result is that of ``matrix_rank`` on the full activation
matrix up to ties at the threshold. In float64 the Gram matrix resolves
singular values down to about ``1e-7 * s_max``, far below that threshold
(``max(N, k) * 1.2e-7 * s_max`` for float32 outputs).

Where the authors' code differs (their ``EarlyExitRepr`` repository, file
``src/modules/tunnel_code.py``): it applies ``torch.linalg.matrix_rank`` to the
*centred covariance* ``torch.cov(X^T)`` with that function's default tolerance
on the covariance's own eigenvalues (``eps * k * lambda_max``, i.e. singular
values of the centred ``X`` above ``sqrt(k * eps) * s_max``, a much coarser
cut), and it draws a fresh unseeded column subset for every batch. Here the
rank is that of ``X`` with numpy's tolerance (``center=True`` gives the centred
variant, ``rtol`` any other threshold), and the column subset is fixed per
layer. That code keeps up to 8000 columns per layer (6000 here by default)
and measures on the test split (the caller passes the split here).
"""

from __future__ import annotations

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


def layer_ranks(model: nn.Module, batches: Batches, *, n_features: int = 6000, seed: int = 0,
                layers: Sequence[str] | None = None, center: bool = False, rtol: float | None = None,
                max_samples: int | None = None, max_bytes: int = 2**30) -> list[dict]:
    """Numerical rank of every backbone layer's output over a split (Figure 3).

    Args:
        model: a ``MultiExitModel`` (or any module), run in eval mode without gradients;
            its mode is restored and its weights are not touched.
        batches: ``(x, y)`` pairs (or bare inputs), e.g. ``lambda: split.batches(256)``;
            a callable or a re-iterable object lets the layers be split over several passes.
        n_features: columns kept per layer (``min(n_features, d)``, see ``layers.feature_subset``).
        seed: seed of the column subsets (the same for every model of one architecture).
        layers: qualified names of the layers to measure; None: all hooked layers.
        center: subtract the column means first (the rank of the centred activations).
        rtol: relative threshold on the singular values of ``X``; None: ``max(N, k) * eps``.
        max_samples: use at most this many samples; None: all.
        max_bytes: memory budget of the Gram accumulators of one pass (``8 k^2`` bytes per layer).
    Returns:
        One dict per layer, in forward order: ``{"layer": name, "rank": int, "features": k,
        "samples": N, "dim": d}``.
    Raises:
        ValueError: on bad arguments, no data, or unknown layer names.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    grams: dict[str, Tensor] = {}  # layer -> (k, k) float64
    sums: dict[str, Tensor] = {}  # layer -> (k,) float64
    dtypes: dict[str, torch.dtype] = {}  # layer -> dtype of its output

    def sink(name: str, x: Tensor) -> None:  # x: (B, k)
        dtypes.setdefault(name, x.dtype)
        x = x.double()
        if name not in grams:
            grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            sums[name] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        grams[name].addmm_(x.T, x)  # += X_b^T X_b
        sums[name] += x.sum(0)

    ranks: dict[str, int] = {}

    def reduce(group: list[str], n: int) -> None:  # read the pass's ranks, then free its Gram matrices
        for name in group:
            g, s = grams.pop(name), sums.pop(name)
            if center:
                g = g - torch.outer(s, s) / n  # sum_i (x_i - mu)(x_i - mu)^T
            dtype = dtypes[name]
            eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
            ranks[name] = rank_from_gram(g, n, rtol=rtol, eps=eps)

    info, n = stream_layers(model, batches, n_features=n_features, seed=seed, layers=layers, max_samples=max_samples,
                            bytes_per_layer=lambda k, d: 8 * k * (k + 1), max_bytes=max_bytes, sink=sink,
                            on_pass_end=reduce)
    return [{"layer": r["layer"], "rank": ranks[r["layer"]], "features": r["features"], "samples": n, "dim": r["dim"]}
            for r in info]
