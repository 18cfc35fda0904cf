"""The loss on the plane through three trained models: the paper's Figure 2 (mode connectivity).

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" shows
whether models trained under different regimes lie in one basin by drawing
the loss on the 2-D plane through three of them in weight space (the picture
of Garipov et al., 2018). ``connectivity_plane``:

1. matches ``a`` and ``b`` onto ``ref`` (Git Re-Basin weight matching,
   ``connectivity.weight_matching``; MLP and ResNet models), since permuting
   hidden units changes the weights but not the function;
2. flattens every parameter of the three models (float64) into
   ``theta_ref``, ``theta_a``, ``theta_b`` and builds an orthonormal basis of
   the plane by Gram-Schmidt, ``ref`` at the origin:
   ``u = (theta_a - theta_ref) / ||theta_a - theta_ref||``, ``v`` the unit vector
   along the part of ``theta_b - theta_ref`` orthogonal to ``u``; the models sit
   at ``ref = (0, 0)``, ``a = (||theta_a - theta_ref||, 0)``,
   ``b = (<theta_b - theta_ref, u>, ||(theta_b - theta_ref)_perp||)``;
3. evaluates ``theta_ref + x u + y v`` on a ``steps x steps`` grid, ``x`` over
   ``span`` times a's distance and ``y`` over ``span`` times b's orthogonal
   distance (so with the default ``(-0.5, 1.5)`` a margin of half a model
   distance surrounds ``ref`` and ``a``, and ``b``'s height; ``b`` is inside
   as long as its projection on ``u`` is, which holds when the three models
   are about equally far apart);
4. re-estimates BatchNorm statistics at every point (``connectivity.reset_bn``)
   on ``bn_batches`` (default: the evaluation batches), since the statistics of
   a point between models are not the mix of theirs; models without
   BatchNorm skip this. Other buffers come from ``ref``.

Every exit's loss and accuracy are measured at each point (eval mode,
``landscape.exit_losses``), and the total loss ``sum_k w_k L_k`` with the
training weights (default: the mean over exits, as the authors' training loss
``sum_k L_k / E`` in their ``early-exit-benchmark`` code, file
``metrics/ee_training_loss_wrapper.py``). The three models' own points are
evaluated the same way, so their entries equal each model's loss after the
same BatchNorm re-estimation.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..models.multiexit import MultiExitModel
from .batchnorm import reset_bn
from .connectivity import weight_matching
from .landscape import exit_losses


def _flat(model: nn.Module) -> Tensor:
    """All parameters, flattened and concatenated, float64 on the model's device: ``(P,)``."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def plane_basis(ref: nn.Module, a: nn.Module, b: nn.Module) -> dict:
    """Orthonormal basis (Gram-Schmidt) of the plane through three models' parameters, ``ref`` at the origin.

    Args:
        ref, a, b: models of one architecture (parameters in the same order and shapes).
    Returns:
        ``{"origin": (P,), "u": (P,), "v": (P,), "coords": {"ref": (0, 0), "a": (x, y), "b": (x, y)}}``,
        vectors float64.
    Raises:
        ValueError: if the models differ in shape, or the three points are (nearly) collinear.
    """
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in (ref, a, b)]
    if shapes[0] != shapes[1] or shapes[0] != shapes[2]:
        raise ValueError("the three models do not have the same parameters")
    o = _flat(ref)
    da, db = _flat(a).to(o.device) - o, _flat(b).to(o.device) - o  # (P,)
    la = float(da.norm())
    if la == 0.0:
        raise ValueError("model a has the same weights as ref: no plane")
    u = da / la
    bx = float(db @ u)
    perp = db - bx * u
    lv = float(perp.norm())
    if lv <= 1e-9 * max(la, float(db.norm())):
        raise ValueError("the three models are collinear in weight space: no plane")
    return {"origin": o, "u": u, "v": perp / lv, "coords": {"ref": (0.0, 0.0), "a": (la, 0.0), "b": (bx, lv)}}


def _load(model: nn.Module, flat: Tensor) -> None:
    """Write a flat float64 vector into the model's parameters (cast to each parameter's dtype)."""
    i = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[i:i + n].view_as(p).to(p.dtype))
            i += n


def _weights(weights: Sequence[float] | None, E: int) -> Tensor:
    if weights is None:
        return torch.full((E,), 1.0 / E, dtype=torch.float64)
    w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
    if w.numel() != E or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights must be {E} finite numbers (one per exit), got {list(weights)}")
    return w


def connectivity_plane(ref: MultiExitModel, a: MultiExitModel, b: MultiExitModel, batches: Iterable[Any], *,
                       steps: int = 150, span: tuple[float, float] = (-0.5, 1.5), match: bool = True,
                       bn_batches: Iterable[Any] | None = None, weights: Sequence[float] | None = None,
                       seed: int = 0) -> dict:
    """Every exit's loss, and the weighted total, on the plane through three models (Figure 2).

    Args:
        ref: the reference model, at the origin (left unchanged, like ``a`` and ``b``).
        a, b: two more models of the same architecture.
        batches: ``(x, y)`` pairs to evaluate on, iterated at every point (materialised first).
        steps: grid points along each axis (``steps * steps`` evaluations).
        span: ``(lo, hi)`` extent of each axis in units of the models' distances (see the module docstring).
        match: permute ``a`` and ``b`` onto ``ref`` first (weight matching; needs scipy, MLP / ResNet only).
        bn_batches: batches for the BatchNorm re-estimation at every point; None: ``batches``.
        weights: loss weight of every exit for the total; None: ``1 / E`` each.
        seed: seed of the weight matching.
    Returns:
        ``{"xs": [S], "ys": [S], "exits": [E], "weights": [E], "loss": (S, S) total, "exit_loss": (E, S, S),
        "accuracy": (E, S, S), "coords": {"ref", "a", "b": (x, y)}, "models": {"ref", "a", "b":
        {"loss": total, "exit_loss": [E], "accuracy": [E]}}, "matched": bool}``; grid entry ``[i, j]`` is at
        ``(xs[i], ys[j])``; tensors float64 on the CPU.
    Raises:
        ValueError: on bad steps or span, mismatched or collinear models, or no batches.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    lo, hi = (float(s) for s in span)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"span must be (lo, hi) with lo < hi, got {span}")
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    if not batches:
        raise ValueError("no batches to evaluate")
    bn = batches if bn_batches is None else (bn_batches if isinstance(bn_batches, (list, tuple)) else list(bn_batches))
    if match:
        a = weight_matching(ref, a, seed=seed)
        b = weight_matching(ref, b, seed=seed)
    basis = plane_basis(ref, a, b)
    E = ref.num_exits
    w = _weights(weights, E)
    work = copy.deepcopy(ref)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in work.modules())
    o, u, v = basis["origin"], basis["u"], basis["v"]

    def at(x: float, y: float) -> tuple[Tensor, Tensor]:  # (E,) loss and accuracy at plane point (x, y)
        _load(work, o + x * u + y * v)
        if has_bn:
            reset_bn(work, bn)
        return exit_losses(work, batches)

    la, lv = basis["coords"]["a"][0], basis["coords"]["b"][1]
    t = torch.linspace(lo, hi, steps, dtype=torch.float64)
    xs, ys = (t * la).tolist(), (t * lv).tolist()
    exit_loss = torch.zeros(E, steps, steps, dtype=torch.float64)
    acc = torch.zeros(E, steps, steps, dtype=torch.float64)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            exit_loss[:, i, j], acc[:, i, j] = at(x, y)
    models = {}
    for name, (x, y) in basis["coords"].items():
        l_k, a_k = at(x, y)
        models[name] = {"loss": float(w @ l_k), "exit_loss": l_k.tolist(), "accuracy": a_k.tolist()}
    return {"xs": xs, "ys": ys, "exits": list(range(E)), "weights": w.tolist(),
            "loss": torch.einsum("k,kij->ij", w, exit_loss), "exit_loss": exit_loss, "accuracy": acc,
            "coords": {k: tuple(c) for k, c in basis["coords"].items()}, "models": models, "matched": bool(match)}
