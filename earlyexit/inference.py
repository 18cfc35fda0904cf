"""Batched early-exit inference that really skips work (its wall-clock benchmark: ``earlyexit.bench.inference``).

Follows the inference rule of "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models": a sample leaves at the first exit whose criterion fires
(``confidence``: max softmax > t, strictly, so t = 1.0 keeps every sample to
the last exit; ``entropy``: softmax entropy in nats <= t; ``patience``: the
same arg-max at ``p`` consecutive exits, ``p = 0`` never firing; all as in
``earlyexit.metrics.criteria``), and at the last exit otherwise.

``predict`` runs the model stage by stage. After each exit the samples that
left are dropped from the state (``slice_state``, tensors and pytrees alike),
so the deeper stages run only on the samples still in flight. The criteria
are computed with the same formulas as ``earlyexit.metrics`` (float32
log-sum-exp for the confidence, float32 softmax entropy, compared in float64),
so on the same logits the decisions equal ``metrics.exit_decisions`` exactly.
The logits themselves come from smaller batches than an offline ``model(x)``
and may differ from it by float rounding (~1e-7 on CPU), which can flip a
decision only for a score within that distance of the threshold.

Exits that need more than the state: a model may define
``exit_step(k, state, memory) -> (logits, memory)``, where ``memory`` is a
per-sample pytree (``None`` before the first exit) carried from exit to exit,
such as the previous IC's logits of a cascade (Zero Time Waste) or the past
states of Global Past-Future. ``run_exit`` calls it when present and
``model.head(k, state)`` otherwise; the memory is sliced with the state.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .device import autocast_context, model_device
from .metrics import CRITERIA, exit_scores
from .models import MultiExitModel
from .tree import slice_state, state_batch_size, to_device


def run_exit(model: MultiExitModel, k: int, state: Any, memory: Any) -> tuple[Tensor, Any]:
    """Logits of exit ``k`` and the memory passed on to the next exit.

    Args:
        model: the multi-exit model.
        k: exit index.
        state: the state after stage ``model.exit_after[k]``.
        memory: what the previous exits left (``None`` before the first one).
    Returns:
        ``(logits (B, C), memory)``; models without ``exit_step`` pass ``memory`` through.
    """
    step = getattr(model, "exit_step", None)
    if step is None:
        return model.head(k, state), memory
    return step(k, state, memory)


def _check_criterion(criterion: str, threshold: float) -> float:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    if criterion == "patience" and (threshold < 0 or threshold != int(threshold)):
        raise ValueError(f"the patience must be an integer >= 0 (0: never leave early), got {threshold}")
    return float(threshold)


def _fires(logits: Tensor, criterion: str, threshold: float) -> Tensor:
    """(B,) bool for the confidence (``> t``, strict) and entropy (``<= t``) criteria, scored by
    ``metrics.exit_scores`` and compared as offline (``metrics.criteria``)."""
    score = exit_scores(logits[None], criterion)[0]  # (B,)
    return score > threshold if criterion == "confidence" else score <= threshold


@torch.inference_mode()
def _predict(model: MultiExitModel, x: Any, criterion: str, threshold: float, device: torch.device) -> tuple[Tensor, Tensor]:
    E = model.num_exits
    n = state_batch_size(x)
    if n <= 0:
        raise ValueError("the input holds no tensor with a non-empty batch dimension")
    preds = torch.zeros(n, dtype=torch.long, device=device)  # (N,)
    exits = torch.full((n,), E - 1, dtype=torch.long, device=device)  # (N,)
    alive = torch.arange(n, device=device)  # (B,) original indices of the samples still in flight
    run = prev = None  # patience: (B,) length of the current run of equal predictions, (B,) last prediction
    state, memory = x, None
    k = 0
    for i in range(len(model.stages)):
        state = model.stage(i, state)
        while k < E and model.exit_after[k] == i:
            logits, memory = run_exit(model, k, state, memory)
            logits = logits.float()  # (B, C)
            pred = logits.argmax(-1)  # (B,)
            if k == E - 1:
                preds[alive] = pred
                return preds, exits
            if criterion == "patience":
                run = torch.ones_like(pred) if run is None else torch.where(pred == prev, run + 1, 1)  # (B,)
                fire = run >= threshold if threshold > 0 else torch.zeros_like(pred, dtype=torch.bool)  # p = 0: never
            else:
                fire = _fires(logits, criterion, threshold)  # (B,)
            left = alive[fire]
            preds[left] = pred[fire]
            exits[left] = k
            keep = (~fire).nonzero().squeeze(1)  # (B',)
            if keep.numel() == 0:
                return preds, exits
            if keep.numel() < alive.numel():
                alive, state, memory = alive[keep], slice_state(state, keep), slice_state(memory, keep)
                if run is not None:
                    run = run[keep]
                pred = pred[keep]
            prev = pred
            k += 1
    raise ValueError(f"the model's exits {model.exit_after} do not end at its last stage")


def predict(model: MultiExitModel, x: Any, *, criterion: str = "confidence", threshold: float) -> tuple[Tensor, Tensor]:
    """Early-exit predictions of one batch, each sample running only as deep as its exit.

    Runs in eval mode under ``torch.inference_mode`` (the training flag is
    restored), with bf16 autocast on CUDA as ``metrics.evaluate`` does.

    Args:
        model: the multi-exit model (its device is used; ``x`` is moved there).
        x: an input batch, a tensor or a pytree such as a dict of tensors.
        criterion: ``"confidence"``, ``"entropy"`` or ``"patience"``.
        threshold: ``t`` of the criterion (confidence: leave if ``> t``; entropy: leave if ``<= t``), or
            the patience ``p >= 0`` for ``"patience"`` (0: nobody leaves early).
    Returns:
        ``(predictions, exit_indices)``: two ``(N,)`` long tensors on the model's device.
    """
    if not isinstance(model, MultiExitModel):
        raise TypeError(f"expected a MultiExitModel, got {type(model).__name__}")
    t = _check_criterion(criterion, threshold)
    device = model_device(model)
    was_training = model.training
    if was_training:  # switching modes walks every module: only when needed (it costs ~1 ms at batch 1)
        model.eval()
    try:
        with autocast_context(device):
            return _predict(model, to_device(x, device), criterion, t, device)
    finally:
        if was_training:
            model.train()


def predict_batches(model: MultiExitModel, batches: Iterable[Any], *, criterion: str = "confidence",
                    threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """``predict`` over ``(x, y)`` batches, concatenated on the CPU.

    Args:
        model: the multi-exit model.
        batches: an iterable of ``(x, y)`` pairs (as for ``metrics.evaluate``).
        criterion, threshold: as for ``predict``.
    Returns:
        ``(predictions, exit_indices, labels)``: three ``(N,)`` tensors on the CPU.
    """
    preds, exits, labels = [], [], []
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("each batch must be an (x, y) pair")
        x, y = batch
        p, e = predict(model, x, criterion=criterion, threshold=threshold)
        preds.append(p.cpu())
        exits.append(e.cpu())
        labels.append(torch.as_tensor(y).reshape(-1).cpu())  # (B,)
    if not preds:
        raise ValueError("no batches to predict")
    return torch.cat(preds), torch.cat(exits), torch.cat(labels)


def fuse_batchnorm(model: MultiExitModel) -> MultiExitModel:
    """A copy of ``model`` for inference with every BatchNorm folded into the convolution before it.

    Folds the ``(conv, BatchNorm)`` pairs the model declares (``model.conv_bn_pairs()``: the ResNet
    stems, blocks and shortcuts, the MSDNet convolutions); the folded BatchNorms become
    ``nn.Identity``. BatchNorm is memory-bound and uncounted by FLOPs, so folding it makes wall-clock
    time follow FLOPs more closely. The copy is in eval mode and meant for inference only (its
    outputs equal the original's in eval mode up to float rounding); the original is untouched.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for conv_name, bn_name in fused.conv_bn_pairs():
        conv_parent, _, conv_child = conv_name.rpartition(".")
        bn_parent, _, bn_child = bn_name.rpartition(".")
        cp, bp = fused.get_submodule(conv_parent), fused.get_submodule(bn_parent)
        setattr(cp, conv_child, fuse_conv_bn_eval(getattr(cp, conv_child), getattr(bp, bn_child)))
        setattr(bp, bn_child, nn.Identity())
    return fused


__all__ = ["run_exit", "predict", "predict_batches", "fuse_batchnorm"]
