"""Patience-based early exit, PABEE (Zhou et al., NeurIPS 2020, "BERT Loses Patience").

An IC after every layer; a sample leaves once ``t`` consecutive ICs after
the first have agreed with their predecessor, i.e. once the same arg-max has
held at ``t + 1`` consecutive exits (``earlyexit.metrics``' ``patience``
criterion with ``p = t + 1``; ``patience_threshold`` converts), and at the
last exit otherwise. Patience ``t = 0`` means "use all layers": no sample
leaves early, as in PABEE's published inference code, which runs the whole
model when the patience is 0 (the criterion's ``p = 0``). PABEE's own loss
weighs exit ``k`` (0-based) by ``k + 1``, normalised by the sum of the weights
(weighting ``pabee``); the code of "Joint or Disjoint" trains PBEE's ICs with
the mean of the exits' losses, the default here (weighting ``mean``).
"""

from __future__ import annotations

from .sdn import apply as _keep_model


def patience_threshold(patience: int) -> int:
    """The ``patience`` criterion's threshold ``p`` for PABEE's patience ``t``.

    Args:
        patience: PABEE's ``t >= 0``, the number of agreeing ICs after the first; 0 uses all layers.
    Returns:
        ``t + 1`` for ``t >= 1``; 0 (the criterion's "never leave early") for ``t = 0``.
    Raises:
        ValueError: ``patience`` is not an integer >= 0.
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"PABEE's patience must be an integer >= 0, got {patience!r}")
    return patience + 1 if patience > 0 else 0


# PABEE keeps the model's independent ICs as they are: only the exit rule and the loss weights change.
apply = _keep_model
