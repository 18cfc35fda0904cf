"""The analyses of finished run folders, and their figures: what ``python -m earlyexit analyze`` runs.

The analyses themselves are functions over a model and batches (``earlyexit.analysis``); this module
reads run folders (``earlyexit.runs``) and hands them over, so the analysis package never imports the
run code (which uses its gradient probe).

Each analysis of "Joint or Disjoint: Mixing Training Regimes for Early-Exit
Models" by the paper's own definition, under the name ``analyze`` knows it by:

| name            | what                                                               | figure                 |
|-----------------|--------------------------------------------------------------------|------------------------|
| ``plane``       | loss on the plane through three runs (``plane.connectivity_plane``)  | Figure 2               |
| ``rank``        | numerical rank of every backbone layer (``layer_rank.layer_ranks``)  | Figure 3               |
| ``gradients``   | each exit's gradient cosine (``cosines.gradient_cosines``); the      | Figure 4 (the log)     |
|                 | figure draws the run's ``gradients.jsonl`` (``--grad-log-every``)    |                        |
| ``information`` | ``I(X; Z)`` of every backbone layer (``noisy_information``)          | Figure 5               |
| ``landscape``   | total and per-exit loss around the weights (``landscape``)           | appendix A             |

and the earlier estimators, kept as variants: ``rank-exits`` (numerical and
effective rank after each exit's stage, ``rank.stage_ranks``),
``gradient-norms`` (per-exit, per-stage gradient norms, ``gradients``),
``information`` with ``mi_method="knn"`` (``I(T; Y)`` by kNN and ``I(X; T)`` by
binning after each exit's stage, ``information.stage_information``), and
``connectivity`` (the straight path between two runs, ``connectivity``).

The total losses (landscape, plane) and the gradient cosines use the run's
loss weighting at the end of training (progress 1), over every exit, as in phase 2.

The defaults are the paper's protocols: the rank of the centred covariance with
``torch.linalg.matrix_rank``'s tolerance on the same seeded columns for every
layer (``rank_tolerance="covariance"``, ``columns="shared"``; each row says its
tolerance, ceiling and whether it is saturated); ``I(X; Z)`` by the Jensen
(pairwise, Kolchinsky & Tracey) upper bound with a noise of ``sigma`` times
each layer's median pairwise distance, the Monte Carlo estimate and the
Bhattacharyya lower bound beside it; the landscapes, the plane and the path
between two runs with BatchNorm re-estimated at every point, after weight
matching for the plane and the path.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError
from .progress import ProgressFn
from .regime import Regime
from .tree import to_jsonable

ANALYSES = ("rank", "gradients", "information", "landscape", "plane", "connectivity", "rank-exits", "gradient-norms")
PAIRED = ("plane", "connectivity")  # analyses of several runs together (the first run is the reference)
SPLITS = ("train", "val", "test")
MI_METHODS = ("jensen", "mc", "bhattacharyya", "jensen-sampled", "binning", "knn")  # knn: per exit
FIGURES = ("rank", "gradients", "information", "landscape", "plane", "connectivity")


def _weights(cfg: Any, num_exits: int) -> list[float]:
    """The run's loss weight of every exit at the end of training (phase 2's weighting, progress 1)."""
    from .weighting import get_weighting

    return [float(w) for w in get_weighting(cfg.train.loss_weighting)(num_exits, 1.0)]


def _load_other(path: str | Path, cfg: Any, dev: Any) -> Any:
    from .runs import load_run

    model, other_cfg = load_run(path, device=dev)
    if other_cfg.model.name != cfg.model.name:
        raise ConfigError(f"cannot compare a {cfg.model.name} run with a {other_cfg.model.name} run ({path})")
    return model


def analyze_run(run_dir: str | Path, *, what: Sequence[str] = ("rank", "gradients", "information"),
                max_samples: int = 512, split: str | None = None, other: str | Path | None = None,
                third: str | Path | None = None, device: str | None = None, batch_size: int = 256, seed: int = 0,
                mi_method: str = "jensen", sigma: float = 0.25, n_features: int = 6000,
                landscape_steps: int | Sequence[int] = (11, 11), landscape_span: float = 1.0,
                steps: int = 21, path_steps: int = 11, rank_tolerance: str = "covariance",
                columns: str = "shared", sigma_ref: str = "median", mi_also: Sequence[str] = ("mc", "bhattacharyya"),
                mi_also_ref_size: int | None = None, distance_dtype: str = "float64",
                landscape_direction: str = "gaussian", landscape_bn: bool = True,
                max_bytes: int = 2**30, on_done: Callable[[str], None] | None = None) -> dict:
    """Run analyses on a finished run folder.

    Args:
        run_dir: a run folder (``config.json`` and the final weights).
        what: names from ``ANALYSES`` (see the module docstring).
        max_samples: samples used by each analysis (``gradients``: training samples, in batches).
        split: the split that rank, information, landscape, plane and connectivity are measured on; None
            (the default): the paper's, the test split for rank and information (Figures 3 and 5), the training
            split for the losses of the landscapes and the plane (appendix A, Figure 2).
        other: a second run of the same architecture (``connectivity``, ``plane``).
        third: a third run (``plane``).
        device: ``"cpu"``, ``"cuda"``, ...; None = CUDA when available.
        batch_size: evaluation batch size.
        seed: seed of the gradient batches, column subsets, noise, projections and directions.
        mi_method: ``information``'s estimator of ``I(X; Z)`` per layer (``noisy_information``): ``"jensen"``
            (the default, the pairwise upper bound), ``"mc"``, ``"bhattacharyya"`` (the lower bound),
            ``"jensen-sampled"``, or ``"binning"`` (per layer), or ``"knn"`` (the per-exit ``stage_information``).
        sigma: the noise of ``I(X; Z)``: the factor on each layer's scale (``sigma_ref``), or in the
            features' units with ``sigma_ref="absolute"``.
        n_features: columns kept per layer (``rank``, ``information``).
        landscape_steps, landscape_span: grid of ``landscape`` (see ``landscape.loss_surface``).
        steps: grid points per axis of ``plane``.
        path_steps: points on the path of ``connectivity``.
        rank_tolerance: ``"covariance"`` (the authors') or ``"numpy"`` (see ``layer_rank``).
        columns: ``"shared"`` (the same indices for every layer) or ``"layer"`` column subsets.
        sigma_ref: ``"median"``, ``"std"`` or ``"absolute"`` (see ``noisy_information.layer_information``).
        mi_also: estimators reported beside ``mi_method`` (``mi_<name>`` in each row).
        mi_also_ref_size: reference set of the ``mi_also`` estimators; None: all samples.
        distance_dtype: ``"float64"`` or ``"float32"``, the distance products of the pairwise bounds.
        landscape_direction: ``"gaussian"`` or ``"uniform"`` directions (``landscape.random_direction``).
        landscape_bn: re-estimate BatchNorm at every landscape point (on unaugmented training batches).
        max_bytes: memory budget of one pass of ``rank`` / ``information`` (more: fewer passes).
        on_done: called with an analysis' name when it is finished (progress).
    Returns:
        A JSON-ready dict: ``run``, ``model``, ``dataset``, ``regime``, ``regime_name``, ``exit_after``,
        ``split``, ``num_samples``, ``weights`` and one entry per analysis, under its name:

        - ``rank``: ``[{layer, rank, features, samples, dim, ceiling, saturated, tolerance}]`` per backbone layer;
        - ``gradients``: ``{cos: [E] mean over batches, per_batch: [[E]], weights: [E]}``;
        - ``information``: ``[{layer, mi, features, samples, dim, sigma, method, sigma_ref, sigma_scale, scale,
          log_n, ref_size, mi_<also>...}]`` per backbone layer (``knn``: ``[{exit, stage, I_TY, I_XT, H_Y}]`` per exit);
        - ``landscape``: ``{alphas, betas, exits, loss: (E, S1, S2), accuracy, total: (S1, S2), direction, bn_reset,
          summary}`` (``summary``: ``landscape.landscape_summary``);
        - ``plane``: ``connectivity_plane``'s result with ``runs: {ref, a, b}``;
        - ``connectivity``: ``{other, path, matched_path, summary}`` (``summary``: the loss barrier of every exit
          and of the weighted total, plain and matched, BatchNorm re-estimated at every point);
        - ``rank-exits``: ``{numerical: [E], effective: [E], dims: [E]}``;
        - ``gradient-norms``: ``{norms: (E, S), dominance: (E, S)}``.
    Raises:
        ConfigError: on unknown analyses, split or estimator, or a paired analysis without its runs.
    """
    from .device import local_device
    from .runs import load_data, load_run

    what = tuple(what)
    bad = [w for w in what if w not in ANALYSES]
    if bad:
        raise ConfigError(f"unknown analysis {bad[0]!r}; valid: {', '.join(ANALYSES)}")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if mi_method not in MI_METHODS:
        raise ConfigError(f"unknown estimator {mi_method!r}; valid: {', '.join(MI_METHODS)}")
    if "connectivity" in what and other is None:
        raise ConfigError("the connectivity analysis needs a second run folder (other=...)")
    if "plane" in what and (other is None or third is None):
        raise ConfigError("the plane analysis needs a second and a third run folder (other=..., third=...)")
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    if distance_dtype not in DTYPES:
        raise ConfigError(f"unknown distance dtype {distance_dtype!r}; valid: {', '.join(DTYPES)}")
    tick = on_done or (lambda name: None)
    dev = local_device(device)
    model, cfg = load_run(run_dir, device=dev)
    splits = load_data(cfg)
    bs = min(batch_size, max_samples)
    n_batches = math.ceil(max_samples / bs)
    feature_split, loss_split = split or "test", split or "train"
    batches = list(itertools.islice(getattr(splits, feature_split).batches(bs), n_batches))
    loss_batches = batches if loss_split == feature_split else \
        list(itertools.islice(getattr(splits, loss_split).batches(bs), n_batches))
    weights = _weights(cfg, model.num_exits)
    out: dict[str, Any] = {"run": str(run_dir), "model": cfg.model.name, "dataset": cfg.data.name,
                           "regime": cfg.train.parsed_regime.phases, "regime_name": cfg.train.regime,
                           "seed": cfg.train.seed,
                           "exit_after": list(model.exit_after), "split": feature_split, "loss_split": loss_split,
                           "num_samples": min(sum(len(y) for _, y in batches), max_samples), "weights": weights}
    if "rank" in what:
        from .analysis.layer_rank import layer_ranks

        out["rank"] = layer_ranks(model, batches, n_features=n_features, seed=seed, max_samples=max_samples,
                                  tolerance=rank_tolerance, columns=columns, max_bytes=max_bytes)
        tick("rank")
    if "rank-exits" in what:
        from .analysis.rank import effective_rank, numerical_rank, stage_features

        feats = stage_features(model, batches, max_samples=max_samples)["features"]
        out["rank-exits"] = {"numerical": [numerical_rank(f) for f in feats],
                             "effective": [effective_rank(f) for f in feats], "dims": [f.shape[1] for f in feats]}
        tick("rank-exits")
    if "gradients" in what or "gradient-norms" in what:
        train_batches = list(itertools.islice(splits.train.batches(bs, shuffle=True, seed=seed), n_batches))
    if "gradients" in what:
        from .analysis.cosines import gradient_cosines

        per_batch = [gradient_cosines(model, x, y, weights=weights) for x, y in train_batches]
        out["gradients"] = {"cos": [_mean([c[k] for c in per_batch]) for k in range(model.num_exits)],
                            "per_batch": per_batch, "weights": weights}
        tick("gradients")
    if "gradient-norms" in what:
        from .analysis.gradients import dominance_from_norms, exit_gradient_norms

        x, y = train_batches[0]
        norms = exit_gradient_norms(model, x, y)
        out["gradient-norms"] = {"norms": norms, "dominance": dominance_from_norms(norms)}
        tick("gradient-norms")
    if "information" in what:
        if mi_method == "knn":
            from .analysis.information import stage_information

            out["information"] = stage_information(model, batches, method="knn", max_samples=max_samples, seed=seed)
        else:
            from .analysis.noisy_information import layer_information

            import torch

            out["information"] = layer_information(
                model, batches, sigma=sigma, method=mi_method, n_features=n_features, max_samples=max_samples,
                seed=seed, sigma_ref=sigma_ref, also=tuple(m for m in mi_also if m != mi_method),
                also_ref_size=mi_also_ref_size, dtype=getattr(torch, distance_dtype), columns=columns,
                max_bytes=max_bytes)
        tick("information")
    if {"plane", "connectivity", "landscape"} & set(what):
        bn = list(itertools.islice(splits.train.batches(bs), n_batches))  # BatchNorm re-estimation: unaugmented
    if "landscape" in what:
        from .analysis.landscape import landscape_summary, loss_surface

        surface = loss_surface(model, loss_batches, steps=landscape_steps, span=landscape_span, seed=seed,
                               weights=weights, direction=landscape_direction, bn_batches=bn if landscape_bn else None)
        out["landscape"] = {**surface, "span": landscape_span, "summary": landscape_summary(surface)}
        tick("landscape")
    if "plane" in what or "connectivity" in what:
        model_b = _load_other(other, cfg, dev)
    if "plane" in what:
        model_c = _load_other(third, cfg, dev)
        out["plane"] = {**_plane(model, model_b, model_c, loss_batches, bn, steps=steps, weights=weights, seed=seed),
                        "runs": {"ref": str(run_dir), "a": str(other), "b": str(third)}}
        tick("plane")
    if "connectivity" in what:
        from .analysis.connectivity import interpolation_path, weight_matching

        path = interpolation_path(model, model_b, loss_batches, steps=path_steps, bn_batches=bn)
        # an architecture without permutation rules (or no scipy): the plain path only
        matched = weight_matching(model, model_b, seed=seed) if matchable(model) else None
        matched_path = (interpolation_path(model, matched, loss_batches, steps=path_steps, bn_batches=bn)
                        if matched is not None else None)
        out["connectivity"] = {"other": str(other), "path": path, "matched_path": matched_path,
                               "summary": _barriers(path, matched_path, weights)}
        tick("connectivity")
    return to_jsonable(out)


DTYPES = ("float64", "float32")


def _barriers(path: dict, matched: dict | None, weights: list[float]) -> dict:
    """The loss barrier of every exit and of the weighted total along the plain and the matched path."""
    import torch

    from .analysis.connectivity import loss_barrier

    w = torch.tensor(weights, dtype=torch.float64)
    out = {}
    for name, p in (("plain", path), ("matched", matched)):
        if p is None:
            continue
        total = p["loss"] @ w[p["exits"]]  # (S,)
        out[name] = {"exit_barrier": p["loss_barrier"].tolist(), "total_barrier": float(loss_barrier(total)),
                     "final_exit_barrier": float(p["loss_barrier"][-1]), "total_loss": total.tolist(),
                     "final_accuracy_barrier": float(p["accuracy_barrier"][-1]),
                     "endpoints_total": [float(total[0]), float(total[-1])]}
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def matchable(model: Any) -> bool:
    """Whether weight matching can permute ``model`` (its parts declare their permutations, and scipy is there)."""
    from .analysis.connectivity import permutation_spec

    try:
        import scipy.optimize  # noqa: F401
        permutation_spec(model)
    except (ImportError, ValueError):
        return False
    return True


def _plane(ref: Any, a: Any, b: Any, batches: list, bn: list, *, steps: int, weights: list[float], seed: int) -> dict:
    """``connectivity_plane``, weight-matched where the architecture allows it."""
    from .analysis.plane import connectivity_plane

    return connectivity_plane(ref, a, b, batches, steps=steps, match=matchable(ref), bn_batches=bn, weights=weights,
                              seed=seed)


# --- several runs, and the figures ------------------------------------------------------------------------

def run_labels(results: Sequence[dict]) -> list[str]:
    """One legend label per run: its regime name, or its folder's name where regimes repeat."""
    names = [r.get("regime_name") or r["regime"] for r in results]
    if len(set(names)) == len(names):
        return names
    return [Path(r["run"]).name for r in results]


def analyze_runs(run_dirs: Sequence[str | Path], *, what: Sequence[str], other: str | Path | None = None,
                 third: str | Path | None = None, progress: ProgressFn | None = None, **kwargs: Any) -> list[dict]:
    """``analyze_run`` on every run; the paired analyses (``plane``, ``connectivity``) once, on the first.

    The partners of a paired analysis are ``other`` and ``third``, else the second and third runs given.
    ``progress(done, total, "analyses")`` (``earlyexit.progress``) is told of every analysis finished.
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ConfigError("no run folder given")
    other = other if other is not None else (run_dirs[1] if len(run_dirs) > 1 else None)
    third = third if third is not None else (run_dirs[2] if len(run_dirs) > 2 else None)
    what = tuple(dict.fromkeys(what))
    single = tuple(w for w in what if w not in PAIRED)
    total, done = len(what) + len(single) * (len(run_dirs) - 1), [0]

    def on_done(name: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total, "analyses")

    if progress is not None:
        progress(0, total, "analyses")
    out = [analyze_run(run_dirs[0], what=what, other=other, third=third, on_done=on_done, **kwargs)]
    out += [analyze_run(d, what=single, on_done=on_done, **kwargs) for d in run_dirs[1:]]
    return out


def _gradient_log(run_dir: Path) -> list[dict] | None:
    """The run's ``gradients.jsonl``, kept to the grid point each phase chose (None without a log)."""
    from .training.state import PROBE_LOG
    from .analysis.figures import read_records

    path = run_dir / PROBE_LOG
    if not path.is_file():
        return None
    records = read_records(path)
    chosen: dict[int, float] = {}
    if (run_dir / "results.json").is_file():
        from .results import Results  # read and checked against its schema (a tampered file: one line)

        train = Results.from_json(run_dir).train
        chosen = {int(p["phase"]): p["lr"] for p in (train.phases if train is not None else [])}
    return [r for r in records if r.get("lr") is None or chosen.get(r["phase"], r["lr"]) == r["lr"]]


def short_run(path: str | Path) -> str:
    """A run folder's name without its model and dataset: ``.../resnet20-fashion-mnist-mixed-s0`` -> ``mixed s0``."""
    import re

    name = Path(path).name
    m = re.search(r"-([a-z+]+)-s(\d+)$", name)
    return f"{m.group(1)} s{m.group(2)}" if m else name


def describe(result: dict) -> str:
    """What a run is, for a figure's title: regime, seed, model and dataset."""
    seed = f", seed {result['seed']}" if result.get("seed") is not None else ""
    return f"{result.get('regime_name') or result['regime']} regime{seed} ({result['model']} on {result['dataset']})"


def _common_range(surfaces: Sequence[dict]) -> tuple[float, float] | None:
    """The smallest and largest loss over every panel of several landscapes (one colour scale for all)."""
    import numpy as np

    vals = [np.asarray(s[k], dtype=float) for s in surfaces for k in ("loss", "total") if s.get(k) is not None]
    vals = [v[np.isfinite(v)] for v in vals]
    vals = [v for v in vals if v.size]
    if not vals:
        return None
    lo, hi = min(float(v.min()) for v in vals), max(float(v.max()) for v in vals)
    return (lo, hi) if hi > lo else None


def write_figures(results: Sequence[dict], stem: str | Path, *, echo: Callable[[str], None] = print,
                  plane_range: tuple[float, float] | None = None,
                  landscape_range: tuple[float, float] | None = None) -> list[Path]:
    """Draw the paper's figure of every analysis in ``results`` beside ``stem`` (``STEM-NAME.png``).

    Args:
        results: ``analyze_runs``'s results (one per run; per-layer figures get one line per run).
        stem: path prefix of the figures, e.g. ``runs/x/analysis``.
        echo: where notes go (e.g. no gradient log to draw).
        plane_range: a fixed colour scale ``(vmin, vmax)`` of the plane figure (the same for every plane of a
            study), stated in its caption; None: the plane's own range.
        landscape_range: a fixed colour scale of the landscape figures; None: one scale over all the runs'
            landscapes drawn here (the range of all their panels).
    Returns:
        The figures written.
    """
    from .analysis import figures as fig

    stem = Path(stem)
    labels = run_labels(results)
    many = len(results) > 1
    written: list[Path] = []

    def path(name: str, label: str | None = None) -> Path:
        return stem.with_name(f"{stem.name}-{name}" + (f"-{_slug(label)}" if label and many else "") + ".png")

    first = results[0]
    seeds = sorted({r.get("seed") for r in results if r.get("seed") is not None})
    what = describe(first) if not many else f"{first['model']} on {first['dataset']}" + \
        (f", seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else "")
    if "rank" in first:
        n = first["rank"][0].get("samples") if first["rank"] else None
        written.append(fig.plot_layer_ranks({lab: r["rank"] for lab, r in zip(labels, results)}, path("rank"),
                                            title=f"numerical rank per layer, {what} ({first['split']} split, "
                                                  f"N = {n})"))
    if "information" in first and first["information"] and "mi" in first["information"][0]:
        written.append(fig.plot_layer_information({lab: r["information"] for lab, r in zip(labels, results)},
                                                  path("information"), subject=f"{what}, {first['split']} split"))
    scapes = [r["landscape"] for r in results if "landscape" in r]
    lo_hi = landscape_range or (_common_range(scapes) if len(scapes) > 1 else None)
    for lab, r in zip(labels, results):
        if "gradients" in r:
            log = _gradient_log(Path(r["run"]))
            if log:
                written.append(fig.plot_gradient_cosines(log, path("gradients", lab),
                                                         title=f"gradient cosines over training: {describe(r)}"))
            else:
                echo(f"note: {r['run']} has no gradients.jsonl to draw (train with --grad-log-every N)")
        if "landscape" in r:
            land = r["landscape"]
            written.append(fig.plot_loss_landscape(
                land, path("landscape", lab), vmin=lo_hi[0] if lo_hi else None, vmax=lo_hi[1] if lo_hi else None,
                title=f"loss landscape, {describe(r)}: {land.get('direction', 'gaussian')} filter-normalised "
                      f"directions"))
        if r.get("connectivity"):
            runs = {"a": r["run"], "b": r["connectivity"]["other"]}
            written.append(fig.plot_connectivity_path(
                r["connectivity"], path("connectivity", lab), weights=r.get("weights"),
                title=f"linear path {short_run(runs['a'])} -> {short_run(runs['b'])} ({r['model']} on {r['dataset']}, "
                      f"{r.get('loss_split', 'train')} split, {r.get('num_samples')} samples)"))
    if "plane" in first:
        # each model by the label its run has in the other figures (its regime), else every one by its folder
        label_of = {str(Path(r["run"])): lab for lab, r in zip(labels, results)}
        runs = first["plane"]["runs"]
        if all(str(Path(v)) in label_of for v in runs.values()):
            names = {k: label_of[str(Path(v))] for k, v in runs.items()}
        else:
            names = {k: short_run(v) for k, v in runs.items()}
        written.append(fig.plot_connectivity_plane(
            first["plane"], path("plane"), names=names, vmin=plane_range[0] if plane_range else None,
            vmax=plane_range[1] if plane_range else None,
            title="total loss on the plane through " + ", ".join(names[k] for k in ("ref", "a", "b"))
                  + f"\n{first['model']} on {first['dataset']}, {first.get('loss_split', 'train')} split, "
                  + f"{first.get('num_samples')} samples\n"
                  + (f"{names['a']}, {names['b']} weight-matched onto {names['ref']}; "
                     if first["plane"].get("matched") else "") + "BatchNorm re-estimated"))
    return written


def _slug(text: str) -> str:
    """A file-name part: a phase string spelt with p/m (as run folders are), other characters kept safe."""
    regime = Regime.try_parse(text)
    if regime is not None and regime.phases == text:
        return regime.slug
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
