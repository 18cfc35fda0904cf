"""The phase table of the three training regimes, as data, and the functions that read it.

A regime (``earlyexit.regime.Regime``) is a phase string over ``+``/``-``
(``joint = "-+-"``, ``disjoint = "+-+"``, ``mixed = "++-"``); ``Regime.runs(p)``
says whether phase ``p`` runs. What a phase does is one ``Phase`` row of ``PHASES``:

| phase | trains (``requires_grad``) | losses counted | validated | eval mode | loss weights |
|-------|----------------------------|----------------|-----------|-----------|--------------|
| 1     | backbone (+ final head)    | final exit     | final     | nothing   | no (1.0)     |
| 2     | backbone and IC heads      | all exits      | all       | nothing   | yes          |
| 3     | IC heads                   | the ICs        | all       | backbone  | yes          |

"backbone" is ``model.backbone_modules()`` (stem, stages and the backbone's
own classifier); "heads" the IC heads. Phase 1 never runs the ICs; phase 3
keeps the backbone in eval mode, so its BatchNorm statistics and dropout are
frozen along with its weights. Where the loss weights apply, exit ``k``'s loss
weighs ``alpha_k`` of the run's weighting (``earlyexit.weighting``), asked
for with the phase, the epoch and the progress (``phase_loss_weights``), and a
weighting with a ``prepare`` hook installs it; elsewhere the one counted exit
weighs 1. The weighting always gives all ``E`` exits' weights and phase 3 takes
the ICs' entries: under ``mean`` each IC weighs ``1 / E`` there, ``E``
counting the frozen final exit, as in the paper's code. Phase 1 picks its best
epoch by the final exit's accuracy; the others by the phase config's ``metric``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from torch import nn

from ..models.multiexit import MultiExitModel
from ..weighting import TrainingPoint, Weighting, weights_at

ExitSet = str  # "final" (the backbone's own exit), "ics" (every IC), "all"
Group = str    # "backbone" or "heads"


@dataclass(frozen=True)
class Phase:
    number: int
    trains: tuple[Group, ...]        # parameter groups that get gradients (the rest: requires_grad False)
    losses: ExitSet                  # exits whose losses count (and which the forward computes)
    validated: ExitSet               # exits whose validation accuracy is measured after each epoch
    eval_mode: tuple[Group, ...]     # module groups kept in eval mode while training (BatchNorm, dropout)
    weighted: bool                   # the loss weights alpha_k apply; False: weight 1 on each counted exit
    metric: str | None               # validation metric fixed by the phase ("final"); None: the config's


PHASES: dict[int, Phase] = {
    1: Phase(1, trains=("backbone",), losses="final", validated="final", eval_mode=(), weighted=False,
             metric="final"),
    2: Phase(2, trains=("backbone", "heads"), losses="all", validated="all", eval_mode=(), weighted=True,
             metric=None),
    3: Phase(3, trains=("heads",), losses="ics", validated="all", eval_mode=("backbone",), weighted=True,
             metric=None),
}

_EXITS: dict[ExitSet, Callable[[int], list[int]]] = {
    "final": lambda E: [E - 1],
    "ics": lambda E: list(range(E - 1)),
    "all": lambda E: list(range(E)),
}

_PARAMETERS: dict[Group, Callable[[MultiExitModel], Iterator[nn.Parameter]]] = {
    "backbone": lambda m: m.backbone_parameters(),
    "heads": lambda m: m.head_parameters(),
}

_MODULES: dict[Group, Callable[[MultiExitModel], list[nn.Module]]] = {
    "backbone": lambda m: m.backbone_modules(),
    "heads": lambda m: list(m.heads[:-1]),
}


def phase_spec(phase: int) -> Phase:
    """The ``Phase`` row of phase 1, 2 or 3."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 1, 2 or 3, got {phase!r}")
    return PHASES[phase]


def phase_exits(model: MultiExitModel, phase: int) -> list[int]:
    """Exits whose losses count in ``phase``."""
    return _EXITS[phase_spec(phase).losses](model.num_exits)


def validated_exits(model: MultiExitModel, phase: int) -> list[int]:
    """Exits whose validation accuracy is measured after each epoch of ``phase``."""
    return _EXITS[phase_spec(phase).validated](model.num_exits)


def loss_weights(phase: int, alphas: list[float], exits: list[int]) -> list[float]:
    """The weights of the counted ``exits``' losses: ``alphas[k]`` where the phase applies them, else 1."""
    if phase_spec(phase).weighted:
        return [alphas[k] for k in exits]
    return [1.0] * len(exits)


def phase_loss_weights(phase: int, weighting: Weighting, num_exits: int, exits: list[int],
                       point: TrainingPoint) -> list[float]:
    """The weights of the counted ``exits``' losses at ``point`` of ``phase`` (``loss_weights`` of the weighting's list)."""
    if not phase_spec(phase).weighted:
        return [1.0] * len(exits)
    return loss_weights(phase, weights_at(weighting, num_exits, point), exits)


def val_metric(phase: int, acc: list[float], metric: str) -> float:
    """The validation figure that picks the best epoch: the final exit's accuracy, or the mean over ``acc``."""
    if (phase_spec(phase).metric or metric) == "final":
        return acc[-1]
    if metric == "mean":
        return sum(acc) / len(acc)
    raise ValueError(f"unknown validation metric {metric!r}; valid: mean, final")


def set_trainable(model: MultiExitModel, phase: int) -> None:
    """``requires_grad`` per phase: 1 backbone only, 2 everything, 3 IC heads only."""
    spec = phase_spec(phase)
    for group, params in _PARAMETERS.items():
        for p in params(model):
            p.requires_grad_(group in spec.trains)


def set_mode(model: MultiExitModel, phase: int) -> None:
    """Training mode, except the phase's ``eval_mode`` groups (phase 3: the backbone, BatchNorm and dropout)."""
    model.train()
    for group in phase_spec(phase).eval_mode:
        for m in _MODULES[group](model):
            m.eval()


__all__ = ["Phase", "PHASES", "phase_spec", "phase_exits", "validated_exits", "loss_weights", "phase_loss_weights",
           "val_metric", "set_trainable", "set_mode"]
