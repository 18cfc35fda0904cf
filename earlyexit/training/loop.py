"""One training loop for the three regimes of "Joint or Disjoint: Mixing
Training Regimes for Early-Exit Models": ``train``, its records, ``validate``.

A regime (``earlyexit.regime.Regime``) says which phases run, a phase string
over ``+``/``-`` (``joint = "-+-"``, ``disjoint = "+-+"``, ``mixed = "++-"``). What differs between phases is data,
the phase table in ``earlyexit.training.phases``: which parameters train
(``requires_grad``), which exits count, which are validated, which modules are
in eval mode, whether the loss weights apply. The loop itself knows no phase
or model: it walks the phases' learning-rate grids epoch by epoch; each grid
point trains from the weights the phase started with, with early stopping on
validation accuracy; the best weights over the grid are restored at the end
of the phase. Every batch goes through ``step.train_step``.

A checkpoint holding the whole training state (``state.TrainState``) is
written atomically after every epoch. Data order, augmentation and dropout are
seeded from ``(seed, phase, grid point, epoch)`` alone (``optim.seed_for``),
so a resumed run ends with the same weights, bit for bit on CPU, as an
uninterrupted one.

A step probe (``train(probe=...)``, every ``TrainConfig.grad_log_every`` steps
of phases 2 and 3) measures the model on the batch a step is about to train
on, before that step; ``earlyexit.runs.gradient_probe`` records each exit's
gradient cosine (the paper's Figure 4). The probe runs with the random number
generators forked (dropout draws nothing from the training's stream) and must
leave weights, buffers, ``requires_grad`` flags and modes as it found them, so
a run with a probe trains exactly as one without.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import nn

from .. import distributed as dist
from ..config import TrainConfig
from ..device import autocast_context as autocast, in_format, local_device, memory_format
from ..errors import TrainingError
from ..io import load_state_strict
from ..models.multiexit import MultiExitModel
from ..models.registry import effective_grad_clip
from ..regime import Regime
from ..tree import to_device
from .optim import make_optimizer, seed_for
from .phases import phase_exits, phase_spec, set_mode, set_trainable, val_metric, validated_exits
from .state import CheckpointFiles, TrainState, cpu_state
from .step import RunningSums, StepSetup, step_weights, train_step
from ..weighting import Weighting, get_weighting

LogHook = Callable[..., None]
# probe(model, x, y, *, phase, epoch, step, weights, train_mode) -> JSON-ready dict (see train)
StepProbe = Callable[..., dict]
PROBED_PHASES = (2, 3)  # the phases in which every exit (phase 2) or every IC (phase 3) trains


@dataclass
class PhaseRecord:
    phase: int
    lr: float                    # the grid point chosen by validation accuracy
    best_epoch: int              # 1-based epoch of the restored weights
    best_val: float              # validation metric of the restored weights
    grid: list[dict] = field(default_factory=list)  # per lr: {lr, best_val, best_epoch, epochs}


@dataclass
class TrainRecord:
    regime: str                  # phase string
    phases: list[PhaseRecord]
    history: list[dict]          # one dict per epoch, as in history.jsonl
    checkpoint: str | None       # path of the last checkpoint, if any
    seconds: float               # wall-clock training time, summed over the calls of a resumed run
    probe_log: list[dict] = field(default_factory=list)  # the step probe's records, as in gradients.jsonl


@torch.no_grad()
def validate(model: nn.Module, split: Any, exits: Sequence[int], device: torch.device, *, batch_size: int = 512,
             fmt: torch.memory_format = torch.contiguous_format) -> list[float]:
    """Accuracy of each exit in ``exits`` on ``split`` (sharded over ranks, all-reduced); image batches in ``fmt``."""
    rank, ws = dist.world()
    was = model.training
    model.eval()
    correct = torch.zeros(len(exits), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in split.batches(batch_size * ws, rank=rank, world_size=ws):
        x, y = in_format(to_device(x, device), fmt), y.to(device)
        with autocast(device):
            outs = model(x, exits=exits)
        for i, o in enumerate(outs):
            correct[i] += (o.argmax(-1) == y).sum()
        count += y.numel()
    model.train(was)
    correct, count = dist.all_reduce_sum(correct), dist.all_reduce_sum(count)
    return (correct / count.clamp_min(1)).tolist()


def train(
    model: MultiExitModel,
    data: Any,
    *,
    regime: str | Regime | None = None,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    augment: bool = True,
    log: LogHook | None = None,
    eval_batch_size: int = 512,
    probe: StepProbe | None = None,
    options: dict | None = None,
) -> TrainRecord:
    """Train ``model`` on ``data`` in the phases of ``regime``.

    The phases (what each trains, counts, validates and freezes) are the table
    of ``earlyexit.training.phases``.

    Args:
        model: a ``MultiExitModel`` (moved to the chosen device).
        data: splits with ``train`` and ``val`` objects offering
            ``batches(batch_size, *, shuffle, seed, epoch, augment, rank, world_size, drop_last)``.
        regime: joint | disjoint | mixed | a phase string | a ``Regime``; overrides ``config.regime``.
        config: optimisation settings (defaults: ``TrainConfig()``).
        out_dir: folder for ``checkpoint.pt`` and ``history.jsonl`` (None: keep nothing on disk).
        resume: continue from ``out_dir/checkpoint.pt``.
        augment: use the dataset's training augmentation.
        log: progress hook ``log(event, **info)``, called on rank 0 only with
            events ``phase``, ``step``, ``epoch`` and ``done`` (``step`` is skipped
            when the hook has ``wants_steps = False``).
        eval_batch_size: batch size of the per-epoch validation.
        probe: called on rank 0 every ``config.grad_log_every`` steps of phases 2 and 3 (counted from
            the phase's first step), before the step, on that step's batch, as
            ``probe(model, x, y, phase=, epoch=, step=, weights=, train_mode=)``: ``epoch`` and ``step``
            1-based within the phase and the epoch, ``weights`` every exit's loss weight in that step
            (0 for the exits that do not count), ``train_mode`` whether the backbone trains in batch
            statistics (phase 2) or stays in eval mode (phase 3). Its dict, with ``grid`` and ``lr`` added,
            is kept in the training state and written to ``out_dir/gradients.jsonl``
            (``earlyexit.runs.gradient_probe``: the gradient cosines of each exit).
        options: the run's options (plain containers), recorded in the checkpoint so that a resume with
            other options can be refused even without ``config.json``.
    Returns:
        A ``TrainRecord``: per-phase choice of lr and best epoch, the history, the checkpoint path,
        the probe's records.
    Raises:
        TrainingError: ``config.grad_log_every`` set without a probe.
    """
    cfg = config or TrainConfig()
    if regime is not None:
        cfg = replace(cfg, regime=regime)
    regime = cfg.parsed_regime  # the config checked the regime and every phase it runs when it was built
    phases = regime.phases  # the checkpoint records the phase string
    if cfg.grad_log_every is not None and probe is None:
        raise TrainingError("grad_log_every needs a step probe: pass probe=earlyexit.runs.gradient_probe "
                            "(run_experiment does)")
    weighting = get_weighting(cfg.loss_weighting)
    device = local_device(cfg.device)
    rank, ws = dist.init_distributed(device)
    if cfg.batch_size % ws:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {ws} processes")
    main = rank == 0
    model.to(device)
    fmt = memory_format(model, cfg.memory_format)
    model.to(memory_format=fmt)  # the weights stay in this layout while training (loading copies into it)
    files = CheckpointFiles(out_dir, write=main)
    if resume:
        st = files.load(phases, model)
        files.save_logs(st)  # the history as the checkpoint knows it (a line lost to an interrupt comes back)
    else:
        st = TrainState(phases)
    if options is not None:
        st.options = options
    run = _Run(model=model, data=data, cfg=cfg, weighting=weighting, device=device, rank=rank, ws=ws,
               augment=augment, eval_batch_size=eval_batch_size, files=files,
               emit=log if (log is not None and main) else (lambda *a, **k: None),
               # per-step events read the loss (a host sync on CUDA): only for hooks that want them
               want_steps=log is not None and main and getattr(log, "wants_steps", True),
               probe=probe if main else None, fmt=fmt)
    try:
        _train_phases(run, st, regime)
    finally:
        model.to(memory_format=torch.contiguous_format)  # weights leave in the usual layout (safetensors, eval)
    set_trainable(model, 2)  # every parameter trainable again
    model.eval()
    run.emit("done")
    return TrainRecord(regime=phases, phases=[PhaseRecord(**r) for r in st.records], history=list(st.history),
                       checkpoint=str(files.path) if (files.path is not None and main) else None,
                       seconds=st.seconds, probe_log=list(st.probe_log))


@dataclass
class _Run:
    """What stays fixed over one call of ``train``, and the model's DDP wrapper."""
    model: MultiExitModel
    data: Any
    cfg: TrainConfig
    weighting: Weighting
    device: torch.device
    rank: int
    ws: int
    augment: bool
    eval_batch_size: int
    files: CheckpointFiles
    emit: LogHook
    want_steps: bool
    probe: StepProbe | None = None  # rank 0's step probe
    fmt: torch.memory_format = torch.contiguous_format  # memory layout of the weights and the image batches
    net: nn.Module | None = None  # the module the steps call (DDP wrapper, compiled module), None: the model
    net_phase: int = 0            # the phase ``net`` was made for

    def wrapped(self, phase: int) -> nn.Module:
        """The module to train: per phase (its trainable set is fixed within the phase) the DDP wrapper under
        torchrun, compiled with ``torch.compile`` when the config asks; else the model itself."""
        if self.net_phase != phase and (self.ws > 1 or self.cfg.compile):
            dev = self.device
            net: nn.Module = self.model
            if self.ws > 1:
                net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None)
            self.net = torch.compile(net) if self.cfg.compile else net
            self.net_phase = phase
        return self.net if self.net is not None else self.model


def _train_phases(run: _Run, st: TrainState, regime: Regime) -> None:
    """Train every remaining epoch of the phases the regime runs, with a checkpoint after each."""
    while st.phase <= 3:
        if not regime.runs(st.phase):
            st.skip_phase()
            continue
        _train_epoch(run, st)
        run.files.save(st, run.model)


def _train_epoch(run: _Run, st: TrainState) -> None:
    """Run epoch ``st.epoch`` of grid point ``st.grid`` of phase ``st.phase`` and move ``st`` past it."""
    model, cfg, device, p = run.model, run.cfg, run.device, st.phase
    pc = cfg.phases[p - 1]
    if st.phase_start is None:
        st.phase_start = cpu_state(model)
    exits = phase_exits(model, p)
    set_trainable(model, p)
    params = [q for q in model.parameters() if q.requires_grad]
    if not params:
        raise TrainingError(f"phase {p} has nothing to train (the model has no IC heads)")
    net = run.wrapped(p)
    gi, e = st.grid, st.epoch
    lr = pc.lr[gi]
    # rebuilt every epoch from the saved state: a resumed run takes exactly the same path
    opt = make_optimizer(params, pc, lr)
    if e == 0:
        load_state_strict(model, st.phase_start, source="phase start")
        st.start_grid_point()
    else:
        opt.load_state_dict(st.optimizer)
    if e == 0 and gi == 0:
        run.emit("phase", phase=p, exits=exits, lr_grid=list(pc.lr), epochs=pc.epochs)
    steps_per_epoch = _num_batches(run.data.train, cfg.batch_size)
    te = time.time()
    seed = seed_for(cfg.seed, p, gi, e)
    torch.manual_seed(seed)  # dropout and anything else stochastic in the step
    set_mode(model, p)
    sums = RunningSums.zeros(len(exits), device)
    ckpt = run.files.path
    setup = StepSetup(net=net, num_exits=model.num_exits, phase=p, exits=exits, weighting=run.weighting, opt=opt,
                      params=params, pc=pc, lr=lr, total=steps_per_epoch * pc.epochs, device=device,
                      grad_clip=effective_grad_clip(cfg.grad_clip, model), on_non_finite=lambda loss, s: _non_finite(loss, p, e, s, lr, ckpt))
    # schemes that act on gradients inside the backbone (gradient equilibrium) hook the model for the epoch
    prepare = getattr(run.weighting, "prepare", None)
    hooks = prepare(model, exits) if (prepare is not None and phase_spec(p).weighted) else None
    every = cfg.grad_log_every if (run.probe is not None and p in PROBED_PHASES) else None
    try:
        for s, (x, y) in enumerate(run.data.train.batches(cfg.batch_size, shuffle=True, seed=seed, epoch=e,
                                                          augment=run.augment, rank=run.rank, world_size=run.ws,
                                                          drop_last=True)):
            x, y = in_format(to_device(x, device), run.fmt), y.to(device)
            if every is not None and (e * steps_per_epoch + s) % every == 0:
                st.log_probe(_probe(run, setup, x, y, step=e * steps_per_epoch + s, epoch=e, index=s, grid=gi))
            loss = train_step(setup, x, y, step=e * steps_per_epoch + s, index=s, sums=sums)
            if run.want_steps:
                run.emit("step", phase=p, epoch=e + 1, step=s + 1, steps=steps_per_epoch, loss=float(loss.detach()),
                         acc=float(sums.correct[-1]) / max(sums.seen, 1))
    finally:
        if hooks is not None:
            hooks.remove()
    if not torch.isfinite(sums.loss):
        _non_finite(sums.loss, p, e, steps_per_epoch - 1, lr, ckpt)
    _check_finite_weights(model, p, e, lr, ckpt)
    n = dist.all_reduce_sum(torch.tensor(float(sums.seen), dtype=torch.float64, device=device))
    train_loss = float(dist.all_reduce_sum(sums.loss) / n)
    train_acc = (dist.all_reduce_sum(sums.correct) / n).tolist()
    val_acc = validate(model, run.data.val, validated_exits(model, p), device, batch_size=run.eval_batch_size, fmt=run.fmt)
    metric = val_metric(p, val_acc, pc.metric)
    rec = {"phase": p, "lr": lr, "epoch": e + 1, "train_loss": train_loss, "train_acc": train_acc,
           "val_acc": val_acc, "val_metric": metric, "seconds": time.time() - te}
    st.end_epoch(rec, metric, time.time() - te, model, exit_acc=val_acc if pc.early_stop == "per_exit" else None)
    run.emit("epoch", **rec)
    st.advance(opt.state_dict())
    if st.epoch >= pc.epochs or (pc.patience is not None and st.bad >= pc.patience):
        st.finish_grid_point(lr)
        if st.grid + 1 < len(pc.lr):
            st.next_grid_point()
        else:
            load_state_strict(model, st.grid_best.state, source="best weights")
            st.finish_phase()


def _probe(run: _Run, setup: StepSetup, x: Any, y: torch.Tensor, *, step: int, epoch: int, index: int,
           grid: int) -> dict:
    """The probe's record of the batch step ``index`` of epoch ``epoch`` (0-based) trains on; ``step``: in the phase."""
    E, p = setup.num_exits, setup.phase
    alphas = step_weights(setup, step)  # exactly the weights train_step uses for this step
    weights = [0.0] * E
    for k, a in zip(setup.exits, alphas):
        weights[k] = float(a)
    dev = setup.device
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # whatever the probe draws (dropout), training's stream is untouched
        rec = run.probe(run.model, x, y, phase=p, epoch=epoch + 1, step=index + 1, weights=weights,
                        train_mode=not phase_spec(p).eval_mode)
    return {**rec, "grid": grid, "lr": setup.lr}


def _non_finite(loss: torch.Tensor, phase: int, epoch: int, step: int, lr: float, ckpt_path: Path | None) -> NoReturn:
    last = f"; the last good checkpoint is kept at {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() else ""
    raise TrainingError(f"non-finite loss ({float(loss.detach())}) in phase {phase}, epoch {epoch + 1}, step {step + 1} at lr {lr}{last}")


def _check_finite_weights(model: nn.Module, phase: int, epoch: int, lr: float, ckpt_path: Path | None) -> None:
    """Weights (and floating buffers) that blew up without a NaN loss end the run here, in one line."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    last = f"; the last good checkpoint is kept at {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() else ""
    raise TrainingError(f"training diverged: the weights are not finite after phase {phase}, epoch {epoch + 1} "
                        f"at lr {lr} (a smaller --lr or --grad-clip usually helps){last}")


def _num_batches(split: Any, batch_size: int) -> int:
    n = len(split) // batch_size
    if n == 0:
        raise ValueError(f"training set of {len(split)} samples is smaller than one batch of {batch_size}")
    return n


__all__ = ["train", "validate", "TrainRecord", "PhaseRecord", "LogHook", "StepProbe", "PROBED_PHASES"]
