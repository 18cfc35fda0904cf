"""Numerical rank of the representations after each exit's stage.

One of the analyses of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models": the rank of the matrix of a layer's activations over a set
of samples measures how many independent directions the backbone still uses
there; the paper compares it along depth across training regimes.

- ``numerical_rank``: the number of singular values of an ``(N, D)`` matrix
  above a tolerance, by default ``max(N, D) * eps * s_max`` with ``eps`` the
  machine epsilon of the features' dtype (the rule of ``numpy.linalg.matrix_rank``
  and ``torch.linalg.matrix_rank``), or ``rtol * s_max``.
- ``effective_rank``: Roy & Vetterli (2007), ``exp(H(p))`` with
  ``p_i = s_i / sum_j s_j``; a continuous count of the directions used.
- ``stage_features`` / ``stage_ranks``: features of the state after each exit's
  stage, one ``(N, D)`` matrix per exit (states are reduced to one vector per
  sample by ``state_features``).

This module also holds the feature extraction shared by ``information.py``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from ..device import model_device
from ..models.multiexit import MultiExitModel
from ..tree import State, slice_state, state_batch_size, to_device

POOLS = ("cls", "mean")
RANK_KINDS = ("numerical", "effective")


# --- features of a state ------------------------------------------------------

def state_features(state: State, *, pool: str = "cls") -> Tensor:
    """One flat vector per sample from a model state.

    Args:
        state: a tensor ``(B, ...)`` (flattened per sample); a dict holding
            ``"hidden"`` ``(B, T, D)`` (a BERT state: the first, [CLS] token
            with ``pool="cls"``, the mean over the tokens that ``"mask"`` keeps
            with ``pool="mean"``); or a list / tuple of tensors (MSDNet's
            scales: the last, coarsest one, flattened).
        pool: ``"cls"`` or ``"mean"``, for dict states only.
    Returns:
        ``(B, D)`` float32 features.
    Raises:
        ValueError: on an unknown ``pool`` or a state of another kind.
    """
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; valid: {', '.join(POOLS)}")
    if isinstance(state, Tensor):
        return state.flatten(1).float()  # (B, D)
    if isinstance(state, dict):
        if "hidden" not in state:
            raise ValueError(f"dict state without a 'hidden' entry (keys: {sorted(state)})")
        h = state["hidden"]  # (B, T, D)
        if pool == "cls":
            return h[:, 0].float()  # (B, D)
        mask = state.get("mask")
        if mask is None:
            return h.float().mean(1)  # (B, D)
        w = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
        return ((h * w).sum(1) / w.sum(1).clamp_min(1)).float()  # (B, D)
    if isinstance(state, (list, tuple)) and state and isinstance(state[-1], Tensor):
        return state[-1].flatten(1).float()  # (B, D)
    raise ValueError(f"cannot take features of a state of type {type(state).__name__}")


def stage_features(model: MultiExitModel, batches: Iterable[Any], *, max_samples: int = 1024,
                   pool: str = "cls") -> dict[str, Any]:
    """Features of the state after each exit's stage, in eval mode and float32.

    Args:
        model: the multi-exit model (run on the device of its parameters).
        batches: ``(x, y)`` pairs; iteration stops once ``max_samples`` samples are in.
        max_samples: number of samples kept (the last batch is cut).
        pool: how a dict state becomes a vector (see ``state_features``).
    Returns:
        ``{"features": [(N, D_k) per exit], "labels": (N,), "stages": [stage index per exit]}``,
        tensors on the CPU.
    Raises:
        ValueError: if ``max_samples < 1`` or there are no batches.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    device = model_device(model)
    stages = list(model.exit_after)
    wanted = sorted(set(stages))
    feats: dict[int, list[Tensor]] = {s: [] for s in wanted}
    labels = []
    seen = 0
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in batches:
                take = min(state_batch_size(x), max_samples - seen)
                if take <= 0:
                    break
                if take < state_batch_size(x):
                    x = slice_state(x, slice(0, take))
                labels.append(torch.as_tensor(y).reshape(-1)[:take].cpu())
                state = to_device(x, device)
                for i in range(wanted[-1] + 1):
                    state = model.stage(i, state)
                    if i in feats:
                        feats[i].append(state_features(state, pool=pool).cpu())
                seen += take
                if seen >= max_samples:
                    break
    finally:
        model.train(was)
    if not labels:
        raise ValueError("no batches to analyse")
    per_stage = {s: torch.cat(v) for s, v in feats.items()}
    return {"features": [per_stage[s] for s in stages], "labels": torch.cat(labels), "stages": stages}


# --- ranks ----------------------------------------------------------------------

def _check_matrix(features: Tensor) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError(f"features must be an (N, D) tensor, got {getattr(features, 'shape', type(features))}")
    if features.numel() == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold non-finite values")


def singular_values(features: Tensor, *, center: bool = False, exact: bool = True) -> Tensor:
    """Singular values (descending, float64) of an ``(N, D)`` matrix, optionally after centring its columns.

    Args:
        features: ``(N, D)`` matrix.
        center: subtract the mean row first.
        exact: a full SVD; False takes the square roots of the eigenvalues of the
            smaller Gram matrix (``X X^T`` or ``X^T X``), an order of magnitude
            faster on wide activation matrices and accurate down to about
            ``1e-7 * s_max`` (float64 rounding is squared there).
    Returns:
        ``(min(N, D),)`` float64 tensor.
    """
    _check_matrix(features)
    x = features.double()
    if center:
        x = x - x.mean(0, keepdim=True)  # (N, D)
    if exact:
        return torch.linalg.svdvals(x)  # (min(N, D),)
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x  # (m, m), m = min(N, D)
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)  # (m,)


# Relative thresholds at or above this are resolved by the fast Gram route (its float64 error is ~1e-8 * s_max).
_GRAM_SAFE_RTOL = 1e-6


def numerical_rank(features: Tensor, *, tol: float | None = None, rtol: float | None = None,
                   center: bool = False) -> int:
    """Number of singular values of ``features`` above a tolerance.

    Args:
        features: ``(N, D)`` matrix (one row per sample).
        tol: absolute threshold; default ``max(N, D) * eps * s_max``, ``eps`` the
            machine epsilon of ``features``' dtype (float32 for other dtypes).
        rtol: relative threshold instead: singular values above ``rtol * s_max`` count.
        center: subtract the mean row first (rank of the covariance rather than of the raw activations).
    Returns:
        The rank, an int in ``[0, min(N, D)]``.
    Raises:
        ValueError: on a non-2-D or non-finite input, negative thresholds, or both ``tol`` and ``rtol``.
    """
    if tol is not None and rtol is not None:
        raise ValueError("give tol or rtol, not both")
    if (tol is not None and tol < 0) or (rtol is not None and rtol < 0):
        raise ValueError(f"thresholds must be >= 0, got tol={tol}, rtol={rtol}")
    s = singular_values(features, center=center, exact=False)
    s_max = float(s.max()) if s.numel() else 0.0
    if tol is None:
        if rtol is None:
            dtype = features.dtype if features.dtype.is_floating_point else torch.float32
            rtol = max(features.shape) * torch.finfo(dtype).eps
        tol = rtol * s_max
    if s_max > 0 and tol < _GRAM_SAFE_RTOL * s_max:
        s = singular_values(features, center=center, exact=True)  # a threshold finer than the Gram route resolves
    return int((s > tol).sum())


def effective_rank(features: Tensor, *, center: bool = False) -> float:
    """Effective rank (Roy & Vetterli, 2007): ``exp`` of the entropy of the normalised singular values.

    Args:
        features: ``(N, D)`` matrix.
        center: subtract the mean row first.
    Returns:
        A float in ``[1, min(N, D)]`` (0.0 for an all-zero matrix).
    """
    s = singular_values(features, center=center, exact=False)  # tiny values barely move the entropy
    total = s.sum()
    if float(total) == 0.0:
        return 0.0
    p = s / total  # (r,)
    return float(torch.exp(torch.special.entr(p).sum()))


def stage_ranks(model: MultiExitModel, batches: Iterable[Any], *, max_samples: int = 1024, kind: str = "numerical",
                tol: float | None = None, rtol: float | None = None, center: bool = False,
                pool: str = "cls") -> list:
    """Rank of the representation after each exit's stage.

    Args:
        model: the multi-exit model.
        batches: ``(x, y)`` pairs (e.g. ``split.batches(256)``).
        max_samples: rows of each feature matrix.
        kind: ``"numerical"`` (ints, see ``numerical_rank``) or ``"effective"`` (floats, see ``effective_rank``).
        tol, rtol: thresholds of ``numerical_rank``.
        center: subtract the mean feature first.
        pool: how dict states become vectors (see ``state_features``).
    Returns:
        One rank per exit, depth order.
    """
    if kind not in RANK_KINDS:
        raise ValueError(f"unknown rank kind {kind!r}; valid: {', '.join(RANK_KINDS)}")
    feats = stage_features(model, batches, max_samples=max_samples, pool=pool)["features"]
    if kind == "effective":
        return [effective_rank(f, center=center) for f in feats]
    return [numerical_rank(f, tol=tol, rtol=rtol, center=center) for f in feats]
