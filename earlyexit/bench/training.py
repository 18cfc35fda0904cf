"""Training-step timing: phases 1-3 stepped by the training loop's own ``train_step``, and batch drawing.

Each phase's step is ``earlyexit.training.step.train_step``, the function the
loop calls for every batch, set up as the loop sets it up: the phase's
``set_trainable`` / ``set_mode`` (``earlyexit.training.phases``), the loop's
``make_optimizer`` and schedule, the default loss weighting and gradient
clipping (``TrainConfig()``), the loop's running loss and per-exit accuracy sums and its finiteness check (every step
on the CPU, every ``CUDA_CHECK_EVERY`` steps on CUDA). The three phases are
timed interleaved, one step of each per round in rotating order, so that a
change in background load hits them alike; step times are medians over the
timed steps, and the phase ratios medians over rounds of each round's own
ratio; warm-up steps are not counted. Time is ``time.perf_counter``, with
``torch.cuda.synchronize`` around each timed piece on CUDA, where the model
runs under bf16 autocast (float32 on CPU).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterator, NoReturn

import torch

from ..config import PhaseConfig, TrainConfig
from ..device import cuda_sync
from ..errors import TrainingError
from ..models import MultiExitModel
from ..models.registry import effective_grad_clip
from ..training.optim import make_optimizer
from ..training.phases import phase_exits, set_mode, set_trainable
from ..training.step import RunningSums, StepSetup, train_step
from ..weighting import get_weighting
from ..tree import to_device

BENCH_LR = 1e-3            # learning rate of the timed steps (see _PhaseStep)

_TRAIN = TrainConfig()  # the defaults a training run steps with


class _PhaseStep:
    """One training step of ``phase``: the loop's ``train_step``, set up as the loop does (no data loading)."""

    def __init__(self, model: MultiExitModel, phase: int, device: torch.device, *, total_steps: int) -> None:
        self.model, self.phase, self.device = model, phase, device
        self.exits = phase_exits(model, phase)
        set_trainable(model, phase)
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise ValueError(f"phase {phase} has nothing to train (the model has no IC heads); "
                             "benchmark a model with exits")
        # The loop's optimizer and schedule, with a small learning rate: a step costs the same at any rate,
        # and the untrained model, whose phase-3 backbone runs on BatchNorm statistics a few steps stale
        # while the phases interleave, diverges within a few steps at the default 0.1.
        pc = PhaseConfig(lr=(BENCH_LR,))
        self.setup = StepSetup(net=model, num_exits=model.num_exits, phase=phase, exits=self.exits,
                               weighting=get_weighting(_TRAIN.loss_weighting), opt=make_optimizer(params, pc, BENCH_LR),
                               params=params, pc=pc, lr=BENCH_LR, total=total_steps, device=device,
                               grad_clip=effective_grad_clip(_TRAIN.grad_clip, model),
                               on_non_finite=self._non_finite)
        self.sums = RunningSums.zeros(len(self.exits), device)
        self.step_no = 0

    def _non_finite(self, loss: torch.Tensor, index: int) -> NoReturn:
        raise TrainingError(f"non-finite loss ({float(loss.detach())}) in benchmark phase {self.phase}, step {index + 1}")

    def enter(self) -> None:
        """Switch the model to this phase (per phase in the loop; outside the timed step here)."""
        set_trainable(self.model, self.phase)
        set_mode(self.model, self.phase)

    def __call__(self, x: Any, y: torch.Tensor) -> None:
        # the benchmark's steps form one epoch: the step's index in the phase and in the epoch coincide
        train_step(self.setup, x, y, step=self.step_no, index=self.step_no, sums=self.sums)
        self.step_no += 1


def _train_batches(split: Any, batch_size: int, device: torch.device) -> Iterator[tuple[float, Any, torch.Tensor]]:
    """Endless training batches as the loop draws them, each with the seconds it took to draw and move."""
    if len(split) < batch_size:
        raise ValueError(f"training set of {len(split)} samples is smaller than one batch of {batch_size}")
    epoch = 0
    while True:
        it = split.batches(batch_size, shuffle=True, seed=0, epoch=epoch, augment=True, drop_last=True)
        while True:
            cuda_sync(device)
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = to_device(x, device), y.to(device)
            cuda_sync(device)
            yield time.perf_counter() - t0, x, y
        epoch += 1


def time_phases(model: MultiExitModel, split: Any, *, batch_size: int, steps: int, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Median step time of phases 1-3 and median batch-drawing time.

    Args:
        model: the model, on ``device`` (its weights are trained a few steps).
        split: a training split with ``batches(...)``.
        batch_size: training batch size.
        steps: timed steps per phase.
        warmup: untimed steps per phase before them.
        device: where the model runs.
    Returns:
        ``{"p1_step_s", "p2_step_s", "p3_step_s", "load_s"}`` in seconds (medians), and
        ``"p2_over_p1"``, ``"p3_over_p1"``: the medians over rounds of each round's step-time ratio.
    """
    phases = [_PhaseStep(model, p, device, total_steps=warmup + steps) for p in (1, 2, 3)]
    draws = _train_batches(split, batch_size, device)
    times: dict[int, list[float]] = {1: [], 2: [], 3: []}
    loads: list[float] = []
    for r in range(warmup + steps):
        for j in range(3):
            ph = phases[(r + j) % 3]  # rotate the order so no phase always follows the same one
            ph.enter()
            t_load, x, y = next(draws)
            cuda_sync(device)
            t0 = time.perf_counter()
            ph(x, y)
            cuda_sync(device)
            if r >= warmup:
                times[ph.phase].append(time.perf_counter() - t0)
                loads.append(t_load)
    set_trainable(model, 2)
    model.eval()
    out = {f"p{p}_step_s": statistics.median(ts) for p, ts in times.items()}
    out["load_s"] = statistics.median(loads)
    # Ratios within each round, then their median: a load change that lasts a round cancels out.
    for p in (2, 3):
        out[f"p{p}_over_p1"] = statistics.median(a / b for a, b in zip(times[p], times[1]))
    return out


def time_layouts(model: MultiExitModel, split: Any, *, batch_size: int, steps: int, warmup: int,
                 device: torch.device, compile: bool = False) -> dict[str, float]:
    """Phase-1 training steps in each memory layout (and compiled), timed interleaved on copies of ``model``.

    The variants are ``contiguous`` and ``channels_last`` (weights and image batches in that layout,
    as ``TrainConfig.memory_format`` trains), and with ``compile`` also ``compiled``: the model in the
    layout ``memory_format="auto"`` picks for it, stepped through ``torch.compile`` (its first call, the
    compilation, is timed on its own). One step of each variant per round, on the same batch.

    Returns:
        ``layout_{variant}_samples_per_s`` (from the median step time), ``channels_last_speedup``
        and, with ``compile``, ``compiled_speedup`` (both over contiguous: medians of each round's own
        ratio), and ``compile_s`` (the first compiled step).
    """
    import copy

    from ..device import in_format, memory_format

    variants = {"contiguous": (torch.contiguous_format, False), "channels_last": (torch.channels_last, False)}
    if compile:
        variants["compiled"] = (memory_format(model, "auto"), True)
    steppers, fmts, out = {}, {}, {}
    for name, (fmt, compiled) in variants.items():
        m = copy.deepcopy(model).to(device).to(memory_format=fmt)
        step = _PhaseStep(m, 1, device, total_steps=warmup + steps + 1)
        step.enter()
        if compiled:
            step.setup.net = torch.compile(m)
        steppers[name], fmts[name] = step, fmt
    draws = _train_batches(split, batch_size, device)
    if compile:  # the compilation: the first call
        _, x, y = next(draws)
        t0 = time.perf_counter()
        steppers["compiled"](in_format(x, fmts["compiled"]), y)
        cuda_sync(device)
        out["compile_s"] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(warmup + steps):
        _, x, y = next(draws)
        for j in range(len(names)):
            name = names[(r + j) % len(names)]  # rotating order, as in time_phases
            xb = in_format(x, fmts[name])
            cuda_sync(device)
            t0 = time.perf_counter()
            steppers[name](xb, y)
            cuda_sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[f"layout_{name}_samples_per_s"] = batch_size / statistics.median(ts)
    for name in names[1:]:
        key = "channels_last_speedup" if name == "channels_last" else "compiled_speedup"
        out[key] = statistics.median(c / t for c, t in zip(times["contiguous"], times[name]))
    return out


__all__ = ["time_phases", "time_layouts", "BENCH_LR"]
