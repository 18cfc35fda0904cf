"""Reports over finished runs: summaries over seeds and accuracy-vs-FLOPs figures.

Runs are read through ``earlyexit.results.Results`` and grouped into
configurations: the same model, dataset, regime (phase string) and method; the
runs of a configuration are its seeds.

``summarize_runs`` gives, per configuration, the mean and standard deviation
over seeds of each exit's accuracy and three budget tables:

- ``calibrated_budgets``, the thresholds chosen on validation data (MSDNet's
  protocol, results.json ``calibrated_budgets``) and applied unchanged to the
  test set, mean and std over seeds: the table the verdicts use, printed first;
- ``paper_budgets``, the paper's Table 1 rule (``metrics.ztw_budget_table``):
  the seeds' threshold curves averaged per threshold, each budget taking the
  mean accuracy at the last threshold within it; printed as
  "budget (paper's rule, curves averaged over seeds)";
- ``budgets``, each seed's best accuracy within budget (its results.json
  ``budgets``, static exits included), then mean and std over seeds; printed
  as "best within budget (test-set oracle, ...)": a maximum over test-set
  operating points, so an upper bound, not an estimate.

Each configuration also states what its training spent (``stats.training_cost``:
epochs per phase and training FLOPs in backbone forward passes per sample).
``earlyexit.pairs`` compares two sets of runs seed by seed.

``plot_runs`` draws each configuration in its own colour. A configuration of
one run is drawn as that run's threshold curve with its static exit points;
one of several seeds as the seeds' mean curve (averaged per threshold index,
as for the paper's table) inside a band of +- one standard deviation of the
accuracy, with the static exits as markers at their mean (error bars: +- std).
The x axis is the average cost as a share of the backbone's cost, as in the
paper's figures. matplotlib is an optional extra, imported inside the
plotting function.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import EarlyExitError
from .io import atomic_write_bytes, figure_bytes
from .metrics import average_curves, ztw_budget_table
from .regime import NAMES as REGIME_NAMES, Regime
from .results import Results
from .stats import training_cost

_REGIME_COLOR = {phases: i for i, phases in enumerate(REGIME_NAMES.values())}  # joint, disjoint, mixed: the same
                                                                               # colour in every figure
_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))  # (line, exit marker) per configuration of a regime
CALIBRATED_TITLE = "validation-calibrated budget (thresholds chosen on validation, per seed, mean +- std)"
PAPER_BUDGETS_TITLE = "budget (paper's rule, curves averaged over seeds)"
SEED_BUDGETS_TITLE = "best within budget (test-set oracle, per seed, mean +- std)"
TABLES = (("calibrated_budgets", CALIBRATED_TITLE), ("paper_budgets", PAPER_BUDGETS_TITLE),
          ("budgets", SEED_BUDGETS_TITLE))  # the order every summary prints them in: the verdicts' table first


def read_results(run_dir: Path) -> Results:
    """The ``Results`` of a run folder (one-line error when it has none or it is malformed).

    Args:
        run_dir: a run folder holding results.json, or the file itself.
    Returns:
        The run's ``Results``.
    """
    return Results.from_json(run_dir)


def group_runs(run_dirs: Sequence[Path]) -> list[tuple[tuple, list[Results]]]:
    """Runs grouped into configurations: ``(model, dataset, regime, method)``, in order of first appearance.

    Args:
        run_dirs: run folders holding results.json.
    Returns:
        ``[(key, [Results, ...]), ...]``, each group's runs sorted by seed.
    """
    return _group([read_results(Path(d)) for d in run_dirs])


def method_label(r: Results) -> str | None:
    """The method slot of a configuration's key: the method's name, the loss weighting where it is not the
    method's own default (the mean for plain ICs) and the exit criterion where it is not the method's own
    (confidence for plain ICs), e.g. ``"weights han"``, ``"pbee, weights sdn"``, ``"exit by entropy"``."""
    from .config import DEFAULT_CRITERION, METHOD_DEFAULTS

    own = METHOD_DEFAULTS.get(r.method)
    weights = f"weights {r.weighting}" if r.weighting not in (None, own.weighting if own else "mean") else None
    criterion = r.curve.criterion if r.curve is not None else None
    exit_by = f"exit by {criterion}" if criterion not in (None, own.criterion if own else DEFAULT_CRITERION) else None
    return ", ".join(p for p in (r.method, weights, exit_by) if p) or None


def _group(results: Sequence[Results]) -> list[tuple[tuple, list[Results]]]:
    groups: dict[tuple, list[Results]] = {}
    for r in results:
        groups.setdefault((r.model, r.dataset, r.regime, method_label(r)), []).append(r)
    return [(k, sorted(rs, key=lambda r: r.seed)) for k, rs in groups.items()]


def _name(key: tuple) -> str:
    model, dataset, regime, method = key
    return f"{model} {dataset} {regime}" + (f" {method}" if method else "")


def _base_flops(key: tuple, runs: Sequence[Results]) -> float:
    """The backbone cost shared by a configuration's runs (they must agree: same model)."""
    base = runs[0].base_flops
    if any(abs(r.base_flops - base) > 1e-9 * abs(base) for r in runs):
        raise EarlyExitError(f"{_name(key)}: the seeds' base_flops differ "
                             f"({sorted({r.base_flops for r in runs})}); were they built with other model options?")
    return float(base)


def _curve_dict(r: Results, curve: str) -> dict | None:
    """A run's curve as ``average_curves`` reads it; calibrated curves line up by their target budgets."""
    c = getattr(r, curve, None)
    if c is None:
        return None
    points = c.thresholds if curve == "curve" else c.targets  # calibrated thresholds are per exit and per seed
    return {"criterion": c.criterion, "thresholds": points, "flops": c.flops, "accuracy": c.accuracy}


def _averaged(key: tuple, runs: Sequence[Results], curve: str) -> dict:
    try:
        return average_curves([_curve_dict(r, curve) for r in runs])
    except ValueError as e:
        raise EarlyExitError(f"{_name(key)}: {e}") from None


def _stats(vals: list[float]) -> dict:
    t = torch.tensor(vals, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0}


# config.json fields that may differ between the seeds of one configuration: where, not what, was run (the
# gradient log leaves training bit-identical)
POOL_FREE_FIELDS = ("train.seed", "data.data_dir", "train.device", "train.grad_log_every", "train.log")


def check_pool(run_dirs: Sequence[Path], *, same_config: bool = True) -> None:
    """Refuse to pool a run twice, or runs whose config.json differ in more than ``POOL_FREE_FIELDS``.

    Runs are pooled per configuration (model, dataset, regime, method); within one, every seed must
    appear once and, with ``same_config``, the runs that have a config.json must agree on every other field.
    """
    from .config import config_diff

    seen: dict[Path, Path] = {}
    for d in run_dirs:
        real = Path(d).resolve()
        if real in seen:
            raise EarlyExitError(f"{d} is given twice (as {seen[real]}); pool each run once")
        seen[real] = Path(d)
    groups: dict[tuple, list[tuple[Path, Results]]] = {}
    for d in run_dirs:
        r = read_results(Path(d))
        groups.setdefault((r.model, r.dataset, r.regime, method_label(r)), []).append((Path(d), r))
    for key, members in groups.items():
        seeds: dict[int, Path] = {}
        for d, r in members:
            if r.seed in seeds:
                raise EarlyExitError(f"{_name(key)}: {seeds[r.seed]} and {d} are both seed {r.seed}; "
                                     "pool each run once")
            seeds[r.seed] = d
        if not same_config:
            continue
        configs = [(d, c) for d, _ in members if (c := _config_of(d)) is not None]
        for d, raw in configs[1:]:
            diff = config_diff(configs[0][1], raw)  # (_config_of drops the POOL_FREE_FIELDS)
            if diff:
                raise EarlyExitError(f"{_name(key)}: {configs[0][0]} and {d} differ in {', '.join(diff[:4])}"
                                     f"{' ...' if len(diff) > 4 else ''}; only the seed may differ between pooled runs")


def summarize_runs(run_dirs: Sequence[Path], *, same_config: bool = True) -> list[dict]:
    """Mean and standard deviation over seeds of the runs of each configuration, the three budget tables and
    what training spent.

    Args:
        run_dirs: run folders holding results.json.
        same_config: refuse runs of one configuration whose config.json differ in more than the seed
            (``check_pool``; a run given twice or two runs of one seed are refused always).
    Returns:
        One dict per configuration: ``{model, dataset, regime, method, criterion, seeds, exits: [{index, mean,
        std}], calibrated_budgets, paper_budgets, budgets: {name: {mean, std} or None}, training: {epochs:
        {phase: mean epochs}, passes: {mean, std} or None}}``; accuracies in [0, 1], std with Bessel's correction
        (0 for one seed). ``calibrated_budgets`` averages each seed's validation-calibrated table (None where a
        seed has none); ``paper_budgets`` is ``metrics.ztw_budget_table`` of the seeds' test curves;
        ``budgets`` averages each seed's results.json ``budgets`` (the test-set oracle).
    Raises:
        EarlyExitError: a configuration's seeds differ in base_flops, criterion or swept thresholds, a run
            is given twice, or the configs differ (``check_pool``).
    """
    check_pool(run_dirs, same_config=same_config)
    out = []
    for key, rs in group_runs(run_dirs):
        model, dataset, regime, method = key
        n_exits = min(len(r.exits) for r in rs)
        try:
            paper = ztw_budget_table([_curve_dict(r, "curve") for r in rs], _base_flops(key, rs))
        except ValueError as e:
            raise EarlyExitError(f"{_name(key)}: {e}") from None
        out.append({"model": model, "dataset": dataset, "regime": regime, "method": method,
                    "criterion": rs[0].curve.criterion, "seeds": [r.seed for r in rs],
                    "exits": [{"index": i, **_stats([r.exits[i].accuracy for r in rs])} for i in range(n_exits)],
                    "calibrated_budgets": _seed_table(rs, "calibrated_budgets"), "paper_budgets": paper,
                    "budgets": _seed_table(rs, "budgets"), "training": _training(rs)})
    return out


def _seed_table(rs: Sequence[Results], field: str) -> dict:
    """Mean and std over seeds of each run's per-seed budget table ``field`` (None where a seed lacks a cell)."""
    tables = [getattr(r, field, None) or {} for r in rs]
    names = list(next((t for t in tables if t), {}) or rs[0].budgets)
    out = {}
    for k in names:
        vals = [t[k] for t in tables if t.get(k) is not None]
        out[k] = _stats(vals) if len(vals) == len(rs) else None
    return out


def _run_cost(r: Results) -> dict | None:
    phases = (r.train or {}).get("phases") if isinstance(r.train, dict) else getattr(r.train, "phases", None)
    if not phases:
        return None
    return training_cost(phases, r.base_flops, [e.flops for e in r.exits])


def _training(rs: Sequence[Results]) -> dict:
    """Epochs per phase (mean over seeds) and training FLOPs in backbone forward passes per training sample."""
    costs = [_run_cost(r) for r in rs]
    if any(c is None for c in costs):
        return {"epochs": None, "passes": None}
    phases = sorted({p for c in costs for p in c["epochs"]})
    epochs = {p: sum(c["epochs"].get(p, 0) for c in costs) / len(costs) for p in phases}
    return {"epochs": epochs, "passes": _stats([c["passes"] for c in costs])}


def _cells(table: dict) -> str:
    return "  ".join(f"{k}: " + ("-" if v is None else f"{v['mean'] * 100:.2f}+-{v['std'] * 100:.2f}")
                     for k, v in table.items())


def _epochs_per_phase(training: dict) -> str:
    """Mean epochs of phases 1/2/3 to one decimal, e.g. "18/0/14.7" (early-stopped seeds differ)."""
    return "/".join(f"{round(training['epochs'].get(p, 0), 1):g}" for p in ("1", "2", "3"))


def _spent(training: dict) -> str:
    if not training or training.get("epochs") is None:
        return "training: not recorded"
    passes = training["passes"]["mean"]
    return (f"training: epochs per phase 1/2/3 = {_epochs_per_phase(training)}, {passes:.0f} backbone forward "
            "passes per training sample")


def format_summary(group: dict) -> list[str]:
    """The lines ``python -m earlyexit summary`` prints for one configuration of ``summarize_runs``.

    Args:
        group: one dict of ``summarize_runs``.
    Returns:
        A header line (model, dataset, regime, method, seeds), what training spent, the per-exit accuracies
        and the three budget tables, named (the validation-calibrated one first); percentages, mean+-std, "-"
        for an empty budget.
    """
    method = f" {group['method']}" if group.get("method") else ""
    width = max(len(t) for _, t in TABLES) + 1
    lines = [f"{group['model']} {group['dataset']} {group['regime']}{method} (seeds {group['seeds']})",
             f"  {_spent(group.get('training') or {})}",
             f"  {'exits (test accuracy %):':<{width}} " + "  ".join(f"{e['mean'] * 100:.2f}+-{e['std'] * 100:.2f}"
                                                                   for e in group["exits"])]
    lines += [f"  {title + ':':<{width}} {_cells(group.get(key) or {})}" for key, title in TABLES]
    return lines


def _md_cell(v: dict | None) -> str:
    return "-" if v is None else f"{v['mean'] * 100:.2f} +- {v['std'] * 100:.2f}"


def _md_spent(training: dict | None) -> str:
    if not training or training.get("epochs") is None:
        return "- | -"
    return f"{_epochs_per_phase(training)} | {training['passes']['mean']:.0f}"


def markdown_summary(groups: Sequence[dict]) -> str:
    """Markdown tables of ``summarize_runs`` groups, as RESULTS.md prints them (``summary --markdown``).

    Four tables, one row per configuration: the validation-calibrated budget table, the paper's budget
    table, the best within budget (test-set oracle), each stating the epochs per phase and the training
    FLOPs (backbone forward passes per training sample) a configuration spent; then each exit's test
    accuracy. Percentages as mean +- std over the seeds.
    """
    def label(g: dict) -> str:
        regime = Regime.display(g["regime"])
        method = f" {g['method']}" if g.get("method") else ""
        return f"{g['model']} {regime}{method} (seeds {','.join(str(s) for s in g['seeds'])})"

    out = []
    for key, title in TABLES:
        names = list(next((g[key] for g in groups if g.get(key)), {}))
        out += [f"{title[0].upper()}{title[1:]}:", "",
                "| run | epochs 1/2/3 | train cost | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        out += ["| " + label(g) + " | " + _md_spent(g.get("training")) + " | "
                + " | ".join(_md_cell((g.get(key) or {}).get(n)) for n in names) + " |" for g in groups]
        out.append("")
    n = max((len(g["exits"]) for g in groups), default=0)
    out += ["Test accuracy of each exit (every sample leaves there), %:", "",
            "| run | " + " | ".join(f"exit {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
    out += ["| " + label(g) + " | " + " | ".join(_md_cell(e) for e in g["exits"]) + " |" for g in groups]
    return "\n".join(out) + "\n"


def plot_runs(run_dirs: Sequence[Path], out_file: Path, *, curve: str = "curve", note: str | None = None,
              split_configs: bool = True) -> None:
    """Draw the runs' accuracy-vs-FLOPs curves (``runs_figure``) and write ``out_file`` (PNG, PDF, SVG).

    Args:
        run_dirs: run folders holding results.json.
        out_file: the figure's path; its suffix picks the format.
        curve: which curve of results.json to draw (``curve``, ``calibrated_geometric`` or ``calibrated_global``).
        note, split_configs: as for ``runs_figure``.
    Raises:
        ImportError: matplotlib is not installed.
        EarlyExitError: a run lacks the curve, or a configuration's seeds do not line up.
    """
    import matplotlib.pyplot as plt

    fig = runs_figure(run_dirs, curve=curve, note=note, split_configs=split_configs)
    data = figure_bytes(fig, Path(out_file).suffix.lstrip(".") or "png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(out_file, data)


def _config_of(run_dir: Path) -> dict | None:
    """A run's config.json without the fields seeds may differ in (``POOL_FREE_FIELDS``); None if absent.
    ``run_dir`` may also name a file in the run folder (its results.json)."""
    from .config import upgrade_run_record
    from .schema import read_json

    d = Path(run_dir)
    f = (d if d.is_dir() else d.parent) / "config.json"
    try:
        raw = read_json(f) if f.is_file() else None
    except (OSError, ValueError):
        raise EarlyExitError(f"{f} is not valid JSON") from None
    if not isinstance(raw, dict):
        return None
    raw = upgrade_run_record(raw)  # an earlier version's model.exits is model.ic_after, its missing warmup 0
    raw.pop("shapes", None)
    for dotted in POOL_FREE_FIELDS:
        section, _, field = dotted.partition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(field, None)
    return raw


def _figure_groups(run_dirs: Sequence[Path], results: Sequence[Results], split_configs: bool) -> list[tuple]:
    """``[(key, runs, extra label)]``: runs grouped by (model, dataset, regime, method) and, with
    ``split_configs``, by the rest of their config.json; groups that share a key are told apart in the
    legend by the first fields in which their configs differ. A seed given twice in a group is refused."""
    import json

    from .config import config_diff

    groups: dict[tuple, list[tuple[Path, Results, dict | None]]] = {}
    for d, r in zip(run_dirs, results):
        cfg = _config_of(Path(d)) if split_configs else None
        fp = json.dumps(cfg, sort_keys=True) if cfg is not None else None
        groups.setdefault((r.model, r.dataset, r.regime, method_label(r), fp), []).append((Path(d), r, cfg))
    out = []
    for full_key, members in groups.items():
        seeds: dict[int, Path] = {}
        for d, r, _ in members:
            if r.seed in seeds:
                raise EarlyExitError(f"{_name(full_key[:4])}: {seeds[r.seed]} and {d} are both seed {r.seed} of one "
                                     "configuration; draw each run once")
            seeds[r.seed] = d
        extra = ""
        siblings = [m for k, m in groups.items() if k[:4] == full_key[:4] and k != full_key]
        cfg = members[0][2]
        if siblings and cfg is not None:
            fields = sorted({f for sib in siblings if sib[0][2] is not None for f in config_diff(sib[0][2], cfg)})
            extra = ", ".join(describe_field(f, _lookup(cfg, f)) for f in fields[:2]) + (" ..." if len(fields) > 2 else "")
        out.append((full_key[:4], sorted((r for _, r, _ in members), key=lambda r: r.seed), extra))
    return out


_FIELD_WORDS = {"lr": "lr", "epochs": "epochs", "weight_decay": "weight decay", "optimizer": "optimizer",
                "schedule": "schedule", "patience": "patience", "warmup": "warmup steps", "ic_after": "ICs",
                "weighting": "weighting", "grad_clip": "clipping", "train_size": "training images",
                "batch_size": "batch", "criterion": "criterion", "name": "model"}


def describe_field(dotted: str, value: Any) -> str:
    """A config field and its value in words, e.g. ``train.phases[0].lr`` = [0.01] -> "phase 1 at lr 0.01"."""
    import re

    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (list, tuple)):
        value = "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    elif isinstance(value, float):
        value = f"{value:g}"
    m = re.fullmatch(r"train\.phases\[(\d)\]\.(\w+)", dotted)
    if m:
        what = m.group(2)
        if what == "lr":
            return f"phase {int(m.group(1)) + 1} at lr {value}"
        return f"phase {int(m.group(1)) + 1}: {value} {_FIELD_WORDS.get(what, what.replace('_', ' '))}"
    leaf = dotted.rsplit(".", 1)[-1]
    if dotted.startswith("model.kwargs."):
        return f"{leaf.replace('_', ' ')} {value}"
    return f"{_FIELD_WORDS.get(leaf, leaf.replace('_', ' '))} {value}"


def describe_run(run_dir: Path) -> str | None:
    """What a run is, in words, for its own figure's title: each phase it ran with its epochs and lr, and the
    options that set it apart (IC placement, head, weighting, method), e.g. "mixed: phase 1 8 epochs at lr
    0.001, phase 2 8 epochs at lr 0.1; ICs every:1"."""
    c = _run_config_of(run_dir)
    if c is None:
        return None
    t = c.train
    regime = t.parsed_regime
    phases = [f"phase {p} {_epoch_words(t.phases[p - 1])} at lr {'/'.join(f'{v:g}' for v in t.phases[p - 1].lr)}"
              for p in regime.run_phases]
    extra = setting_words(c)
    return f"{regime.name}: {', '.join(phases)}" + (f"; {extra}" if extra else "")


def _epoch_words(phase) -> str:
    """A phase's epochs in words: "8 epochs", or "up to 40 epochs (patience 5)" under early stopping."""
    if phase.patience is None:
        return f"{phase.epochs} epochs"
    return f"up to {phase.epochs} epochs (patience {phase.patience})"


def stopping_words(c) -> str:
    """A configuration's early stopping in words for a comparison's figure, e.g. "every phase up to 40 epochs,
    early stopping with patience 5"; empty when no phase stops early."""
    stopping = [(i + 1, ph) for i, ph in enumerate(c.train.phases) if ph.patience is not None]
    if not stopping:
        return ""
    ceilings = sorted({ph.epochs for _, ph in stopping})
    patiences = sorted({ph.patience for _, ph in stopping})
    which = ("every phase" if len(stopping) == len(c.train.phases)
             else "phase " + "/".join(str(i) for i, _ in stopping))
    return (f"{which} up to {'/'.join(map(str, ceilings))} epochs, early stopping with patience "
            f"{'/'.join(map(str, patiences))}")


def setting_words(c) -> str:
    """The options of a RunConfig that set it apart (IC placement, head and other model options, weighting,
    method), in words, e.g. "ICs every:1, head mlp1024" (a comparison's figure); empty when it has none."""
    extra = [f"ICs {c.model.ic_after}" if c.model.ic_after is not None else None,
             *(f"{k.replace('_', ' ')} {v}" for k, v in sorted(c.model.kwargs.items()) if k != "weights"),
             f"weighting {c.train.weighting}" if c.train.weighting not in (None, "mean") else None,
             f"method {c.method}" if c.method else None]
    return ", ".join(e for e in extra if e)


def _run_config_of(run_dir: Path):
    """The RunConfig of a run folder, or None for a foreign or older config (its figure goes without words)."""
    cfg = _config_of(Path(run_dir))
    if cfg is None:
        return None
    try:
        from .config import run_config_from_dict

        return run_config_from_dict({**cfg, "train": {**cfg["train"], "seed": 0}})
    except Exception:
        return None


def _lookup(cfg: dict, dotted: str) -> Any:
    """The value of a ``config_diff`` field name such as ``train.phases[0].epochs`` in a config dict."""
    import re

    v: Any = cfg
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        v = v[int(part[1:-1])] if part.startswith("[") else v.get(part) if isinstance(v, dict) else None
        if v is None:
            return None
    return v


def runs_figure(run_dirs: Sequence[Path], *, curve: str = "curve", note: str | None = None,
                split_configs: bool = True):
    """The accuracy-vs-FLOPs figure of runs, one colour per configuration.

    A configuration (same model, dataset, regime and method) with one run is drawn as its curve and static
    exit points; one with several seeds as the mean curve over seeds (averaged per threshold index, or per
    target budget for the calibrated curves) with a +- std band of the accuracy, and the static exits as
    markers at their mean cost and accuracy with +- std error bars. The legend has one entry per
    configuration, in the order the runs were given; when each configuration is a different regime, joint,
    disjoint and mixed keep the same colour in every figure.

    Args:
        run_dirs: run folders holding results.json.
        curve: which curve of results.json to draw (``curve``, ``calibrated_geometric`` or ``calibrated_global``).
        note: a second title line saying what the legend cannot (e.g. that joint had a matched budget).
        split_configs: draw runs of one (model, dataset, regime, method) whose config.json differ in more
            than the seed as separate configurations, labelled by the fields that differ (False: pool
            them, as the matched-budget joint runs, whose epochs follow each seed's mixed run).
    Returns:
        The matplotlib ``Figure`` (Agg backend); close it with ``plt.close``.
    Raises:
        ImportError: matplotlib is not installed.
        EarlyExitError: a run lacks the curve, or a configuration's seeds do not line up.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    results = []
    for d in run_dirs:
        r = read_results(Path(d))
        if getattr(r, curve, None) is None:
            raise EarlyExitError(f"{d} has no {curve} in results.json (calibrated curves need the confidence or "
                                 "entropy criterion)")
        results.append(r)
    groups = _figure_groups(run_dirs, results, split_configs)
    several_models = len({(k[0], k[1]) for k, _, _ in groups}) > 1
    fig, ax = plt.subplots(figsize=(7, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    # fixed regime colours when no two groups share a regime and a config label; the configurations of one
    # regime (e.g. IC densities) are then told apart by the line style and the exits' marker
    extras = list(dict.fromkeys(extra for _, _, extra in groups))
    by_regime = (len({(k[2], extra) for k, _, extra in groups}) == len(groups)
                 and (len(extras) == 1 or (len(extras) <= len(_STYLES) and all(k[2] in _REGIME_COLOR for k, _, _ in groups))))
    for j, (key, rs, extra) in enumerate(groups):
        color = colors[(_REGIME_COLOR.get(key[2], 3 + j) if by_regime else j) % len(colors)]
        ls, marker = _STYLES[extras.index(extra)] if by_regime else _STYLES[0]
        base = _base_flops(key, rs)
        pct = lambda xs: [x / base * 100 for x in xs]  # noqa: E731
        if len(rs) == 1:
            r = rs[0]
            c = getattr(r, curve)
            line, = ax.plot(pct(c.flops), [a * 100 for a in c.accuracy], color=color, lw=1.6, ls=ls,
                            label=_label(key, rs, several_models, extra))
            ax.scatter(pct([e.flops for e in r.exits]), [e.accuracy * 100 for e in r.exits], color=color, s=22,
                       marker=marker, zorder=3)
        else:
            avg = _averaged(key, rs, curve)
            x = pct(avg["flops"])
            mean = torch.tensor(avg["accuracy"]) * 100
            std = torch.tensor(avg["accuracy_std"]) * 100
            line, = ax.plot(x, mean.tolist(), color=color, lw=1.8, ls=ls, label=_label(key, rs, several_models, extra))
            ax.fill_between(x, (mean - std).tolist(), (mean + std).tolist(), color=color, alpha=0.18, lw=0)
            n_exits = min(len(r.exits) for r in rs)
            ex = [_stats([r.exits[i].flops for r in rs]) for i in range(n_exits)]
            ey = [_stats([r.exits[i].accuracy for r in rs]) for i in range(n_exits)]
            ax.errorbar(pct([e["mean"] for e in ex]), [e["mean"] * 100 for e in ey], yerr=[e["std"] * 100 for e in ey],
                        fmt=marker, color=color, ms=5, mec="white", mew=0.6, elinewidth=1, capsize=2, zorder=3)
        handles.append(line)
    handles.append(Line2D([], [], ls="none", marker="o", color="0.4", ms=5,
                          label="static exits" + (" (mean +- std)" if any(len(rs) > 1 for _, rs, _ in groups) else "")))
    if any(len(rs) > 1 for _, rs, _ in groups):
        handles.append(Patch(color="0.4", alpha=0.18, label="+- std over seeds"))
    ax.set_xlabel("average cost (% of the backbone's FLOPs)")
    ax.set_ylabel("test accuracy (%)" if curve == "curve" else f"test accuracy (%), {curve.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    if len(groups) > 6:  # a long legend goes beside the axes, where it hides no curve
        fig.set_size_inches(10.5, 4.6)
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(handles=handles, fontsize=8, loc="best")
    title = "" if several_models else "{} on {}".format(*groups[0][0][:2])
    if note:
        note = "\n".join(textwrap.wrap(note, 80))  # a long run description wraps instead of running off the figure
        title = f"{title}\n{note}" if title else note
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _label(key: tuple, runs: Sequence[Results], several_models: bool, extra: str = "") -> str:
    """Legend label: the regime (and method; model and dataset when the figure holds several), then the seeds."""
    model, dataset, _, method = key
    r = runs[0]
    parts = ([model, dataset] if several_models else []) + [r.regime_name if r.regime_name == r.regime
                                                            else f"{r.regime_name} ({r.regime})"]
    if method:
        parts.append(method)
    seeds = f"seed {r.seed}" if len(runs) == 1 else f"{len(runs)} seeds"
    return f"{' '.join(parts)}{', ' + extra if extra else ''}, {seeds}"


def maybe_plot(run_dirs: list[Path], out_file: Path, *, required: bool = False, curve: str = "curve",
               note: str | None = None, split_configs: bool = True) -> bool:
    """``plot_runs``, or False when matplotlib is missing (an error when ``required``).

    Args:
        run_dirs: run folders holding results.json.
        out_file: the figure's path.
        required: raise ``EarlyExitError`` instead of returning False when matplotlib is missing.
        curve, note, split_configs: as for ``plot_runs``.
    Returns:
        True when the figure was written.
    """
    if note is None and len(run_dirs) == 1:
        note = describe_run(Path(run_dirs[0]))  # a run's own figure says what the run is
    try:
        plot_runs(run_dirs, out_file, curve=curve, note=note, split_configs=split_configs)
    except ImportError:
        if required:
            raise EarlyExitError("plotting needs matplotlib: pip install 'earlyexit[plot]'") from None
        return False
    return True


__all__ = ["read_results", "group_runs", "check_pool", "summarize_runs", "format_summary", "plot_runs", "runs_figure", "maybe_plot",
           "CALIBRATED_TITLE", "PAPER_BUDGETS_TITLE", "SEED_BUDGETS_TITLE", "TABLES"]
