"""Shared machinery of the early-exit methods: a model rewired from another one's parts.

A method (Zero Time Waste, Global Past-Future) changes what an exit reads:
besides the state after its stage, it may need what earlier exits computed
(the previous IC's logits, the past ICs' states). ``RewiredModel`` expresses
that with one extra method, ``exit_step(k, state, memory) -> (logits,
memory)``, where ``memory`` is a per-sample pytree carried from exit to exit
in depth order (``None`` before the first exit). ``forward`` runs the exits
through it and keeps ``MultiExitModel``'s contract (a list of ``(B, C)``
logits in depth order; ``exits=[-1]`` runs the backbone alone), and
``earlyexit.inference.predict`` slices the memory along with the state.

A ``RewiredModel`` shares the stem, the stages and the backbone's own head
with the model it was built from (no copy: training one trains the other)
and takes over its plain attributes (``exit_after``, ``feature_info``, a
BERT model's ``config``, ...).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..models.multiexit import MultiExitModel


class RewiredModel(MultiExitModel):
    """Base of the method models: ``source``'s backbone with new exit modules.

    Args:
        source: the model whose stem, stages and final head are reused.
        heads: the new exit modules, one per exit, the backbone's own head last.
    """

    def __init__(self, source: MultiExitModel, heads: Sequence[nn.Module]) -> None:
        if not isinstance(source, MultiExitModel):
            raise TypeError(f"expected a MultiExitModel, got {type(source).__name__}")
        if len(heads) != source.num_exits:
            raise ValueError(f"need one head per exit ({source.num_exits}), got {len(heads)}")
        # The parts come from ``source``, so MultiExitModel's builder arguments do not apply.
        nn.Module.__init__(self)
        for key, value in vars(source).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        self.exit_after = list(source.exit_after)
        self.feature_info = [dict(fi) for fi in source.feature_info]
        self._source_cls = getattr(source, "_source_cls", type(source))
        self.stem = source.stem
        self.stages = source.stages
        self.heads = nn.ModuleList(heads)
        self.train(source.training)

    def example_input(self, batch_size: int = 1, device: torch.device | str | None = None, **kw: Any) -> Any:
        """The source architecture's example input (e.g. token ids for BERT)."""
        return self._source_cls.example_input(self, batch_size, device, **kw)

    def map_ic_input(self, state: Any, fn: Any) -> Any:
        """What an IC reads of the state, as the source architecture declares it."""
        return self._source_cls.map_ic_input(self, state, fn)

    # --- exits -----------------------------------------------------------------
    def exit_step(self, k: int, state: Any, memory: Any) -> tuple[Tensor, Any]:
        """Logits ``(B, C)`` of exit ``k`` and the memory handed to exit ``k + 1``."""
        raise NotImplementedError

    def blank_memory(self, k: int, state: Any) -> Any:
        """A memory of the right shapes (zeros) for running exit ``k`` alone."""
        return None

    def head(self, k: int, state: Any) -> Tensor:
        """Exit ``k`` run alone, on a blank (zero) memory.

        The logits differ from those of ``forward`` whenever exit ``k`` reads
        earlier exits; the work done is the same, so FLOP counting per part
        stays exact. Use ``forward`` or ``exit_step`` for the real values.
        """
        return self.exit_step(k, state, self.blank_memory(k, state))[0]

    def forward(self, x: Tensor, *, exits: Sequence[int] | None = None) -> list[Tensor]:
        """Logits of every exit (or of ``exits``), depth order; earlier ICs run when a later IC needs them."""
        E = self.num_exits
        wanted = set(range(E)) if exits is None else {k % E for k in exits}
        deepest_ic = max((k for k in wanted if k < E - 1), default=-1)
        last_stage = self.exit_after[max(wanted)]
        grad = self._backbone_grad()
        outs: list[Tensor] = []
        state, memory = x, None
        k = 0
        for i in range(last_stage + 1):
            with torch.set_grad_enabled(grad):
                state = self.stage(i, state)
            while k < E and self.exit_after[k] == i:
                if k <= deepest_ic or k == E - 1:
                    logits, memory = self.exit_step(k, state, memory)
                    if k in wanted:
                        outs.append(logits)
                k += 1
        return outs


def batch_of(state: Any) -> int:
    """Batch size of a state (dim 0 of its first tensor)."""
    from ..tree import state_batch_size

    n = state_batch_size(state)
    if n < 0:
        raise ValueError("the state holds no tensor")
    return n


class _WithLoss(torch.autograd.Function):
    """Identity on ``logits``; its backward also sends the gradient ``weight`` into the scalar ``aux``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, aux: Tensor, weight: float) -> Tensor:
        ctx.weight, ctx.aux_dtype = weight, aux.dtype
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        return grad, torch.full((), ctx.weight, dtype=ctx.aux_dtype, device=grad.device), None


def attach_loss(logits: Tensor, aux: Tensor, weight: float) -> Tensor:
    """Return ``logits`` unchanged, such that any loss on them also minimises ``weight * aux``.

    Lets an exit carry an auxiliary training loss (GPF's imitation loss)
    through the one training loop, which only sees the exits' logits: the
    backward pass through these logits adds ``weight * d aux / d theta``.
    The auxiliary term is not part of the loss value the loop reports.

    Args:
        logits: ``(B, C)`` logits of an exit whose loss is trained.
        aux: a scalar loss.
        weight: its weight.
    Returns:
        ``logits`` (same values).
    """
    if not aux.requires_grad or weight == 0:
        return logits
    return _WithLoss.apply(logits, aux, float(weight))
