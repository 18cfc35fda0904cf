"""The paper's comparison: joint, disjoint and mixed training of one configuration over seeds.

For each seed, phase 1 (backbone and final head) is trained once and shared:
disjoint continues it with phase 3 (ICs on the frozen backbone), mixed with
phase 2 (everything); joint trains phase 2 from scratch. Disjoint and mixed
thus start from the same backbone, as in the paper. Every run goes through
``run``'s own steps (``earlyexit.runs``: ``new_model``, ``open_run``,
``train_run``, ``finish_run``, ``plot_run``; disjoint and mixed pass the shared
phase 1 to ``train_run``), so each regime's run folder is exactly what ``run``
writes for that regime (config.json naming the regime, the history of every
phase, weights, results.json), bit for bit on the CPU: a phase's data order,
augmentation and dropout are seeded from ``(seed, phase, grid point, epoch)``
alone, and the model is built from the seed before phase 1 in both cases.

Budgets (``budget``):

- ``"paper"``: every phase runs to its epochs / early stopping, as the paper does;
- ``"matched"``: joint gets as many training epochs as mixed spent in phases
  1 and 2 together (the control for mixed's extra epochs), with joint's own
  phase-2 settings otherwise;
- ``"flops"``: joint gets the epochs whose training FLOPs come nearest to
  what mixed spent (``stats.training_cost``: phase 1 trains the backbone
  alone, so its epochs cost less than joint's when the ICs are large).

``summary.json`` also holds the paired comparisons of the regimes seed by seed
(``earlyexit.pairs``): mixed - joint, mixed - disjoint, disjoint - joint.

Everything resumes: a finished run folder is kept, a started one continues
from its checkpoint, a finished phase 1 is reloaded. ``DIR/summary.json``
holds the summaries over seeds (``earlyexit.reports.summarize_runs``), and the
figure ``DIR/curves.png`` the three regimes' curves. The matched budget's
joint runs get folders of their own (``...-joint-matched-sSEED``), and its
summary and figure a ``-matched`` suffix, so both budgets can share one
folder: the second pass (``resume=True``) reuses phase 1, disjoint and mixed.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import runs
from .config import RunConfig
from .errors import EarlyExitError
from .io import atomic_torch_save, atomic_write_json, load_checkpoint, load_state_strict, remove_stale_temps
from .pairs import pair_summary
from .regime import NAMES, Regime
from .reports import maybe_plot, setting_words, stopping_words, summarize_runs
from .rundir import RunLock
from .results import RESULTS, Results
from .stats import training_cost
from .training import CHECKPOINT, log_hook, train

REGIMES = tuple(NAMES)  # joint, disjoint, mixed: the paper's order
BUDGETS = ("paper", "matched", "flops")
PAIRS = (("mixed", "joint"), ("mixed", "disjoint"), ("disjoint", "joint"))  # a - b, the paper's order
PHASE1 = "phase1"


def run_dir(out: Path, cfg: RunConfig, regime: str, seed: int) -> Path:
    """The folder of one run of the comparison in ``out``: ``run``'s folder name (``runs.run_name``) with
    ``regime`` as its tag (e.g. ``mixed``, ``joint-matched``)."""
    return Path(out) / runs.run_name(cfg, tag=regime, seed=seed)


def compare_regimes(cfg: RunConfig, seeds: Sequence[int], out: str | Path, *, budget: str = "paper",
                    resume: bool = False, log: Callable[..., None] | None = None,
                    regimes: Sequence[str] = REGIMES) -> dict:
    """Train joint, disjoint and mixed for every seed; write one folder per run and ``summary.json``.

    Args:
        cfg: the run configuration shared by the regimes (its regime and seed are set per run).
        seeds: the seeds, e.g. ``(0, 1, 2)``.
        out: the comparison's folder.
        budget: ``"paper"`` or ``"matched"`` (see the module docstring).
        resume: continue a comparison already in ``out`` (finished runs are kept).
        log: the progress hook of ``train`` (also receives ``event="run"`` before each run); the sinks of
            ``cfg.train.log`` are added to it (TensorBoard: each run's ``tensorboard`` folder, phase 1's too).
        regimes: the regimes to train, a subset of joint, disjoint and mixed (e.g. joint and mixed for the
            loss-weighting comparisons, where disjoint's ICs train alone); the matched and FLOPs budgets need mixed.
    Returns:
        The summary written to ``out/summary.json``: ``{"budget", "seeds", "runs": {regime: [dirs]},
        "summary": summarize_runs(...)}``.
    """
    if budget not in BUDGETS:
        raise EarlyExitError(f"unknown budget {budget!r}; valid: {', '.join(BUDGETS)}")
    if not seeds:
        raise EarlyExitError("compare needs at least one seed")
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown or not regimes:
        raise EarlyExitError(f"regimes: {', '.join(unknown) or 'none given'}; valid: {', '.join(REGIMES)}")
    regimes = tuple(r for r in REGIMES if r in set(regimes))  # in the paper's order
    if budget != "paper" and "mixed" not in regimes:
        raise EarlyExitError(f"the {budget} budget gives joint the epochs mixed spent: include mixed in the regimes")
    if cfg.init is not None:
        raise EarlyExitError("compare trains phase 1 itself; --init does not apply")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not resume:
        raise EarlyExitError(f"{out} already holds a comparison; pass --resume to continue it")
    runs.check_run(cfg)
    cfg = runs.with_model_defaults(cfg)
    log = log_hook(cfg.train.log, out, log)  # (a TensorBoard log follows the "run" events into each run's folder)
    with RunLock(out):  # one comparison per folder at a time
        remove_stale_temps(out)
        return _compare(cfg, seeds, out, budget=budget, log=log, regimes=regimes)


def _compare(cfg: RunConfig, seeds: Sequence[int], out: Path, *, budget: str,
             log: Callable[..., None] | None, regimes: Sequence[str] = REGIMES) -> dict:
    emit = log or (lambda *a, **k: None)
    dirs: dict[str, list[str]] = {r: [] for r in regimes}
    for seed in seeds:
        c = replace(cfg, train=replace(cfg.train, seed=int(seed)))
        splits = runs.load_data(c)
        # phase 1 is trained or loaded only when a run still needs it (not for finished runs), and once
        phase1 = functools.cache(functools.partial(_phase1, c, splits, out / f"s{seed}-{PHASE1}", emit))

        spent = {}
        for regime in [r for r in regimes if Regime.parse(r).starts_from_phase1]:  # they continue the shared phase 1
            d = run_dir(out, c, regime, seed)
            res = _run(replace(c, train=replace(c.train, regime=regime)), splits, d, emit, tag=regime, phase1=phase1)
            spent[regime] = res.train.phases
            mixed_res = res
        if "joint" not in regimes:
            for regime in regimes:
                dirs[regime].append(str(run_dir(out, c, regime, seed)))
            continue
        joint = replace(c, train=replace(c.train, regime="joint"))
        if budget != "paper":
            epochs = sum(_epochs_run(ph) for ph in spent["mixed"])
            if budget == "flops":
                epochs = flops_matched_epochs(mixed_res)
            phases = list(joint.train.phases)
            phases[1] = replace(phases[1], epochs=epochs, patience=None)
            joint = replace(joint, train=replace(joint.train, phases=tuple(phases)))
        joint_tag = {"paper": "joint", "matched": "joint-matched", "flops": "joint-flops"}[budget]  # one folder for all
        _run(joint, splits, run_dir(out, c, joint_tag, seed), emit, tag=joint_tag)
        for regime in regimes:
            dirs[regime].append(str(run_dir(out, c, joint_tag if regime == "joint" else regime, seed)))
    all_dirs = [Path(d) for r in regimes for d in dirs[r]]
    summary = {"budget": budget, "seeds": [int(s) for s in seeds], "runs": dirs,
               "summary": summarize_runs(all_dirs, same_config=budget == "paper"),  # matched: joint's epochs vary
               "pairs": [pair_summary([Path(d) for d in dirs[a]], [Path(d) for d in dirs[b]])
                         for a, b in PAIRS if a in dirs and b in dirs]}
    suffix = "" if budget == "paper" else f"-{budget}"
    atomic_write_json(out / f"summary{suffix}.json", summary)
    note = {"paper": None, "matched": "matched budget: joint trains as many epochs as mixed's phases 1 and 2",
            "flops": "FLOPs-matched budget: joint's training FLOPs nearest mixed's"}[budget]
    setting = setting_words(cfg)  # what the runs share, e.g. the IC density (from cfg, not re-read from disk)
    note = "; ".join(n for n in (note, setting, stopping_words(cfg)) if n) or None
    maybe_plot(all_dirs, out / f"curves{suffix}.png", note=note, split_configs=budget == "paper")
    return summary


def flops_matched_epochs(mixed: Results) -> int:
    """Joint's phase-2 epochs whose training FLOPs come nearest to what the mixed run ``mixed`` spent at its
    chosen learning rates (``stats.training_cost``; both sides search the same grid; at least 1)."""
    flops = [e.flops for e in mixed.exits]
    chosen = [{"phase": ph["phase"], "grid": [{"epochs": _epochs_run(ph)}]} for ph in mixed.train.phases]
    spent = training_cost(chosen, mixed.base_flops, flops)["passes"]
    per_epoch = training_cost([{"phase": 2, "grid": [{"epochs": 1}]}], mixed.base_flops, flops)["passes"]
    return max(1, round(spent / per_epoch))


def _epochs_run(phase_record: dict) -> int:
    """Epochs a phase actually trained at its chosen grid point (early stopping counted)."""
    for g in phase_record.get("grid", []):
        if g["lr"] == phase_record["lr"]:
            return int(g["epochs"])
    return int(phase_record["best_epoch"])


def _phase1(cfg: RunConfig, splits: Any, d: Path, emit: Callable[..., None]) -> dict:
    """Phase 1 of one seed, trained once (or reloaded): the model's state, its record, its history and its time."""
    state_file = d / "phase1.pt"
    if state_file.is_file():
        return load_checkpoint(state_file)
    with RunLock(d):
        return _train_phase1(cfg, splits, d, emit)


def _train_phase1(cfg: RunConfig, splits: Any, d: Path, emit: Callable[..., None]) -> dict:
    state_file = d / "phase1.pt"
    model = runs.new_model(cfg, splits)  # built from the seed exactly as `run` builds it
    emit("run", regime="phase 1 (shared)", seed=cfg.train.seed, out=str(d))
    p1cfg = replace(cfg.train, regime=Regime.of(1))
    probe = runs.gradient_probe if cfg.train.grad_log_every is not None else None  # (phase 1 is never probed)
    rec = train(model, splits, config=p1cfg, out_dir=d, resume=(d / CHECKPOINT).is_file(), augment=cfg.data.augment,
                log=emit, eval_batch_size=cfg.eval.batch_size, probe=probe)
    blob = {"state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "phases": [vars(r) for r in rec.phases], "history": rec.history, "seconds": rec.seconds}
    atomic_torch_save(blob, state_file)
    return blob


def _run(cfg: RunConfig, splits: Any, d: Path, emit: Callable[..., None], *, tag: str,
         phase1: Callable[[], dict] | None = None) -> Results:
    """One run of the comparison by ``run``'s steps, resumable: the folder ``run`` writes for ``cfg``, announced to
    the log hook as ``tag``. Disjoint and mixed continue the shared phase 1 (``phase1()`` trains or loads it, and
    announces it first); a finished run is read back without touching phase 1."""
    finished = (d / RESULTS).is_file()
    p1 = phase1() if phase1 is not None and not finished else None
    emit("run", regime=tag, seed=cfg.train.seed, out=str(d))  # the epochs that follow are this run's
    if finished:
        return Results.from_json(d)
    with RunLock(d):  # a `run --out` into this folder meanwhile gets the one-line busy error
        resume = (d / CHECKPOINT).is_file()
        model = runs.new_model(cfg, splits)
        if p1 is not None:
            load_state_strict(model, p1["state"], source="the shared phase 1")
        runs.open_run(cfg, splits, d, resume=resume)
        model, info, timing = runs.train_run(cfg, model, splits, d, resume=resume, log=emit, phase1=p1)
        res = runs.finish_run(cfg, model, splits, d, info, timing)
        runs.plot_run(d)
        return res


class Progress:
    """A log hook that adds an estimate of the time left to the epoch lines of another hook."""

    def __init__(self, inner: Callable[..., None], total_epochs: int) -> None:
        self.inner, self.total, self.done, self.t0 = inner, max(total_epochs, 1), 0, time.time()
        self.wants_steps = getattr(inner, "wants_steps", False)

    def __call__(self, event: str, **k: Any) -> None:
        if event == "epoch":
            self.done += 1
            rate = (time.time() - self.t0) / self.done
            k = {**k, "eta": max(self.total - self.done, 0) * rate}
        self.inner(event, **k)


def planned_epochs(cfg: RunConfig, seeds: Sequence[int]) -> int:
    """Upper bound of the epochs a comparison trains (phase 1 once per seed; no early stopping assumed)."""
    e1, e2, e3 = (pc.epochs * len(pc.lr) for pc in cfg.train.phases)
    return len(seeds) * (e1 + e3 + e2 + e2)


__all__ = ["compare_regimes", "run_dir", "planned_epochs", "Progress", "REGIMES", "BUDGETS"]
