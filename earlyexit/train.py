"""One training loop for the three regimes of "Joint or Disjoint: Mixing
Training Regimes for Early-Exit Models".

A regime is a phase string over ``+``/``-`` (``joint = "-+-"``,
``disjoint = "+-+"``, ``mixed = "++-"``):

| phase | trains                  | loss                          | frozen (and in eval mode)   |
|-------|-------------------------|-------------------------------|-----------------------------|
| 1     | backbone + final head   | final exit only (ICs not run) | IC heads                    |
| 2     | everything              | sum_k alpha_k L_k, all exits  | nothing                     |
| 3     | IC heads only           | sum_k alpha_k L_k over ICs    | backbone and final head     |

What differs between phases is data: which parameters train (``requires_grad``),
which exits count, which modules are in eval mode. Each phase runs its own
learning-rate grid; each grid point trains from the weights the phase started
with, with early stopping on validation accuracy; the best weights over the
grid are restored at the end of the phase.

A checkpoint holding the whole training state is written atomically after
every epoch. Data order, augmentation and dropout are seeded from
``(seed, phase, grid point, epoch)`` alone, so a resumed run ends with the
same weights, bit for bit on CPU, as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .config import PhaseConfig, TrainConfig
from .device import autocast_context as autocast, local_device
from .errors import CheckpointError, TrainingError
from .io import atomic_torch_save, atomic_write_text, load_checkpoint, load_state_strict
from .models.multiexit import MultiExitModel
from .tree import to_device
from .weighting import get_weighting

LogHook = Callable[..., None]
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.jsonl"


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


# --- phase semantics --------------------------------------------------------

def phase_exits(model: MultiExitModel, phase: int) -> list[int]:
    """Exits whose losses count in ``phase``."""
    E = model.num_exits
    return [E - 1] if phase == 1 else list(range(E)) if phase == 2 else list(range(E - 1))


def set_trainable(model: MultiExitModel, phase: int) -> None:
    """``requires_grad`` per phase: 1 backbone only, 2 everything, 3 IC heads only."""
    for p in model.backbone_parameters():
        p.requires_grad_(phase in (1, 2))
    for p in model.head_parameters():
        p.requires_grad_(phase in (2, 3))


def set_mode(model: MultiExitModel, phase: int) -> None:
    """Training mode, except that phase 3 keeps the backbone (BatchNorm, dropout) in eval mode."""
    model.train()
    if phase == 3:
        for m in model.backbone_modules():
            m.eval()


def _seed_for(seed: int, phase: int, grid: int, epoch: int) -> int:
    return (seed * 1_000_003 + phase * 10_007 + grid * 101 + epoch) % (2**31 - 1)


def make_optimizer(params: Sequence[nn.Parameter], pc: PhaseConfig, lr: float) -> torch.optim.Optimizer:
    if pc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=pc.momentum, weight_decay=pc.weight_decay, nesterov=False)
    if pc.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=pc.weight_decay)
    raise ValueError(f"unknown optimizer {pc.optimizer!r}; valid: sgd, adamw")


def lr_at(pc: PhaseConfig, base: float, step: int, total: int) -> float:
    if pc.schedule == "constant":
        return base
    if pc.schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise ValueError(f"unknown schedule {pc.schedule!r}; valid: cosine, constant")


@torch.no_grad()
def validate(model: nn.Module, split: Any, exits: Sequence[int], device: torch.device, *, batch_size: int = 512) -> list[float]:
    """Accuracy of each exit in ``exits`` on ``split`` (sharded over ranks, all-reduced)."""
    rank, ws = dist.world()
    was = model.training
    model.eval()
    correct = torch.zeros(len(exits), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in split.batches(batch_size * ws, rank=rank, world_size=ws):
        x, y = to_device(x, device), y.to(device)
        with autocast(device):
            outs = model(x, exits=exits)
        for i, o in enumerate(outs):
            correct[i] += (o.argmax(-1) == y).sum()
        count += y.numel()
    model.train(was)
    correct, count = dist.all_reduce_sum(correct), dist.all_reduce_sum(count)
    return (correct / count.clamp_min(1)).tolist()


def _val_metric(acc: list[float], phase: int, metric: str) -> float:
    if phase == 1 or metric == "final":
        return acc[-1]
    if metric == "mean":
        return sum(acc) / len(acc)
    raise ValueError(f"unknown validation metric {metric!r}; valid: mean, final")


# --- the loop -----------------------------------------------------------------

def train(
    model: MultiExitModel,
    data: Any,
    *,
    regime: str | None = None,
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    augment: bool = True,
    log: LogHook | None = None,
    eval_batch_size: int = 512,
) -> TrainRecord:
    """Train ``model`` on ``data`` in the phases of ``regime``.

    Args:
        model: a ``MultiExitModel`` (moved to the chosen device).
        data: splits with ``train`` and ``val`` objects offering
            ``batches(batch_size, *, shuffle, seed, epoch, augment, rank, world_size, drop_last)``.
        regime: joint | disjoint | mixed | a phase string; overrides ``config.regime``.
        config: optimisation settings (defaults: ``TrainConfig()``).
        out_dir: folder for ``checkpoint.pt`` and ``history.jsonl`` (None: keep nothing on disk).
        resume: continue from ``out_dir/checkpoint.pt``.
        augment: use the dataset's training augmentation.
        log: progress hook ``log(event, **info)``, called on rank 0 only with
            events ``phase``, ``step``, ``epoch`` and ``done`` (``step`` is skipped
            when the hook has ``wants_steps = False``).
        eval_batch_size: batch size of the per-epoch validation.
    Returns:
        A ``TrainRecord``: per-phase choice of lr and best epoch, the history, the checkpoint path.
    """
    cfg = config or TrainConfig()
    if regime is not None:
        cfg = replace(cfg, regime=regime)
    phases = cfg.phase_string
    weighting = get_weighting(cfg.loss_weighting)
    for p, pc in enumerate(cfg.phases, 1):
        if phases[p - 1] == "+":
            if pc.epochs <= 0:
                raise ValueError(f"phase {p}: epochs must be > 0, got {pc.epochs}")
            if not pc.lr or any(lr <= 0 for lr in pc.lr):
                raise ValueError(f"phase {p}: learning rates must be > 0, got {pc.lr}")
    device = local_device(cfg.device)
    rank, ws = dist.init_distributed(device)
    if cfg.batch_size % ws:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {ws} processes")
    main = rank == 0
    emit: LogHook = (log if (log is not None and main) else (lambda *a, **k: None))
    # per-step events read the loss (a host sync on CUDA): only for hooks that want them
    want_steps = log is not None and main and getattr(log, "wants_steps", True)
    model.to(device)
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / CHECKPOINT if out is not None else None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)

    st = _fresh_state(phases)
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise CheckpointError(f"nothing to resume: {ckpt_path} does not exist")
        st = _load_state(ckpt_path, phases)
        load_state_strict(model, st["model"], source=str(ckpt_path))

    def save() -> None:
        st["model"] = _cpu_state(model)
        if main and out is not None:
            atomic_torch_save(st, ckpt_path)
            atomic_write_text(out / HISTORY, "".join(_json_line(h) for h in st["history"]))

    net: nn.Module = model  # DistributedDataParallel around it under torchrun
    ddp_phase = 0
    while st["phase"] <= 3:
        p = st["phase"]
        if phases[p - 1] != "+":
            st.update(phase=p + 1, grid=0, epoch=0)
            continue
        pc = cfg.phases[p - 1]
        if st["phase_start"] is None:
            st["phase_start"] = _cpu_state(model)
        exits = phase_exits(model, p)
        set_trainable(model, p)
        params = [q for q in model.parameters() if q.requires_grad]
        if not params:
            raise TrainingError(f"phase {p} has nothing to train (the model has no IC heads)")
        if ws > 1 and ddp_phase != p:  # one wrapper per phase: its trainable set is fixed within the phase
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            ddp_phase = p
        gi = st["grid"]
        lr = pc.lr[gi]
        # rebuilt every epoch from the saved state: a resumed run takes exactly the same path
        opt = make_optimizer(params, pc, lr)
        if st["epoch"] == 0:
            load_state_strict(model, st["phase_start"], source="phase start")
            st.update(run_best=None, bad=0)
        else:
            opt.load_state_dict(st["optimizer"])
        if st["epoch"] == 0 and gi == 0:
            emit("phase", phase=p, exits=exits, lr_grid=list(pc.lr), epochs=pc.epochs)
        steps_per_epoch = _num_batches(data.train, cfg.batch_size)
        total = steps_per_epoch * pc.epochs
        e = st["epoch"]
        te = time.time()
        seed = _seed_for(cfg.seed, p, gi, e)
        torch.manual_seed(seed)  # dropout and anything else stochastic in the step
        set_mode(model, p)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros(len(exits), dtype=torch.float64, device=device)
        seen = 0
        # schemes that act on gradients inside the backbone (gradient equilibrium) hook the model for the epoch
        prepare = getattr(weighting, "prepare", None)
        hooks = prepare(model, exits) if (prepare is not None and p != 1) else None
        try:
            for s, (x, y) in enumerate(data.train.batches(cfg.batch_size, shuffle=True, seed=seed, epoch=e, augment=augment,
                                                           rank=rank, world_size=ws, drop_last=True)):
                step = e * steps_per_epoch + s
                for g in opt.param_groups:
                    g["lr"] = lr_at(pc, lr, step, total)
                x, y = to_device(x, device), y.to(device)
                alphas = weighting(model.num_exits, step / max(total, 1))
                alphas = [1.0] if p == 1 else (alphas if p == 2 else alphas[:-1])
                with autocast(device):
                    outs = net(x, exits=exits)
                    losses = [F.cross_entropy(o.float(), y) for o in outs]
                    loss = sum(a * l for a, l in zip(alphas, losses))
                # on CUDA a check is a host sync: look every 25 steps (and at the epoch's end) instead of every step
                if (device.type != "cuda" or s % 25 == 0) and not torch.isfinite(loss):
                    _non_finite(loss, p, e, s, lr, ckpt_path)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                with torch.no_grad():
                    loss_sum += loss.detach().double() * y.numel()
                    for i, o in enumerate(outs):
                        correct[i] += (o.argmax(-1) == y).sum()
                seen += y.numel()
                if want_steps:
                    emit("step", phase=p, epoch=e + 1, step=s + 1, steps=steps_per_epoch, loss=float(loss.detach()),
                         acc=float(correct[-1]) / max(seen, 1))
        finally:
            if hooks is not None:
                hooks.remove()
        if not torch.isfinite(loss_sum):
            _non_finite(loss_sum, p, e, steps_per_epoch - 1, lr, ckpt_path)
        n = dist.all_reduce_sum(torch.tensor(float(seen), dtype=torch.float64, device=device))
        train_loss = float(dist.all_reduce_sum(loss_sum) / n)
        train_acc = (dist.all_reduce_sum(correct) / n).tolist()
        val_acc = validate(model, data.val, exits if p != 3 else list(range(model.num_exits)), device, batch_size=eval_batch_size)
        metric = _val_metric(val_acc, p, pc.metric)
        rec = {"phase": p, "lr": lr, "epoch": e + 1, "train_loss": train_loss, "train_acc": train_acc,
               "val_acc": val_acc, "val_metric": metric, "seconds": time.time() - te}
        st["history"].append(rec)
        st["seconds"] = st.get("seconds", 0.0) + (time.time() - te)
        if st["run_best"] is None or metric > st["run_best"]["val"]:
            st["run_best"] = {"val": metric, "epoch": e + 1, "state": _cpu_state(model)}
            st["bad"] = 0
        else:
            st["bad"] += 1
        emit("epoch", **rec)
        st["epoch"] = e + 1
        st["optimizer"] = opt.state_dict()
        finished = st["epoch"] >= pc.epochs or (pc.patience is not None and st["bad"] >= pc.patience)
        if finished:
            _finish_grid_point(st, lr)
            if st["grid"] + 1 < len(pc.lr):
                st.update(grid=st["grid"] + 1, epoch=0, optimizer=None)
            else:
                best = st["grid_best"]
                load_state_strict(model, best["state"], source="best weights")
                st["records"].append({"phase": p, "lr": best["lr"], "best_epoch": best["epoch"], "best_val": best["val"],
                                      "grid": st["grid_log"]})
                st.update(phase=p + 1, grid=0, epoch=0, optimizer=None, phase_start=None, grid_best=None,
                          run_best=None, grid_log=[], bad=0)
        save()

    set_trainable(model, 2)
    model.eval()
    emit("done")
    return TrainRecord(regime=phases, phases=[PhaseRecord(**r) for r in st["records"]], history=list(st["history"]),
                       checkpoint=str(ckpt_path) if (ckpt_path is not None and main) else None,
                       seconds=st.get("seconds", 0.0))


def _non_finite(loss: torch.Tensor, phase: int, epoch: int, step: int, lr: float, ckpt_path: Path | None) -> None:
    last = f"; the last good checkpoint is kept at {ckpt_path}" if ckpt_path is not None and ckpt_path.exists() else ""
    raise TrainingError(f"non-finite loss ({float(loss.detach())}) in phase {phase}, epoch {epoch + 1}, step {step + 1} at lr {lr}{last}")


# --- state ------------------------------------------------------------------

def _fresh_state(phases: str) -> dict:
    return {"version": 1, "phases": phases, "seconds": 0.0, "phase": 1, "grid": 0, "epoch": 0, "phase_start": None, "run_best": None,
            "grid_best": None, "grid_log": [], "bad": 0, "optimizer": None, "records": [], "history": [], "model": None}


def _load_state(path: Path, phases: str) -> dict:
    st = load_checkpoint(path)
    if not isinstance(st, dict) or st.get("version") != 1 or "phase" not in st:
        raise CheckpointError(f"{path} is not a training checkpoint of this package")
    if st["phases"] != phases:
        raise CheckpointError(f"{path} was written by regime {st['phases']!r}, not {phases!r}")
    return st


def _finish_grid_point(st: dict, lr: float) -> None:
    rb = st["run_best"]
    st["grid_log"].append({"lr": lr, "best_val": rb["val"], "best_epoch": rb["epoch"], "epochs": st["epoch"]})
    if st["grid_best"] is None or rb["val"] > st["grid_best"]["val"]:
        st["grid_best"] = {"val": rb["val"], "epoch": rb["epoch"], "lr": lr, "state": rb["state"]}
    st["run_best"] = None


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _num_batches(split: Any, batch_size: int) -> int:
    n = len(split) // batch_size
    if n == 0:
        raise ValueError(f"training set of {len(split)} samples is smaller than one batch of {batch_size}")
    return n


def _json_line(d: dict) -> str:
    import json

    return json.dumps(d) + "\n"
