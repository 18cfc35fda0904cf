"""Per-exit costs: ``exit_costs`` and ``backbone_cost`` give a multi-exit model's per-sample cost of
leaving at each exit and of its backbone alone (the reference of the budget table), counted by
``earlyexit.flops.count_flops`` (which the models use too, below both).

Convention: FLOPs = 2 x multiply-adds, as ``torch.utils.flop_counter`` counts
matrix products and convolutions (including the score and value products
inside ``scaled_dot_product_attention``). Element-wise ops, pooling and
normalisation are not counted, as in that counter. Costs are per sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..device import model_device
from ..flops import count_flops
from ..tree import state_batch_size, to_device

if TYPE_CHECKING:  # annotations only: metrics never import models
    from ..models.multiexit import MultiExitModel


# --- per-exit costs -----------------------------------------------------------

_MODEL_ATTRS = ("stages", "heads", "exit_after", "stage", "head")


def _check_model(model: Any) -> None:
    """Raise ``TypeError`` unless ``model`` offers the ``MultiExitModel`` parts the costs walk through."""
    if not all(hasattr(model, a) for a in _MODEL_ATTRS):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")


def _part_costs(model: MultiExitModel, example_input: Any, *, ic_heads: bool) -> tuple[list[float], list[float]]:
    """Per-sample FLOPs of each stage (stage 0 with the stem) and of each head (0 for skipped ICs)."""
    _check_model(model)
    batch = state_batch_size(example_input)
    if batch <= 0:
        raise ValueError("example_input holds no tensor with a non-empty batch dimension")
    E = model.num_exits
    stage_flops = [0.0] * len(model.stages)
    head_flops = [0.0] * E
    was_training = model.training
    model.eval()  # BatchNorm and dropout as at inference; the counts do not depend on it, the state does
    try:
        state = to_device(example_input, model_device(model))
        k = 0
        for i in range(len(model.stages)):
            c, state = count_flops(model.stage, i, state)
            stage_flops[i] = c / batch
            while k < E and model.exit_after[k] == i:
                if ic_heads or k == E - 1:
                    c, _ = count_flops(model.head, k, state)
                    head_flops[k] = c / batch
                k += 1
    finally:
        model.train(was_training)
    return stage_flops, head_flops


def exit_costs(model: MultiExitModel, example_input: Any) -> list[float]:
    """Cumulative per-sample FLOPs of leaving the model at each exit.

    The cost of exit ``k`` is the stem and every stage up to ``exit_after[k]``,
    plus every head up to and including ``k`` (a sample that leaves at ``k``
    has been through the earlier heads too). Convention: FLOPs = 2 x
    multiply-adds, as ``torch.utils.flop_counter`` counts matrix products and
    convolutions (attention score and value products included, through
    ``scaled_dot_product_attention``); element-wise ops, pooling and
    normalisation are free. Counted once in eval mode; the model's training
    flag is restored.

    Args:
        model: the multi-exit model.
        example_input: an input batch (tensor or pytree such as a dict of
            tensors); the counts are divided by its batch size.
    Returns:
        One float per exit, non-decreasing along exits.
    """
    stage_flops, head_flops = _part_costs(model, example_input, ic_heads=True)
    costs, k, total = [], 0, 0.0
    for i, s in enumerate(stage_flops):
        total += s
        while k < model.num_exits and model.exit_after[k] == i:
            total += head_flops[k]
            costs.append(total)
            k += 1
    return costs


def backbone_cost(model: MultiExitModel, example_input: Any) -> float:
    """Per-sample FLOPs of the backbone alone: stem, every stage and its own classifier, no ICs.

    Same convention as ``exit_costs`` (2 x multiply-adds, ``torch.utils.flop_counter``).

    Args:
        model: the multi-exit model.
        example_input: an input batch (tensor or pytree); counts are divided by its batch size.
    Returns:
        The cost as a float: the reference of the budget table.
    """
    stage_flops, head_flops = _part_costs(model, example_input, ic_heads=False)
    return sum(stage_flops) + head_flops[-1]


__all__ = ["exit_costs", "backbone_cost"]
