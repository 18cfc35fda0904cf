"""Loss weights alpha_k over exits: L = sum_k alpha_k * L_k.

A weighting is a callable ``(num_exits, progress) -> list[float]`` giving one
weight per exit (the backbone's own exit last), where ``progress`` in [0, 1]
is the fraction of the current phase's training done. Phase 3 uses the IC
entries only; phase 1 always trains the final exit alone with weight 1.
"""

from __future__ import annotations

from typing import Callable

Weighting = Callable[[int, float], list[float]]


def uniform(num_exits: int, progress: float) -> list[float]:
    """Every exit weighs 1 (the plain sum of the exits' losses)."""
    return [1.0] * num_exits


_SCHEMES: dict[str, Weighting] = {"uniform": uniform}


def register_weighting(name: str, fn: Weighting) -> None:
    _SCHEMES[name] = fn


def list_weightings() -> list[str]:
    return sorted(_SCHEMES)


def get_weighting(name: str) -> Weighting:
    """Look up a weighting scheme by name."""
    if name not in _SCHEMES:
        raise ValueError(f"unknown weighting {name!r}; valid: {', '.join(list_weightings())}")
    return _SCHEMES[name]
