"""Analyses of trained multi-exit models, after "Joint or Disjoint: Mixing
Training Regimes for Early-Exit Models".

The paper compares the training regimes through what they do to the
backbone; each analysis here is a small function over a ``MultiExitModel``
and batches of ``(x, y)``:

- ``rank``: numerical (and effective) rank of the representation after each exit's stage;
- ``gradients``: the norm of each exit's loss gradient on each backbone stage
  (which exits dominate the backbone's updates);
- ``information``: mutual information ``I(T; Y)`` and ``I(X; T)`` of each exit's
  representation (kNN or binning estimators);
- ``connectivity``: loss and accuracy along the linear path between two models,
  the loss barrier, BatchNorm re-estimation, Git Re-Basin weight matching;
- ``landscape``: 1-D / 2-D loss slices along filter-normalised random directions.

The paper's figures, each by its own definition:

- ``layer_rank.layer_ranks`` (Figure 3): numerical rank of every backbone
  Conv2d / Linear output over a whole split, streamed through Gram matrices;
- ``cosines.gradient_cosines`` (Figure 4): cosine between each exit's backbone
  gradient and the total gradient;
- ``noisy_information.mi_xz`` / ``layer_information`` (Figure 5): ``I(X; Z)`` of
  every backbone layer with Gaussian noise (Jensen or Monte Carlo);
- ``plane.connectivity_plane`` (Figure 2): the loss on the plane through three
  weight-matched models, BatchNorm re-estimated at every point;
- ``figures``: the drawings of all of them and of the loss landscapes.

``analyze_run`` runs the chosen analyses on a finished run folder and returns
JSON-ready results. scipy (weight matching only) is imported when needed.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence


from ..tree import to_jsonable

from .connectivity import (PermutationSpec, apply_permutation, interpolate, interpolate_state, interpolation_path,
                           loss_barrier, permutation_spec, reset_bn, weight_matching)
from .gradients import (dominance_from_norms, exit_gradient_norms, gradient_dominance, mean_gradient_norms,
                        stage_parameter_groups)
from .information import binned_entropy, label_entropy, mutual_information, random_projection, stage_information
from .landscape import exit_losses, filter_normalized_direction, loss_surface
from .rank import effective_rank, numerical_rank, stage_features, stage_ranks, state_features
from .cosines import gradient_cosine_record, gradient_cosines, shared_parameters
from .figures import (plot_connectivity_plane, plot_gradient_cosines, plot_layer_information, plot_layer_ranks,
                      plot_loss_landscape, read_records)
from .landscape import random_direction
from .layer_rank import layer_ranks, rank_from_gram
from .layers import backbone_layers, feature_subset
from .noisy_information import layer_information, mi_xz
from .plane import connectivity_plane, plane_basis

ANALYSES = ("rank", "gradients", "information", "landscape", "connectivity")
SPLITS = ("train", "val", "test")


def analyze_run(run_dir: str | Path, *, what: Sequence[str] = ("rank", "gradients", "information"),
                max_samples: int = 512, split: str = "test", other: str | Path | None = None,
                device: str | None = None, batch_size: int = 256, seed: int = 0, mi_method: str = "knn",
                landscape_steps: int | Sequence[int] = (11, 11), landscape_span: float = 1.0,
                path_steps: int = 11) -> dict:
    """Run analyses on a finished run folder.

    Args:
        run_dir: a run folder (``config.json`` and the final weights).
        what: any of ``"rank"``, ``"gradients"``, ``"information"``, ``"landscape"``,
            ``"connectivity"`` (the last needs ``other``).
        max_samples: samples used by each analysis (the gradients: one batch of that many training samples).
        split: the split that rank, information, landscape and connectivity are measured on.
        other: a second run folder of the same architecture, for ``"connectivity"``.
        device: ``"cpu"``, ``"cuda"``, ...; None = CUDA when available.
        batch_size: evaluation batch size.
        seed: seed of the gradient batch, projections and directions.
        mi_method: ``"knn"`` or ``"binning"`` (see ``information``).
        landscape_steps, landscape_span: grid of ``"landscape"`` (see ``loss_surface``).
        path_steps: points on the interpolation path of ``"connectivity"``.
    Returns:
        A JSON-ready dict: ``run``, ``model``, ``dataset``, ``regime``, ``exit_after``,
        ``split``, ``num_samples`` and one entry per analysis:

        - ``rank``: ``{numerical: [E], effective: [E], dims: [E]}``;
        - ``gradients``: ``{norms: (E, S), dominance: (E, S)}``;
        - ``information``: ``[{exit, stage, I_TY, I_XT, H_Y}]`` (nats);
        - ``landscape``: ``{alphas, betas, exits, loss: (E, S1, S2), accuracy}``;
        - ``connectivity``: ``{other, path: {...}, matched_path: {...} or None}``
          (``matched_path``: after Git Re-Basin weight matching of the other run
          onto this one, for MLP and ResNet models).
    Raises:
        ValueError: on unknown analyses or split, or ``"connectivity"`` without ``other``.
    """
    from ..config import parse_regime
    from ..runs import load_data, load_run

    what = tuple(what)
    bad = [w for w in what if w not in ANALYSES]
    if bad:
        raise ValueError(f"unknown analysis {bad[0]!r}; valid: {', '.join(ANALYSES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if "connectivity" in what and other is None:
        raise ValueError("the connectivity analysis needs a second run folder (other=...)")
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    from ..device import local_device

    dev = local_device(device)
    model, cfg = load_run(run_dir, device=dev)
    splits = load_data(cfg)
    data = getattr(splits, split)
    bs = min(batch_size, max_samples)
    batches = list(itertools.islice(data.batches(bs), math.ceil(max_samples / bs)))
    n = sum(len(y) for _, y in batches)
    out: dict[str, Any] = {"run": str(run_dir), "model": cfg.model.name, "dataset": cfg.data.name,
                           "regime": parse_regime(cfg.train.regime), "exit_after": list(model.exit_after),
                           "split": split, "num_samples": min(n, max_samples)}
    if "rank" in what:
        feats = stage_features(model, batches, max_samples=max_samples)["features"]
        out["rank"] = {"numerical": [numerical_rank(f) for f in feats], "effective": [effective_rank(f) for f in feats],
                       "dims": [f.shape[1] for f in feats]}
    if "gradients" in what:
        x, y = next(iter(splits.train.batches(max_samples, shuffle=True, seed=seed)))
        norms = exit_gradient_norms(model, x, y)
        out["gradients"] = {"norms": norms, "dominance": dominance_from_norms(norms)}
    if "information" in what:
        out["information"] = stage_information(model, batches, method=mi_method, max_samples=max_samples, seed=seed)
    if "landscape" in what:
        out["landscape"] = loss_surface(model, batches, steps=landscape_steps, span=landscape_span, seed=seed)
    if "connectivity" in what:
        model_b, cfg_b = load_run(other, device=dev)
        if cfg_b.model.name != cfg.model.name:
            raise ValueError(f"cannot connect a {cfg.model.name} run with a {cfg_b.model.name} run")
        bn = list(itertools.islice(splits.train.batches(bs), math.ceil(max_samples / bs)))
        path = interpolation_path(model, model_b, batches, steps=path_steps, bn_batches=bn)
        try:
            matched = weight_matching(model, model_b, seed=seed)
        except ValueError:
            matched = None  # an architecture without a permutation rule: the plain path only
        matched_path = (interpolation_path(model, matched, batches, steps=path_steps, bn_batches=bn)
                        if matched is not None else None)
        out["connectivity"] = {"other": str(other), "path": path, "matched_path": matched_path}
    return to_jsonable(out)


__all__ = [
    "analyze_run", "to_jsonable", "ANALYSES",
    "numerical_rank", "effective_rank", "stage_ranks", "stage_features", "state_features",
    "exit_gradient_norms", "gradient_dominance", "dominance_from_norms", "mean_gradient_norms", "stage_parameter_groups",
    "mutual_information", "stage_information", "binned_entropy", "label_entropy", "random_projection",
    "reset_bn", "interpolate", "interpolate_state", "interpolation_path", "loss_barrier", "weight_matching",
    "permutation_spec", "apply_permutation", "PermutationSpec",
    "loss_surface", "exit_losses", "filter_normalized_direction",
    "gradient_cosines", "gradient_cosine_record", "shared_parameters",
    "layer_ranks", "rank_from_gram", "backbone_layers", "feature_subset",
    "mi_xz", "layer_information",
    "connectivity_plane", "plane_basis", "random_direction",
    "plot_layer_ranks", "plot_gradient_cosines", "plot_layer_information", "plot_connectivity_plane",
    "plot_loss_landscape", "read_records",
]
