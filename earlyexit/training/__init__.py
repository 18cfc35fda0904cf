"""Training of multi-exit models in the joint, disjoint and mixed regimes.

One concern per module:

- ``phases``: the phase table as data (what each phase trains, counts, validates, freezes);
- ``step``: the one training step, shared by the loop and the benchmark;
- ``state``: the training state, the checkpoint it is saved to, resuming from it;
- ``optim``: optimizer, learning-rate schedule, per-epoch seeds;
- ``weighting``: the loss weights over exits;
- ``loop``: ``train``, which walks the phases and their grids, and ``validate``;
- ``logs``: ``history.csv`` beside ``history.jsonl``, and the optional TensorBoard log hook (``log_hook``).
"""

from ..errors import TrainingError
from .loop import PhaseRecord, TrainRecord, train, validate
from .optim import lr_at, make_optimizer
from .phases import phase_exits, set_mode, set_trainable
from .logs import HISTORY_CSV, LOG_SINKS, TensorBoardLog, log_hook, write_history
from .state import CHECKPOINT, HISTORY
from ..weighting import GradientEquilibrium, get_weighting, list_weightings, register_weighting

__all__ = [
    "train", "TrainRecord", "PhaseRecord", "validate", "phase_exits", "set_trainable", "set_mode", "make_optimizer",
    "lr_at", "get_weighting", "list_weightings", "register_weighting", "GradientEquilibrium", "CHECKPOINT", "HISTORY",
    "HISTORY_CSV", "LOG_SINKS", "TensorBoardLog", "log_hook", "write_history", "TrainingError",
]
