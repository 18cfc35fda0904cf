"""What ``train`` would find wrong, found before anything runs or any file changes.

``check_training`` is called by ``earlyexit.runs`` before a run touches its
folder (so ``--force`` never loses a run to an input that could have been
checked): the batch against the number of processes and the training set, a
phase with nothing to train, and the optimizer of every grid point of every
phase that runs, built exactly as the loop builds it.
"""

from __future__ import annotations

import os
from typing import Any

from ..config import TrainConfig
from ..errors import ConfigError, DataError
from ..models.multiexit import MultiExitModel
from .optim import make_optimizer
from .phases import set_trainable


def check_training(model: MultiExitModel, data: Any, config: TrainConfig, *, world_size: int | None = None) -> None:
    """Raise a one-line ``ConfigError`` / ``DataError`` for a run that cannot train; change nothing.

    Args:
        model: the model as ``train`` will get it (its ``requires_grad`` flags are restored).
        data: the splits (``train`` and ``val`` with ``len``).
        config: the training configuration.
        world_size: processes of a data-parallel run (default: torchrun's ``WORLD_SIZE``, else 1).
    """
    ws = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    bs = config.batch_size
    if bs % ws:
        raise ConfigError(f"batch size {bs} is not divisible by the {ws} processes")
    n = len(data.train)
    if n < bs:
        raise ConfigError(f"batch size {bs} is larger than the training set ({n} samples); "
                          "pass a smaller --batch-size or a larger --train-size")
    if len(data.val) == 0:
        raise DataError("the validation split is empty: pass a larger --train-size or validation fraction")
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in config.parsed_regime.run_phases:
            set_trainable(model, p)
            params = [q for q in model.parameters() if q.requires_grad]
            if not params:
                raise ConfigError(f"phase {p} has nothing to train (the model has no IC heads)")
            pc = config.phases[p - 1]
            for lr in pc.lr:
                try:
                    make_optimizer(params, pc, lr)
                except (ValueError, TypeError, RuntimeError) as e:
                    raise ConfigError(f"phase {p}: the {pc.optimizer} optimizer refuses lr {lr}: "
                                      f"{' '.join(str(e).split())[:160]}") from None
    finally:
        for q, f in zip(model.parameters(), flags):
            q.requires_grad_(f)


__all__ = ["check_training"]
