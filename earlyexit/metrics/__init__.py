"""Early-exit metrics: per-exit FLOPs, one-pass evaluation, threshold sweeps, budgets, calibration.

Follows the evaluation protocol of "Joint or Disjoint: Mixing Training Regimes
for Early-Exit Models": the data is run once, every exit's logits are kept as an
``(E, N, C)`` tensor, and every threshold curve, static point and budget table
(the paper's Table 1) is computed from that tensor by pure, vectorized
functions, never by re-running the model per threshold. Budgets can also be
calibrated on validation logits and applied to the test logits, after MSDNet's
budgeted protocol (Huang et al., ICLR 2018): ``calibrate_thresholds``,
``apply_thresholds``, ``calibrated_curve``.

One concern per module, all re-exported here:

- ``costs``: per-exit costs (``exit_costs``, ``backbone_cost``; ``count_flops`` lives below the models in ``earlyexit.flops``);
- ``evaluate``: the one logits pass (``evaluate``);
- ``criteria``: exit criteria (``CRITERIA``, ``exit_scores``, ``exit_decisions``);
- ``curves``: ``threshold_curve``, ``static_points``, ``accuracy_per_exit``, ``budget_table`` (best
  within budget, one run), ``average_curves`` and ``ztw_budget_table`` (the paper's Table 1 rule over seeds);
- ``calibration``: budgets calibrated on validation data.

The FLOP convention is in ``costs``, the exit criteria are defined in ``criteria``.
"""

from __future__ import annotations

from ..device import autocast_context, model_device
from ..tree import to_device
from .calibration import CALIBRATION_MODES, apply_thresholds, calibrate_thresholds, calibrated_curve, geometric_fractions
from ..flops import count_flops
from .costs import backbone_cost, exit_costs
from .criteria import CRITERIA, exit_decisions, exit_scores
from .curves import accuracy_per_exit, average_curves, budget_table, static_points, threshold_curve, ztw_budget_table
from .evaluate import evaluate

__all__ = ["CRITERIA", "to_device", "autocast_context", "model_device", "exit_scores", "count_flops", "exit_costs",
           "backbone_cost", "evaluate", "exit_decisions", "threshold_curve", "static_points", "accuracy_per_exit",
           "budget_table", "average_curves", "ztw_budget_table", "CALIBRATION_MODES", "geometric_fractions",
           "calibrate_thresholds", "apply_thresholds", "calibrated_curve"]
