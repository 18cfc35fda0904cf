"""Helpers shared by the backbone files: exit placement, stage shapes and costs, conv/BN initialisation.

Exit placement (``exits=``) is given as block (stage) indices, never as
hand-written masks:

- ``None`` / ``"default"``: the model's own default (ResNet: every other block
  from the fifth, the paper's placement; MLP: after every layer);
- a list of stage indices, e.g. ``[2, 4, 6]``;
- ``"every:N"``: an IC after every N-th stage (stages N-1, 2N-1, ...);
- ``"sdn"``: SDN's placement, the first stage at which the backbone's cumulative
  cost reaches 15, 30, 45, 60, 75 and 90 % of its total;
- ``"none"``: no ICs (the backbone alone).

The last stage always ends with the backbone's own classifier.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..metrics.costs import count_flops


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

    ``example`` (an input, or the shape of a zero image batch) is only run for ``"sdn"``, which needs stage costs.
    """
    n = len(stages)
    if spec is None or spec == "default":
        return list(default)
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "none":
            return []
        if s.startswith("every:"):
            try:
                step = int(s.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"bad exits spec {spec!r}: expected every:N with an integer N") from None
            if step < 1:
                raise ValueError(f"bad exits spec {spec!r}: N must be >= 1")
            return list(range(step - 1, n - 1, step))
        if s == "sdn":
            costs = stage_costs(stem, stages, example)
            total, cum, out = sum(costs), 0, []
            cums = []
            for c in costs:
                cum += c
                cums.append(cum)
            for f in (0.15, 0.30, 0.45, 0.60, 0.75, 0.90):
                i = next(i for i, c in enumerate(cums) if c >= f * total)
                if i < n - 1 and i not in out:
                    out.append(i)
            return out
        try:
            spec = [int(t) for t in s.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"bad exits spec {spec!r}: expected a list of block indices, every:N, sdn, default or none") from None
    idx = [int(i) for i in spec]
    bad = [i for i in idx if not 0 <= i < n - 1]
    if bad:
        raise ValueError(f"IC block indices must lie in [0, {n - 2}]; got {bad}")
    return sorted(set(idx))
