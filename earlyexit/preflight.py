"""Checks of a run's model before it trains: the builder options, the built model, one forward pass.

``check_model_options`` holds ``--model-opt`` values against the builder's
signature (and the signatures its ``ModelSpec.options`` names): the type of
each option's default or annotation, and sizes (options whose default is a
positive integer) >= 1. ``build_checked`` turns whatever a builder raises on
bad options into one line, and refuses a model with an empty layer.
``check_forward`` runs one real batch through the model (eval mode, random
number generators untouched) and checks every exit's logits, so a model that
does not fit the data fails before any file changes, not in the first step.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import torch

from .errors import ConfigError, EarlyExitError
from .models import MultiExitModel, build_model, get_spec
from .tree import to_device

_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None)}


def _kinds(param: inspect.Parameter) -> set[type] | None:
    """The plain types an option accepts (None: not known, e.g. ``Any`` or a class)."""
    ann = param.annotation
    if ann is not inspect.Parameter.empty:
        names = [t.strip() for t in str(ann).replace("Optional[", "").rstrip("]").split("|")]
        if all(n in _KINDS for n in names):
            return {_KINDS[n] for n in names}
        return None
    d = param.default
    if d is inspect.Parameter.empty or d is None:
        return None
    return {type(d)} if type(d) in (int, float, str, bool) else None


def _fits(value: Any, kinds: set[type]) -> bool:
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    if isinstance(value, float):
        return float in kinds and math.isfinite(value)
    return type(value) in kinds


def _describe(kinds: set[type]) -> str:
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    return " or ".join(words[k] for k in (int, float, str, bool, type(None)) if k in kinds)


def _signatures(name: str) -> list[inspect.Signature]:
    spec = get_spec(name)
    out = []
    for fn in (spec.builder, *getattr(spec, "options", ())):
        try:
            out.append(inspect.signature(fn))
        except (TypeError, ValueError):
            continue
    return out


def check_model_options(name: str, options: Mapping[str, Any]) -> None:
    """Refuse ``options`` of the model ``name`` whose type or size its builder's signature rules out.

    Options a signature does not name (builders that pass ``**kw`` on) are left to ``build_checked``.
    """
    params: dict[str, inspect.Parameter] = {}
    for sig in _signatures(name):
        for p in sig.parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(p.name, p)
    for key, value in options.items():
        p = params.get(key)
        if p is None:
            continue
        kinds = _kinds(p)
        if kinds is not None and not _fits(value, kinds):
            raise ConfigError(f"model option {key}={value!r}: model {name!r} expects {_describe(kinds)}")
        d = p.default
        if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(d, (int, float)) \
                and not isinstance(d, bool):
            sized = kinds is None or float not in kinds  # an integer option (not a float such as a width factor)
            if sized and isinstance(d, int) and d > 0 and value < 1:
                raise ConfigError(f"model option {key}={value!r}: model {name!r} expects a size >= 1")
            if d >= 0 and value < 0:
                raise ConfigError(f"model option {key}={value!r}: model {name!r} expects a value >= 0")


def build_checked(name: str, *, num_classes: int, in_chans: int, exits: Any, options: Mapping[str, Any],
                  build: Callable[..., MultiExitModel] = build_model) -> MultiExitModel:
    """``build_model`` with the options checked first and any builder failure as a one-line ``ConfigError``."""
    check_model_options(name, options)
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    try:
        model = build(name, num_classes=num_classes, in_chans=in_chans, exits=exits, **options)
    except EarlyExitError:
        raise
    except ValueError as e:  # a builder's refusal of an option value: already one line and named
        raise ConfigError(" ".join(str(e).split()) or type(e).__name__) from None
    except (TypeError, RuntimeError, ArithmeticError, AssertionError, IndexError, KeyError, AttributeError) as e:
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(f"model {name!r} cannot be built{' with ' + shown if shown else ''}: {msg}") from None
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(f"model {name!r}{' with ' + shown if shown else ''} has an empty layer ({empty[0]}): "
                          "sizes must be >= 1")
    return model


@torch.no_grad()
def check_forward(model: MultiExitModel, split: Any, *, what: str) -> None:
    """One batch of ``split`` through ``model`` on its device, in eval mode: every exit gives ``(B, classes)`` logits.

    Weights, buffers, modes and the random number generators are left as they were. ``what`` names the
    pairing in the error (e.g. "model 'mlp' on dataset 'synthetic'").
    """
    was = model.training
    dev = next(model.parameters()).device
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            x, y = next(iter(split.batches(min(2, len(split)))))
            model.eval()
            outs = model(to_device(x, dev))
        except (EarlyExitError, StopIteration):
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            msg = " ".join(str(e).split())[:160] or type(e).__name__
            raise ConfigError(f"{what} do not fit: {msg}") from None
        finally:
            model.train(was)
    want = (len(y), model.num_classes)
    if len(outs) != model.num_exits or any(tuple(o.shape) != want for o in outs):
        got = [tuple(o.shape) for o in outs]
        raise ConfigError(f"{what} do not fit: the exits give logits of shapes {got}, expected {want} each")


__all__ = ["check_model_options", "build_checked", "check_forward"]
