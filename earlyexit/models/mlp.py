"""A tiny multi-exit MLP: the fast toy backbone of the tests.

Stages are ``Linear + ReLU`` layers on flattened inputs; every exit is a
linear layer. Small enough for property tests over random shapes, and free
of BatchNorm, so data-parallel runs match a single process exactly.
"""

from __future__ import annotations

from torch import Tensor, nn

from .heads import LinearHead
from .multiexit import MultiExitModel


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def mlp(*, num_classes: int, in_chans: int = 1, image_size: int = 28, width: int = 64, depth: int = 4, exits=None) -> MultiExitModel:
    """Build an MLP of ``depth`` hidden layers of ``width`` units; ICs after every layer by default."""
    from . import resolve_exits

    d_in = in_chans * image_size * image_size
    stages = [nn.Sequential(nn.Linear(d_in if i == 0 else width, width), nn.ReLU()) for i in range(depth)]
    info = [{"num_chs": width, "size": None, "module": f"stages.{i}"} for i in range(depth)]
    head = LinearHead(width, num_classes)
    stem = Flatten()
    chosen = resolve_exits(exits, stem, stages, head, (1, in_chans, image_size, image_size), default=list(range(depth - 1)))
    return MultiExitModel(stem=stem, stages=stages, head=head, exits=chosen,
                          make_head=lambda fi, c: LinearHead(fi["num_chs"], c), feature_info=info, num_classes=num_classes,
                          input_shape=(in_chans, image_size, image_size))


MODELS = {"mlp": mlp}
