"""Hypothesis strategies shared by the metric and calibration tests."""

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def exit_outputs(draw, max_exits: int = 5, max_classes: int = 6):
    """(logits (E, N, C), labels (N,), costs) with strictly increasing positive costs; ties in logits are likely."""
    E = draw(st.integers(1, max_exits))
    N = draw(st.integers(1, 12))
    C = draw(st.integers(2, max_classes))
    arr = draw(hnp.arrays(np.float32, (E, N, C), elements=st.floats(-5, 5, width=32)))
    labels = draw(hnp.arrays(np.int64, (N,), elements=st.integers(0, C - 1)))
    costs = list(np.cumsum(draw(st.lists(st.floats(0.1, 10), min_size=E, max_size=E))))
    return torch.from_numpy(arr), torch.from_numpy(labels), costs
