"""The training state, what a checkpoint holds, and the checkpoint files.

``TrainState`` is everything the loop needs to continue a run: where it is
(phase, grid point, epoch), the early-stopping counter (and, for per-exit
early stopping, every validated exit's best accuracy), the best weights so
far (of the grid point and of the phase), the weights the phase started from,
the optimizer state, the history, the step probe's records, the finished
phases' records and the training seconds. ``state_dict()`` / ``load_state_dict()`` turn it into the
plain dict of tensors and containers that ``checkpoint.pt`` holds (readable
with ``torch.load(weights_only=True)``) and back.

``CheckpointFiles`` writes ``checkpoint.pt`` (with the model's weights),
``history.jsonl`` (and ``history.csv``, ``logs.write_history``) and, when a step probe recorded anything,
``gradients.jsonl``
atomically after every epoch (both rewritten whole from the state, so a
resumed run that repeats an epoch writes no line twice), and reads a checkpoint back
for ``resume``, refusing files that are not training checkpoints of this
package or were written by another regime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import atomic_torch_save, atomic_write_text, load_checkpoint, load_state_strict
from ..schema import check_checkpoint, check_optimizer_shapes
from .logs import HISTORY, HISTORY_CSV, write_history  # noqa: F401  (HISTORY, HISTORY_CSV: the files' names)

CHECKPOINT = "checkpoint.pt"
PROBE_LOG = "gradients.jsonl"  # the step probe's records (run_experiment's probe: gradient cosines per exit)
VERSION = 1  # of the checkpoint's layout


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's state_dict on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@dataclass
class Best:
    """The best weights so far of a grid point (``lr`` None) or of a phase's grid."""
    val: float                   # their validation metric
    epoch: int                   # 1-based epoch they come from
    state: dict[str, Tensor]     # the weights, on the CPU
    lr: float | None = None      # the grid point they come from

    def to_dict(self) -> dict:
        d = {"val": self.val, "epoch": self.epoch, "state": self.state}
        return d if self.lr is None else {**d, "lr": self.lr}

    @classmethod
    def from_dict(cls, d: dict | None) -> Best | None:
        return None if d is None else cls(val=d["val"], epoch=d["epoch"], state=d["state"], lr=d.get("lr"))


class TrainState:
    """Where a run stands; the loop changes it only through these methods."""

    def __init__(self, phases: str) -> None:
        self.phases = phases                          # the regime's phase string
        self.phase, self.grid, self.epoch = 1, 0, 0   # next epoch to run: phase, grid point, 0-based epoch
        self.bad = 0                                  # epochs since the grid point's best
        self.exit_best: list[float] | None = None     # per-exit early stopping: each validated exit's best accuracy
        self.run_best: Best | None = None             # best of the current grid point
        self.grid_best: Best | None = None            # best over the phase's finished grid points
        self.grid_log: list[dict] = []                # per finished grid point: {lr, best_val, best_epoch, epochs}
        self.phase_start: dict[str, Tensor] | None = None  # weights every grid point of the phase starts from
        self.optimizer: dict | None = None            # optimizer state after the last epoch of the grid point
        self.records: list[dict] = []                 # per finished phase: {phase, lr, best_epoch, best_val, grid}
        self.history: list[dict] = []                 # one dict per epoch, as in history.jsonl
        self.probe_log: list[dict] = []               # the step probe's records, as in gradients.jsonl
        self.seconds = 0.0                            # training time, summed over the calls of a resumed run
        self.options: dict | None = None              # the run's options (RunConfig as a dict): --resume checks them

    # --- transitions ----------------------------------------------------------
    def skip_phase(self) -> None:
        """Move past a phase the regime does not run."""
        self.phase, self.grid, self.epoch = self.phase + 1, 0, 0

    def start_grid_point(self) -> None:
        """Forget the previous grid point's best and its early-stopping count (at its first epoch)."""
        self.run_best, self.bad, self.exit_best = None, 0, None

    def end_epoch(self, rec: dict, metric: float, seconds: float, model: nn.Module, *,
                  exit_acc: list[float] | None = None) -> None:
        """Log an epoch and keep the model's weights when it improved.

        Improved: ``metric`` beats the grid point's best; with ``exit_acc`` (per-exit early stopping),
        some exit's accuracy beats that exit's own best instead. ``bad`` counts the epochs since the
        last improvement, so with ``exit_acc`` it reaches the patience when every exit has stalled that long.
        """
        self.history.append(rec)
        self.seconds += seconds
        if exit_acc is None:
            improved = self.run_best is None or metric > self.run_best.val
        else:
            prev = self.exit_best
            improved = prev is None or any(a > b for a, b in zip(exit_acc, prev))
            self.exit_best = list(exit_acc) if prev is None else [max(a, b) for a, b in zip(exit_acc, prev)]
        if improved:
            self.run_best = Best(val=metric, epoch=rec["epoch"], state=cpu_state(model))
            self.bad = 0
        else:
            self.bad += 1

    def log_probe(self, rec: dict) -> None:
        """Keep one record of the step probe."""
        self.probe_log.append(rec)

    def advance(self, optimizer_state: dict) -> None:
        """Count the epoch as done and keep the optimizer state it ended with."""
        self.epoch += 1
        self.optimizer = optimizer_state

    def finish_grid_point(self, lr: float) -> None:
        """Log the grid point's best and keep it when it beats the other grid points'."""
        rb = self.run_best
        self.grid_log.append({"lr": lr, "best_val": rb.val, "best_epoch": rb.epoch, "epochs": self.epoch})
        if self.grid_best is None or rb.val > self.grid_best.val:
            self.grid_best = Best(val=rb.val, epoch=rb.epoch, state=rb.state, lr=lr)
        self.run_best = None

    def next_grid_point(self) -> None:
        self.grid, self.epoch, self.optimizer = self.grid + 1, 0, None

    def finish_phase(self) -> None:
        """Record the phase's choice over its grid and move to the next phase."""
        best = self.grid_best
        self.records.append({"phase": self.phase, "lr": best.lr, "best_epoch": best.epoch, "best_val": best.val,
                             "grid": self.grid_log})
        self.phase, self.grid, self.epoch, self.optimizer = self.phase + 1, 0, 0, None
        self.phase_start = self.grid_best = self.run_best = self.exit_best = None
        self.grid_log, self.bad = [], 0

    # --- (de)serialisation ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain containers and tensors (``torch.load(weights_only=True)`` reads them back)."""
        return {"version": VERSION, "phases": self.phases, "seconds": self.seconds, "phase": self.phase,
                "grid": self.grid, "epoch": self.epoch, "phase_start": self.phase_start,
                "run_best": self.run_best.to_dict() if self.run_best is not None else None,
                "grid_best": self.grid_best.to_dict() if self.grid_best is not None else None,
                "grid_log": self.grid_log, "bad": self.bad, "optimizer": self.optimizer, "records": self.records,
                "history": self.history, "exit_best": self.exit_best, "probe_log": self.probe_log,
                "options": self.options}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.phases, self.seconds = d["phases"], d.get("seconds", 0.0)
        self.phase, self.grid, self.epoch, self.bad = d["phase"], d["grid"], d["epoch"], d["bad"]
        self.phase_start, self.optimizer = d["phase_start"], d["optimizer"]
        self.run_best, self.grid_best = Best.from_dict(d["run_best"]), Best.from_dict(d["grid_best"])
        self.grid_log, self.records, self.history = d["grid_log"], d["records"], d["history"]
        self.exit_best, self.probe_log = d.get("exit_best"), d.get("probe_log", [])  # absent from older checkpoints
        self.options = d.get("options")


class CheckpointFiles:
    """``checkpoint.pt`` and ``history.jsonl`` in ``out_dir`` (None: nothing on disk); only ``write`` ranks write."""

    def __init__(self, out_dir: str | Path | None, *, write: bool) -> None:
        self.out = Path(out_dir) if out_dir is not None else None
        self.path = self.out / CHECKPOINT if self.out is not None else None
        self.write = write and self.out is not None
        if self.write:
            self.out.mkdir(parents=True, exist_ok=True)

    def save(self, st: TrainState, model: nn.Module) -> None:
        """Write the state with the model's weights, the history and the probe's records, atomically."""
        if self.write:
            atomic_torch_save({**st.state_dict(), "model": cpu_state(model)}, self.path)
            self.save_logs(st)

    def save_logs(self, st: TrainState) -> None:
        """Rewrite ``history.jsonl`` and ``history.csv`` (and the probe's log) from the state: a line lost to an
        interrupt between the checkpoint's write and the history's comes back on resume."""
        if self.write:
            write_history(self.out, st.history)
            if st.probe_log or (self.out / PROBE_LOG).exists():
                atomic_write_text(self.out / PROBE_LOG, "".join(json.dumps(r) + "\n" for r in st.probe_log))

    def load(self, phases: str, model: nn.Module) -> TrainState:
        """The state of the checkpoint, whose weights are loaded into ``model``.

        Raises:
            CheckpointError: no checkpoint, not a training checkpoint of this package, another regime's,
                or weights that do not fit the model.
        """
        if self.path is None or not self.path.is_file():
            raise CheckpointError(f"nothing to resume: {self.path} does not exist")
        d = load_checkpoint(self.path)
        if not isinstance(d, dict) or d.get("version") != VERSION or "phase" not in d:
            raise CheckpointError(f"{self.path} is not a training checkpoint of this package")
        check_checkpoint(d, self.path, phases=phases)  # every key it is read by, of its type: one line, never a KeyError
        if d["phases"] != phases:
            raise CheckpointError(f"{self.path} was written by regime {d['phases']!r}, not {phases!r}")
        st = TrainState(phases)
        st.load_state_dict(d)
        load_state_strict(model, d["model"], source=str(self.path))
        if d["optimizer"] is not None and d["phase"] <= 3:
            check_optimizer_shapes(d["optimizer"], _trained_shapes(model, d["phase"]), self.path)
        return st


def _trained_shapes(model: nn.Module, phase: int) -> list[tuple[int, ...]]:
    """The shapes of the parameters ``phase`` trains, in the optimizer's order (``requires_grad`` left as it was)."""
    from .phases import set_trainable

    before = [p.requires_grad for p in model.parameters()]
    try:
        set_trainable(model, phase)  # type: ignore[arg-type]
        return [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    finally:
        for p, flag in zip(model.parameters(), before):
            p.requires_grad_(flag)


__all__ = ["CHECKPOINT", "HISTORY", "HISTORY_CSV", "PROBE_LOG", "Best", "TrainState", "CheckpointFiles", "cpu_state"]
