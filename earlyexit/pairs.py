"""Two configurations compared seed by seed: the paired intervals and verdicts of RESULTS.md.

``pair_summary(a_dirs, b_dirs, direction)`` pairs the runs of two configurations by seed and, at every
budget of the three tables of ``earlyexit.reports`` (validation-calibrated, the paper's rule applied to
each seed's curve, the test-set oracle), gives the mean difference ``a - b``, its 95 % Student-t interval
over seeds and the verdict of ``earlyexit.stats.decide``. ``summary --pair`` prints it; RESULTS.md's
``<!-- pair: ... -->`` blocks hold its Markdown, recomputed by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import EarlyExitError
from .metrics import ztw_budget_table
from .reports import TABLES, _curve_dict, _name, _spent, _training, group_runs
from .results import Results
from .stats import decide, paired_t

SHORT = {"calibrated_budgets": "validation-calibrated", "paper_budgets": "paper's rule",
         "budgets": "test-set oracle"}  # the tables' names in a pair's rows


def per_seed_values(rs: Sequence[Results], table: str) -> dict[str, dict[int, float]]:
    """Per budget, each seed's value in ``table``: ``calibrated_budgets``, ``budgets`` (oracle) or
    ``paper_budgets`` (the paper's rule applied to that seed's curve alone)."""
    out: dict[str, dict[int, float]] = {}
    for r in rs:
        if table == "paper_budgets":
            cells = {k: (v["mean"] if v else None)
                     for k, v in ztw_budget_table([_curve_dict(r, "curve")], float(r.base_flops)).items()}
        else:
            cells = getattr(r, table, None) or {}
        for k, v in cells.items():
            if v is not None:
                out.setdefault(k, {})[r.seed] = float(v)
    return out


def select(run_dirs: Sequence[Path], pattern: str) -> list[Path]:
    """The run folders whose name matches the shell pattern ``pattern`` (e.g. ``*-joint-matched-s?``)."""
    from fnmatch import fnmatch

    return [Path(d) for d in run_dirs if fnmatch(Path(d).name, pattern)]


def _one_config(dirs: Sequence[Path]) -> tuple[tuple, list[Results]]:
    """The one configuration (key, runs by seed) a side of a pair must hold."""
    groups = group_runs([Path(d) for d in dirs])
    if len(groups) != 1:
        raise EarlyExitError(f"a side of a pair must be one configuration, got {len(groups)}: "
                             f"{', '.join(_name(k) for k, _ in groups)}")
    return groups[0]


def pair_summary(a_dirs: Sequence[Path], b_dirs: Sequence[Path], *, direction: int = 1) -> dict:
    """Seed-by-seed differences ``a - b`` of two configurations at every budget of the three tables.

    Args:
        a_dirs, b_dirs: the run folders of each side (one configuration each; seeds are paired by number,
            and only seeds both sides have count).
        direction: the sign of ``a - b`` the claim predicts (+1: a is better), for the verdicts.
    Returns:
        ``{a, b, seeds, direction, tables: {table: {budget: {n, mean, std, low, high, p, verdict}}},
        training: {a, b}}``; differences in accuracy points of [0, 1].
    Raises:
        EarlyExitError: a side holds several configurations, or the sides share no seed.
    """
    (ka, ra), (kb, rb) = _one_config(a_dirs), _one_config(b_dirs)
    seeds = sorted({r.seed for r in ra} & {r.seed for r in rb})
    if not seeds:
        raise EarlyExitError(f"{_name(ka)} and {_name(kb)} share no seed; a pair compares the same seeds")
    tables = {}
    for table, _ in TABLES:
        va, vb = per_seed_values(ra, table), per_seed_values(rb, table)
        cells = {}
        for budget in va:
            both = [s for s in seeds if s in va[budget] and s in vb.get(budget, {})]
            if len(both) < len(seeds):
                cells[budget] = None  # a budget one side does not reach for some seed
                continue
            t = paired_t([va[budget][s] for s in both], [vb[budget][s] for s in both])
            cells[budget] = {**t, "verdict": decide(t, direction)}
        tables[table] = cells
    return {"a": _name(ka), "b": _name(kb), "seeds": seeds, "direction": direction, "tables": tables,
            "training": {"a": _training([r for r in ra if r.seed in seeds]),
                         "b": _training([r for r in rb if r.seed in seeds])}}


def format_pair(pair: dict) -> list[str]:
    """The lines of a ``pair_summary``: per table and budget, the mean difference a - b in points with its 95 %
    interval and the verdict."""
    arrow = ">" if pair["direction"] > 0 else "<"
    lines = [f"pair: {pair['a']} - {pair['b']} (seeds {pair['seeds']}; the claim: a {arrow} b)",
             f"  a {_spent(pair['training']['a'])}", f"  b {_spent(pair['training']['b'])}"]
    for key, title in TABLES:
        cells = []
        for budget, c in pair["tables"][key].items():
            cells.append(f"{budget}: -" if c is None else f"{budget}: {_diff(c)} {c['verdict']}")
        lines.append(f"  {SHORT[key]}: " + "; ".join(cells))
    return lines


def markdown_pair(pair: dict) -> str:
    """A ``pair_summary`` as a Markdown table (RESULTS.md's interval blocks): one row per table, one column per
    budget, each cell the mean difference a - b in points, its 95 % t interval over seeds and the verdict."""
    names = list(next((c for c in pair["tables"].values() if c), {}))
    arrow = ">" if pair["direction"] > 0 else "<"
    out = [f"{pair['a']} minus {pair['b']}, seeds {','.join(map(str, pair['seeds']))} (the paper: a {arrow} b); "
           f"points, mean [95 % t interval], verdict:", "",
           "| table | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, title in TABLES:
        cells = pair["tables"][key]
        row = ["-" if cells.get(n) is None else f"{_diff(cells[n])} {cells[n]['verdict']}" for n in names]
        out.append(f"| {SHORT[key]} | " + " | ".join(row) + " |")
    return "\n".join(out) + "\n"


def mean_cosines(run_dir: Path) -> list[float | None]:
    """Per exit, the mean over the logged steps of the gradient cosine with the total backbone gradient
    (``gradients.jsonl``, Figure 4), in the phase that trains the ICs (2; 3 for disjoint), at the grid point the
    run chose; None for an exit never logged."""
    from .schema import PROBE_RECORD, read_json_lines

    path = Path(run_dir) / "gradients.jsonl"
    if not path.is_file():
        raise EarlyExitError(f"{run_dir} has no gradients.jsonl (train with --grad-log-every N)")
    train = Results.from_json(run_dir).train
    chosen = {int(p["phase"]): p["lr"] for p in (train.phases if train is not None else [])}
    recs = [r for r in read_json_lines(path, item=PROBE_RECORD)
            if r.get("lr") is None or chosen.get(r["phase"], r["lr"]) == r["lr"]]
    phase = 2 if any(r["phase"] == 2 for r in recs) else 3
    recs = [r for r in recs if r["phase"] == phase]
    if not recs:
        raise EarlyExitError(f"{run_dir}: gradients.jsonl logs no step of phase 2 or 3")
    out: list[float | None] = []
    for k in range(len(recs[0]["cos"])):
        vals = [r["cos"][k] for r in recs if r["cos"][k] is not None]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def cosine_pair(a_dirs: Sequence[Path], b_dirs: Sequence[Path], *, direction: int = 1) -> dict:
    """Seed-by-seed differences ``a - b`` of each exit's mean gradient cosine (``mean_cosines``), with the paired
    t interval and the verdict per exit (the same rule as ``pair_summary``).

    Returns:
        ``{a, b, seeds, direction, exits: [{n, mean, std, low, high, p, verdict} or None]}`` (None: an exit one
        side never logged).
    """
    (ka, _), (kb, _) = _one_config(a_dirs), _one_config(b_dirs)
    da, db = ({Results.from_json(Path(d)).seed: Path(d) for d in dirs} for dirs in (a_dirs, b_dirs))
    seeds = sorted(set(da) & set(db))
    if not seeds:
        raise EarlyExitError(f"{_name(ka)} and {_name(kb)} share no seed; a pair compares the same seeds")
    ca, cb = [mean_cosines(da[s]) for s in seeds], [mean_cosines(db[s]) for s in seeds]
    exits = []
    for k in range(min(len(ca[0]), len(cb[0]))):
        xa, xb = [c[k] for c in ca], [c[k] for c in cb]
        if any(v is None for v in xa + xb):
            exits.append(None)
            continue
        t = paired_t(xa, xb)
        exits.append({**t, "verdict": decide(t, direction)})
    return {"a": _name(ka), "b": _name(kb), "seeds": seeds, "direction": direction, "exits": exits}


def markdown_cosine_pair(pair: dict) -> str:
    """A ``cosine_pair`` as a Markdown table (RESULTS.md's cosine blocks): one column per exit, each cell the mean
    difference of the cosines a - b, its 95 % t interval over seeds and the verdict."""
    arrow = ">" if pair["direction"] > 0 else "<"
    n = len(pair["exits"])
    names = [f"IC {k + 1}" for k in range(n - 1)] + ["final"]
    cell = lambda c: "-" if c is None else (  # noqa: E731
        f"{c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] {c['verdict']}" if c.get("low") is not None
        else f"{c['mean']:+.3f} {c['verdict']}")
    out = [f"{pair['a']} minus {pair['b']}, seeds {','.join(map(str, pair['seeds']))} (the paper: a {arrow} b); "
           f"gradient cosine with the total backbone gradient, mean over logged steps, [95 % t interval], verdict:",
           "", "| " + " | ".join(names) + " |", "|" + "---|" * n, "| " + " | ".join(cell(c) for c in pair["exits"]) + " |"]
    return "\n".join(out) + "\n"


def _diff(c: dict) -> str:
    if c.get("low") is None:
        return f"{c['mean'] * 100:+.2f}"
    return f"{c['mean'] * 100:+.2f} [{c['low'] * 100:+.2f}, {c['high'] * 100:+.2f}]"


__all__ = ["SHORT", "cosine_pair", "format_pair", "markdown_cosine_pair", "markdown_pair", "mean_cosines", "pair_summary",
           "per_seed_values", "select"]
