"""earlyexit: early-exit (multi-exit) networks and their joint, disjoint and mixed training regimes.

The public API, re-exported from the modules that hold it.
"""

from .config import PhaseConfig, RunConfig, TrainConfig
from .data import load_dataset
from .regime import Regime
from .results import Results
from .runs import load_run, run_experiment
from .score import score
from .inference import predict
from .metrics import backbone_cost, budget_table, evaluate, exit_costs, static_points, threshold_curve
from .models import MultiExitModel, build_model, list_models
from .training import train

__version__ = "0.1.0"
__all__ = [
    "MultiExitModel", "build_model", "list_models", "load_dataset", "train", "evaluate", "exit_costs",
    "backbone_cost", "threshold_curve", "static_points", "budget_table", "load_run", "score", "predict", "PhaseConfig",
    "TrainConfig", "RunConfig", "Regime", "Results", "run_experiment",
]
