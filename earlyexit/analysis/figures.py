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


def _values(rows: Sequence[Mapping[str, Any]], key: str, ratio_to: str | None = None) -> list[float]:
    ys = [None if r.get(key) is None else (r[key] / r[ratio_to] if ratio_to else r[key]) for r in rows]
    return [math.nan if y is None else float(y) for y in ys]


def _per_layer(runs: Runs, out_file: str | os.PathLike, key: str, ylabel: str, title: str | None,
               ratio_to: str | None = None, *, extra: Mapping[str, str] | None = None,
               ceiling: tuple[str, str] | None = None, flag: str | None = None, caption: str | None = None,
               log_y: bool = False) -> Path:
    """One line per run of ``rows[i][key]`` over the layers.

    ``extra``: ``{row key: legend suffix}`` of further series, drawn dotted in the run's colour;
    ``ceiling``: ``(row key, label)`` of a per-layer ceiling drawn dashed (the first run's);
    ``flag``: a boolean row key whose layers get a hollow square; ``caption``: text under the axes;
    ``log_y``: a log axis when the values span more than a factor of 30.
    """
    groups = _runs(runs)
    n = max(len(v) for v in groups.values())
    fig, axes = _figure(size=(max(6.4, 0.22 * n + 2.5), 4.6 if caption else 4.2))
    ax = axes[0][0]
    names: list[str] = []
    for label, rows in groups.items():
        (line,) = ax.plot(range(len(rows)), _values(rows, key, ratio_to), "o-", ms=3, lw=1.4, label=label or None)
        for (k, suffix), style in zip((extra or {}).items(), (":", "-.", (0, (1, 3)), (0, (5, 2)))):
            if any(r.get(k) is not None for r in rows):
                ax.plot(range(len(rows)), _values(rows, k, ratio_to), ls=style, marker=".", ms=3, lw=1.1,
                        color=line.get_color(), label=f"{label} {suffix}".strip())
        if flag:
            hit = [(i, y) for i, (r, y) in enumerate(zip(rows, _values(rows, key, ratio_to))) if r.get(flag)]
            if hit:
                ax.plot([i for i, _ in hit], [y for _, y in hit], "s", ms=7, mfc="none", color=line.get_color())
        if len(rows) > len(names):
            names = [str(r.get("layer", i)) for i, r in enumerate(rows)]
    if ceiling:
        rows = max(groups.values(), key=len)
        if all(r.get(ceiling[0]) is not None for r in rows):
            ax.plot(range(len(rows)), _values(rows, ceiling[0], ratio_to), "--", color="0.35", lw=1.1,
                    label=ceiling[1], zorder=1)
    if log_y:  # positive values over more than a decade and a half: a log axis keeps the low ones readable
        ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 30:
            ax.set_yscale("log")
    if caption:
        fig.text(0.01, -0.02, caption, fontsize=7, ha="left", va="top", wrap=True)
    step = max(1, math.ceil(len(names) / 40))
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels([_short(s) for s in names[::step]], rotation=90, fontsize=7)
    ax.set_xlabel("backbone layer (forward order)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    labels = ax.get_legend_handles_labels()[1]
    if len(labels) > 5:  # many series: the legend beside the axes, clear of the lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    elif labels:
        ax.legend(fontsize=7)
    return _save(fig, out_file)


def _rank_caption(row: Mapping[str, Any]) -> str | None:
    tol = row.get("tolerance")
    if not tol:
        return None
    what = ("rank of the centred covariance (k x k) of the kept columns, eigenvalues above k x eps x the largest "
            f"(torch.linalg.matrix_rank's default; eps = {tol['eps']:.3g}: {tol['rtol']:.3g} at k = {row['features']})"
            if tol["rule"] == "covariance" else
            f"rank of the {tol['matrix']}, singular values above {tol['rtol']:.3g} x the largest (numpy's rule)")
    return (f"{what}; N = {row['samples']} samples, k = min({row['features']} kept, width) columns per layer. "
            "Dashed: the ceiling min(N, k); hollow squares: saturated layers (rank within 1 % of the ceiling).")


def plot_layer_ranks(runs: Runs, out_file: str | os.PathLike, *, relative: bool = False,
                     title: str | None = None, caption: str | None = None) -> Path:
    """Numerical rank per backbone layer (Figure 3).

    Args:
        runs: ``layer_ranks`` rows of one run, or ``{label: rows}`` (e.g. one per regime).
        out_file: the figure's path; its suffix picks the format.
        relative: plot ``rank / features`` (the share of the measured columns) instead of the rank.
        title: optional title.
        caption: text under the axes (default: the tolerance and the ceiling, when the rows state them).
    Returns:
        The path written.
    """
    first = next(iter(_runs(runs).values()))[0]
    return _per_layer(runs, out_file, "rank", "rank / measured features" if relative else "numerical rank",
                      title, ratio_to="features" if relative else None, ceiling=("ceiling", "min(N, k)"),
                      flag="saturated", caption=caption if caption is not None else _rank_caption(first),
                      log_y=not relative)


EXTRA_MI = {"mi_mc": "(Monte Carlo)", "mi_bhattacharyya": "(lower bound)", "mi_jensen": "(Jensen bound)",
            "mi_jensen-sampled": "(sampled Jensen)"}


def plot_layer_information(runs: Runs, out_file: str | os.PathLike, *, title: str | None = None,
                           caption: str | None = None, subject: str | None = None) -> Path:
    """``I(X; Z)`` per backbone layer (Figure 5), with the ``log N`` ceiling dashed.

    Args:
        runs: ``layer_information`` rows of one run, or ``{label: rows}``; ``mi_<name>`` entries
            (further estimators) are drawn dotted in the run's colour.
        out_file: the figure's path.
        title: optional title (default: the estimator and sigma of the first row).
        caption: text under the axes.
        subject: what was measured (e.g. the model and data), added to the default title.
    Returns:
        The path written.
    """
    first = next(iter(_runs(runs).values()))[0]
    if title is None and "method" in first:
        if first.get("sigma_ref") not in (None, "absolute"):
            how = "median pairwise distance" if first["sigma_ref"] == "median" else "RMS distance to the mean"
            noise = f", sigma = {first['sigma_scale']:g} x the layer's {how}"
        else:
            noise = f", sigma = {first['sigma']:g}" if first.get("sigma") else ""
        title = f"I(X; Z), {first['method']}{noise}" + (f"\n{subject}" if subject else "")
    if caption is None and first.get("log_n") is not None:
        names = ("dotted", "dash-dotted", "sparse dots", "dashes")
        extra = [f"{n}: {v.strip('()')}" for n, (k, v) in zip(names, EXTRA_MI.items()) if first.get(k) is not None]
        if first.get("mi_mc") is not None and first.get("also_ref_size"):
            extra = [e + f" (reference set {first['also_ref_size']}, ceiling log {first['also_ref_size'] + 1})"
                     if e.endswith("Monte Carlo") else e for e in extra]
        caption = (f"Solid: {first['method']}" + (f"; in the run's colour, {'; '.join(extra)}" if extra else "")
                   + f". N = {first['samples']} test samples, k = min({first['features']} kept, width) columns per "
                   "layer; dashed: the ceiling log N.")
    return _per_layer(runs, out_file, "mi", "I(X; Z) (nats)", title, extra=EXTRA_MI,
                      ceiling=("log_n", "log N"), caption=caption)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The step probe's records of a JSON-lines file (blank lines skipped), each checked against its schema
    (``earlyexit.schema.PROBE_RECORD``: a damaged or crafted line is one ``FileSchemaError``)."""
    from ..schema import PROBE_RECORD, read_json_lines

    return read_json_lines(path, item=PROBE_RECORD)


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


def _contour(fig: Any, ax: Any, xs: Sequence[float], ys: Sequence[float], z: Any, levels: int, label: str,
             vmin: float | None = None, vmax: float | None = None) -> None:
    """Filled contours of ``z[i, j]`` at ``(xs[i], ys[j])`` with a colour bar.

    ``vmin`` / ``vmax`` fix the colour scale (values beyond take the end colours), so that several
    figures share one; each left out comes from the data.
    """
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullLocator

    z = np.asarray(z, dtype=float).T  # (len(ys), len(xs)) for contourf
    if vmin is not None or vmax is not None:
        finite = z[np.isfinite(z)]
        lo = float(finite.min()) if vmin is None else float(vmin)
        hi = float(finite.max()) if vmax is None else float(vmax)
        if not hi > lo:
            raise ValueError(f"the colour scale needs vmin < vmax, got {lo} and {hi}")
        lev = np.geomspace(lo, hi, levels) if lo > 0 and hi / lo > 10 else np.linspace(lo, hi, levels)
    else:
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
                            title: str | None = None, vmin: float | None = None, vmax: float | None = None,
                            caption: str | None = None) -> Path:
    """The loss on the plane through three models, with the models marked (Figure 2).

    Args:
        plane: the result of ``connectivity_plane``.
        out_file: the figure's path.
        exit: draw this exit's loss; None: the total (weighted) loss.
        levels: number of contour levels.
        names: labels of the models, ``{"ref": ..., "a": ..., "b": ...}`` (e.g. the regimes).
        title: optional title.
        vmin, vmax: a fixed colour scale (the same for every plane of a study), stated under the axes.
        caption: text under the axes (default: the colour scale when it is fixed).
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
    _contour(fig, ax, plane["xs"], plane["ys"], z, levels, what, vmin=vmin, vmax=vmax)
    if caption is None and (vmin is not None or vmax is not None):
        lo, hi = (vmin if vmin is not None else "min"), (vmax if vmax is not None else "max")
        caption = (f"Colour scale fixed at [{lo}, {hi}] ({what}) for every plane figure of this study; values "
                   "beyond it take the end colours.")
    if caption:
        fig.text(0.01, -0.01, caption, fontsize=7, ha="left", va="top", wrap=True)
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
                        title: str | None = None, vmin: float | None = None, vmax: float | None = None,
                        caption: str | None = None) -> Path:
    """Loss landscapes around a model (appendix A): the total loss and every exit's.

    Args:
        surface: the result of ``loss_surface`` (2-D: one contour panel each; 1-D: one line each).
        out_file: the figure's path.
        levels: number of contour levels of the 2-D panels.
        title: optional overall title.
        vmin, vmax: a fixed colour scale (2-D) or y range (1-D) for every panel, e.g. the same for
            every regime; stated under the panels.
        caption: text under the panels (default: the colour scale when it is fixed, and whether
            BatchNorm was re-estimated).
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
        if vmin is not None or vmax is not None:
            ax.set_ylim(vmin, vmax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    else:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = _figure(nrows, ncols, size=(4.3 * ncols, 3.6 * nrows))
        for idx, (name, z) in enumerate(panels):
            ax = axes[idx // ncols][idx % ncols]
            _contour(fig, ax, alphas, betas, z, levels, "loss", vmin=vmin, vmax=vmax)
            ax.plot([0], [0], "*", color="white", mec="black", ms=10)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("alpha", fontsize=8)
            ax.set_ylabel("beta", fontsize=8)
            ax.tick_params(labelsize=7)
        for idx in range(len(panels), nrows * ncols):
            axes[idx // ncols][idx % ncols].set_visible(False)
    direction = surface.get("direction")
    fig.suptitle(title or "loss landscape" + (f" ({direction} directions)" if direction else ""), fontsize=10)
    if caption is None:
        parts = []
        if surface.get("bn_reset") is not None:
            parts.append("BatchNorm statistics re-estimated at every grid point" if surface["bn_reset"]
                         else "BatchNorm: the model's own running statistics at every point")
        if vmin is not None or vmax is not None:
            parts.append(f"colour scale fixed at [{vmin if vmin is not None else 'min'}, "
                         f"{vmax if vmax is not None else 'max'}] for every panel and every regime")
        caption = "; ".join(parts) + "." if parts else None
    if caption:
        fig.text(0.01, -0.01, caption, fontsize=7, ha="left", va="top", wrap=True)
    return _save(fig, out_file)


def plot_connectivity_path(conn: Mapping[str, Any], out_file: str | os.PathLike, *,
                           weights: Sequence[float] | None = None, title: str | None = None) -> Path:
    """The loss along the straight path between two models, plain and weight-matched.

    Args:
        conn: an ``analyze_run`` ``connectivity`` entry: ``{"path", "matched_path"}`` (``interpolation_path``
            results; the matched one may be None).
        out_file: the figure's path.
        weights: the exits' loss weights for the total (None: the mean).
        title: optional title.
    Returns:
        The path written.
    """
    import numpy as np

    fig, axes = _figure(1, 2, size=(9.6, 3.8))
    for ax, which in zip(axes[0], ("total", "final")):
        for key, style, name in (("path", "--", "plain"), ("matched_path", "-", "weight-matched")):
            p = conn.get(key)
            if not p:
                continue
            loss = np.asarray(p["loss"], dtype=float)  # (S, E')
            if which == "total":
                w = np.full(loss.shape[1], 1.0 / loss.shape[1]) if weights is None else \
                    np.asarray(weights, dtype=float)[list(p["exits"])]
                y = loss @ w
            else:
                y = loss[:, -1]
            barrier = float(y.max() - 0.5 * (y[0] + y[-1]))
            ax.plot(p["alphas"], y, style, marker="o", ms=3, lw=1.4, label=f"{name} (barrier {barrier:.3g})")
        ax.set_xlabel("alpha (0: first model, 1: second)")
        ax.set_ylabel("total loss" if which == "total" else "loss of the final exit")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    bn = (conn.get("path") or {}).get("bn_reset")
    fig.text(0.01, -0.01, ("BatchNorm statistics re-estimated at every point" if bn else
                           "BatchNorm statistics interpolated with the weights") +
             "; barrier: the highest loss on the path minus the mean of its two ends.", fontsize=7, ha="left",
             va="top")
    return _save(fig, out_file)
