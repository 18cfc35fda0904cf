"""Score any implementation's outputs: a run's evaluation, from per-exit logits alone.

``evaluate_logits`` is the one evaluation of this package: a run hands it its
model's test logits (``runs.evaluate_model``), ``score`` hands it another
implementation's. Either way the result is the evaluation part of a run's
results.json (``earlyexit.results.Results``): ``base_flops``, ``exits``
(per-exit accuracy), ``curve`` (the threshold sweep), ``budgets`` (best
accuracy within each budget) and, given validation logits, the
validation-calibrated curves and their budgets.

An output file (``.npz``, ``.pt`` read with ``torch.load(weights_only=True)``,
or ``.safetensors``) holds the keys

- ``logits``: ``(E, N, C)`` test logits of every exit, the final exit last;
- ``labels``: ``(N,)`` class indices;
- ``costs``: ``(E,)`` cumulative cost of leaving at each exit (earlier ICs included),
  non-decreasing;
- optionally ``base_flops`` (a scalar: the reference cost of the budgets; default
  the last exit's cost) and ``stages`` (``(E,)`` the block each exit sits after).

A validation file holds ``logits`` ``(E, N_val, C)`` and ``labels`` ``(N_val,)``
(``costs``, when present, must equal the test file's). Several output files are
the seeds of one configuration: ``score`` then also gives the mean +- std over
them of the per-exit accuracies and of both budget tables, the paper's
(``metrics.ztw_budget_table``: the seeds' curves averaged per threshold) and
each seed's best within budget, as ``python -m earlyexit summary`` does for run
folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import metrics
from .errors import EarlyExitError
from .io import atomic_write_bytes, atomic_write_json, figure_bytes, one_line
from .progress import ProgressFn, tracked
from .reports import PAPER_BUDGETS_TITLE, SEED_BUDGETS_TITLE
from .tree import to_jsonable

FORMATS = (".npz", ".pt", ".safetensors")
REQUIRED = {"logits": "(E, N, C)", "labels": "(N,)", "costs": "(E,)"}
SCORE_FILE = "score.json"
FIGURE_FILE = "curve.png"
CALIBRATED_BUDGETS_TITLE = "calibrated on validation, best within budget (per seed, mean +- std)"


# --- the evaluation -------------------------------------------------------------

def calibrates(criterion: str, num_exits: int) -> bool:
    """Whether validation-calibrated curves exist: a threshold criterion (or PBEE's patience) and at least one IC."""
    return criterion in ("confidence", "entropy", "patience") and num_exits > 1


def calibration_modes(criterion: str) -> tuple[str, ...]:
    """The calibrations of a criterion; the first feeds ``calibrated_budgets`` (patience: one value, ``global``)."""
    return ("global",) if criterion == "patience" else metrics.CALIBRATION_MODES


def evaluate_logits(logits: Tensor, labels: Tensor, costs: Sequence[float], base_flops: float, *,
                    criterion: str = "confidence", thresholds: int | Sequence[float] = 100,
                    val_logits: Tensor | None = None, stages: Sequence[int] | None = None) -> dict:
    """The evaluation part of results.json, from the logits of one pass.

    Args:
        logits: ``(E, N, C)`` test logits; labels: ``(N,)``; costs: ``(E,)`` cumulative costs.
        base_flops: the reference cost of the budget table (a run: ``backbone_cost``).
        criterion: exit criterion of the threshold curve.
        thresholds: the curve's thresholds (a count or explicit values).
        val_logits: ``(E, N_val, C)`` validation logits; with them (and at least one IC) the calibrated curves
            and ``calibrated_budgets`` are added (patience: ``calibrated_global`` only, the patience chosen on
            validation per target cost).
        stages: per exit, the block it sits after (results.json's ``exits[].stage``); None leaves it out.
    Returns:
        ``{base_flops, exits, curve, budgets}`` and, where computed, ``calibrated_geometric``,
        ``calibrated_global``, ``calibrated_budgets``: the layout of results.json.
    """
    curve = metrics.threshold_curve(logits, labels, costs, thresholds=thresholds, criterion=criterion)
    statics = metrics.static_points(logits, labels, costs)
    if stages is not None:
        for s in statics:
            s["stage"] = stages[s["index"]]
    out = {"base_flops": base_flops, "exits": statics, "curve": curve,
           "budgets": metrics.budget_table(curve, statics, base_flops)}
    if val_logits is not None and calibrates(criterion, len(costs)):
        modes = calibration_modes(criterion)
        for mode in modes:
            cal = metrics.calibrated_curve(val_logits, logits, labels, costs, criterion=criterion, mode=mode)
            out[f"calibrated_{mode}"] = to_jsonable(cal)  # infinite thresholds (always / never fires) -> null
        out["calibrated_budgets"] = metrics.budget_table(out[f"calibrated_{modes[0]}"], [], base_flops)
    return out


# --- reading and checking outputs -------------------------------------------------

@dataclass
class _Outputs:
    source: str
    logits: Tensor                   # (E, N, C) floating
    labels: Tensor | None            # (N,) int64 (None: a validation file without labels is refused)
    costs: list[float] | None        # (E,)
    base_flops: float | None = None
    stages: list[int] | None = None


def read_outputs(path: str | os.PathLike) -> dict[str, Any]:
    """The arrays of an output file (``.npz``, ``.pt`` or ``.safetensors``), by key; one-line errors."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise EarlyExitError(f"{path}: unknown format {path.suffix or '(no suffix)'!r}; expected {', '.join(FORMATS)}")
    if not path.exists():
        raise EarlyExitError(f"{path} does not exist")
    if not path.is_file():
        raise EarlyExitError(f"{path} is not a file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # a main dependency

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except EarlyExitError:
        raise
    except Exception as e:  # a corrupt or foreign file, a pickle of other objects
        msg = one_line(e)
        if "weights only load failed" in msg.lower():
            msg = "it holds objects other than tensors (read with torch.load(weights_only=True))"
        raise EarlyExitError(f"cannot read {path}: {msg}") from None
    if not isinstance(obj, Mapping):
        raise EarlyExitError(f"{path} holds a {type(obj).__name__}, expected a dict with the keys "
                             f"{', '.join(REQUIRED)}")
    return dict(obj)


def _tensor(value: Any, key: str, source: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise EarlyExitError(f"{source}: {key!r} is an array of {value.dtype}, expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise EarlyExitError(f"{source}: {key!r} is a {type(value).__name__}, expected an array") from None


def _shape(t: Tensor) -> str:
    return f"({', '.join(str(d) for d in t.shape)}{',' if t.dim() == 1 else ''})"


def _int_vector(t: Tensor, key: str, source: str, n: int, what: str) -> Tensor:
    if t.dim() != 1 or t.shape[0] != n:
        raise EarlyExitError(f"{source}: {key} must have shape ({n},) ({what}), got {_shape(t)}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise EarlyExitError(f"{source}: {key} must be integers, got non-integral values")
    elif t.is_complex():
        raise EarlyExitError(f"{source}: {key} must be integers, got {t.dtype}")
    return t.to(torch.int64)


def _outputs(d: Mapping[str, Any], source: str, *, val: bool = False) -> _Outputs:
    """Check the arrays of one output (or validation) mapping; one-line ``EarlyExitError`` on the first problem."""
    if not isinstance(d, Mapping):
        raise EarlyExitError(f"{source}: expected a mapping with the keys {', '.join(REQUIRED)}, "
                             f"got {type(d).__name__}")
    needed = ("logits", "labels") if val else tuple(REQUIRED)
    missing = [k for k in needed if k not in d]
    if missing:
        expected = ", ".join(f"{k} {REQUIRED[k]}" for k in needed)
        raise EarlyExitError(f"{source} lacks {', '.join(repr(k) for k in missing)} (expected keys: {expected})")
    logits = _tensor(d["logits"], "logits", source)
    if logits.dim() != 3 or 0 in logits.shape:
        raise EarlyExitError(f"{source}: logits must have shape (E, N, C) (exits, samples, classes), "
                             f"got {_shape(logits)}")
    if logits.is_complex() or logits.dtype == torch.bool:
        raise EarlyExitError(f"{source}: logits must be real numbers, got {logits.dtype}")
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # exact for half precision; the criteria compute in float32 anyway
    if bool(torch.isnan(logits).any()):
        raise EarlyExitError(f"{source}: logits hold NaN values")
    E, N, C = logits.shape
    labels = _int_vector(_tensor(d["labels"], "labels", source), "labels", source, N, "one class index per sample")
    if bool(((labels < 0) | (labels >= C)).any()):
        raise EarlyExitError(f"{source}: labels must be class indices in [0, {C}), got values from "
                             f"{int(labels.min())} to {int(labels.max())}")
    costs = None
    if "costs" in d:
        c = _tensor(d["costs"], "costs", source).double()
        if c.dim() > 1 or c.numel() != E:
            raise EarlyExitError(f"{source}: costs must have shape ({E},) (the cumulative cost of each exit), "
                                 f"got {_shape(c)}")
        c = c.reshape(-1)
        if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
            raise EarlyExitError(f"{source}: costs must be finite and >= 0, got {c.tolist()}")
        if bool((c[1:] < c[:-1]).any()):
            raise EarlyExitError(f"{source}: costs must be cumulative (non-decreasing along exits), got {c.tolist()}")
        costs = c.tolist()
    base = None
    if not val and "base_flops" in d:
        b = _tensor(d["base_flops"], "base_flops", source).double()
        if b.numel() != 1 or not bool(torch.isfinite(b).all()) or float(b.reshape(())) <= 0:
            raise EarlyExitError(f"{source}: base_flops must be one positive number, got {b.tolist()}")
        base = float(b.reshape(()))
    stages = None
    if not val and "stages" in d:
        stages = _int_vector(_tensor(d["stages"], "stages", source), "stages", source, E,
                             "the block each exit sits after").tolist()
    return _Outputs(source=source, logits=logits, labels=labels, costs=costs, base_flops=base, stages=stages)


def _load(item: Any, source: str, *, val: bool = False) -> _Outputs:
    if isinstance(item, (str, os.PathLike)):
        return _outputs(read_outputs(item), str(item), val=val)
    if val and isinstance(item, (Tensor, np.ndarray)):
        raise EarlyExitError(f"{source}: give the validation logits with their labels, "
                             "as {'logits': ..., 'labels': ...} or a file")
    return _outputs(item, source, val=val)


def _items(outputs: Any) -> list:
    if isinstance(outputs, (str, os.PathLike, Mapping)):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs:
        return list(outputs)
    raise EarlyExitError("outputs: give a file, a mapping with logits, labels and costs, or a list of them "
                         f"(one per seed), got {type(outputs).__name__}")


def _check_together(items: list[_Outputs], vals: list[_Outputs | None]) -> None:
    """Seeds of one configuration: the same exits and classes; validation logits that fit their outputs."""
    E, _, C = items[0].logits.shape
    for o in items[1:]:
        e, _, c = o.logits.shape
        if (e, c) != (E, C):
            raise EarlyExitError(f"{o.source} has {e} exits and {c} classes, {items[0].source} {E} and {C}: "
                                 "several outputs must be seeds of one configuration")
    for o, v in zip(items, vals):
        if v is None:
            continue
        e, _, c = v.logits.shape
        if (e, c) != (E, C):
            raise EarlyExitError(f"{v.source}: validation logits have {e} exits and {c} classes, "
                                 f"{o.source} {E} and {C}")
        if v.costs is not None and any(abs(a - b) > 1e-9 * max(abs(b), 1.0) for a, b in zip(v.costs, o.costs)):
            raise EarlyExitError(f"{v.source}: its costs {v.costs} differ from those of {o.source} {o.costs}")


def _base_flops(items: list[_Outputs], base_flops: float | None) -> float:
    """The shared reference cost: the argument, else each file's ``base_flops``, else its last exit's cost."""
    if base_flops is not None:
        b = float(base_flops)
        if not b > 0 or b == float("inf"):
            raise EarlyExitError(f"base_flops must be a positive number, got {base_flops}")
        return b
    bases = [o.base_flops if o.base_flops is not None else o.costs[-1] for o in items]
    for o, b in zip(items, bases):
        if abs(b - bases[0]) > 1e-9 * abs(bases[0]):
            raise EarlyExitError(f"{o.source}: base FLOPs {b:g} differ from {bases[0]:g} of {items[0].source}; "
                                 "several outputs must be seeds of one configuration (or pass base_flops)")
    if not bases[0] > 0:
        raise EarlyExitError(f"{items[0].source}: the last exit costs 0, so no budget can be a share of it; "
                             "pass base_flops")
    return float(bases[0])


# --- scoring ---------------------------------------------------------------------

def score(outputs: Any, labels: Any = None, costs: Any = None, *, val: Any = None, base_flops: float | None = None,
          criterion: str = "confidence", thresholds: int = 100, out: str | os.PathLike | None = None,
          progress: ProgressFn | None = None) -> dict:
    """Evaluate another implementation's per-exit outputs exactly as a run of this package evaluates its own.

    Args:
        outputs: one output file (``.npz``, ``.pt``, ``.safetensors``), a mapping with the keys ``logits``,
            ``labels``, ``costs`` (optionally ``base_flops``, ``stages``; tensors, arrays or lists), or a list of
            them: the seeds of one configuration. Or the ``(E, N, C)`` logits themselves, with ``labels`` and
            ``costs``.
        labels: ``(N,)`` class indices, when ``outputs`` is the logits.
        costs: ``(E,)`` cumulative cost of each exit, when ``outputs`` is the logits.
        val: validation outputs (a file, or a mapping with ``logits`` and ``labels``), one per output; with them
            the validation-calibrated curves and budgets are computed (confidence and entropy criteria).
        base_flops: reference cost of the budgets; default each output's ``base_flops`` key, else its last
            exit's cost (they must agree over the outputs).
        criterion: ``confidence``, ``entropy`` or ``patience``.
        thresholds: the number of evenly spaced thresholds of the curve (a run's default: 100).
        out: a folder to write ``score.json`` (this dict) and ``curve.png`` (with matplotlib) into.
        progress: ``progress(done, total, label)`` (``earlyexit.progress``), told of every output read and scored.
    Returns:
        ``{criterion, base_flops, sources, evaluations, summary}``: ``evaluations[i]`` is the evaluation part of a
        results.json for ``sources[i]`` (``evaluate_logits``); ``summary`` (``summarize``) the mean +- std over
        the outputs of the per-exit accuracies, the paper's budget table and the best-within-budget tables.
    Raises:
        EarlyExitError: a file is missing or unreadable, a key missing, an array mis-shaped (one line).
    """
    if criterion not in metrics.CRITERIA:
        raise EarlyExitError(f"unknown criterion {criterion!r}; valid: {', '.join(metrics.CRITERIA)}")
    if isinstance(thresholds, bool) or not isinstance(thresholds, int) or thresholds < 1:
        raise EarlyExitError(f"thresholds must be a count >= 1, got {thresholds!r}")
    if labels is not None or costs is not None:
        if labels is None or costs is None:
            raise EarlyExitError("give the logits with both labels and costs")
        outputs = {"logits": outputs, "labels": labels, "costs": costs}
    elif isinstance(outputs, (Tensor, np.ndarray)):
        raise EarlyExitError("logits alone cannot be scored: pass labels= and costs= as well")
    sources = _items(outputs)
    items = [_load(o, f"outputs[{i}]") for i, o in tracked(enumerate(sources), len(sources), "reading", progress)]
    if val is None:
        vals: list = [None] * len(items)
    else:
        vals = list(val) if isinstance(val, (list, tuple)) else [val]
        if len(vals) != len(items):
            raise EarlyExitError(f"give one validation output per output: {len(items)} outputs, {len(vals)} "
                                 "validation outputs")
        vals = [_load(v, f"val[{i}]", val=True)
                for i, v in tracked(enumerate(vals), len(vals), "reading validation outputs", progress)]
    _check_together(items, vals)
    base = _base_flops(items, base_flops)
    evaluations = []
    for o, v in tracked(zip(items, vals), len(items), "scoring", progress):
        try:
            ev = evaluate_logits(o.logits, o.labels, o.costs, base, criterion=criterion, thresholds=thresholds,
                                 val_logits=None if v is None else v.logits, stages=o.stages)
        except ValueError as e:
            raise EarlyExitError(f"{o.source}: {one_line(e)}") from None
        evaluations.append(to_jsonable(ev))
    result = {"criterion": criterion, "base_flops": base, "sources": [o.source for o in items],
              "evaluations": evaluations, "summary": summarize(evaluations, base)}
    if out is not None:
        write_score(result, out)
    return result


def _stats(vals: Sequence[float]) -> dict:
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0}


def _mean_std_table(tables: Sequence[Mapping]) -> dict:
    """Per budget, mean +- std over seeds; None where any seed has no point within it."""
    out = {}
    for k in tables[0]:
        vals = [t.get(k) for t in tables]
        out[k] = _stats(vals) if all(v is not None for v in vals) else None
    return out


def summarize(evaluations: Sequence[Mapping], base_flops: float) -> dict:
    """Mean +- std over seeds (Bessel's correction; 0 for one seed), as ``reports.summarize_runs`` for run folders.

    Args:
        evaluations: ``evaluate_logits`` results of the seeds of one configuration (same exits and thresholds).
        base_flops: the shared reference cost.
    Returns:
        ``{seeds, exits: [{index, flops, mean, std}], paper_budgets, budgets}`` and ``calibrated_budgets`` when
        every seed has them: ``paper_budgets`` is ``metrics.ztw_budget_table`` of the seeds' curves (the paper's
        Table 1 rule), ``budgets`` the mean +- std of each seed's best accuracy within budget.
    """
    try:
        paper = metrics.ztw_budget_table([ev["curve"] for ev in evaluations], base_flops)
    except ValueError as e:
        raise EarlyExitError(one_line(e)) from None
    n_exits = min(len(ev["exits"]) for ev in evaluations)
    exits = [{"index": k, "flops": _stats([ev["exits"][k]["flops"] for ev in evaluations])["mean"],
              **_stats([ev["exits"][k]["accuracy"] for ev in evaluations])} for k in range(n_exits)]
    out = {"seeds": len(evaluations), "exits": exits, "paper_budgets": paper,
           "budgets": _mean_std_table([ev["budgets"] for ev in evaluations])}
    if all(ev.get("calibrated_budgets") is not None for ev in evaluations):
        out["calibrated_budgets"] = _mean_std_table([ev["calibrated_budgets"] for ev in evaluations])
    return out


# --- writing and printing ------------------------------------------------------------

def write_score(result: Mapping, out: str | os.PathLike) -> list[Path]:
    """Write ``score.json`` and, with matplotlib, ``curve.png`` into the folder ``out``; return the files written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EarlyExitError(f"--out {out} is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SCORE_FILE, to_jsonable(dict(result)))
    written = [out / SCORE_FILE]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written
    import matplotlib.pyplot as plt

    fig = score_figure(result)
    data = figure_bytes(fig, "png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(out / FIGURE_FILE, data)
    return written + [out / FIGURE_FILE]


def score_figure(result: Mapping):
    """Accuracy vs average cost (% of base FLOPs): one output's curve and static exits (and its calibrated
    curve), or the seeds' mean curve with a +- std band and the static exits' mean +- std.

    Returns:
        A matplotlib ``Figure`` (Agg backend); close it with ``plt.close``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, evs = float(result["base_flops"]), result["evaluations"]
    pct = lambda xs: [float(x) / base * 100 for x in xs]  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.6))
    crit = result["criterion"]
    if len(evs) == 1:
        ev = evs[0]
        ax.plot(pct(ev["curve"]["flops"]), [a * 100 for a in ev["curve"]["accuracy"]], lw=1.6,
                label=f"{crit} thresholds (test)")
        cal = ev.get("calibrated_geometric")
        if cal is not None:
            ax.plot(pct(cal["flops"]), [a * 100 for a in cal["accuracy"]], lw=1.2, ls="--",
                    label="calibrated on validation (geometric)")
        ax.scatter(pct([e["flops"] for e in ev["exits"]]), [e["accuracy"] * 100 for e in ev["exits"]], s=22,
                   color="0.3", zorder=3, label="static exits")
        title = result["sources"][0]
    else:
        avg = metrics.average_curves([ev["curve"] for ev in evs])
        mean = torch.tensor(avg["accuracy"]) * 100
        std = torch.tensor(avg["accuracy_std"]) * 100
        x = pct(avg["flops"])
        ax.plot(x, mean.tolist(), lw=1.8, label=f"{crit} thresholds, mean of {len(evs)} seeds")
        ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), alpha=0.18, lw=0, label="+- std over seeds")
        ex = result["summary"]["exits"]
        ax.errorbar(pct([e["flops"] for e in ex]), [e["mean"] * 100 for e in ex], yerr=[e["std"] * 100 for e in ex],
                    fmt="o", color="0.3", ms=5, elinewidth=1, capsize=2, zorder=3, label="static exits (mean +- std)")
        title = f"{len(evs)} seeds"
    ax.set_xlabel("average cost (% of base FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.2f}"


def _cells(table: Mapping) -> str:
    return "  ".join(f"{k}: " + ("-" if v is None else f"{v['mean'] * 100:.2f}+-{v['std'] * 100:.2f}")
                     for k, v in table.items())


def format_score(result: Mapping) -> list[str]:
    """The lines ``python -m earlyexit score`` prints: per output its exits and budgets, then the tables over seeds."""
    base, crit = float(result["base_flops"]), result["criterion"]
    lines = [f"criterion {crit}; budgets are shares of {base:.6g} FLOPs"]
    for src, ev in zip(result["sources"], result["evaluations"]):
        n = sum(ev["curve"]["exit_counts"][0])
        lines.append(f"{src}: {len(ev['exits'])} exits, {n} test samples")
        lines.append(f"  {'exit':>4} {'cost %':>7} {'test acc %':>10}")
        lines += [f"  {e['index']:>4} {e['flops'] / base * 100:>7.1f} {e['accuracy'] * 100:>10.2f}" for e in ev["exits"]]
        cells = "  ".join(f"{k}: {_pct(v)}" for k, v in ev["budgets"].items())
        lines.append(f"  best within budget: {cells}")
        if ev.get("calibrated_budgets") is not None:
            cells = "  ".join(f"{k}: {_pct(v)}" for k, v in ev["calibrated_budgets"].items())
            lines.append(f"  calibrated on validation, best within budget: {cells}")
    s = result["summary"]
    width = max(len(PAPER_BUDGETS_TITLE), len(SEED_BUDGETS_TITLE), len(CALIBRATED_BUDGETS_TITLE)) + 1
    lines.append(f"over {s['seeds']} seed{'s' if s['seeds'] > 1 else ''} (mean +- std):")
    lines.append(f"  {'exits (test accuracy %):':<{width}} "
                 + "  ".join(f"{e['mean'] * 100:.2f}+-{e['std'] * 100:.2f}" for e in s["exits"]))
    lines.append(f"  {PAPER_BUDGETS_TITLE + ':':<{width}} {_cells(s['paper_budgets'])}")
    lines.append(f"  {SEED_BUDGETS_TITLE + ':':<{width}} {_cells(s['budgets'])}")
    if s.get("calibrated_budgets") is not None:
        lines.append(f"  {CALIBRATED_BUDGETS_TITLE + ':':<{width}} {_cells(s['calibrated_budgets'])}")
    return lines


__all__ = ["score", "evaluate_logits", "calibrates", "read_outputs", "summarize", "write_score", "score_figure",
           "format_score", "FORMATS", "SCORE_FILE", "FIGURE_FILE"]
