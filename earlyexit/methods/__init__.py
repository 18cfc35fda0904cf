"""Early-exit methods by name: how the exits are wired, how samples leave, how the exits are weighed.

A method bundles

- ``apply(model, **kw) -> MultiExitModel``: rewires the exits of a built
  model (or returns it as it is);
- ``criterion``: its exit rule (defaults in ``earlyexit.config.METHOD_DEFAULTS``) (``confidence``, ``entropy``, ``patience``);
- ``weighting``: its loss weights over exits (``earlyexit.weighting``);
- ``stage``: an optional training stage after the regime's phases,
  ``stage(model, data, config, **kw) -> (model, record)``; it may return a
  new model (ZTW returns the model with its trained ensembles).

Methods:

| name | paper | exits | criterion | weighting | extra stage |
|------|-------|-------|-----------|-----------|-------------|
| sdn  | Kaya et al., ICML 2019 | independent ICs | confidence | sdn | none |
| pbee | Zhou et al., NeurIPS 2020 (PABEE) | independent ICs | patience | mean | none |
| ztw  | Wołczyk et al., NeurIPS 2021 | cascading ICs, then geometric ensembles | confidence | mean | ensembles on the frozen ICs |
| gpf  | Liao et al., NAACL 2021 | past states + imitated future states, gated | entropy | pabee | none |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import METHOD_DEFAULTS
from ..errors import ConfigError
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


def _method(name: str, apply: Callable[..., MultiExitModel], **kw: Any) -> Method:
    d = METHOD_DEFAULTS[name]  # the defaults live in the config, so the library and the CLI agree
    return Method(name, apply, d.criterion, d.weighting, paper=d.paper, **kw)


METHODS: dict[str, Method] = {
    "sdn": _method("sdn", sdn.apply),
    "pbee": _method("pbee", pbee.apply),
    "ztw": _method("ztw", ztw.apply, stage=ztw.train_ensembles, staged=ztw.add_ensembles),
    "gpf": _method("gpf", gpf.apply),
}


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    """Look up a method by name."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid: {', '.join(list_methods())}")
    return METHODS[name]


__all__ = ["Method", "METHODS", "get_method", "list_methods", "gpf", "pbee", "sdn", "ztw"]
