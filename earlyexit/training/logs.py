"""Where a run's epochs are logged besides ``history.jsonl``: ``history.csv``, and TensorBoard on request.

- ``history.csv`` holds the rows of ``history.jsonl``, one per epoch, flattened: a list becomes one column
  per position (``val_acc.0``, ``val_acc.1``, ...; in phase 1 the one validated exit is the final one, as
  in the JSON line), a dict one column per key (``a.b``); the columns are every key in the order it first
  appears, a row without one leaves it empty. It is written with ``history.jsonl``, whole and atomically
  (``write_history``), so the two always hold the same epochs.
- ``TensorBoardLog`` is a ``train`` log hook (``--log tensorboard``, ``TrainConfig.log``; ``run_experiment`` and
  ``compare_regimes`` add it through ``log_hook``): each epoch's training loss, training and validation accuracy
  of every exit, validation metric and learning rate as scalars, one curve per phase and grid point
  (``phase2-lr0.1/val_acc/exit0``), stepped by the epoch. TensorBoard is an optional extra
  (``pip install 'earlyexit[tensorboard]'``), imported when the first event arrives.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import LOG_SINKS  # the optional sinks of ``log_hook`` (history.jsonl and history.csv are always written)
from ..errors import ConfigError
from ..io import atomic_write_text

HISTORY = "history.jsonl"
HISTORY_CSV = "history.csv"
TENSORBOARD_DIR = "tensorboard"  # the event files' folder inside the run folder


def flatten(row: dict, prefix: str = "") -> dict[str, Any]:
    """``{"val_acc": [0.5, 0.7], "lr": 0.1}`` -> ``{"val_acc.0": 0.5, "val_acc.1": 0.7, "lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out.update(flatten({str(i): v for i, v in enumerate(value)}, name + "."))
        else:
            out[name] = value
    return out


def history_csv(rows: Sequence[dict]) -> str:
    """The rows as CSV text: a header of every flattened key (first-appearance order), then one line per row."""
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if columns:
        writer.writerow(columns)
    for r in flat:
        writer.writerow(["" if r.get(c) is None else _cell(r[c]) for c in columns])
    return buf.getvalue()


def _cell(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)  # floats: repr, the JSON line's digits


def write_history(out_dir: str | Path, rows: Sequence[dict]) -> None:
    """Write ``history.jsonl`` and ``history.csv`` in ``out_dir`` from ``rows``, each whole and atomically."""
    out = Path(out_dir)
    atomic_write_text(out / HISTORY, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / HISTORY_CSV, history_csv(rows))


class TensorBoardLog:
    """A ``train`` log hook that writes every epoch's numbers to TensorBoard and passes each event on to ``inner``.

    A ``run`` event (``compare`` sends one before each run, with its folder as ``out``) moves the log to that
    run's ``tensorboard`` folder.

    Args:
        log_dir: the folder of the event files (``RUN/tensorboard`` from ``log_hook``).
        inner: the hook that also gets every event (e.g. the CLI's progress lines), or None.
    Raises:
        ConfigError: at the first event, when the tensorboard package is not installed (one line).
    """

    def __init__(self, log_dir: str | Path, inner: Callable[..., None] | None = None) -> None:
        self.log_dir, self.inner, self.writer = Path(log_dir), inner, None
        self.wants_steps = bool(getattr(inner, "wants_steps", False))  # steps only for an inner hook that draws them

    def _open(self) -> Any:
        if self.writer is None:  # made at the first event: on rank 0 only, once the run has started
            self.writer = summary_writer_class()(log_dir=str(self.log_dir))
        return self.writer

    def __call__(self, event: str, **info: Any) -> None:
        if event == "epoch":
            w, step = self._open(), int(info["epoch"])
            tag = f"phase{info['phase']}-lr{info['lr']:g}"
            w.add_scalar(f"{tag}/train_loss", info["train_loss"], step)
            w.add_scalar(f"{tag}/val_metric", info["val_metric"], step)
            w.add_scalar(f"{tag}/lr", info["lr"], step)
            for split in ("train_acc", "val_acc"):
                for k, acc in enumerate(info.get(split) or []):
                    w.add_scalar(f"{tag}/{split}/exit{k}", acc, step)
            w.flush()
        elif event in ("done", "run"):
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            if event == "run" and info.get("out"):  # compare: each run of the comparison logs into its own folder
                self.log_dir = Path(info["out"]) / TENSORBOARD_DIR
        if self.inner is not None:
            self.inner(event, **info)


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line ``ConfigError`` when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install 'earlyexit[tensorboard]'") from None
    return SummaryWriter


def log_hook(sinks: Sequence[str], out_dir: str | Path, inner: Callable[..., None] | None = None
             ) -> Callable[..., None] | None:
    """``inner`` with the optional sinks ``sinks`` (names of ``LOG_SINKS``) of a run in ``out_dir`` added.

    Raises:
        ConfigError: an unknown sink, or (``"tensorboard"``) the tensorboard package missing.
    """
    bad = [s for s in sinks if s not in LOG_SINKS]
    if bad:
        raise ConfigError(f"unknown log sink {bad[0]!r}; valid: {', '.join(LOG_SINKS)} "
                          f"({HISTORY} and {HISTORY_CSV} are always written)")
    hook = inner
    if "tensorboard" in sinks:
        summary_writer_class()  # a missing package is a one-line error before the run starts, not after an epoch
        hook = TensorBoardLog(Path(out_dir) / TENSORBOARD_DIR, inner)
    return hook


__all__ = ["HISTORY", "HISTORY_CSV", "LOG_SINKS", "TENSORBOARD_DIR", "flatten", "history_csv", "write_history",
           "TensorBoardLog", "log_hook", "summary_writer_class"]
