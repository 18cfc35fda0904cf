"""Helpers shared by the backbone files: exit placement, stage shapes and costs, conv/BN initialisation.

Exit placement (``exits=``) is given as block (stage) indices, never as
hand-written masks:

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
- ``"none"``: no ICs (the backbone alone).

The last stage always ends with the backbone's own classifier.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..flops import count_flops


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


def resolve_exits(spec: Any, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module,
                  example: Any, *, default: Sequence[int]) -> list[int]:
    """Turn an exit specification into sorted IC stage indices (see the module docstring).

    Args:
        spec: ``None``/``"default"``, ``"none"``, ``"every:N[:OFFSET]"``, ``"sdn"``, a comma-separated string
            or a list of stage indices.
        stem, stages, head: the backbone's parts (``"sdn"`` runs the stem and stages to cost them).
        example: an input, or the shape of a zero image batch; only run for ``"sdn"``.
        default: the model's own placement.
    Returns:
        Sorted unique stage indices in ``[0, len(stages) - 2]``.
    Raises:
        ConfigError: for a malformed spec or an index out of range (a ValueError too).
    """
    n = len(stages)
    if spec is None or spec == "default":
        return list(default)
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "none":
            return []
        if s.startswith("every:"):
            return _every(spec, s, n)
        if s == "sdn":
            return sdn_placement(stage_costs(stem, stages, example))
        try:
            spec = [int(t) for t in s.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"bad exits spec {spec!r}: expected a list of block indices, every:N, sdn, default or none") from None
    idx = [int(i) for i in spec]
    bad = [i for i in idx if not 0 <= i < n - 1]
    if bad:
        raise ConfigError(f"IC block indices must lie in [0, {n - 2}]; got {bad}")
    return sorted(set(idx))


def _every(spec: str, s: str, n: int) -> list[int]:
    """``every:N[:OFFSET]`` over ``n`` stages: stages OFFSET, OFFSET+N, ... before the last (OFFSET defaults to N-1)."""
    parts = s.split(":")[1:]
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        step = int(parts[0])
        offset = int(parts[1]) if len(parts) == 2 else step - 1
    except ValueError:
        raise ConfigError(f"bad exits spec {spec!r}: expected every:N or every:N:OFFSET with integers") from None
    if step < 1:
        raise ConfigError(f"bad exits spec {spec!r}: N must be >= 1")
    if len(parts) == 2 and not 0 <= offset < n - 1:
        raise ConfigError(f"bad exits spec {spec!r}: OFFSET must lie in [0, {n - 2}]")
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
