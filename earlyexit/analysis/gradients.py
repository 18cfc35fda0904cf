"""Gradient dominance: how strongly each exit's loss pulls on each stage of the backbone.

One of the analyses of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models": in joint training the backbone's update is the sum of the
gradients of every exit's loss, ``sum_k alpha_k dL_k/dtheta``; comparing the
size of each term per stage shows which exits dominate the backbone's
updates (e.g. whether the early ICs overwhelm the final classifier in the
early stages).

``exit_gradient_norms`` returns an ``(E, S)`` matrix: entry ``(k, s)`` is the
L2 norm, over all parameters of stage ``s`` (stage 0 includes the stem), of
the gradient of the unweighted cross-entropy ``L_k`` of exit ``k``, computed
on one batch with one forward pass and one ``torch.autograd.grad`` call per
exit (the graph is retained between them). The backbone's own classifier is
not part of any stage. ``gradient_dominance`` turns the norms into each
exit's share of every stage (every non-zero column sums to 1).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tree import to_device
from ..models.multiexit import MultiExitModel


def stage_parameter_groups(model: MultiExitModel) -> list[list[tuple[str, nn.Parameter]]]:
    """Named parameters of each stage; the stem's go with stage 0.

    Args:
        model: the multi-exit model.
    Returns:
        One list of ``(name, parameter)`` per stage.
    """
    groups = [[(f"stages.{i}.{n}", p) for n, p in s.named_parameters()] for i, s in enumerate(model.stages)]
    groups[0] = [(f"stem.{n}", p) for n, p in model.stem.named_parameters()] + groups[0]
    return groups


@contextlib.contextmanager
def kept_grad_state(model: nn.Module, *, buffers: bool) -> Iterator[None]:
    """Restore every parameter's ``requires_grad`` flag (and, with ``buffers``, every buffer: BatchNorm's running
    statistics after a training-mode forward) on leaving, whatever the measurement in between changed."""
    flags = {p: p.requires_grad for p in model.parameters()}
    saved = {n: b.detach().clone() for n, b in model.named_buffers()} if buffers else None
    try:
        yield
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        if saved is not None:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])


def exit_gradient_norms(model: MultiExitModel, x: Any, y: Tensor, *, phase: int | None = None,
                        train_mode: bool = False, respect_trainable: bool = True) -> Tensor:
    """Per-exit, per-stage gradient norms of the exits' losses with respect to the backbone.

    Args:
        model: the multi-exit model (left unchanged: ``requires_grad`` flags,
            training flag and buffers are restored).
        x: an input batch (tensor or pytree), moved to the model's device.
        y: ``(B,)`` class labels.
        phase: measure what training phase 1, 2 or 3 would see: exits whose
            loss does not count in that phase (``train.phase_exits``) get zero
            rows, and the phase's ``requires_grad`` flags (``train.set_trainable``)
            decide which parameters are frozen. None: every exit, the model's own flags.
        train_mode: run in training mode (BatchNorm on batch statistics, as
            during training; running statistics restored afterwards) instead of eval mode.
        respect_trainable: frozen parameters (``requires_grad=False``) receive
            no update, so their gradients count as zero; False measures them anyway.
    Returns:
        ``(E, S)`` float32 tensor on the CPU: row ``k`` the norms of ``dL_k/dtheta_s``
        for each stage ``s``; zero for stages after exit ``k``'s.
    Raises:
        ValueError: on a bad phase or a label batch that does not fit the input.
    """
    from ..training import phase_exits, set_trainable

    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    if phase is not None and phase not in (1, 2, 3):
        raise ValueError(f"phase must be 1, 2 or 3, got {phase}")
    device = next(model.parameters()).device
    y = torch.as_tensor(y).reshape(-1).to(device)
    groups = stage_parameter_groups(model)
    E, S = model.num_exits, len(groups)
    was = model.training
    with kept_grad_state(model, buffers=train_mode):
        try:
            if phase is not None:
                set_trainable(model, phase)
            trainable = {p: p.requires_grad for p in model.parameters()}
            counted = set(phase_exits(model, phase)) if phase is not None else set(range(E))
            # Every backbone parameter must be tracked for autograd to reach it (frozen ones are masked afterwards).
            for p in model.backbone_parameters():
                p.requires_grad_(True)
            model.train(train_mode)
            with torch.enable_grad():
                outs = model(to_device(x, device))
            if outs[0].shape[0] != y.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for a batch of {outs[0].shape[0]} samples")
            params = [p for g in groups for _, p in g]
            owner = [s for s, g in enumerate(groups) for _ in g]
            norms = torch.zeros(E, S, dtype=torch.float64)
            for k, logits in enumerate(outs):
                if k not in counted:
                    continue
                with torch.enable_grad():
                    loss = F.cross_entropy(logits.float(), y)
                grads = torch.autograd.grad(loss, params, retain_graph=k < E - 1, allow_unused=True)
                sq = torch.zeros(S, dtype=torch.float64)
                for p, g, s in zip(params, grads, owner):
                    if g is None or (respect_trainable and not trainable[p]):
                        continue
                    sq[s] += g.detach().double().pow(2).sum().cpu()
                norms[k] = sq.sqrt()
        finally:
            model.train(was)
    return norms.float()


def gradient_dominance(model: MultiExitModel, x: Any, y: Tensor, **kwargs: Any) -> Tensor:
    """Each exit's share of the gradient norm reaching every stage.

    Args:
        model, x, y, **kwargs: as for ``exit_gradient_norms``.
    Returns:
        ``(E, S)`` tensor: ``norms[k, s] / sum_j norms[j, s]``; every column with
        any gradient sums to 1, columns without any stay 0.
    """
    return dominance_from_norms(exit_gradient_norms(model, x, y, **kwargs))


def dominance_from_norms(norms: Tensor) -> Tensor:
    """Normalise an ``(E, S)`` norm matrix over exits (columns sum to 1; all-zero columns stay 0).

    Args:
        norms: ``(E, S)`` non-negative tensor.
    Returns:
        ``(E, S)`` tensor of shares.
    """
    if not isinstance(norms, Tensor) or norms.dim() != 2:
        raise ValueError(f"norms must be an (E, S) tensor, got {getattr(norms, 'shape', type(norms))}")
    total = norms.sum(0, keepdim=True)  # (1, S)
    return torch.where(total > 0, norms / total.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def mean_gradient_norms(model: MultiExitModel, batches: Sequence[tuple[Any, Tensor]], **kwargs: Any) -> Tensor:
    """``exit_gradient_norms`` averaged over several batches (a steadier estimate than one batch).

    Args:
        model: the multi-exit model.
        batches: ``(x, y)`` pairs.
        **kwargs: as for ``exit_gradient_norms``.
    Returns:
        ``(E, S)`` tensor, the mean of the per-batch norms.
    """
    total, n = None, 0
    for x, y in batches:
        g = exit_gradient_norms(model, x, y, **kwargs)
        total = g if total is None else total + g
        n += 1
    if total is None:
        raise ValueError("no batches to analyse")
    return total / n
