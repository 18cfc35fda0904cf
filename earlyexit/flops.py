"""FLOP counting of one call: below the models (their stage costs) and the metrics (per-exit costs).

Convention: FLOPs = 2 x multiply-adds, as ``torch.utils.flop_counter`` counts
matrix products and convolutions (including the score and value products
inside ``scaled_dot_product_attention``). Element-wise ops, pooling and
normalisation are not counted, as in that counter.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    shape = lambda t: getattr(t, "shape", t)  # noqa: E731  (the counter passes shapes, older releases tensors)
    return sdpa_flop_count(shape(query), shape(key), shape(value))


def _extra_mapping() -> dict:
    # On CPU, scaled_dot_product_attention dispatches to a fused kernel that the stock counter does not
    # know; count it as the score (Q K^T) and value (P V) products it performs.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _sdpa_cpu_flops} if op is not None else {}


@torch.no_grad()
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` once and return ``(flops, output)``."""
    with FlopCounterMode(display=False, custom_mapping=_extra_mapping()) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


__all__ = ["count_flops"]
