"""Figures of the analyses: the paper's Figures 2-5 and the loss landscapes of its appendix A.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" draws

- Figure 2, ``plot_connectivity_plane``: the loss on the plane through three
  models (``plane.connectivity_plane``), as filled contours with the models marked;
- Figure 3, ``plot_layer_ranks``: the numerical rank per backbone layer
  (``layer_rank.layer_ranks``), one line per run or regime;
- Figure 4, ``plot_gradient_cosines``: the cosine between each exit's backbone
  gradient and the total one over the training steps (records as
  ``cosines.gradient_cosine_record`` makes them, e.g. the lines of a
  ``gradients.jsonl``), one line per exit;
- Figure 5, ``plot_layer_information``: ``I(X; Z)`` per backbone layer
  (``noisy_information.layer_information``), one line per run or regime;
- appendix A, ``plot_loss_landscape``: ``landscape.loss_surface`` slices, one
  panel for the total loss and one per exit.

matplotlib is imported inside the functions (an optional dependency) and
drives the Agg canvas directly, without pyplot's global state; every figure is
written atomically (``io.atomic_write_bytes``) in the format its suffix names
(``.png``, ``.pdf``, ``.svg``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..io import atomic_write_bytes, figure_bytes

Runs = Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]]


def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (6.4, 4.2)) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig: Any, out_file: str | os.PathLike) -> Path:
    out = Path(out_file)
    fmt = out.suffix.lstrip(".").lower() or "png"
    atomic_write_bytes(out, figure_bytes(fig, fmt, dpi=150, bbox_inches="tight"))
    return out


def _runs(runs: Runs) -> dict[str, Sequence[Mapping[str, Any]]]:
    """``{label: rows}`` from one run's rows or a mapping of runs."""
    if isinstance(runs, Mapping):
        out = {str(k): v for k, v in runs.items()}
    else:
        out = {"": runs}
    if not out or any(len(v) == 0 for v in out.values()):
        raise ValueError("nothing to plot: every run needs at least one layer")
    return out


def _short(name: str) -> str:
    return name.replace("stages.", "s").replace("heads.", "h").replace("stem.", "stem ")


def _per_layer(runs: Runs, out_file: str | os.PathLike, key: str, ylabel: str, title: str | None,
               ratio_to: str | None = None) -> Path:
    groups = _runs(runs)
    n = max(len(v) for v in groups.values())
    fig, axes = _figure(size=(max(6.4, 0.22 * n + 2.5), 4.2))
    ax = axes[0][0]
    names: list[str] = []
    for label, rows in groups.items():
        ys = [(r[key] / r[ratio_to]) if ratio_to else r[key] for r in rows]
        ys = [math.nan if y is None else float(y) for y in ys]
        ax.plot(range(len(rows)), ys, "o-", ms=3, lw=1.4, label=label or None)
        if len(rows) > len(names):
            names = [str(r.get("layer", i)) for i, r in enumerate(rows)]
    step = max(1, math.ceil(len(names) / 40))
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([_short(s) for s in names[::step]], rotation=90, fontsize=7)
    ax.set_xlabel("backbone layer (forward order)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if any(groups):
        ax.legend(fontsize=8)
    return _save(fig, out_file)


def plot_layer_ranks(runs: Runs, out_file: str | os.PathLike, *, relative: bool = False,
                     title: str | None = None) -> Path:
    """Numerical rank per backbone layer (Figure 3).

    Args:
        runs: ``layer_ranks`` rows of one run, or ``{label: rows}`` (e.g. one per regime).
        out_file: the figure's path; its suffix picks the format.
        relative: plot ``rank / features`` (the share of the measured columns) instead of the rank.
        title: optional title.
    Returns:
        The path written.
    """
    return _per_layer(runs, out_file, "rank", "rank / measured features" if relative else "numerical rank",
                      title, ratio_to="features" if relative else None)


def plot_layer_information(runs: Runs, out_file: str | os.PathLike, *, title: str | None = None) -> Path:
    """``I(X; Z)`` per backbone layer (Figure 5).

    Args:
        runs: ``layer_information`` rows of one run, or ``{label: rows}``.
        out_file: the figure's path.
        title: optional title (default: the estimator and sigma of the first row).
    Returns:
        The path written.
    """
    first = next(iter(_runs(runs).values()))[0]
    if title is None and "method" in first:
        title = f"I(X; Z), {first['method']}" + (f", sigma = {first['sigma']:g}" if first.get("sigma") else "")
    return _per_layer(runs, out_file, "mi", "I(X; Z) (nats)", title)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_gradient_cosines(records: Iterable[Mapping[str, Any]] | str | os.PathLike, out_file: str | os.PathLike, *,
                          title: str | None = None) -> Path:
    """Cosine between each exit's backbone gradient and the total gradient over training (Figure 4).

    Args:
        records: ``{"phase", "epoch", "step", "cos": [E]}`` dicts in training order (``step`` counted
            within the epoch), or the path of a JSON-lines file of them. ``None`` entries leave gaps.
        out_file: the figure's path.
        title: optional title.
    Returns:
        The path written.
    Raises:
        ValueError: without records, or with records of different exit counts.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_records(records)
    records = list(records)
    if not records:
        raise ValueError("no gradient records to plot")
    E = len(records[0]["cos"])
    if any(len(r["cos"]) != E for r in records):
        raise ValueError("the records hold different numbers of exits")
    # A global step: the epochs' step counts laid end to end (an epoch's length = its largest step seen).
    offset, last_len, key, xs, bounds = 0, 0, None, [], []
    for r in records:
        k = (r["phase"], r["epoch"])
        if k != key:
            if key is not None:
                offset += last_len
                if k[0] != key[0]:
                    bounds.append((offset, k[0]))
            else:
                bounds.append((0, k[0]))
            key, last_len = k, 0
        last_len = max(last_len, int(r["step"]))
        xs.append(offset + int(r["step"]))
    fig, axes = _figure()
    ax = axes[0][0]
    for e in range(E):
        ys = [math.nan if r["cos"][e] is None else float(r["cos"][e]) for r in records]
        ax.plot(xs, ys, lw=1.3, marker="o" if len(xs) <= 30 else None, ms=3,
                label="final exit" if e == E - 1 else f"IC {e + 1}")
    for x, phase in bounds:
        ax.axvline(x, color="0.5", lw=0.8, ls="--")
        ax.annotate(f"phase {phase}", (x, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="0.35")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("cos(g_k, g_total)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if E > 4 else 1, loc="lower right", framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, out_file)


def _levels(z: Any, n: int) -> Any:
    """Contour levels over the finite values of ``z``: log-spaced when they span more than a decade."""
    import numpy as np

    finite = z[np.isfinite(z)]
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.linspace(lo - 0.5, lo + 0.5, 3)
    if lo > 0 and hi / lo > 10:
        return np.geomspace(lo, hi, n)
    return np.linspace(lo, hi, n)


def _contour(fig: Any, ax: Any, xs: Sequence[float], ys: Sequence[float], z: Any, levels: int, label: str) -> None:
    """Filled contours of ``z[i, j]`` at ``(xs[i], ys[j])`` with a colour bar."""
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullLocator

    z = np.asarray(z, dtype=float).T  # (len(ys), len(xs)) for contourf
    lev = _levels(z, levels)
    log = lev[0] > 0 and lev[-1] / lev[0] > 10
    cs = ax.contourf(xs, ys, z, levels=lev, cmap="viridis", norm=LogNorm(lev[0], lev[-1]) if log else None,
                     extend="both")
    ax.contour(xs, ys, z, levels=lev[::max(1, len(lev) // 8)], colors="white", linewidths=0.4, alpha=0.6)
    cb = fig.colorbar(cs, ax=ax)
    ticks = (LogLocator(subs=(1.0, 2.0, 5.0)) if log else MaxNLocator(6)).tick_values(lev[0], lev[-1])
    cb.set_ticks(ticks[(ticks >= lev[0]) & (ticks <= lev[-1])])
    cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))


def plot_connectivity_plane(plane: Mapping[str, Any], out_file: str | os.PathLike, *, exit: int | None = None,
                            levels: int = 24, names: Mapping[str, str] | None = None,
                            title: str | None = None) -> Path:
    """The loss on the plane through three models, with the models marked (Figure 2).

    Args:
        plane: the result of ``connectivity_plane``.
        out_file: the figure's path.
        exit: draw this exit's loss; None: the total (weighted) loss.
        levels: number of contour levels.
        names: labels of the models, ``{"ref": ..., "a": ..., "b": ...}`` (e.g. the regimes).
        title: optional title.
    Returns:
        The path written.
    """
    z = plane["loss"] if exit is None else plane["exit_loss"][exit]
    z = z.numpy() if hasattr(z, "numpy") else z
    # the axes keep equal units: the figure takes the plane's aspect (a long, flat plane gets a low figure)
    xs, ys = plane["xs"], plane["ys"]
    aspect = (max(ys) - min(ys)) / max(max(xs) - min(xs), 1e-12)
    fig, axes = _figure(size=(7.0, min(7.0, max(3.2, 5.4 * aspect + 1.3))))
    ax = axes[0][0]
    what = "total loss" if exit is None else f"loss of exit {exit}"
    _contour(fig, ax, plane["xs"], plane["ys"], z, levels, what)
    names = {"ref": "ref", "a": "a", "b": "b", **(names or {})}
    for (key, (x, y)), m in zip(plane["coords"].items(), ("o", "s", "^")):
        ax.plot([x], [y], m, color="white", mec="black", ms=9, zorder=5)
        ax.annotate(names[key], (x, y), xytext=(7, 6), textcoords="offset points", fontsize=9, color="white",
                    fontweight="bold", zorder=6)
    ax.set_xlabel("u (weight-space distance)")
    ax.set_ylabel("v (weight-space distance)")
    ax.set_aspect("equal", adjustable="box")
    ax.set_title(title or f"{what} on the plane through three models" + (" (matched)" if plane.get("matched") else ""),
                 fontsize=10)
    return _save(fig, out_file)


def plot_loss_landscape(surface: Mapping[str, Any], out_file: str | os.PathLike, *, levels: int = 20,
                        title: str | None = None) -> Path:
    """Loss landscapes around a model (appendix A): the total loss and every exit's.

    Args:
        surface: the result of ``loss_surface`` (2-D: one contour panel each; 1-D: one line each).
        out_file: the figure's path.
        levels: number of contour levels of the 2-D panels.
        title: optional overall title.
    Returns:
        The path written.
    """
    import numpy as np

    loss = np.asarray(surface["loss"], dtype=float)  # (E', S1, S2)
    exits = list(surface["exits"])
    total = surface.get("total")
    panels = ([("total", np.asarray(total, dtype=float))] if total is not None else []) + \
        [(f"exit {k}" + (" (final)" if k == exits[-1] and len(exits) > 1 else ""), loss[i])
         for i, k in enumerate(exits)]
    alphas, betas = list(surface["alphas"]), list(surface["betas"])
    one_d = len(betas) == 1
    if one_d:
        fig, axes = _figure()
        ax = axes[0][0]
        for name, z in panels:
            if name == "total":
                ax.plot(alphas, z[:, 0], "--", lw=2.0, color="black", label=name, zorder=5)
            else:
                ax.plot(alphas, z[:, 0], lw=1.4, label=name)
        ax.set_xlabel("alpha (filter-normalised direction)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = _figure(nrows, ncols, size=(4.3 * ncols, 3.6 * nrows))
        for idx, (name, z) in enumerate(panels):
            ax = axes[idx // ncols][idx % ncols]
            _contour(fig, ax, alphas, betas, z, levels, "loss")
            ax.plot([0], [0], "*", color="white", mec="black", ms=10)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("alpha", fontsize=8)
            ax.set_ylabel("beta", fontsize=8)
            ax.tick_params(labelsize=7)
        for idx in range(len(panels), nrows * ncols):
            axes[idx // ncols][idx % ncols].set_visible(False)
    direction = surface.get("direction")
    fig.suptitle(title or "loss landscape" + (f" ({direction} directions)" if direction else ""), fontsize=10)
    return _save(fig, out_file)
