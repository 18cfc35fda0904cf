"""One walker over nested tensors ("pytrees": a tensor, or dicts / lists / tuples of them).

A model's state between stages may be a tensor or a small pytree (a BERT state
carries its attention mask, MSDNet a list of scales); batches may be dicts of
token ids. Everything that moves, slices or measures such a structure goes
through ``tree_map`` here, and ``to_jsonable`` makes any result strict JSON.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

State = Any  # a Tensor, or a (nested) tuple / list / dict of Tensors


def tree_map(fn: Callable[[Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of ``tree``; keep the structure (named tuples included)
    and pass other leaves (``None``, numbers, strings) through unchanged."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return type(tree)((k, tree_map(fn, v)) for k, v in tree.items())
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # named tuple
        return type(tree)(*(tree_map(fn, v) for v in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def to_device(tree: Any, device: torch.device | str) -> Any:
    """Move every tensor of a pytree to ``device``.

    Args:
        tree: a tensor, or a (nested) dict / list / tuple of tensors.
        device: target device.
    Returns:
        The same structure with its tensors on ``device``.
    """
    device = torch.device(device)
    # Asynchronous copies only towards CUDA; a non-blocking copy to the host may be read before it lands.
    return tree_map(lambda t: t.to(device, non_blocking=device.type == "cuda"), tree)


def slice_state(state: State, index: Tensor) -> State:
    """Select samples ``index`` (bool mask or int indices) along dim 0 of every tensor."""
    return tree_map(lambda t: t[index], state)


def state_batch_size(state: State) -> int:
    """Batch size of a state: dim 0 of its first tensor leaf (-1 when it holds no tensor)."""
    if isinstance(state, Tensor):
        return state.shape[0]
    if not isinstance(state, (dict, list, tuple)):
        return -1  # non-tensor leaves (None, numbers, strings) carry no batch
    values = state.values() if isinstance(state, dict) else state
    for v in values:
        n = state_batch_size(v)
        if n >= 0:
            return n
    return -1


def to_jsonable(obj: Any) -> Any:
    """Tensors to (nested) lists, tuples to lists, non-finite floats to None: ready for strict JSON."""
    if isinstance(obj, Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


__all__ = ["State", "tree_map", "to_device", "slice_state", "state_batch_size", "to_jsonable"]
