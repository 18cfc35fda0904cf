"""FLOP counting shared by model building and metrics.

Convention: FLOPs = 2 x multiply-adds, as ``torch.utils.flop_counter`` counts
matrix products and convolutions (including those inside
``scaled_dot_product_attention``). Element-wise ops, pooling and
normalisation are not counted, as in that counter.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` once and return ``(flops, output)``."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out
