"""Patience-based early exit, PABEE (Zhou et al., NeurIPS 2020, "BERT Loses Patience").

An IC after every layer; a sample leaves once ``t`` consecutive ICs after
the first have agreed with their predecessor, i.e. once the same arg-max has
held at ``t + 1`` consecutive exits (``earlyexit.metrics``' ``patience``
criterion with ``p = t + 1``; ``patience_threshold`` converts), and at the
last exit otherwise. PABEE's own loss weighs exit ``k`` (0-based) by
``k + 1``, normalised by the sum of the weights (weighting ``pabee``); the
code of "Joint or Disjoint" trains PBEE's ICs with the mean of the exits'
losses, the default here (weighting ``mean``).
"""

from __future__ import annotations

from .sdn import apply as _keep_model


def patience_threshold(patience: int) -> int:
    """The ``patience`` criterion's threshold ``p`` for PABEE's patience ``t`` (``p = t + 1``).

    Args:
        patience: PABEE's ``t >= 0``, the number of agreeing ICs after the first.
    Returns:
        ``t + 1``.
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"PABEE's patience must be an integer >= 0, got {patience!r}")
    return patience + 1


# PABEE keeps the model's independent ICs as they are: only the exit rule and the loss weights change.
apply = _keep_model
