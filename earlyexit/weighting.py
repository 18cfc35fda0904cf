"""Loss weights alpha_k over exits: L = sum_k alpha_k * L_k.

A weighting gives one weight per exit, the backbone's own exit last. Its
basic form is a callable ``(num_exits, progress) -> list[float]``, where
``progress`` in [0, 1] is the fraction of the current phase's planned steps
done; ``register_weighting`` accepts any such callable. A weighting that needs
more than that (the epoch, the phase) also defines ``at(num_exits, point)``
with a ``TrainingPoint``; training asks for the weights through
``weights_at``, which prefers ``at`` and falls back to the plain call.

The list always covers all ``E`` exits. Phase 1 trains the final exit alone
with weight 1; phase 3 takes the IC entries of the list
(``earlyexit.training.phases.loss_weights``), so under ``mean`` each IC still
weighs ``1 / E`` there, ``E`` counting the frozen final exit.

Schemes:

- ``mean`` (the default): every exit weighs ``1 / E``, the mean of the exits'
  losses. This is what the code of "Joint or Disjoint" does for plain ICs,
  SDN, PBEE and both ZTW stages: it divides the sum of the losses of all the
  model's outputs by their number, in phase 3 too, where the frozen final
  exit still counts in that number (its loss carries no gradient).
- ``sum``: every exit weighs 1. ``uniform`` is another name for it.
- ``sdn`` (Shallow-Deep Networks, Kaya et al., ICML 2019), SDN's code: IC
  ``k`` (0-based) has the maximum ``tau_k = 0.15 (k + 1)`` (0.15, 0.30, ...,
  whatever the number of ICs: SDN's code fixes 0.15, ..., 0.90 for its six
  ICs and indexes them by IC; past six ICs the same step continues, where
  SDN's code has no value), and in epoch ``e = 1, 2, ...`` of the ramp weighs
  ``min(tau_k, 0.01 + e * tau_k / R)``: the weights step once per epoch and
  reach ``tau_k`` in epoch ``R``; the final exit weighs 1. ``R`` is the
  phase's maximum number of epochs (SDN ramps over its whole training), or
  explicit in the name ``sdn:R`` (e.g. ``sdn:20``), which keeps the ramp's
  pace whatever the phase's length, so a phase that early stopping may end
  sooner can set it. In phase 3 every IC weighs 1: SDN's IC-only training
  (a frozen backbone) sums the ICs' losses without the ramp. Called as a
  plain ``(num_exits, progress)`` weighting (no epoch known), the ramp is
  continuous: ``min(tau_k, 0.01 + progress * tau_k)``.
- ``han`` / ``han-decreasing`` (the fixed weightings after Han et al., 2022,
  that "Joint or Disjoint" compares): weights on a line from 0.6 (first
  exit) to 1.4 (last), or from 1.4 down to 0.6, mean 1, then divided by
  ``E`` as the paper's code averages over exits (its weighted training
  objective, L2W's, takes the mean over exits of weights of mean 1); they sum
  to 1, the scale of ``mean``.
- ``pabee`` (PABEE, Zhou et al., NeurIPS 2020): exit ``k`` (0-based) weighs
  ``k + 1``, normalised by the sum ``E (E + 1) / 2`` as PABEE's loss divides
  by it, so the weights sum to 1. The paper's code weighs GPF's exits so.
- ``gradient-equilibrium`` (IMTA, Li et al., ICCV 2019, "Improved Techniques
  for Training Adaptive Deep Networks"): loss weights 1 (IMTA sums the exits'
  losses) plus a gradient rescaling in the backbone. IMTA's code passes the
  features read by exit ``k`` (of ``n``) through an identity whose backward
  multiplies the gradient by ``1 / (n - k)``, and the features flowing on to
  the deeper stages through a second one that multiplies it by
  ``n - k - 1``. By induction, the gradient reaching the output of any stage
  is the *mean* over the exits that depend on it of each exit's own gradient,
  instead of their sum: deep stages no longer see the early exits' gradients
  summed on top of theirs. ``GradientEquilibrium.prepare(model)`` installs
  the rescaling as forward pre-hooks (on each IC head: ``1 / m_k``; on the
  stage after it: ``(m_k - 1) / m_k``, ``m_k`` the number of trained exits at
  or after ``k``), which gives the same gradients as IMTA's two rescalings.
  Only the part of the state that an IC reads is rescaled, as the model
  declares it (``MultiExitModel.map_ic_input``): the whole state by default;
  MSDNet's coarsest scale, as IMTA does on MSDNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

Weighting = Callable[[int, float], list[float]]


@dataclass(frozen=True)
class TrainingPoint:
    """Where training stands when the weights are asked for.

    Attributes:
        phase: 1, 2 or 3 (``earlyexit.training.phases``).
        epoch: 0-based epoch within the phase (of the current learning-rate grid point).
        epochs: the phase's maximum number of epochs.
        progress: fraction of the phase's planned steps done, in [0, 1].
    """
    phase: int = 2
    epoch: int = 0
    epochs: int = 1
    progress: float = 0.0


def weights_at(weighting: Weighting, num_exits: int, point: TrainingPoint) -> list[float]:
    """The weights of ``weighting`` at ``point``: its ``at`` where it has one, else ``weighting(E, progress)``."""
    at = getattr(weighting, "at", None)
    if at is not None:
        return list(at(num_exits, point))
    return list(weighting(num_exits, point.progress))


def _check(num_exits: int, progress: float) -> None:
    if isinstance(num_exits, bool) or not isinstance(num_exits, int) or num_exits < 1:
        raise ValueError(f"num_exits must be an integer >= 1, got {num_exits!r}")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")


def mean(num_exits: int, progress: float) -> list[float]:
    """Every exit weighs ``1 / E``: the mean of the exits' losses (the paper's code)."""
    _check(num_exits, progress)
    return [1.0 / num_exits] * num_exits


def total(num_exits: int, progress: float) -> list[float]:
    """Every exit weighs 1: the plain sum of the exits' losses (``sum``, alias ``uniform``)."""
    _check(num_exits, progress)
    return [1.0] * num_exits


uniform = total  # the former name of ``sum``


class KayaRamp:
    """SDN's ramped IC weights (see the module docstring), stepped once per epoch.

    Args:
        ramp_epochs: ``R``, the epochs over which the ramp climbs to its maxima;
            ``None``: the phase's maximum number of epochs.
    """

    START = 0.01   # SDN's weight of every IC before the ramp
    STEP = 0.15    # SDN's maxima: 0.15 (k + 1) for IC k

    def __init__(self, ramp_epochs: int | None = None) -> None:
        if ramp_epochs is not None and (isinstance(ramp_epochs, bool) or not isinstance(ramp_epochs, int)
                                        or ramp_epochs < 1):
            raise ValueError(f"the SDN ramp's epochs must be an integer >= 1, got {ramp_epochs!r}")
        self.ramp_epochs = ramp_epochs

    def maxima(self, num_ics: int) -> list[float]:
        """``tau_k = 0.15 (k + 1)`` for ``k < num_ics``."""
        return [self.STEP * (k + 1) for k in range(num_ics)]

    def __call__(self, num_exits: int, progress: float) -> list[float]:
        """The ramp without epochs: ``min(tau_k, 0.01 + progress * tau_k)``; the final exit weighs 1."""
        _check(num_exits, progress)
        return [min(t, self.START + progress * t) for t in self.maxima(num_exits - 1)] + [1.0]

    def at(self, num_exits: int, point: TrainingPoint) -> list[float]:
        """Epoch ``point.epoch + 1`` of the ramp (phase 2); 1 for every exit in phase 3 (SDN's IC-only step)."""
        _check(num_exits, point.progress)
        if point.phase == 3:
            return [1.0] * num_exits
        ramp = self.ramp_epochs if self.ramp_epochs is not None else max(point.epochs, 1)
        e = point.epoch + 1
        return [min(t, self.START + e * t / ramp) for t in self.maxima(num_exits - 1)] + [1.0]


sdn = KayaRamp()


def _line(num_exits: int, first: float, last: float) -> list[float]:
    if num_exits == 1:
        return [1.0]
    return [(first + (last - first) * k / (num_exits - 1)) / num_exits for k in range(num_exits)]


def han(num_exits: int, progress: float) -> list[float]:
    """Weights rising linearly from 0.6 (first exit) to 1.4 (last), divided by ``E``: they sum to 1.

    Args:
        num_exits: ``E``.
        progress: ignored (constant schedule), checked to lie in [0, 1].
    Returns:
        ``E`` weights.
    """
    _check(num_exits, progress)
    return _line(num_exits, 0.6, 1.4)


def han_decreasing(num_exits: int, progress: float) -> list[float]:
    """Weights falling linearly from 1.4 (first exit) to 0.6 (last), divided by ``E``: they sum to 1."""
    _check(num_exits, progress)
    return _line(num_exits, 1.4, 0.6)


def pabee(num_exits: int, progress: float) -> list[float]:
    """PABEE's depth weights ``(k + 1) / sum_j (j + 1)``: they sum to 1.

    Args:
        num_exits: ``E``.
        progress: ignored (constant schedule), checked to lie in [0, 1].
    Returns:
        ``E`` weights.
    """
    _check(num_exits, progress)
    norm = num_exits * (num_exits + 1) / 2
    return [(k + 1) / norm for k in range(num_exits)]


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


def _state_hook(model: nn.Module, scale: float) -> Callable:
    # Only the state (the first argument) is rescaled, and of it only the part an IC reads (the model says which,
    # ``map_ic_input``); further arguments (e.g. a cascade input) are left alone.
    mapper = getattr(model, "map_ic_input", None)

    def rescale(part: Any) -> Any:
        return scale_grad(part, scale)

    def hook(module: nn.Module, args: tuple) -> tuple:
        state = mapper(args[0], rescale) if mapper is not None else rescale(args[0])
        return (state, *args[1:])
    return hook


class GradientEquilibrium:
    """IMTA's gradient equilibrium: loss weights 1 plus ``prepare(model)`` (see the module docstring)."""

    def __call__(self, num_exits: int, progress: float) -> list[float]:
        return total(num_exits, progress)

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
            handles.append(model.heads[k].register_forward_pre_hook(_state_hook(model, 1.0 / m)))
            nxt = model.exit_after[k] + 1
            if nxt < len(model.stages):
                handles.append(model.stages[nxt].register_forward_pre_hook(_state_hook(model, (m - 1) / m)))
        return HookHandle(handles)


_SCHEMES: dict[str, Weighting] = {
    "mean": mean,
    "sum": total,
    "uniform": total,  # alias of "sum"
    "sdn": sdn,
    "han": han,
    "han-decreasing": han_decreasing,
    "pabee": pabee,
    "gradient-equilibrium": GradientEquilibrium(),
}

# Schemes with a parameter in their name, "NAME:VALUE": the factory gets VALUE as a string.
_PARAMETRISED: dict[str, tuple[str, Callable[[str], Weighting]]] = {
    "sdn": ("sdn:EPOCHS (the ramp's length, an integer >= 1)", lambda v: KayaRamp(int(v))),
}


def register_weighting(name: str, fn: Weighting) -> None:
    """Register ``fn`` under ``name``: a ``(num_exits, progress) -> list[float]`` callable, optionally with
    ``at(num_exits, point)`` (see ``weights_at``)."""
    _SCHEMES[name] = fn


def list_weightings() -> list[str]:
    """The registered names (``sdn:EPOCHS`` forms are accepted besides them)."""
    return sorted(_SCHEMES)


def get_weighting(name: str) -> Weighting:
    """Look up a weighting scheme by name (or ``NAME:VALUE`` for a parametrised one, e.g. ``sdn:20``)."""
    if isinstance(name, str) and name in _SCHEMES:
        return _SCHEMES[name]
    base, sep, value = name.partition(":") if isinstance(name, str) else ("", "", "")
    if sep and base in _PARAMETRISED:
        form, factory = _PARAMETRISED[base]
        try:
            return factory(value)
        except ValueError:
            raise ValueError(f"bad weighting {name!r}: expected {form}") from None
    forms = [f for f, _ in _PARAMETRISED.values()]
    raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(list_weightings() + forms)}")
