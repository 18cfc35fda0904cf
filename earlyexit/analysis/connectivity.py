"""Mode connectivity between two trained multi-exit models, and weight matching.

One of the analyses of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models": are the models that two regimes produce (e.g. a joint
and a mixed run) in the same basin? Along the straight line
``theta(a) = (1 - a) theta_A + a theta_B``, ``a in [0, 1]``, every exit's loss
and accuracy are measured; the loss barrier is the highest loss on the path
minus the mean of the two endpoints' (Frankle et al., 2020). BatchNorm
statistics of an interpolated network are not the interpolation of the
endpoints' statistics, so ``reset_bn`` can recompute them on training batches
at every point.

Hidden units can be permuted without changing a network's function, so two
independently trained networks may sit in the same basin up to a
permutation. ``weight_matching`` implements the weight-matching algorithm of
Ainsworth et al., "Git Re-Basin" (ICLR 2023): it permutes B's hidden units to
make its weights as close to A's as possible (maximising
``sum_l <W_A^l, P_l W_B^l P_{l-1}^T>``), solving one linear assignment problem
per permutation, in random order, until no permutation changes. Which
permutation acts on which axis is declared by the model's parts: the stem,
every stage and every head define ``permutation_axes(rules, prefix, inp)``,
which records the axes of their state-dict entries in ``rules``
(``PermutationRules``) given the permutation of their input, and returns that
of their output (the MLP's layers and the ResNets' stems and blocks do, and
the heads of ``earlyexit.models.heads``). IC heads permute their input
features with the stage they read. A model whose parts are pieces of one
traced graph (``torchvision:NAME``, ``models.from_module``) declares all its
entries itself, from the graph (``models.graphperm``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..models.multiexit import MultiExitModel
from .batchnorm import reset_bn
from .landscape import exit_losses


# --- linear interpolation ---------------------------------------------------------

def _check_same_shapes(sa: dict[str, Tensor], sb: dict[str, Tensor]) -> None:
    if sa.keys() != sb.keys():
        diff = sorted(set(sa) ^ set(sb))
        raise ValueError(f"the two models have different parameters (e.g. {diff[0]})")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise ValueError(f"shape mismatch for {k}: {tuple(sa[k].shape)} vs {tuple(sb[k].shape)}")


def interpolate_state(state_a: dict[str, Tensor], state_b: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * A + alpha * B`` for every floating-point entry; integer entries come from the nearer end.

    ``torch.lerp`` is exact at both ends: ``alpha = 0`` gives A and ``alpha = 1`` gives B, bit for bit.

    Args:
        state_a, state_b: state dicts with the same keys and shapes.
        alpha: the interpolation weight.
    Returns:
        A new state dict on ``state_a``'s devices.
    """
    _check_same_shapes(state_a, state_b)
    out = {}
    for k, a in state_a.items():
        b = state_b[k].to(a.device)
        if a.is_floating_point():
            out[k] = torch.lerp(a.detach(), b.detach().to(a.dtype), float(alpha))
        else:
            out[k] = (a if alpha < 0.5 else b).detach().clone()
    return out


def interpolate(model_a: MultiExitModel, model_b: MultiExitModel, alpha: float) -> MultiExitModel:
    """A copy of ``model_a`` holding the interpolated weights and buffers (see ``interpolate_state``)."""
    out = copy.deepcopy(model_a)
    out.load_state_dict(interpolate_state(model_a.state_dict(), model_b.state_dict(), alpha))
    return out


def loss_barrier(losses: Tensor) -> Tensor:
    """Barrier of a path: the maximum over the path minus the mean of the two endpoints.

    Args:
        losses: ``(S, ...)`` values along the path (first and last: the endpoints).
    Returns:
        ``(...)`` barrier per trailing index (0 for a flat path, > 0 for a bump).
    """
    if not isinstance(losses, Tensor) or losses.dim() < 1 or losses.shape[0] < 2:
        raise ValueError("losses must hold at least the two endpoints along dim 0")
    return losses.amax(0) - 0.5 * (losses[0] + losses[-1])


def interpolation_path(model_a: MultiExitModel, model_b: MultiExitModel, batches: Iterable[Any], *, steps: int = 11,
                       bn_batches: Iterable[Any] | None = None, bn_num_batches: int | None = None,
                       exits: Sequence[int] | None = None) -> dict:
    """Every exit's loss and accuracy along the straight line from A's weights to B's.

    Args:
        model_a, model_b: two models of the same architecture (left unchanged).
        batches: ``(x, y)`` pairs to evaluate on, iterated once per point (a
            one-shot iterator is materialised first).
        steps: number of evenly spaced ``alpha`` values in ``[0, 1]``, ends included.
        bn_batches: training batches on which BatchNorm statistics are
            recomputed at every point (``reset_bn``), endpoints included; None
            keeps the interpolated running statistics (the endpoints then
            reproduce the two models exactly).
        bn_num_batches: use at most this many of ``bn_batches``.
        exits: exits to measure; None = all.
    Returns:
        ``{"alphas": [S], "exits": [E'], "loss": (S, E'), "accuracy": (S, E'),
        "loss_barrier": (E',), "accuracy_barrier": (E',), "bn_reset": bool}`` (tensors float64 on
        the CPU; the accuracy barrier is the mean endpoint accuracy minus the lowest on the path).
    Raises:
        ValueError: on fewer than two steps or models that do not match.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two endpoints), got {steps}")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    _check_same_shapes(sa, sb)
    batches = batches if isinstance(batches, (list, tuple)) else list(batches)
    bn = None
    if bn_batches is not None:
        bn = list(itertools.islice(bn_batches, bn_num_batches))
    E = model_a.num_exits
    wanted = list(range(E)) if exits is None else sorted({k % E for k in exits})
    alphas = [i / (steps - 1) for i in range(steps)]
    work = copy.deepcopy(model_a)
    loss = torch.zeros(steps, len(wanted), dtype=torch.float64)
    acc = torch.zeros(steps, len(wanted), dtype=torch.float64)
    for i, a in enumerate(alphas):
        work.load_state_dict(interpolate_state(sa, sb, a))
        if bn is not None:
            reset_bn(work, bn)
        loss[i], acc[i] = exit_losses(work, batches, exits=wanted)
    return {"alphas": alphas, "exits": wanted, "loss": loss, "accuracy": acc, "loss_barrier": loss_barrier(loss),
            "accuracy_barrier": loss_barrier(-acc), "bn_reset": bn is not None}


# --- weight matching ------------------------------------------------------------------

@dataclass
class PermutationSpec:
    """Which permutation acts on which axis of every state-dict entry.

    Attributes:
        sizes: permutation name -> number of units it permutes.
        axes: state-dict key -> one permutation name (or None) per axis of the
            entry, as viewed through ``views``.
        views: keys whose tensor is reshaped before permuting (an SDN head's
            ``(K, C*h*w)`` weight is seen as ``(K, C, h*w)``).
    """

    sizes: dict[str, int]
    axes: dict[str, tuple[str | None, ...]]
    views: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def view(self, key: str, t: Tensor) -> Tensor:
        return t.reshape(self.views[key]) if key in self.views else t


class PermutationRules:
    """What the parts of a model fill in through their ``permutation_axes``: permutations and the axes they act on.

    Attributes:
        sizes, axes, views: as in ``PermutationSpec``.
        stage: index of the stage being declared (None for the stem and the heads).
    """

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.axes: dict[str, tuple[str | None, ...]] = {}
        self.views: dict[str, tuple[int, ...]] = {}
        self.stage: int | None = None
        self._counts: dict[str, int] = {}

    def new(self, name: str, size: int) -> str:
        """A permutation ``name`` of ``size`` units."""
        if name in self.sizes:
            raise ValueError(f"permutation {name!r} is declared twice")
        self.sizes[name] = int(size)
        return name

    def fresh(self, base: str, size: int) -> str:
        """A new permutation named ``base`` and a running number (``stream0``, ``stream1``, ...)."""
        n = self._counts.get(base, 0)
        self._counts[base] = n + 1
        return self.new(f"{base}{n}", size)

    def norm(self, prefix: str, perm: str) -> None:
        """A normalisation layer's entries (affine parameters, running statistics) move with ``perm``."""
        for s in ("weight", "bias", "running_mean", "running_var"):
            self.axes[f"{prefix}.{s}"] = (perm,)
        self.axes[f"{prefix}.num_batches_tracked"] = ()


def permutation_spec(model: MultiExitModel) -> PermutationSpec:
    """The permutation symmetries of a multi-exit model, as its parts declare them (see the module docstring).

    Args:
        model: a model whose stem, stages and heads define ``permutation_axes`` (the MLP, the ResNets), or that
            defines ``permutation_axes(rules, "", None)`` itself for all its entries (a traced model,
            ``models.graphperm``).
    Returns:
        A ``PermutationSpec`` covering every state-dict entry.
    Raises:
        ValueError: for other architectures or unknown head types.
    """
    if hasattr(model, "permutation_axes"):  # a model that declares all its parts at once (a traced graph)
        rules = PermutationRules()
        model.permutation_axes(rules, "", None)
        return _checked_spec(model, rules)
    parts = [model.stem, *model.stages]
    lacking = next((m for m in parts if not hasattr(m, "permutation_axes")), None)
    if lacking is not None:
        name = getattr(model, "arch", type(model).__name__)
        raise ValueError(f"weight matching supports the MLP and ResNet models and others whose stem and stages "
                         f"declare permutation_axes, not {name!r} ({type(lacking).__name__} declares none)")
    rules = PermutationRules()
    perm = model.stem.permutation_axes(rules, "stem.", None)
    stage_perm: list[str] = []  # permutation of each stage's output
    for i, s in enumerate(model.stages):
        rules.stage = i
        perm = s.permutation_axes(rules, f"stages.{i}.", perm)
        stage_perm.append(perm)
    rules.stage = None
    for k, h in enumerate(model.heads):
        if not hasattr(h, "permutation_axes"):
            raise ValueError(f"weight matching does not know the head type {type(h).__name__} (exit {k})")
        h.permutation_axes(rules, f"heads.{k}.", stage_perm[model.exit_after[k]])
    return _checked_spec(model, rules)


def _checked_spec(model: MultiExitModel, rules: PermutationRules) -> PermutationSpec:
    missing = [key for key in model.state_dict() if key not in rules.axes]
    if missing:
        raise ValueError(f"weight matching has no permutation rule for {missing[0]}")
    return PermutationSpec(sizes=rules.sizes, axes=rules.axes, views=rules.views)


def _permute(t: Tensor, axes: tuple[str | None, ...], perms: dict[str, Tensor], skip: int | None = None) -> Tensor:
    """Gather ``t`` along every permuted axis (except ``skip``): ``out[..., i, ...] = t[..., perm[i], ...]``."""
    for ax, name in enumerate(axes):
        if name is not None and ax != skip:
            t = t.index_select(ax, perms[name].to(t.device))
    return t


def apply_permutation(model: MultiExitModel, spec: PermutationSpec, perms: dict[str, Tensor]) -> MultiExitModel:
    """A copy of ``model`` with its units permuted: the same function, other weights.

    Args:
        model: the model to permute (left unchanged).
        spec: its ``permutation_spec``.
        perms: permutation name -> ``(n,)`` long tensor; unit ``i`` of the copy is unit ``perm[i]`` of ``model``.
    Returns:
        The permuted copy.
    """
    out = copy.deepcopy(model)
    sd = {}
    for k, v in model.state_dict().items():
        sd[k] = _permute(spec.view(k, v), spec.axes[k], perms).reshape(v.shape).clone()
    out.load_state_dict(sd)
    return out


def weight_matching(model_a: MultiExitModel, model_b: MultiExitModel, *, seed: int = 0, max_iter: int = 100,
                    return_permutations: bool = False) -> Any:
    """Permute ``model_b``'s hidden units to match ``model_a``'s weights (Git Re-Basin weight matching).

    For each permutation ``P`` in turn (random order, seeded), with the others
    fixed, the objective is linear in ``P``: ``sum_{(W, axis) using P}
    <W_A, W_B permuted>``; it is maximised exactly by ``scipy.optimize.linear_sum_assignment``
    on the ``(n, n)`` matrix of unit similarities. Sweeps repeat until no
    permutation improves (or ``max_iter`` sweeps). All parameters, IC heads
    included, enter the objective; buffers (BatchNorm statistics) are permuted
    along.

    Args:
        model_a: the reference model.
        model_b: the model to permute (same architecture; left unchanged).
        seed: seed of the order in which permutations are visited.
        max_iter: maximum number of sweeps.
        return_permutations: also return the permutations.
    Returns:
        The permuted copy of ``model_b`` (computing the same function), or
        ``(copy, perms)`` with ``return_permutations``.
    Raises:
        ImportError: without scipy.
        ValueError: for unsupported or mismatched models.
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("weight matching needs scipy: pip install scipy") from None
    spec = permutation_spec(model_a)
    spec_b = permutation_spec(model_b)
    if spec_b.axes != spec.axes or spec_b.sizes != spec.sizes:
        raise ValueError("the two models do not have the same architecture")
    _check_same_shapes(model_a.state_dict(), model_b.state_dict())
    params = [n for n, _ in model_a.named_parameters()]
    wa = {n: spec.view(n, p.detach().to("cpu", torch.float64)) for n, p in model_a.named_parameters()}
    wb = {n: spec.view(n, p.detach().to("cpu", torch.float64)) for n, p in model_b.named_parameters()}
    uses: dict[str, list[tuple[str, int]]] = {p: [] for p in spec.sizes}
    for n in params:
        for ax, name in enumerate(spec.axes[n]):
            if name is not None:
                uses[name].append((n, ax))
    names = sorted(spec.sizes)
    perms = {p: torch.arange(spec.sizes[p]) for p in names}
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for idx in torch.randperm(len(names), generator=g).tolist():
            p = names[idx]
            n = spec.sizes[p]
            sim = torch.zeros(n, n, dtype=torch.float64)  # (n, n): similarity of A's unit i and B's unit j
            for key, ax in uses[p]:
                a = wa[key].movedim(ax, 0).reshape(n, -1)  # (n, rest)
                b = _permute(wb[key], spec.axes[key], perms, skip=ax).movedim(ax, 0).reshape(n, -1)  # (n, rest)
                sim += a @ b.T
            _, cols = linear_sum_assignment(sim.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            rows = torch.arange(n)
            old_score, new_score = float(sim[rows, perms[p]].sum()), float(sim[rows, new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[p] = new
                changed = True
        if not changed:
            break
    out = apply_permutation(model_b, spec, perms)
    return (out, perms) if return_permutations else out
