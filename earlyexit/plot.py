"""Accuracy-vs-FLOPs figures from run folders (matplotlib, an optional extra).

Each run's threshold curve is drawn as a line and its static exit points
(every sample leaving at one exit) as markers; the x axis is the average cost
as a share of the backbone's cost, as in the paper's figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .errors import EarlyExitError
from .io import atomic_write_bytes


def read_results(run_dir: Path) -> dict:
    f = Path(run_dir) / "results.json"
    if not f.is_file():
        raise EarlyExitError(f"{run_dir} has no results.json")
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise EarlyExitError(f"{f} is not valid JSON") from None


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
        base = r["base_flops"]
        label = f"{r['model']} {r.get('regime_name', r['regime'])} (seed {r['seed']})"
        c = r.get(curve)
        if c is None:
            raise EarlyExitError(f"{d} has no {curve} in results.json (calibrated curves need the confidence or entropy criterion)")
        line, = ax.plot([f / base * 100 for f in c["flops"]], [a * 100 for a in c["accuracy"]], label=label)
        ax.scatter([e["flops"] / base * 100 for e in r["exits"]], [e["accuracy"] * 100 for e in r["exits"]],
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
