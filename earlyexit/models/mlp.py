"""A tiny multi-exit MLP: the fast toy backbone of the tests.

Stages are ``Linear + ReLU`` layers on flattened inputs; every exit is a
linear layer. Small enough for property tests over random shapes, and free
of BatchNorm, so data-parallel runs match a single process exactly. Weight
matching permutes every hidden layer's units (``stageI``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .common import check_fields, resolve_ic_after
from .heads import LinearHead
from .multiexit import MultiExitModel
from .registry import register_model


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def permutation_axes(self, rules: Any, prefix: str, inp: None) -> None:
        """Weight matching: no parameters, and the input's units are not permuted."""
        return None


class MLPLayer(nn.Sequential):
    """One stage: ``Linear`` (index 0) and ``ReLU``."""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__(nn.Linear(d_in, width), nn.ReLU())

    def permutation_axes(self, rules: Any, prefix: str, inp: str | None) -> str:
        """Weight matching: one permutation of the layer's units, which the next layer's inputs follow."""
        p = rules.new(f"stage{rules.stage}", self[0].out_features)
        rules.axes[prefix + "0.weight"], rules.axes[prefix + "0.bias"] = (p, inp), (p,)
        return p


@dataclass(frozen=True)
class MLPConfig:
    """The MLP's architecture (a registered size is an instance; ``--model-opt`` sets fields by name)."""

    image_size: int = 28            # side of the square input images (pixels)
    width: int = 64                 # units of every hidden layer
    depth: int = 4                  # hidden layers (= stages)

    def __post_init__(self) -> None:
        check_fields(self, sizes=("image_size", "width", "depth"))


def build_mlp(cfg: MLPConfig, *, num_classes: int, in_chans: int = 1, ic_after: Any = None) -> MultiExitModel:
    """An MLP of ``cfg.depth`` hidden layers of ``cfg.width`` units; ICs after every layer by default."""
    image_size, width, depth = cfg.image_size, cfg.width, cfg.depth
    d_in = in_chans * image_size * image_size
    stages = [MLPLayer(d_in if i == 0 else width, width) for i in range(depth)]
    info = [{"num_chs": width, "size": None, "module": f"stages.{i}"} for i in range(depth)]
    head = LinearHead(width, num_classes)
    stem = Flatten()
    chosen = resolve_ic_after(ic_after, stem, stages, head, (1, in_chans, image_size, image_size),
                              default=list(range(depth - 1)))
    return MultiExitModel(stem=stem, stages=stages, head=head, ic_after=chosen,
                          make_head=lambda fi, c: LinearHead(fi["num_chs"], c), feature_info=info, num_classes=num_classes,
                          input_shape=(in_chans, image_size, image_size))


MODELS = {"mlp": MLPConfig()}
for _name, _cfg in MODELS.items():
    register_model(_name, config=_cfg, tiny=dict(in_chans=1, image_size=8))(build_mlp)
