"""The training step: the one function that trains on a batch, used by the loop and by the benchmark.

``train_step`` sets the scheduled learning rate, runs the forward pass on the
phase's counted exits (under bf16 autocast on CUDA), sums their losses with
the phase's weights, checks the loss for non-finite values, back-propagates,
clips the gradient norm when asked, steps the optimizer and adds the batch to
the epoch's running sums. The finiteness check is a host sync on CUDA, so
there it looks every ``CUDA_CHECK_EVERY`` steps of an epoch (the loop checks
the epoch's summed loss at its end as well); on the CPU it looks every step.

Running sums stay on the device in float64: the loss times the batch size,
and the correct predictions of each counted exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PhaseConfig
from ..device import autocast_context as autocast
from .optim import lr_at
from .phases import phase_loss_weights
from ..weighting import TrainingPoint, Weighting

CUDA_CHECK_EVERY = 25  # steps between two finiteness checks of the loss on CUDA


@dataclass
class RunningSums:
    """An epoch's running sums, on the device."""
    loss: Tensor      # () float64: sum over batches of loss * batch size
    correct: Tensor   # (len(exits),) float64: correct predictions of each counted exit
    seen: int = 0     # samples seen

    @classmethod
    def zeros(cls, num_exits: int, device: torch.device) -> RunningSums:
        return cls(loss=torch.zeros((), dtype=torch.float64, device=device),
                   correct=torch.zeros(num_exits, dtype=torch.float64, device=device))


@dataclass
class StepSetup:
    """What stays fixed over the steps of one epoch of one phase."""
    net: nn.Module                   # the model, or its DistributedDataParallel wrapper
    num_exits: int                   # the model's exits, the length of the weighting's list
    phase: int                       # 1, 2 or 3 (earlyexit.training.phases)
    exits: list[int]                 # the exits whose losses count
    weighting: Weighting
    opt: torch.optim.Optimizer
    params: Sequence[nn.Parameter]   # the trainable parameters (gradient clipping)
    pc: PhaseConfig                  # schedule of the phase
    lr: float                        # base learning rate of the grid point
    total: int                       # steps of the phase (pc.epochs epochs): the schedule's length, the weighting's progress
    device: torch.device
    grad_clip: float | None          # max global gradient norm; None: off
    on_non_finite: Callable[[Tensor, int], NoReturn]  # raises, given the loss and the step index in the epoch


def train_step(setup: StepSetup, x: Any, y: Tensor, *, step: int, index: int, sums: RunningSums) -> Tensor:
    """Train on one batch.

    Args:
        setup: the epoch's fixed parts.
        x: the input batch (tensor or pytree), on ``setup.device``.
        y: ``(B,)`` labels, on ``setup.device``.
        step: the step's index in the phase (schedule, and the weighting's progress and epoch).
        index: the step's index in the epoch (when CUDA checks the loss).
        sums: the epoch's running sums, updated in place.
    Returns:
        The weighted loss, a 0-dim tensor on the device (not read back to the host).
    """
    s = setup
    for g in s.opt.param_groups:
        g["lr"] = lr_at(s.pc, s.lr, step, s.total)
    alphas = step_weights(s, step)
    with autocast(s.device):
        outs = s.net(x, exits=s.exits)  # one (B, C) per counted exit
        losses = [F.cross_entropy(o.float(), y) for o in outs]
        loss = sum(a * l for a, l in zip(alphas, losses))
    if (s.device.type != "cuda" or index % CUDA_CHECK_EVERY == 0) and not torch.isfinite(loss):
        s.on_non_finite(loss, index)
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.grad_clip:
        torch.nn.utils.clip_grad_norm_(s.params, s.grad_clip)
    s.opt.step()
    with torch.no_grad():
        sums.loss += loss.detach().double() * y.numel()
        for i, o in enumerate(outs):
            sums.correct[i] += (o.argmax(-1) == y).sum()
    sums.seen += y.numel()
    return loss


def step_weights(setup: StepSetup, step: int) -> list[float]:
    """The weights step ``step`` of the phase gives the counted exits' losses (one per ``setup.exits``): what
    ``train_step`` trains with and what the gradient log reports, from this one function."""
    return phase_loss_weights(setup.phase, setup.weighting, setup.num_exits, setup.exits, training_point(setup, step))


def training_point(setup: StepSetup, step: int) -> TrainingPoint:
    """Where step ``step`` of the phase stands: its epoch (``total`` covers ``pc.epochs`` epochs) and progress."""
    epochs = max(setup.pc.epochs, 1)
    per_epoch = max(setup.total // epochs, 1)
    return TrainingPoint(phase=setup.phase, epoch=min(step // per_epoch, epochs - 1), epochs=setup.pc.epochs,
                         progress=min(step / max(setup.total, 1), 1.0))


__all__ = ["CUDA_CHECK_EVERY", "RunningSums", "StepSetup", "step_weights", "train_step", "training_point"]
