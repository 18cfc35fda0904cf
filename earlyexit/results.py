"""``Results``: the schema of ``results.json`` as a type.

``results.json`` is the artefact other implementations compare against, so it
has one owner: the dataclasses below. A run builds a ``Results`` once
(``Results.build``), writes it with ``save`` (strict JSON: non-finite numbers
become null) and reads it back with ``Results.from_json``, which also reads
every results.json the earlier layout of this package wrote. ``SCHEMA``, the
field-by-field description printed in the README, is generated from the
field comments here.

Accuracies are fractions in [0, 1]; FLOPs are per sample, 2 x multiply-adds
(``earlyexit.metrics.costs``); budget keys are ``"25%"``, ``"50%"``,
``"75%"``, ``"100%"`` and ``"max"``.

Everything but ``timing`` describes the result and is deterministic: two runs
of one config on the CPU write it identically (``Results.comparable``).
Wall-clock time lives under ``timing`` alone, in the file and in the type
(``Results.timing``; earlier files kept it in ``train.seconds``, which
``from_json`` reads into ``timing``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from .errors import EarlyExitError
from .io import atomic_write_json
from .schema import check_results, read_json
from .tree import to_jsonable

RESULTS = "results.json"
Budgets = dict  # {"25%": float | None, ..., "max": float | None}


@dataclass
class ExitResult:
    index: int                      # exit number, 0 = first IC, last = the backbone's own head
    flops: float                    # cumulative cost of leaving here (earlier ICs included)
    accuracy: float                 # test accuracy when every sample leaves at this exit
    stage: int | None = None        # the block the exit sits after


@dataclass
class Curve:
    criterion: str                  # exit criterion (confidence, entropy, patience)
    thresholds: list                # the thresholds swept (evenly spaced)
    flops: list                     # average cost per sample at each threshold
    accuracy: list                  # test accuracy at each threshold
    exit_counts: list               # per threshold, how many test samples left at each exit


@dataclass
class CalibratedCurve:
    criterion: str                  # exit criterion
    mode: str                       # "geometric" (MSDNet's exit distribution) or "global" (one threshold)
    targets: list                   # target average costs
    thresholds: list                # per target, one threshold per exit (null: fires always / never)
    flops: list                     # average test cost reached
    accuracy: list                  # test accuracy reached
    val_flops: list                 # average validation cost reached
    exit_counts: list               # per target, test samples per exit


@dataclass
class TrainInfo:
    phases: list                    # per phase: {phase, lr, best_epoch, best_val, grid}
    method_stage: list | None = None  # a method's own stage after the phases (ZTW's ensembles)


@dataclass
class Timing:
    train_seconds: float | None = None  # wall-clock training time, summed over resumes (differs between runs)
    platform: str | None = None       # where it finished training (device.platform): reruns match its digits there only


@dataclass
class Results:
    regime: str                     # phase string actually run, e.g. "++-"
    regime_name: str                # the regime as given, e.g. "mixed"
    model: str                      # registry name of the backbone
    dataset: str                    # dataset name
    seed: int                       # the run's seed
    base_flops: float               # FLOPs per sample of the backbone alone with its own classifier
    exits: list[ExitResult]         # per exit: every test sample leaves there
    curve: Curve                    # early exit on the test set at evenly spaced thresholds
    budgets: Budgets                # best test accuracy at an average cost <= that share of base_flops (null if none)
    calibrated_geometric: CalibratedCurve | None = None  # thresholds chosen on validation data, geometric protocol
    calibrated_global: CalibratedCurve | None = None     # thresholds chosen on validation data, one global threshold
    calibrated_budgets: Budgets | None = None            # the budget table of calibrated_geometric
    method: str | None = None       # the early-exit method (null: plain ICs)
    weighting: str | None = None    # the loss weighting over exits
    train: TrainInfo | None = None  # how training went (absent for an evaluation without training)
    timing: Timing | None = None    # wall-clock time and platform: the part that is not the config's (comparisons skip it)

    @classmethod
    def build(cls, *, regime: str, regime_name: str, model: str, dataset: str, seed: int, evaluation: dict,
              method: str | None, weighting: str | None, train: TrainInfo | None = None,
              timing: Timing | None = None) -> "Results":
        """Assemble the results of a run from its identity, the evaluation's dict (``base_flops``, ``exits``,
        ``curve``, ``budgets`` and, where computed, the calibrated parts), its training record and its time."""
        parts = {k: dataclasses.asdict(v) if v is not None else None for k, v in (("train", train), ("timing", timing))}
        return cls.from_dict({"regime": regime, "regime_name": regime_name, "model": model, "dataset": dataset,
                              "seed": seed, **evaluation, "method": method, "weighting": weighting, **parts})

    @classmethod
    def from_dict(cls, d: dict) -> "Results":
        """A ``Results`` from a results.json dict (missing optional parts stay None)."""
        if not isinstance(d, dict):
            raise EarlyExitError(f"results must be a JSON object, got {type(d).__name__}")
        try:
            cal = {k: CalibratedCurve(**d[k]) if d.get(k) is not None else None
                   for k in ("calibrated_geometric", "calibrated_global")}
            train = dict(d["train"]) if d.get("train") is not None else None
            timing = Timing(**d["timing"]) if d.get("timing") is not None else None
            if train is not None:
                old = train.pop("seconds", None)  # the earlier layout kept the time here
                if timing is None and old is not None:
                    timing = Timing(train_seconds=old)
                train = TrainInfo(**train)
            res = cls(regime=d["regime"], regime_name=d.get("regime_name", d["regime"]), model=d["model"],
                      dataset=d["dataset"], seed=d["seed"], base_flops=d["base_flops"],
                      exits=[ExitResult(**e) for e in d["exits"]], curve=Curve(**d["curve"]), budgets=dict(d["budgets"]),
                      **cal, calibrated_budgets=d.get("calibrated_budgets"), method=d.get("method"),
                      weighting=d.get("weighting"), train=train, timing=timing)
        except KeyError as e:
            raise EarlyExitError(f"results lack the field {e.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as e:
            raise EarlyExitError(f"results do not fit the schema: {' '.join(str(e).split())[:160]}") from None
        res._check_types()
        return res

    def _check_types(self) -> None:
        """The fields every reader uses have their documented types (a foreign or tampered file: one line)."""
        def bad(where: str, what: str) -> EarlyExitError:
            return EarlyExitError(f"results do not fit the schema: {where} must be {what}")

        num = (int, float)
        for name in ("regime", "regime_name", "model", "dataset"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise bad("seed", "an integer")
        if not isinstance(self.base_flops, num) or isinstance(self.base_flops, bool):
            raise bad("base_flops", "a number")
        if not isinstance(self.budgets, dict):
            raise bad("budgets", "an object")
        for i, e in enumerate(self.exits):
            if not isinstance(e.index, int) or not isinstance(e.flops, num) or not isinstance(e.accuracy, num):
                raise bad(f"exits[{i}]", "{index: integer, flops: number, accuracy: number}")
        c = self.curve
        if not isinstance(c.criterion, str) or not all(isinstance(v, list) for v in
                                                       (c.thresholds, c.flops, c.accuracy, c.exit_counts)):
            raise bad("curve", "{criterion: string, thresholds, flops, accuracy, exit_counts: lists}")
        if self.train is not None and not isinstance(self.train.phases, list):
            raise bad("train.phases", "a list")

    @classmethod
    def from_json(cls, path: str | Path) -> "Results":
        """Read ``path`` (a results.json, or a run folder holding one)."""
        path = Path(path)
        f = path / RESULTS if path.is_dir() else path
        if not f.is_file():
            raise EarlyExitError(f"{path} has no {RESULTS}")
        d = read_json(f)  # one line for a file that is not JSON or nests too deep
        try:
            res = cls.from_dict(d)
            check_results(d)  # every field a reader uses, of its type (a foreign or crafted file: one line)
        except EarlyExitError as e:
            raise EarlyExitError(f"{f}: {e}") from None
        return res

    def to_dict(self) -> dict:
        """The results.json object: strict JSON, optional parts that were never computed left out."""
        d = dataclasses.asdict(self)
        for k in ("calibrated_geometric", "calibrated_global", "calibrated_budgets", "train", "timing"):
            if d[k] is None:
                del d[k]
        if d.get("train") is not None and d["train"]["method_stage"] is None:
            del d["train"]["method_stage"]
        for e in d["exits"]:
            if e["stage"] is None:
                del e["stage"]
        if d.get("timing") is not None and d["timing"]["platform"] is None:  # a run from before it was recorded
            del d["timing"]["platform"]
        return to_jsonable(d)

    def comparable(self) -> dict:
        """``to_dict`` without ``timing`` (time and platform): what two runs of one config write identically on
        one platform (``Timing.platform``)."""
        d = self.to_dict()
        d.pop("timing", None)
        return d

    def save(self, path: str | Path) -> Path:
        """Write results.json atomically into ``path`` (a run folder) or to ``path`` (a file)."""
        path = Path(path)
        f = path / RESULTS if path.is_dir() else path
        atomic_write_json(f, self.to_dict())
        return f

    @property
    def label(self) -> str:
        """A short legend label: model, regime and seed."""
        return f"{self.model} {self.regime_name} (seed {self.seed})"


def _schema(cls: type, indent: str = "") -> list[str]:
    """``name  comment`` lines of a dataclass, read from the field comments of its source."""
    import inspect

    src = inspect.getsource(cls)
    lines = []
    for f in dataclasses.fields(cls):
        comment = next((ln.split("#", 1)[1].strip() for ln in src.splitlines()
                        if ln.strip().startswith(f"{f.name}:") and "#" in ln), "")
        lines.append(f"{indent}{f.name:<22}{comment}")
    return lines


def schema() -> str:
    """The documented schema of results.json, generated from the dataclasses (the README prints it)."""
    out = _schema(Results)
    for name, cls in (("exits[]", ExitResult), ("curve", Curve), ("calibrated_*", CalibratedCurve), ("train", TrainInfo),
                      ("timing", Timing)):
        out.append(f"{name}:")
        out.extend(_schema(cls, "  "))
    return "\n".join(out)


__all__ = ["Results", "ExitResult", "Curve", "CalibratedCurve", "TrainInfo", "Timing", "RESULTS", "schema"]
