"""Loss weights alpha_k over exits: L = sum_k alpha_k * L_k.

A weighting is a callable ``(num_exits, progress) -> list[float]`` giving one
weight per exit (the backbone's own exit last), where ``progress`` in [0, 1]
is the fraction of the current phase's training done. Phase 3 uses the IC
entries only; phase 1 always trains the final exit alone with weight 1.

Schemes:

- ``uniform``: every exit weighs 1.
- ``sdn`` (Shallow-Deep Networks, Kaya et al., ICML 2019): the weight of IC
  ``k`` grows linearly with training from 0.01 to its maximum
  ``tau_k = 0.9 * (k + 1) / (E - 1)`` and stays there
  (``alpha_k = min(tau_k, 0.01 + progress * tau_k)``); the final exit weighs 1.
  SDN's code fixes six ICs with maxima 0.15, 0.30, ..., 0.90 (the fractions of
  the backbone's cost at which they sit) and steps the weights once per epoch;
  here the maxima are spread evenly up to 0.9 over however many ICs there are
  (identical to SDN's for six ICs) and the ramp is continuous in ``progress``.
- ``han``: constant weights rising linearly along depth from 0.6 (first exit)
  to 1.4 (last), mean 1 (a single exit weighs 1). As used by Han et al. (2022).
- ``pabee`` (PABEE, Zhou et al., NeurIPS 2020): exit ``k`` (0-based) weighs
  ``k + 1``, normalised by the sum ``E (E + 1) / 2`` as PABEE's loss divides
  by it, so the weights sum to 1.
- ``gradient-equilibrium`` (IMTA, Li et al., ICCV 2019, "Improved Techniques
  for Training Adaptive Deep Networks"): uniform loss weights plus a gradient
  rescaling in the backbone. IMTA's code passes the features read by exit
  ``k`` (of ``n``) through an identity whose backward multiplies the gradient
  by ``1 / (n - k)``, and the features flowing on to the deeper stages through
  a second one that multiplies it by ``n - k - 1``. By induction, the
  gradient reaching the output of any stage is the *mean* over the exits that
  depend on it of each exit's own gradient, instead of their sum: deep
  stages no longer see the early exits' gradients summed on top of theirs.
  ``GradientEquilibrium.prepare(model)`` installs the rescaling as forward
  pre-hooks (on each IC head: ``1 / m_k``; on the stage after it:
  ``(m_k - 1) / m_k``, ``m_k`` the number of trained exits at or after ``k``),
  which gives the same gradients as IMTA's two rescalings. IMTA (on MSDNet)
  rescales only the coarsest scale, the one its classifiers read; here every
  floating-point tensor of the state is rescaled, the same rule for every
  backbone.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

Weighting = Callable[[int, float], list[float]]


def _check(num_exits: int, progress: float) -> None:
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be an integer >= 1, got {num_exits!r}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")


def uniform(num_exits: int, progress: float) -> list[float]:
    """Every exit weighs 1 (the plain sum of the exits' losses)."""
    _check(num_exits, progress)
    return [1.0] * num_exits


def sdn(num_exits: int, progress: float) -> list[float]:
    """SDN's schedule: IC ``k`` ramps from 0.01 to ``0.9 (k + 1) / (E - 1)``; the final exit weighs 1.

    Args:
        num_exits: ``E``, ICs plus the final exit.
        progress: fraction of the phase done, in [0, 1].
    Returns:
        ``E`` weights.
    """
    _check(num_exits, progress)
    n_ic = num_exits - 1
    maxima = [0.9 * (k + 1) / n_ic for k in range(n_ic)]
    return [min(tau, 0.01 + progress * tau) for tau in maxima] + [1.0]


def han(num_exits: int, progress: float) -> list[float]:
    """Constant weights from 0.6 (first exit) to 1.4 (last), linear in the exit index, mean 1.

    Args:
        num_exits: ``E``.
        progress: ignored (constant schedule), checked to lie in [0, 1].
    Returns:
        ``E`` weights.
    """
    _check(num_exits, progress)
    if num_exits == 1:
        return [1.0]
    return [0.6 + 0.8 * k / (num_exits - 1) for k in range(num_exits)]


def pabee(num_exits: int, progress: float) -> list[float]:
    """PABEE's depth weights ``(k + 1) / sum_j (j + 1)``: they sum to 1.

    Args:
        num_exits: ``E``.
        progress: ignored (constant schedule), checked to lie in [0, 1].
    Returns:
        ``E`` weights.
    """
    _check(num_exits, progress)
    total = num_exits * (num_exits + 1) / 2
    return [(k + 1) / total for k in range(num_exits)]


# --- gradient equilibrium -------------------------------------------------------

class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by a constant in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(tree: Any, scale: float) -> Any:
    """Apply ``_ScaleGrad`` to every floating-point tensor of a pytree that requires grad.

    Args:
        tree: a tensor or a (nested) dict / list / tuple of tensors.
        scale: gradient factor.
    Returns:
        The same structure; values unchanged, gradients scaled by ``scale``.
    """
    if isinstance(tree, Tensor):
        return _ScaleGrad.apply(tree, scale) if tree.requires_grad and tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return type(tree)((k, scale_grad(v, scale)) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return type(tree)(scale_grad(v, scale) for v in tree)
    return tree


class HookHandle:
    """Removable group of hooks (``remove()``; also a context manager)."""

    def __init__(self, handles: list) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _first_arg_hook(scale: float) -> Callable:
    # Only the state (the first argument) is rescaled; further arguments (e.g. a cascade input) are left alone.
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (scale_grad(args[0], scale), *args[1:])
    return hook


class GradientEquilibrium:
    """IMTA's gradient equilibrium: uniform loss weights plus ``prepare(model)`` (see the module docstring)."""

    def __call__(self, num_exits: int, progress: float) -> list[float]:
        return uniform(num_exits, progress)

    def prepare(self, model: nn.Module, exits: Sequence[int] | None = None) -> HookHandle:
        """Install the gradient rescaling on ``model``'s heads and stages.

        Args:
            model: a ``MultiExitModel`` (anything with ``stages``, ``heads``, ``exit_after``).
            exits: the exits whose losses are trained (negative indices allowed);
                ``None``: all of them. Only these are counted in ``m_k``.
        Returns:
            A ``HookHandle``; ``handle.remove()`` restores plain gradients.
        """
        for name in ("stages", "heads", "exit_after"):
            if not hasattr(model, name):
                raise TypeError(f"gradient equilibrium needs a MultiExitModel, got {type(model).__name__} without {name!r}")
        E = len(model.heads)
        active = sorted({k % E for k in exits}) if exits is not None else list(range(E))
        handles = []
        for r, k in enumerate(active):
            m = len(active) - r  # trained exits at or after k
            if m == 1:
                continue  # the deepest trained exit: nothing to balance
            handles.append(model.heads[k].register_forward_pre_hook(_first_arg_hook(1.0 / m)))
            nxt = model.exit_after[k] + 1
            if nxt < len(model.stages):
                handles.append(model.stages[nxt].register_forward_pre_hook(_first_arg_hook((m - 1) / m)))
        return HookHandle(handles)


_SCHEMES: dict[str, Weighting] = {
    "uniform": uniform,
    "sdn": sdn,
    "han": han,
    "pabee": pabee,
    "gradient-equilibrium": GradientEquilibrium(),
}


def register_weighting(name: str, fn: Weighting) -> None:
    """Register ``fn`` (a ``(num_exits, progress) -> list[float]`` callable) under ``name``."""
    _SCHEMES[name] = fn


def list_weightings() -> list[str]:
    return sorted(_SCHEMES)


def get_weighting(name: str) -> Weighting:
    """Look up a weighting scheme by name."""
    if name not in _SCHEMES:
        raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(list_weightings())}")
    return _SCHEMES[name]
