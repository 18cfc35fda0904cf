"""Shallow-Deep Networks (Kaya et al., ICML 2019) as a named method.

SDN's ICs are independent: each reads only the backbone's state after its
stage (for feature maps, SDN's mixed max/average pooling and a linear layer:
``earlyexit.models.heads.SDNHead``, the heads the convolutional backbones
here already carry). A sample leaves at the first IC whose maximum softmax
probability exceeds the threshold, strictly (``confidence``). The ICs' losses are
weighed with SDN's ramped schedule (weighting ``sdn``) in phase 2; in phase 3
(the ICs on a frozen backbone, SDN's IC-only training) every IC weighs 1. The
paper's code weighs phase 3 with the plain mean (1/E each), so ``--method sdn``
scales phase 3's loss E times higher than the paper's ``--weighting mean``.
"""

from __future__ import annotations

from ..models.multiexit import MultiExitModel


def apply(model: MultiExitModel) -> MultiExitModel:
    """SDN needs no rewiring: the model's independent ICs are SDN's.

    Args:
        model: a multi-exit model.
    Returns:
        ``model`` itself.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    return model
