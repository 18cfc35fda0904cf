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
- ``landscape``: 1-D / 2-D loss slices along filter-normalised random directions,
  BatchNorm optionally re-estimated at every point (``batchnorm.reset_bn``), and
  their summary numbers (``landscape_summary``).

The paper's figures, each by its own definition:

- ``layer_rank.layer_ranks`` (Figure 3): numerical rank of every backbone
  Conv2d / Linear output over a whole split, streamed through Gram matrices
  (the authors' covariance rank, with the tolerance and saturation stated);
- ``cosines.gradient_cosines`` (Figure 4): cosine between each exit's backbone
  gradient and the total gradient;
- ``noisy_information.mi_xz`` / ``layer_information`` (Figure 5): ``I(X; Z)`` of
  every backbone layer with Gaussian noise (the Jensen / Kolchinsky-Tracey upper
  bound, the Bhattacharyya lower bound, Monte Carlo), the noise scaled per layer;
- ``plane.connectivity_plane`` (Figure 2): the loss on the plane through three
  weight-matched models, BatchNorm re-estimated at every point;
- ``figures``: the drawings of all of them and of the loss landscapes.

``earlyexit.analyze`` runs the chosen analyses on finished run folders
(``analyze_run``, the table of names, ``write_figures``): it reads the runs, so
it sits above this package, which never imports the run code. scipy (weight
matching only) is imported when needed.
"""

from __future__ import annotations

from ..tree import to_jsonable

from .connectivity import (PermutationSpec, apply_permutation, interpolate, interpolate_state, interpolation_path,
                           loss_barrier, permutation_spec, reset_bn, weight_matching)
from .gradients import (dominance_from_norms, exit_gradient_norms, gradient_dominance, mean_gradient_norms,
                        stage_parameter_groups)
from .information import binned_entropy, label_entropy, mutual_information, random_projection, stage_information
from .batchnorm import bn_modules
from .landscape import exit_losses, filter_normalized_direction, landscape_summary, loss_surface
from .rank import effective_rank, numerical_rank, stage_features, stage_ranks, state_features
from .cosines import gradient_cosine_record, gradient_cosines, shared_parameters
from .figures import (plot_connectivity_path, plot_connectivity_plane, plot_gradient_cosines, plot_layer_information,
                      plot_layer_ranks, plot_loss_landscape, read_records)
from .landscape import random_direction
from .layer_rank import layer_ranks, rank_from_covariance, rank_from_gram
from .layers import backbone_layers, feature_subset
from .noisy_information import feature_scale, layer_information, mi_xz, pairwise_bounds
from .plane import connectivity_plane, plane_basis

__all__ = [
    "to_jsonable",
    "numerical_rank", "effective_rank", "stage_ranks", "stage_features", "state_features",
    "exit_gradient_norms", "gradient_dominance", "dominance_from_norms", "mean_gradient_norms", "stage_parameter_groups",
    "mutual_information", "stage_information", "binned_entropy", "label_entropy", "random_projection",
    "reset_bn", "bn_modules", "interpolate", "interpolate_state", "interpolation_path", "loss_barrier",
    "weight_matching",
    "permutation_spec", "apply_permutation", "PermutationSpec",
    "loss_surface", "exit_losses", "filter_normalized_direction", "landscape_summary",
    "gradient_cosines", "gradient_cosine_record", "shared_parameters",
    "layer_ranks", "rank_from_gram", "rank_from_covariance", "backbone_layers", "feature_subset",
    "mi_xz", "layer_information", "pairwise_bounds", "feature_scale",
    "connectivity_plane", "plane_basis", "random_direction",
    "plot_layer_ranks", "plot_gradient_cosines", "plot_layer_information", "plot_connectivity_plane",
    "plot_loss_landscape", "plot_connectivity_path", "read_records",
]
