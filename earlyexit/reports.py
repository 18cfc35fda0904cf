"""Reports over finished runs: summaries over seeds and accuracy-vs-FLOPs figures.

``summarize_runs`` groups runs by model, dataset and regime and gives the mean
and standard deviation over seeds. ``plot_runs`` draws each run's threshold
curve as a line and its static exit points (every sample leaving at one exit)
as markers; the x axis is the average cost as a share of the backbone's cost,
as in the paper's figures. matplotlib is an optional extra, imported inside
the plotting function. Runs are read through ``earlyexit.results.Results``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .errors import EarlyExitError
from .io import atomic_write_bytes
from .results import Results


def read_results(run_dir: Path) -> Results:
    """The ``Results`` of a run folder (one-line error when it has none or it is malformed)."""
    return Results.from_json(run_dir)


def plot_runs(run_dirs: Sequence[Path], out_file: Path, *, curve: str = "curve") -> None:
    """Overlay the runs' accuracy-vs-FLOPs curves and static exit points; write ``out_file`` (PNG, PDF, SVG).

    Args:
        run_dirs: run folders holding results.json.
        out_file: the figure's path; its suffix picks the format.
        curve: which curve of results.json to draw (``curve``, or ``calibrated_curve`` when present).
    Raises:
        ImportError: matplotlib is not installed.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for d in run_dirs:
        r = read_results(d)
        base = r.base_flops
        c = getattr(r, curve, None)
        if c is None:
            raise EarlyExitError(f"{d} has no {curve} in results.json (calibrated curves need the confidence or entropy criterion)")
        line, = ax.plot([f / base * 100 for f in c.flops], [a * 100 for a in c.accuracy], label=r.label)
        ax.scatter([e.flops / base * 100 for e in r.exits], [e.accuracy * 100 for e in r.exits],
                   color=line.get_color(), s=18, zorder=3)
    ax.set_xlabel("average cost (% of the backbone's FLOPs)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = Path(out_file).suffix.lstrip(".") or "png"
    fig.savefig(buf, format=fmt, dpi=130)
    plt.close(fig)
    atomic_write_bytes(out_file, buf.getvalue())


def maybe_plot(run_dirs: list[Path], out_file: Path, *, required: bool = False, curve: str = "curve") -> bool:
    """Accuracy-vs-FLOPs curves of runs, with their static exit points; False when matplotlib is missing."""
    try:
        plot_runs(run_dirs, out_file, curve=curve)
    except ImportError:
        if required:
            raise EarlyExitError("plotting needs matplotlib: pip install 'earlyexit[plot]'") from None
        return False
    return True


def summarize_runs(run_dirs: list[Path]) -> list[dict]:
    """Mean and standard deviation over seeds of runs that share model, dataset and regime.

    Returns one dict per group: ``{model, dataset, regime, seeds, exits: [{index, mean, std}],
    budgets: {name: {mean, std}}}``; accuracies in [0, 1], std with Bessel's correction (0 for one seed).
    """
    groups: dict[tuple, list[dict]] = {}
    for d in run_dirs:
        r = read_results(Path(d))
        groups.setdefault((r.model, r.dataset, r.regime), []).append(r)

    def stats(vals: list[float]) -> dict:
        t = torch.tensor(vals, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0}

    out = []
    for (model, dataset, regime), rs in groups.items():
        n_exits = min(len(r.exits) for r in rs)
        budgets = {}
        for k in rs[0].budgets:
            vals = [r.budgets[k] for r in rs if r.budgets.get(k) is not None]
            budgets[k] = stats(vals) if len(vals) == len(rs) else None
        out.append({"model": model, "dataset": dataset, "regime": regime, "seeds": sorted(r.seed for r in rs),
                    "exits": [{"index": i, **stats([r.exits[i].accuracy for r in rs])} for i in range(n_exits)],
                    "budgets": budgets})
    return out
