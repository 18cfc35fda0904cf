"""Loss landscapes of every exit around the trained weights.

One of the analyses of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models", which compares the regimes' loss landscapes. Slices
follow Li et al., "Visualizing the Loss Landscape of Neural Nets" (NeurIPS
2018): the loss is evaluated at ``theta + a * d1 + b * d2`` for random
Gaussian directions ``d1, d2`` that are filter-normalised, i.e. each filter
(the slice of a weight along its output dimension: a convolution's output
channel, a linear layer's output unit) of a direction is rescaled to the norm
of the same filter of ``theta``. Parameters with one dimension or none
(biases, normalisation scales and shifts, SDN's pooling mix) get a zero
direction, Li et al.'s setting for them.

``loss_surface`` also reports the total (weighted) loss, and can draw
uniform instead of Gaussian entries (``random_direction``), the two options
of the authors' landscape code (appendix A of the paper).

Every exit's loss is measured on the same points, in eval mode. BatchNorm
either uses the model's running statistics (the default: the statistics of
the unperturbed weights at every point) or, with ``bn_batches``, has them
re-estimated at every grid point on those (training) batches
(``batchnorm.reset_bn``), as the connectivity plane does: a perturbed network
with its old statistics is a different function from the one its weights
define, and the loss then measures the mismatch as much as the landscape. The
model itself is never changed: its weights are restored bit for bit
afterwards (and with ``bn_batches`` a copy is evaluated).

``landscape_summary`` reduces a surface to the numbers that a verdict on the
paper's appendix A (how the regimes' landscapes differ, per exit) can be
written from: the loss at the centre, its rise within given radii (the
sharpness of the minimum), the share of the grid within given margins of the
centre (the width of the basin), the curvature along each direction and
whether the centre is the lowest point of the slice.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..device import autocast_context
from ..tree import to_device
from ..models.multiexit import MultiExitModel
from .batchnorm import bn_modules, reset_bn


def exit_losses(model: MultiExitModel, batches: Iterable[Any], *, exits: Sequence[int] | None = None,
                autocast: bool = False) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy and accuracy of each exit over ``batches``, in eval mode.

    Args:
        model: the multi-exit model (its training flag is restored).
        batches: ``(x, y)`` pairs.
        exits: exit indices to measure (negative allowed); None = all.
        autocast: bf16 autocast on CUDA; off by default so that nearby points compare in float32.
    Returns:
        ``(loss, accuracy)``, each ``(len(exits),)`` float64 on the CPU.
    Raises:
        ValueError: if there are no batches.
    """
    E = model.num_exits
    wanted = list(range(E)) if exits is None else sorted({k % E for k in exits})
    device = next(model.parameters()).device
    loss = torch.zeros(len(wanted), dtype=torch.float64, device=device)
    correct = torch.zeros(len(wanted), dtype=torch.float64, device=device)
    n = 0
    was = model.training
    model.eval()
    ctx = autocast_context(device) if autocast else contextlib.nullcontext()
    try:
        with torch.inference_mode(), ctx:
            for x, y in batches:
                y = torch.as_tensor(y).reshape(-1).to(device)
                outs = model(to_device(x, device), exits=wanted)
                for i, o in enumerate(outs):
                    loss[i] += F.cross_entropy(o.float(), y, reduction="sum").double()
                    correct[i] += (o.argmax(-1) == y).sum()
                n += y.numel()
    finally:
        model.train(was)
    if n == 0:
        raise ValueError("no batches to evaluate")
    return (loss / n).cpu(), (correct / n).cpu()


def filter_normalized_direction(model: nn.Module, *, generator: torch.Generator) -> dict[str, Tensor]:
    """A random direction in weight space, filter-normalised (Li et al., 2018).

    Args:
        model: the model whose parameters set the shapes and filter norms.
        generator: a CPU generator (the direction does not depend on the device).
    Returns:
        ``{name: tensor}`` for every parameter, on the parameter's device;
        zero for parameters with fewer than two dimensions.
    """
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        w = p.detach()
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)  # (out,) one norm per filter
        w_norm = w.flatten(1).norm(dim=1)  # (out,)
        out[name] = d * (w_norm / d_norm).view(-1, *([1] * (p.dim() - 1)))
    return out


def _grid(steps: int, span: float) -> Tensor:
    """``steps`` points evenly spaced over ``[-span, span]``; the middle one is exactly 0 when ``steps`` is odd."""
    if steps == 1:
        return torch.zeros(1, dtype=torch.float64)
    half = (steps - 1) / 2
    return span * (torch.arange(steps, dtype=torch.float64) - half) / half


def loss_surface(model: MultiExitModel, batches: Iterable[Any], *, steps: int | Sequence[int] = (21, 21),
                 span: float = 1.0, seed: int = 0, exits: Sequence[int] | None = None,
                 direction: str = "gaussian", weights: Sequence[float] | None = None,
                 bn_batches: Iterable[Any] | None = None) -> dict:
    """Loss and accuracy of every exit on a 1-D or 2-D slice around the trained weights.

    Args:
        model: the multi-exit model (its weights are restored exactly afterwards).
        batches: ``(x, y)`` pairs; iterated once per grid point, so pass a list
            (a one-shot iterator is materialised first).
        steps: points along each direction: ``(S1, S2)``, or ``S1`` / ``(S1,)`` /
            ``(S1, 1)`` for a 1-D slice along ``d1`` only.
        span: the slice covers ``[-span, span]`` along each direction (in units
            of the filter-normalised direction, i.e. of the weights' own norms).
        seed: seed of the directions.
        exits: exits to measure; None = all.
        direction: ``"gaussian"`` (Li et al.'s directions, the default) or ``"uniform"``
            (see ``random_direction``); both filter-normalised.
        weights: loss weight of every exit (one per exit of the model) for the total loss;
            None: the mean over the measured exits.
        bn_batches: batches on which BatchNorm statistics are re-estimated at every grid point
            (centre included; materialised first); None: the model's own statistics everywhere.
    Returns:
        ``{"alphas": [S1], "betas": [S2], "exits": [E'], "loss": (E', S1, S2),
        "accuracy": (E', S1, S2), "total": (S1, S2), "direction": str, "bn_reset": bool}``, tensors float64 on the
        CPU; ``total`` is ``sum_k w_k loss_k`` over the measured exits (the training loss when
        every exit is measured); with odd ``S1, S2`` the centre ``[:, S1 // 2, S2 // 2]`` is the
        unperturbed model.
    Raises:
        ValueError: on bad steps, span, direction or weights.
    """
    if isinstance(steps, int):
        steps = (steps,)
    steps = tuple(int(s) for s in steps)
    if len(steps) == 1:
        steps = (steps[0], 1)
    if len(steps) != 2 or min(steps) < 1:
        raise ValueError(f"steps must be one or two positive counts, got {steps}")
    if not span > 0:
        raise ValueError(f"span must be > 0, got {span}")
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    E = model.num_exits
    wanted = list(range(E)) if exits is None else sorted({k % E for k in exits})
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    if weights is None:
        loss_w = torch.full((len(wanted),), 1.0 / len(wanted), dtype=torch.float64)
    else:
        if len(weights) != E or not all(math.isfinite(float(v)) for v in weights):
            raise ValueError(f"weights must be {E} finite numbers (one per exit), got {list(weights)}")
        loss_w = torch.tensor([float(weights[k]) for k in wanted], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    d1 = random_direction(model, generator=g, distribution=direction)
    d2 = random_direction(model, generator=g, distribution=direction) if steps[1] > 1 else None
    alphas, betas = _grid(steps[0], span), _grid(steps[1], span)
    bn = None
    if bn_batches is not None:
        bn = bn_batches if isinstance(bn_batches, (list, tuple)) else list(bn_batches)
        if not bn:
            raise ValueError("bn_batches is empty")
    reset = bn is not None and bool(bn_modules(model))
    work = copy.deepcopy(model) if reset else model  # re-estimated statistics never reach the model
    params = dict(work.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    loss = torch.zeros(len(wanted), *steps, dtype=torch.float64)
    acc = torch.zeros(len(wanted), *steps, dtype=torch.float64)
    try:
        for i, a in enumerate(alphas.tolist()):
            for j, b in enumerate(betas.tolist()):
                with torch.no_grad():
                    for n, p in params.items():
                        # From the saved weights every time: no drift accumulates over the grid.
                        w = saved[n] + a * d1[n]
                        if d2 is not None:
                            w = w + b * d2[n]
                        p.copy_(w)
                if reset:
                    reset_bn(work, bn)
                loss[:, i, j], acc[:, i, j] = exit_losses(work, batches, exits=wanted)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    return {"alphas": alphas.tolist(), "betas": betas.tolist(), "exits": wanted, "loss": loss, "accuracy": acc,
            "total": torch.einsum("k,kij->ij", loss_w, loss), "direction": direction, "bn_reset": reset}


DIRECTIONS = ("gaussian", "uniform")


def random_direction(model: nn.Module, *, generator: torch.Generator,
                     distribution: str = "gaussian") -> dict[str, Tensor]:
    """A filter-normalised random direction with Gaussian or uniform entries.

    ``"gaussian"`` is ``filter_normalized_direction`` (standard normal entries,
    drawn identically). ``"uniform"`` draws entries uniformly from ``[0, 1)``,
    as the ``noise_type="uniform"`` option of the authors' landscape code does
    (their ``early-exit-benchmark``, file ``loss_landscapes_modification/random_plane.py``,
    through ``loss_landscapes``' ``rand_u_like``): such a direction is not centred,
    so it also moves every filter along its own all-positive diagonal. Both are
    then filter-normalised as in Li et al. (each filter rescaled to the norm of
    the weights' filter), and parameters with fewer than two dimensions get 0.

    Args:
        model: the model whose parameters set the shapes and filter norms.
        generator: a CPU generator.
        distribution: ``"gaussian"`` or ``"uniform"``.
    Returns:
        ``{name: tensor}`` for every parameter, on the parameter's device.
    """
    if distribution == "gaussian":
        return filter_normalized_direction(model, generator=generator)
    if distribution != "uniform":
        raise ValueError(f"unknown distribution {distribution!r}; valid: {', '.join(DIRECTIONS)}")
    out = {}
    for name, p in model.named_parameters():
        if p.dim() < 2:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.rand(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)  # (out,) one norm per filter
        w_norm = p.detach().flatten(1).norm(dim=1)  # (out,)
        out[name] = d * (w_norm / d_norm).view(-1, *([1] * (p.dim() - 1)))
    return out


def _panel_summary(z: Tensor, alphas: Tensor, betas: Tensor, radii: Sequence[float],
                   margins: Sequence[float]) -> dict:
    """The summary numbers of one ``(S1, S2)`` loss slice (see ``landscape_summary``)."""
    i0, j0 = int(alphas.abs().argmin()), int(betas.abs().argmin())
    centre = float(z[i0, j0])
    rise = z - centre  # (S1, S2)
    r = torch.sqrt(alphas[:, None] ** 2 + betas[None, :] ** 2)  # (S1, S2) distance from the centre
    out = {"centre": centre, "min": float(z.min()), "max": float(z.max()), "mean_rise": float(rise.mean()),
           "centre_is_min": bool(float(z.min()) >= centre - 1e-12),
           "max_rise_within": {f"{q:g}": float(rise[r <= q + 1e-12].max()) for q in radii},
           "share_within": {f"{m:g}": float((rise <= m).double().mean()) for m in margins}}
    curv = {}
    for name, grid, idx, line in (("alpha", alphas, i0, z[:, j0]), ("beta", betas, j0, z[i0, :])):
        if 0 < idx < len(grid) - 1:
            h_lo, h_hi = float(grid[idx] - grid[idx - 1]), float(grid[idx + 1] - grid[idx])
            # the second derivative through three points (uneven spacing allowed)
            curv[name] = float(2 * (h_lo * line[idx + 1] - (h_lo + h_hi) * line[idx] + h_hi * line[idx - 1])
                               / (h_lo * h_hi * (h_lo + h_hi)))
        else:
            curv[name] = None
    out["curvature"] = curv
    return out


def landscape_summary(surface: dict, *, radii: Sequence[float] = (0.25, 0.5, 1.0),
                      margins: Sequence[float] = (0.1, 0.5, 1.0)) -> dict:
    """Numbers of a ``loss_surface`` result for comparing regimes (appendix A), per exit and for the total loss.

    Args:
        surface: a ``loss_surface`` result (tensors or nested lists).
        radii: distances from the centre (in the units of ``alphas``/``betas``) within which the largest
            rise of the loss over the centre's is reported (the sharpness of the minimum).
        margins: loss margins (nats) over the centre's: the share of the grid within each (the basin's width).
    Returns:
        ``{"total": panel, "exits": {exit: panel}, "direction", "bn_reset"}``, each panel ``{"centre", "min",
        "max", "mean_rise", "centre_is_min", "max_rise_within": {r: rise}, "share_within": {m: share},
        "curvature": {"alpha", "beta"}}`` (curvature: the second difference of the loss through the centre
        along each direction, None where the slice has no point on both sides).
    """
    alphas = torch.as_tensor(surface["alphas"], dtype=torch.float64)
    betas = torch.as_tensor(surface["betas"], dtype=torch.float64)
    loss = torch.as_tensor(surface["loss"], dtype=torch.float64)  # (E', S1, S2)
    out = {"exits": {int(k): _panel_summary(loss[i], alphas, betas, radii, margins)
                     for i, k in enumerate(surface["exits"])},
           "direction": surface.get("direction"), "bn_reset": surface.get("bn_reset")}
    if surface.get("total") is not None:
        out["total"] = _panel_summary(torch.as_tensor(surface["total"], dtype=torch.float64), alphas, betas, radii,
                                      margins)
    return out
