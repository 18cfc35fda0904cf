"""Helpers shared by the backbone files: model configs, IC placement, stage shapes and costs, conv/BN initialisation.

Model configs: every architecture has a frozen config dataclass (``ResNetConfig``, ``ViTConfig``, ...) whose
registered sizes are instances; ``check_fields`` is the check its ``__post_init__`` starts with (each field of
the type its annotation names, sizes >= 1, non-negative values >= 0), so a bad ``--model-opt`` fails in one
line when the config is built.

IC placement (``ic_after=``: the stages an IC follows; "exits" always means exit
indices, ``0 .. E-1``) is given as block (stage) indices, never as hand-written
masks. ``earlyexit.config.parse_ic_after`` reads it once (``ModelConfig`` calls
it when it is built); ``resolve_ic_after`` turns it into the stage indices of one model:

- ``None`` / ``"default"``: the model's own default (ResNet: every other block
  from the fifth, the paper's placement; MLP: after every layer);
- a list of stage indices, e.g. ``[2, 4, 6]``;
- ``"every:N"``: an IC after every N-th stage (stages N-1, 2N-1, ...);
- ``"every:N:OFFSET"``: ICs after stages OFFSET, OFFSET+N, OFFSET+2N, ...
  (0-based; ``"every:N"`` is ``"every:N:N-1"``);
- ``"sdn"``: SDN's placement: for each of 15, 30, 45, 60, 75 and 90 % of the
  backbone's cost, the stage whose cumulative cost (stem included, FLOPs as
  ``stage_costs`` counts them) lies nearest to that share (the earlier stage on
  a tie; a share nearest to the last stage gets no IC). SDN (Kaya et al., ICML
  2019) wrote its placements by hand (``add_ic`` in its
  ``network_architectures.py``, annotated "15, 30, 45, 60, 75, 90 percent of
  GFLOPs"); the nearest stage reproduces its ResNet-56 list
  ``[3, 7, 11, 15, 19, 23]`` and its VGG-16 list ``[1, 3, 5, 6, 8, 9]``, where
  the first stage reaching each share gives ``[3, 7, 12, 16, 20, 24]`` on
  ResNet-56 and the last stage below it ``[2, 6, 11, 15, 19, 23]``;
- ``"none"``: no ICs (the backbone alone);
- models cut from a graph (``torchvision:NAME``, ``from_module``) also take
  ``"cost:F1,F2,..."`` and node names (``tvgraph.resolve_graph_ic_after``).

The last stage always ends with the backbone's own classifier.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..config import every_rule, parse_ic_after
from ..errors import ConfigError
from ..flops import count_flops


_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a dict", type(None): "null"}


def _fits(value: Any, tp: Any) -> bool:
    """``value`` is of the type ``tp`` (``int``, ``float``, ``str``, ``bool``, None, ``tuple[X, ...]``, unions)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return isinstance(value, (tuple, list)) and all(_fits(v, typing.get_args(tp)[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return tp is Any or isinstance(value, tp)


def _words(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_words(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_words(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def check_fields(config: Any, *, sizes: Sequence[str] = (), nonnegative: Sequence[str] = ()) -> None:
    """Check a frozen config dataclass's fields against their annotations; lists become tuples.

    Args:
        config: the config (called from its ``__post_init__``).
        sizes: fields that must be >= 1 (counts, widths, pixels).
        nonnegative: fields that must be >= 0 (rates, multipliers).
    Raises:
        ConfigError: ``"option width=0 expects a size >= 1"`` (a ValueError).
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if not _fits(v, hints[f.name]):
            raise ConfigError(f"option {f.name}={v!r} expects {_words(hints[f.name])}")
        if isinstance(v, list):
            object.__setattr__(config, f.name, tuple(v))
        if f.name in sizes and isinstance(v, (int, float)) and v < 1:
            raise ConfigError(f"option {f.name}={v!r} expects a size >= 1")
        if f.name in nonnegative and isinstance(v, (int, float)) and v < 0:
            raise ConfigError(f"option {f.name}={v!r} expects a value >= 0")


@torch.no_grad()
def feature_info_for(stem: nn.Module, stages: Sequence[nn.Module], input_shape: Sequence[int]) -> list[dict]:
    """Run a dummy input through ``stem`` and ``stages`` (in eval mode) and record each output's shape."""
    x = torch.zeros(*input_shape)
    was = [m.training for m in (stem, *stages)]
    info = []
    try:
        for m in (stem, *stages):
            m.eval()
        x = stem(x)
        for s in stages:
            x = s(x)
            info.append({"num_chs": x.shape[1], "size": tuple(x.shape[2:]) if x.dim() == 4 else None})
    finally:
        for m, w in zip((stem, *stages), was):
            m.train(w)
    return info


def init_conv_bn(model: nn.Module, *, zero_linear_bias: bool = False) -> None:
    """He-normal (fan-out) convolutions and BatchNorm at identity, as ResNet and MSDNet initialise them."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif zero_linear_bias and isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


@torch.no_grad()
def stage_costs(stem: nn.Module, stages: Sequence[nn.Module], example: Any) -> list[int]:
    """FLOPs of each stage (stage 0 includes the stem) on ``example``: an input, or the shape of a zero tensor."""
    x = torch.zeros(*example) if isinstance(example, (tuple, list)) else example
    costs = []
    for i, s in enumerate(stages):
        fn = (lambda t, s=s: s(stem(t))) if i == 0 else s
        c, x = count_flops(fn, x)
        costs.append(c)
    return costs


def resolve_ic_after(spec: Any, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module,
                     example: Any, *, default: Sequence[int]) -> list[int]:
    """Turn an IC placement into sorted IC stage indices (see the module docstring).

    Args:
        spec: an IC placement (``parse_ic_after`` reads it; a parsed one is taken as it is).
        stem, stages, head: the backbone's parts (``"sdn"`` runs the stem and stages to cost them).
        example: an input, or the shape of a zero image batch; only run for ``"sdn"``.
        default: the model's own placement.
    Returns:
        Sorted unique stage indices in ``[0, len(stages) - 2]``.
    Raises:
        ConfigError: for a malformed spec or an index out of range (a ValueError too).
    """
    n = len(stages)
    spec = parse_ic_after(spec)
    if spec is None:
        return list(default)
    if isinstance(spec, str):
        if spec == "none":
            return []
        if spec.startswith("every:"):
            return _every(spec, n)
        if spec == "sdn":
            return sdn_placement(stage_costs(stem, stages, example))
        raise ConfigError(f"bad ic_after spec {spec!r}: expected a list of block indices, every:N, sdn, default or none")
    if any(isinstance(i, str) for i in spec):
        raise ConfigError(f"bad ic_after spec {list(spec)!r}: node names name ICs of graph models only")
    bad = [i for i in spec if not 0 <= i < n - 1]
    if bad:
        raise ConfigError(f"IC block indices must lie in [0, {n - 2}]; got {bad}")
    return sorted(set(spec))


def _every(spec: str, n: int) -> list[int]:
    """``every:N[:OFFSET]`` over ``n`` stages: stages OFFSET, OFFSET+N, ... before the last (OFFSET defaults to N-1)."""
    step, offset = every_rule(spec)
    if spec.count(":") == 2 and offset >= n - 1:
        raise ConfigError(f"bad ic_after spec {spec!r}: OFFSET must lie in [0, {n - 2}]")
    return list(range(offset, n - 1, step))


SDN_FRACTIONS = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


def sdn_placement(costs: Sequence[float], fractions: Sequence[float] = SDN_FRACTIONS) -> list[int]:
    """SDN's IC positions from per-stage costs (see the module docstring).

    Args:
        costs: the cost of every stage (stage 0 with the stem), in order.
        fractions: shares of the total cost to place an IC at.
    Returns:
        Sorted unique stage indices, the last stage excluded (its exit is the backbone's own).
    """
    n, total = len(costs), float(sum(costs))
    cums, acc = [], 0.0
    for c in costs:
        acc += float(c)
        cums.append(acc)
    out = set()
    for f in fractions:
        i = min(range(n), key=lambda j: (abs(cums[j] - f * total), j))
        if i < n - 1:
            out.add(i)
    return sorted(out)


def rename_keys(sd: Mapping[str, Tensor], pattern: str, prefixes: Mapping[str, str], what: str) -> dict[str, Tensor]:
    """An upstream ``state_dict`` in our names: each key's prefix (group 1 of ``pattern``) replaced by ours.

    Raises:
        KeyError: a key whose prefix has no counterpart here (``what`` names the checkpoint).
    """
    out = {}
    for k, v in sd.items():
        m = re.match(pattern, k)
        if m is None or m.group(1) not in prefixes:
            raise KeyError(f"unexpected key in {what}: {k}")
        out[prefixes[m.group(1)] + m.group(2)] = v
    return out


def load_backbone_strict(model: nn.Module, converted: Mapping[str, Tensor]) -> None:
    """Load an upstream checkpoint already in our names into the backbone, strictly: every key is one of the
    model's with the same shape, and every backbone key (stem, stages, the final head) is covered; the IC heads
    keep their initialisation.

    Raises:
        KeyError: a key the model lacks, or backbone keys the checkpoint lacks.
        ValueError: a shape that differs.
    """
    ours = model.state_dict()
    for k, v in converted.items():
        if k not in ours:
            raise KeyError(f"no parameter {k} in the model")
        if ours[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}")
    final = f"heads.{model.num_exits - 1}."
    missing = {k for k in ours if not k.startswith("heads.") or k.startswith(final)} - set(converted)
    if missing:
        raise KeyError(f"checkpoint lacks backbone keys: {sorted(missing)[:5]}")
    model.load_state_dict(converted, strict=False)
