"""One experiment end to end, as a few named steps: check, data, model, train, evaluate, write.

``run_experiment`` runs one ``RunConfig`` into a run folder and returns its
``Results``: ``check_run``, ``load_data``, ``new_model``, ``open_run`` (the
folder's config.json), ``train_run`` (the regime's phases, the method's own
stage), ``finish_run`` (weights, evaluation, results.json) and ``plot_run``.
``earlyexit.compare`` runs every regime of a comparison through the same
steps. ``load_run`` rebuilds a finished run's model; ``evaluate_run``
re-evaluates it. Nothing here asks which model or dataset it runs: the model
registry and the dataset registry answer for them.

A run folder holds (all written atomically):

- ``config.json``: the ``RunConfig`` (and the dataset's shapes);
- ``history.jsonl``: one line per training epoch, and ``history.csv``: the same rows as a table;
- ``checkpoint.pt``: the training state (for ``--resume``);
- ``model.safetensors``: the final weights (``model.pt`` in runs of earlier versions, still read);
- ``results.json``: ``earlyexit.results.Results``;
- ``gradients.jsonl`` with ``TrainConfig.grad_log_every``: one line per probed step of phases 2
  and 3, ``{"phase", "epoch", "step", "cos": [E], "grid", "lr"}``, each exit's gradient cosine
  (``gradient_probe``; the paper's Figure 4);
- ``curve.png`` when matplotlib is installed.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed as dist
from . import metrics
from .config import GRAD_CLIP_MODEL, RunConfig, config_diff, run_config_from_dict, to_dict
from .device import local_device, model_device, platform
from .errors import CheckpointError, ConfigError, EarlyExitError, RunInterrupted, TrainingError
from .io import (WEIGHTS_FILES, atomic_write_json, atomic_write_text, find_weights, load_checkpoint, load_weights,
                 remove_stale_temps)
from .models import MultiExitModel, build_model
from .preflight import build_checked, check_forward
from .progress import ProgressFn, tracked
from .regime import NAMES as REGIME_NAMES
from .rundir import (STASH, RunLock, check_entries, check_unlocked, describe_os_error, drop_stash, remove_entry,
                     restore_run, settle, stash_run)
from .reports import maybe_plot
from .results import RESULTS, Results, Timing, TrainInfo
from .score import calibrates, evaluate_logits
from .training import CHECKPOINT, log_hook, train, write_history
from .training.logs import TENSORBOARD_DIR
from .training.state import HISTORY, HISTORY_CSV, PROBE_LOG

# every file a run writes: what --force replaces (the checkpoint first) and a failed replacement puts back; the
# TensorBoard folder (--log tensorboard) goes with them, so a new run's events never mix with an old run's
RUN_FILES = (CHECKPOINT, "results.json", HISTORY, HISTORY_CSV, PROBE_LOG, "curve.png", *WEIGHTS_FILES, "config.json",
             TENSORBOARD_DIR)


def run_name(cfg: RunConfig, *, tag: str | None = None, seed: int | None = None) -> str:
    """A run folder's name, ``MODEL-DATASET-TAG-sSEED``: ``tag`` the regime's name as given, else its phase
    string's slug (``compare`` passes e.g. ``joint-matched``); ``seed`` the config's unless given."""
    reg = cfg.train.regime
    tag = tag or (reg if reg in REGIME_NAMES else cfg.train.parsed_regime.slug)
    data = cfg.data.name.replace(":", "_").replace("/", "_")
    return f"{cfg.model.name}-{data}-{tag}-s{cfg.train.seed if seed is None else seed}"


def default_out_dir(cfg: RunConfig) -> Path:
    """``runs/`` and the run's name (``run_name``)."""
    return Path("runs") / run_name(cfg)


def prepare_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to overwrite a finished or started run unless told to (nothing is deleted here)."""
    started = (out / CHECKPOINT).exists() or (out / "results.json").exists()
    if resume:
        if not (out / CHECKPOINT).exists():
            raise CheckpointError(f"cannot resume: {out / CHECKPOINT} does not exist")
        return
    if started and not force:
        raise EarlyExitError(f"{out} already holds a run; pass --force to overwrite it or --resume to continue it")


def clear_out_dir(out: Path) -> None:
    """Remove a previous run's files (``--force``; ``RUN_FILES`` but its config.json, which the new run rewrites),
    once the new run is known to start."""
    for name in RUN_FILES:
        if name != "config.json":
            remove_entry(out / name)
    out.mkdir(parents=True, exist_ok=True)


def open_run(cfg: RunConfig, splits: Any, out: Path, *, resume: bool) -> None:
    """Step "folder": a new run starts in an emptied ``out`` with its ``config.json``; a resumed one keeps its
    files (and writes back a lost ``config.json``)."""
    if not resume:
        clear_out_dir(out)
        write_config(cfg, splits, out)
    elif not (out / "config.json").is_file():
        write_config(cfg, splits, out)


def make_model(cfg: RunConfig, splits: Any, *, staged: bool = False) -> MultiExitModel:
    """The run's model: the backbone with ICs, rewired by its method; ``staged``: as after the method's own stage.

    ``cfg.model.kwargs`` are the fields of the model's config (``--model-opt``) and ``weights``; the build is
    checked (``earlyexit.preflight``): a bad ``--model-opt`` is a one-line ``ConfigError``, never a traceback or a
    model with an empty layer.
    """
    from .models import get_spec

    in_chans = getattr(splits, "in_chans", None)
    if (in_chans is None) != (get_spec(cfg.model.name).input == "text"):
        kind = "text" if in_chans is None else "image"
        raise EarlyExitError(f"model {cfg.model.name!r} does not take the {kind} inputs of dataset {cfg.data.name!r}")
    kw = dict(cfg.model.kwargs)
    size = getattr(splits, "image_size", None)
    if size is not None:
        given = kw.get("image_size")
        if isinstance(given, int) and not isinstance(given, bool) and given != size:  # other types: the type check
            raise ConfigError(f"model option image_size={kw['image_size']!r} contradicts the data's {size}-pixel "
                              "images; resize the data instead (--image-size, DataConfig.image_size)")
        kw.setdefault("image_size", size)
    model = build_checked(cfg.model.name, num_classes=splits.num_classes, in_chans=in_chans if in_chans is not None else 3,
                          ic_after=cfg.model.ic_after, options=kw, build=build_model)
    if cfg.method is not None:
        from .methods import get_method

        method = get_method(cfg.method)
        model = method.apply(model)
        if staged and method.staged is not None:
            model = method.staged(model)
    return model


def load_data(cfg: RunConfig) -> Any:
    from .data import load_dataset
    from .models import data_options

    # e.g. pretrained BERT weights decide the text vocabulary
    options = data_options(cfg.model.name, cfg.model.kwargs) if _is_text_dataset(cfg.data.name) else {}
    if cfg.data.image_size is not None:
        options["image_size"] = cfg.data.image_size
    return load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, val_fraction=cfg.data.val_fraction,
                        seed=cfg.train.seed, train_size=cfg.data.train_size, **options)


def _is_text_dataset(name: str) -> bool:
    from .data import text

    return name in text.DATASETS


def save_weights(model: torch.nn.Module, out: Path) -> Path:
    """The final weights as ``out/model.safetensors`` (safetensors is a main dependency; ``model.pt`` is only read,
    from runs of earlier versions)."""
    from safetensors.torch import save as st_save

    from .io import atomic_write_bytes

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out / "model.safetensors", st_save(sd))
    return out / "model.safetensors"


def load_init(model: MultiExitModel, path: str | Path) -> None:
    """``--init``: start ``model`` from a run of one's own, a run folder or a weights file this package wrote
    (``models.load_pretrained``; the backbone covered, IC heads may be missing). Upstream weights (torchvision,
    Hugging Face) are the model's ``weights`` option instead (``--weights``)."""
    from .models import load_pretrained

    load_pretrained(model, path, what="--init", foreign=False)


def evaluate_model(model: MultiExitModel, splits: Any, cfg: RunConfig, device: torch.device | None = None, *,
                   progress: ProgressFn | None = None) -> dict:
    """Test-set results (the ``exits``, ``curve``, ``budgets`` and ``base_flops`` parts of results.json).

    The model's logits go through ``score.evaluate_logits``, the evaluation ``python -m earlyexit score``
    applies to another implementation's logits. ``progress(done, total, label)`` (``earlyexit.progress``) is told
    of every batch evaluated.
    """
    device = device or next(model.parameters()).device
    example = model.example_input(1, device=device)
    costs = metrics.exit_costs(model, example)
    base = metrics.backbone_cost(model, example)
    bs = cfg.eval.batch_size
    logits, labels = metrics.evaluate(model, _batches(splits.test, bs, "test batches", progress), device=device)
    if not torch.isfinite(logits).all():
        bad = "weights" if any(not torch.isfinite(p).all() for p in model.parameters()) else "outputs"
        raise TrainingError(f"training diverged: the model's {bad} are not finite (NaN or inf); "
                            "a smaller --lr or --grad-clip usually helps")
    val_logits = None
    if calibrates(cfg.eval.criterion, len(costs)):
        # thresholds chosen on validation data for each target cost, then applied unchanged to the test set
        val_logits, _ = metrics.evaluate(model, _batches(splits.val, bs, "validation batches", progress), device=device)
    return evaluate_logits(logits, labels, costs, base, criterion=cfg.eval.criterion, thresholds=cfg.eval.thresholds,
                           val_logits=val_logits, stages=model.exit_after)


def _batches(split: Any, batch_size: int, label: str, progress: ProgressFn | None) -> Any:
    return tracked(split.batches(batch_size), -(-len(split) // batch_size), label, progress)


def with_model_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the model-dependent defaults filled in (``grad_clip="model"`` -> the model's norm or None), so
    that ``config.json`` states what the run did."""
    from .models.registry import default_grad_clip

    if cfg.train.grad_clip != GRAD_CLIP_MODEL:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_clip=default_grad_clip(cfg.model.name)))


def check_run(cfg: RunConfig) -> None:
    """Fail fast, before any data is read or any file is touched: names the registries do not know, a bad device.

    (Every other option was checked when ``cfg`` was built.)
    """
    from .data import list_datasets
    from .models import get_spec

    get_spec(cfg.model.name)  # a one-line ConfigError for a name that no registry or family (torchvision:NAME) knows
    if cfg.data.name not in list_datasets() and not cfg.data.name.startswith("imagefolder:"):
        raise EarlyExitError(f"unknown dataset {cfg.data.name!r}; valid: {', '.join(list_datasets())}")
    local_device(cfg.train.device)


def check_resume(cfg: RunConfig, out: Path) -> None:
    """``--resume`` only with the options the run in ``out`` was started with (``train.log``, where epochs are logged
    besides the history, may change).

    They are read from ``config.json`` or, when it is missing, from the checkpoint (which records them).
    """
    from .schema import check_checkpoint, check_run_config

    f = out / "config.json"
    # the checkpoint it resumes from, checked against its schema and this run's learning-rate grids
    ckpt = load_checkpoint(out / CHECKPOINT, mmap=True)
    if isinstance(ckpt, dict) and "version" in ckpt and "phase" in ckpt:  # else: train() refuses it in one line
        check_checkpoint(ckpt, out / CHECKPOINT, phases=cfg.train.parsed_regime.phases,
                         lr_grids=[len(p.lr) for p in cfg.train.phases])
    if f.is_file():
        saved, where = read_run_config(f), "its config.json"
    else:
        opts = ckpt.get("options") if isinstance(ckpt, dict) else None
        if opts is None:
            return  # a checkpoint of an earlier version, which did not record them
        check_run_config(opts, f"{out / CHECKPOINT} (the options it records)")
        try:
            saved = run_config_from_dict(opts)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{out / CHECKPOINT}: the options it records are not a run config: "
                                  f"{' '.join(str(e).split())[:160]}") from None
        where = "its checkpoint"
    diff = [d for d in config_diff(to_dict(saved), to_dict(cfg)) if d != "train.log"]  # the sinks may change
    if diff:
        raise EarlyExitError(f"--resume: the options differ from those of the run in {out} ({', '.join(diff[:4])}; "
                             f"see {where})")


def read_run_config(f: Path) -> RunConfig:
    """The ``RunConfig`` of a ``config.json``; a one-line ``EarlyExitError`` for a missing, tampered or foreign file."""
    return _read_config(f)[0]


def _read_config(f: Path) -> tuple[RunConfig, Any]:
    """The ``RunConfig`` of a ``config.json`` and its saved data shapes (None, or checked by ``_valid_shapes``).

    The file is read by ``earlyexit.schema`` (JSON nested at most a few dozen levels, every field of the type its
    config field has) before any value in it is used.
    """
    from .schema import read_config_json

    try:
        raw = read_config_json(f)
    except OSError as e:
        raise EarlyExitError(describe_os_error(e, "cannot read")) from None
    try:
        cfg = run_config_from_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"the field {e.args[0]!r} is missing" if isinstance(e, KeyError) else " ".join(str(e).split())[:160]
        raise EarlyExitError(f"{f} is not a valid run config: {what}") from None
    shapes = raw.get("shapes")
    if shapes is not None and not _valid_shapes(shapes):
        raise EarlyExitError(f"{f} is not a valid run config: its shapes {_short(shapes)} are not "
                             "{num_classes, in_chans, image_size} of positive integers (or null)")
    return cfg, shapes


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def write_config(cfg: RunConfig, splits: Any, out: Path) -> None:
    shapes = {"num_classes": splits.num_classes, "in_chans": splits.in_chans, "image_size": splits.image_size}
    atomic_write_json(out / "config.json", {**to_dict(cfg), "shapes": shapes})


def gradient_probe(model: MultiExitModel, x: Any, y: torch.Tensor, *, phase: int, epoch: int, step: int,
                   weights: list[float], train_mode: bool = True) -> dict:
    """``train``'s step probe for ``grad_log_every``: each exit's gradient cosine on the step's batch (Figure 4).

    ``cos[k]`` is the cosine between exit ``k``'s weighted-loss gradient on the backbone and the
    total gradient (``earlyexit.analysis.cosines.gradient_cosines``, with the step's loss weights;
    None for an exit that does not count in the phase). Weights, buffers, ``requires_grad`` flags
    and modes are left as they were.

    Returns:
        ``{"phase", "epoch", "step", "cos": [E]}``.
    """
    from .analysis.cosines import gradient_cosine_record

    return gradient_cosine_record(model, x, y, phase=phase, epoch=epoch, step=step, weights=weights,
                                  train_mode=train_mode)


def new_model(cfg: RunConfig, splits: Any, *, resume: bool = False) -> MultiExitModel:
    """Step "model": the run's model built from its seed (every regime of a comparison builds it so), the weights
    of ``cfg.init`` loaded (not on ``resume``: the checkpoint holds them), then checked by one forward pass and the
    optimizers' settings, as far as it can be without training (nothing on disk changes)."""
    from .training.checks import check_training

    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, splits)
    if cfg.init is not None and not resume:
        load_init(model, cfg.init)
    check_forward(model, splits.train, what=f"model {cfg.model.name!r} and dataset {cfg.data.name!r}")
    check_training(model, splits, cfg.train)
    return model


def train_run(cfg: RunConfig, model: MultiExitModel, splits: Any, out: Path, *, resume: bool,
              log: Callable[..., None] | None, phase1: dict | None = None) -> tuple[MultiExitModel, TrainInfo, Timing]:
    """Step "train": the regime's phases, then the method's own stage (e.g. ZTW's ensembles on the frozen ICs) if
    it has one.

    Args:
        phase1: a phase 1 trained before, whose weights ``model`` holds (``compare``'s shared one:
            ``{"phases", "history", "seconds"}``): only the regime's later phases train here, and the run's
            record, ``history.jsonl`` and time count phase 1 as their own, as ``run`` writes them.
    Returns:
        The trained model, the record of its training (``Results.train``) and the time it took (``Results.timing``).
    """
    config, options = cfg.train, to_dict(cfg)
    if phase1 is not None:  # the checkpoint holds the later phases alone, which no `run --resume` continues: no options
        config, options = dataclasses.replace(config, regime=config.parsed_regime.after_phase1()), None
    probe = gradient_probe if cfg.train.grad_log_every is not None else None
    record = train(model, splits, config=config, out_dir=out, resume=resume, augment=cfg.data.augment, log=log,
                   eval_batch_size=cfg.eval.batch_size, probe=probe, options=options)
    phases, seconds = [vars(r) for r in record.phases], record.seconds
    if phase1 is not None:
        write_history(out, [*phase1["history"], *record.history])
        phases, seconds = [*phase1["phases"], *phases], phase1["seconds"] + seconds
    info = TrainInfo(phases=phases)
    method = _method(cfg)
    if method is not None and method.stage is not None:
        t = time.time()
        stage_cfg = dataclasses.replace(cfg.train, grad_log_every=None)  # the log covers the regime's phases
        model, stage_rec = method.stage(model, splits, stage_cfg, log=log, augment=cfg.data.augment,
                                        eval_batch_size=cfg.eval.batch_size)
        info.method_stage = [vars(r) for r in stage_rec.phases]
        seconds += time.time() - t
    return model, info, Timing(train_seconds=seconds, platform=platform(model_device(model)))


def results_of(cfg: RunConfig, evaluation: dict, train_info: TrainInfo | None, timing: Timing | None = None) -> Results:
    """The run's ``Results``: its identity from the config, the rest from the evaluation, training and timing."""
    return Results.build(regime=cfg.train.parsed_regime.phases, regime_name=cfg.train.regime, model=cfg.model.name,
                         dataset=cfg.data.name, seed=cfg.train.seed, evaluation=evaluation, method=cfg.method,
                         weighting=cfg.train.weighting, train=train_info, timing=timing)


def finish_run(cfg: RunConfig, model: MultiExitModel, splits: Any, out: Path, train_info: TrainInfo,
               timing: Timing) -> Results:
    """Steps "evaluate" and "write": the final weights, the test-set evaluation, then ``results.json`` (the file
    that makes the folder a finished run)."""
    save_weights(model, out)
    res = results_of(cfg, evaluate_model(model, splits, cfg), train_info, timing)
    res.save(out)
    return res


def plot_run(out: Path) -> None:
    """Step "figure": ``curve.png`` of a finished run, when matplotlib is installed."""
    try:
        maybe_plot([out], out / "curve.png")
    except OSError as e:
        raise EarlyExitError(f"{describe_os_error(e, 'cannot write')}; the run's results are written") from None


def run_experiment(cfg: RunConfig, out: Path, *, resume: bool = False, force: bool = False,
                   log: Callable[..., None] | None = None) -> Results | None:
    """Train and evaluate one configuration; write the run folder; return its ``Results`` (None on the other
    processes of a torchrun run).

    The steps are the functions of this module's docstring. ``log`` is ``train``'s progress hook; the sinks of
    ``cfg.train.log`` are added to it (``earlyexit.training.log_hook``: TensorBoard writes into ``out/tensorboard``).
    The folder is locked for the whole run (``earlyexit.rundir.RunLock``). Everything that can be
    checked (configs, data, the model build and a forward pass, the optimizers, batch against data and
    processes) is checked before a previous run's files are touched; with ``force``, the previous run
    is set aside and comes back if the new one fails before it has written its results (even after its first
    checkpoints; the price is disk for two runs). No file of the folder is followed through a symbolic link.
    """
    out = Path(out)
    check_run(cfg)
    cfg = with_model_defaults(cfg)
    log = log_hook(cfg.train.log, out, log)
    main = dist.world()[0] == 0
    lock = None
    if main:
        check_unlocked(out)
        lock = RunLock(out).acquire()
    try:
        if main:
            check_entries(out, RUN_FILES)       # a planted symbolic link: refused before anything changes
            settle(out, RUN_FILES, RESULTS)     # a --force replacement that a crash cut short
            remove_stale_temps(out)             # what killed writes left behind
            prepare_out_dir(out, resume=resume, force=force)
        if resume:
            check_resume(cfg, out)
        splits = load_data(cfg)
        model = new_model(cfg, splits, resume=resume)
        stashed = False
        try:
            if main and not resume and ((out / CHECKPOINT).exists() or (out / RESULTS).exists()):
                stashed = True  # from the first file moved: a failure from here on puts the run back
                stash_run(out, RUN_FILES, CHECKPOINT)
            if main:
                open_run(cfg, splits, out, resume=resume)
            model, train_info, timing = train_run(cfg, model, splits, out, resume=resume, log=log)
            if not main:
                return None
            res = finish_run(cfg, model, splits, out, train_info, timing)  # from here on it replaces the previous run
        except BaseException as e:
            raise _failed(e, out, main=main, stashed=stashed) from None
        if stashed:
            drop_stash(out, RUN_FILES)
        plot_run(out)
        return res
    finally:
        if lock is not None:
            lock.release(remove_empty_out=True)


_WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _failed(e: BaseException, out: Path, *, main: bool, stashed: bool) -> BaseException:
    """The error a failed run ends with, after putting back the previous run that ``--force`` set aside (a new run
    that has not written its results never replaces it, whatever checkpoints it wrote)."""
    started = (out / CHECKPOINT).exists()  # the new run wrote a checkpoint
    note = ""
    if main and stashed:
        try:
            restore_run(out, RUN_FILES)
            note = "the previous run in the folder is kept"
        except (OSError, EarlyExitError) as r:
            cause = describe_os_error(r) if isinstance(r, OSError) else " ".join(str(r).split())
            note = f"the previous run is still in {out / STASH} ({cause}); the next run in {out} puts it back"
    kept = f" ({note})" if note else ""
    if isinstance(e, KeyboardInterrupt):
        if stashed and started:
            return RunInterrupted(f"interrupted before this run wrote its results: nothing of this run was saved{kept}")
        if started:
            return RunInterrupted(f"interrupted; the last checkpoint is kept in {out} (continue with --resume)")
        return RunInterrupted(f"interrupted before the first checkpoint: nothing of this run was saved{kept}")
    if isinstance(e, OSError):
        last = kept if stashed else f"; the last good checkpoint is kept in {out / CHECKPOINT}" if started else ""
        verb = "cannot write" if e.errno in _WRITE_ERRORS else "cannot access"
        return EarlyExitError(f"{describe_os_error(e, verb)}{last}")
    if stashed and isinstance(e, EarlyExitError):
        msg = " ".join(str(e).split())
        if started:  # the checkpoint training said it kept went with this run: say what is in the folder now
            msg = msg.split(f"; the last good checkpoint is kept at {out / CHECKPOINT}")[0]
            kept = f" (this run is dropped, as it had not written its results; {note})"
        return type(e)(f"{msg}{kept}")
    return e


def _method(cfg: RunConfig) -> Any:
    if cfg.method is None:
        return None
    from .methods import get_method

    return get_method(cfg.method)


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[MultiExitModel, RunConfig]:
    """Rebuild the model of a run folder (with its final weights) and its config."""
    from .io import load_state_strict

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EarlyExitError(f"{path} is not a run folder (no config.json)")
    cfg, shapes = _read_config(cfg_file)
    if shapes is None:  # an earlier layout: read the shapes from the data
        meta = _data_meta(cfg)
    else:  # the dataset's shapes, saved by the run (checked): no need to read the data
        from types import SimpleNamespace

        meta = SimpleNamespace(**{k: shapes.get(k) for k in ("num_classes", "in_chans", "image_size")})
    model = make_model(cfg, meta, staged=True)
    load_state_strict(model, load_weights(find_weights(path)), source=str(find_weights(path)))
    return model.to(device).eval(), cfg


def _valid_shapes(shapes: Any) -> bool:
    """config.json's ``shapes``: classes >= 1, channels and image side None or >= 1."""
    if not isinstance(shapes, dict):
        return False
    ok = lambda v, none: (v is None and none) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)  # noqa
    return ok(shapes.get("num_classes"), False) and ok(shapes.get("in_chans"), True) and \
        ok(shapes.get("image_size"), True)


def _data_meta(cfg: RunConfig) -> Any:
    """Shapes of the dataset (classes, channels, size), read from the data (runs without saved shapes)."""
    from types import SimpleNamespace

    s = load_data(cfg)
    return SimpleNamespace(num_classes=s.num_classes, in_chans=s.in_chans, image_size=s.image_size)


def evaluate_run(path: str | Path, *, criterion: str | None = None, device: str | None = None,
                 out: str | Path | None = None, progress: ProgressFn | None = None) -> Results:
    """Re-evaluate a run folder on its test split (keeping its training record and time); return the ``Results``.

    Without ``out`` the run's results.json is rewritten. With ``out`` the run folder is left as it is and the
    evaluation becomes a run folder of its own (config.json with the criterion it used, results.json, the
    training history copied), e.g. the same runs under the entropy criterion beside the confidence ones;
    ``out`` must not hold results already. ``progress`` is told of every batch evaluated (``evaluate_model``).
    """
    from dataclasses import replace

    path = Path(path)
    target = path if out is None else Path(out)
    if out is not None and (target / RESULTS).exists():
        raise EarlyExitError(f"{target} already holds results.json; choose another --out or remove it")
    dev = local_device(device)
    model, cfg = load_run(path, device=dev)
    if criterion is not None:
        cfg = replace(cfg, eval=replace(cfg.eval, criterion=criterion))
    splits = load_data(cfg)
    train_info = timing = None
    if (path / RESULTS).is_file():
        try:
            before = Results.from_json(path)
            train_info, timing = before.train, before.timing
        except EarlyExitError:
            pass
    res = results_of(cfg, evaluate_model(model, splits, cfg, dev, progress=progress), train_info, timing)
    if out is not None:
        target.mkdir(parents=True, exist_ok=True)
        write_config(cfg, splits, target)
        for name in (HISTORY, HISTORY_CSV):
            if (path / name).is_file():
                atomic_write_text(target / name, (path / name).read_text())
    res.save(target)
    return res
