"""Checks of a run's model before it trains: the build, the built model, one forward pass.

``build_checked`` builds the model and turns whatever goes wrong into one line:
``--model-opt`` values are checked by the model's config dataclass when it is
built (``earlyexit.models.model_config``: each field of its type, sizes >= 1),
a builder's own refusal becomes a ``ConfigError``, and a model with an empty
layer is refused. ``check_forward`` runs one real batch through the model (eval
mode, random number generators untouched) and checks every exit's logits, so a
model that does not fit the data fails before any file changes, not in the first step.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .errors import ConfigError, EarlyExitError
from .models import MultiExitModel, build_model
from .tree import to_device


def build_checked(name: str, *, num_classes: int, in_chans: int, ic_after: Any, options: Mapping[str, Any],
                  build: Callable[..., MultiExitModel] = build_model) -> MultiExitModel:
    """``build_model`` with any failure to build as a one-line ``ConfigError`` (the options are checked by the model's
    config when it is built)."""
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
    try:
        model = build(name, num_classes=num_classes, in_chans=in_chans, ic_after=ic_after, **options)
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


__all__ = ["build_checked", "check_forward"]
