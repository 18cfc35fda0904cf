"""Early-exit methods by name: how the exits are wired, how samples leave, how the exits are weighed.

A method bundles

- ``apply(model, **kw) -> MultiExitModel``: rewires the exits of a built
  model (or returns it as it is);
- ``criterion``: its exit rule (``confidence``, ``entropy``, ``patience``);
- ``weighting``: its loss weights over exits (``earlyexit.weighting``);
- ``stage``: an optional training stage after the regime's phases,
  ``stage(model, data, config, **kw) -> (model, record)``; it may return a
  new model (ZTW returns the model with its trained ensembles).

Methods:

| name | paper | exits | criterion | weighting | extra stage |
|------|-------|-------|-----------|-----------|-------------|
| sdn  | Kaya et al., ICML 2019 | independent ICs | confidence | sdn | none |
| pbee | Zhou et al., NeurIPS 2020 (PABEE) | independent ICs | patience | pabee | none |
| ztw  | Wołczyk et al., NeurIPS 2021 | cascading ICs, then geometric ensembles | confidence | uniform | ensembles on the frozen ICs |
| gpf  | Liao et al., NAACL 2021 | past states + imitated future states, gated | entropy | pabee | none |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..models.multiexit import MultiExitModel
from . import gpf, pbee, sdn, ztw


@dataclass(frozen=True)
class Method:
    name: str
    apply: Callable[..., MultiExitModel]   # apply(model, **kw) -> the rewired model
    criterion: str                         # default exit criterion
    weighting: str                         # default loss weighting over exits
    stage: Callable[..., tuple[MultiExitModel, Any]] | None = None  # (model, data, config, **kw) -> (model, record)
    paper: str = ""
    staged: Callable[[MultiExitModel], MultiExitModel] | None = None  # the stage's model structure, untrained (to load weights)


METHODS: dict[str, Method] = {
    "sdn": Method("sdn", sdn.apply, sdn.CRITERION, sdn.WEIGHTING, paper="Kaya et al., ICML 2019"),
    "pbee": Method("pbee", pbee.apply, pbee.CRITERION, pbee.WEIGHTING, paper="Zhou et al., NeurIPS 2020"),
    "ztw": Method("ztw", ztw.apply, "confidence", "uniform", stage=ztw.train_ensembles,
                  paper="Wołczyk et al., NeurIPS 2021", staged=ztw.add_ensembles),
    "gpf": Method("gpf", gpf.apply, gpf.CRITERION, gpf.WEIGHTING, paper="Liao et al., NAACL 2021"),
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """Look up a method by name."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    return METHODS[name]


__all__ = ["Method", "METHODS", "get_method", "list_methods", "gpf", "pbee", "sdn", "ztw"]
