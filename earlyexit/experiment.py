"""One experiment end to end: data, model, training, evaluation, results on disk.

A run folder holds (all written atomically):

- ``config.json``: the ``RunConfig``;
- ``history.jsonl``: one line per training epoch;
- ``checkpoint.pt``: the training state (for ``--resume``);
- ``model.safetensors`` (or ``model.pt`` without safetensors): the final weights;
- ``results.json``: see ``RESULTS_SCHEMA``;
- ``curve.png`` when matplotlib is installed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import metrics
from .config import RunConfig, parse_regime, run_config_from_dict, to_dict
from .device import local_device
from .errors import CheckpointError, EarlyExitError
from .io import atomic_write_json, load_weights
from .tree import to_jsonable
from .models import MultiExitModel, build_model
from .training import CHECKPOINT, TrainRecord, train

RESULTS_SCHEMA = """\
results.json
  regime      phase string actually run, e.g. "++-" (regime_name: the name given)
  model, dataset, seed
  base_flops  FLOPs per sample of the backbone alone with its own classifier (2 x multiply-adds)
  exits       [{index, stage, flops, accuracy}]: leaving every test sample at exit `index`
              (after stage `stage`); flops cumulative, ICs before it included
  curve       {criterion, thresholds, flops, accuracy, exit_counts}: early exit on the test set
              with each threshold (flops = average per sample)
  budgets     {"25%", "50%", "75%", "100%", "max"}: best test accuracy at an average cost
              <= that share of base_flops (null if none), and the best overall
  calibrated_geometric, calibrated_global
              {criterion, mode, targets, thresholds, flops, accuracy, val_flops, exit_counts}:
              per-exit thresholds chosen on the validation split for each target cost (MSDNet's
              geometric exit distribution, or one global threshold), applied unchanged to the test
              set; flops/accuracy are test figures; a null threshold never/always fires
  calibrated_budgets  the budget table of calibrated_geometric
  method, weighting   the early-exit method (null: plain ICs) and the loss weighting used
  train       {seconds, phases: [{phase, lr, best_epoch, best_val, grid}], method_stage (ZTW's ensembles)}
"""

WEIGHTS_FILES = ("model.safetensors", "model.pt")


def default_out_dir(cfg: RunConfig) -> Path:
    reg = cfg.train.regime
    tag = reg if reg.isalpha() else reg.replace("+", "p").replace("-", "m")
    data = cfg.data.name.replace(":", "_").replace("/", "_")
    return Path("runs") / f"{cfg.model.name}-{data}-{tag}-s{cfg.train.seed}"


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
    """Remove a previous run's files (``--force``), once the new run is known to start."""
    for name in ("results.json", CHECKPOINT, "history.jsonl", "curve.png", *WEIGHTS_FILES):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def make_model(cfg: RunConfig, splits: Any, *, staged: bool = False) -> MultiExitModel:
    """The run's model: the backbone with ICs, rewired by its method; ``staged``: as after the method's own stage."""
    kw = dict(cfg.model.kwargs)
    if getattr(splits, "image_size", None) is not None:
        kw.setdefault("image_size", splits.image_size)
    in_chans = getattr(splits, "in_chans", None)
    exits = list(cfg.model.exits) if isinstance(cfg.model.exits, tuple) else cfg.model.exits
    model = build_model(cfg.model.name, num_classes=splits.num_classes, in_chans=in_chans if in_chans is not None else 3,
                        exits=exits, **kw)
    text_data, text_model = in_chans is None, model.input_shape is None
    if text_data != text_model:
        kind = "text" if text_data else "image"
        raise EarlyExitError(f"model {cfg.model.name!r} does not take the {kind} inputs of dataset {cfg.data.name!r}")
    if cfg.method is not None:
        from .methods import get_method

        method = get_method(cfg.method)
        model = method.apply(model)
        if staged and method.staged is not None:
            model = method.staged(model)
    return model


def load_data(cfg: RunConfig) -> Any:
    from .data import load_dataset

    options = {}
    weights = cfg.model.kwargs.get("weights")
    if cfg.model.name.startswith("bert") and weights and _is_text_dataset(cfg.data.name):
        from .models.bert import vocab_for

        options["vocab"] = vocab_for(weights)  # token ids must come from the checkpoint's own vocabulary
    return load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, val_fraction=cfg.data.val_fraction,
                        seed=cfg.train.seed, train_size=cfg.data.train_size, **options)


def _is_text_dataset(name: str) -> bool:
    from . import textdata

    return name in textdata.DATASETS


def save_weights(model: torch.nn.Module, out: Path) -> Path:
    from .io import atomic_torch_save, atomic_write_bytes

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save as st_save
    except ImportError:
        atomic_torch_save(sd, out / "model.pt")
        return out / "model.pt"
    atomic_write_bytes(out / "model.safetensors", st_save(sd))
    return out / "model.safetensors"


def find_weights(run_dir: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir} holds no model weights ({' or '.join(WEIGHTS_FILES)})")


def load_init(model: MultiExitModel, path: str | Path) -> None:
    """Initialise ``model`` from a run folder or a weights file (ours, or torchvision's ResNet / ViT).

    The backbone must be covered entirely; IC heads missing from the file keep their initialisation,
    and so does the final classifier when the file's is for another number of classes (e.g.
    ImageNet weights for a 10-class task). Nothing is loaded when the file does not fit.
    """
    from .io import load_state_strict

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--init: {path} does not exist")
    sd = load_weights(find_weights(path) if path.is_dir() else path)
    ours = model.state_dict()
    final = f"heads.{model.num_exits - 1}."
    replaced: set[str] = set()  # final-classifier keys left at their initialisation (another number of classes)
    try:
        if "fc.weight" in sd and "conv1.weight" in sd:  # a torchvision ResNet state_dict
            from .models.resnet import convert_torchvision_state_dict

            sd = convert_torchvision_state_dict(model, sd)
        elif "conv_proj.weight" in sd and "class_token" in sd:  # a torchvision ViT state_dict
            from .models.vit import convert_torchvision_vit_state_dict

            same = sd.get("heads.head.weight", torch.empty(0)).shape[:1] == (model.num_classes,)
            conv = convert_torchvision_vit_state_dict(model, sd, load_head=same)
            replaced = {k for k in ours if k.startswith(final) and k not in conv}
            sd = conv
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"--init: {path} does not fit the model: {e.args[0] if e.args else e}") from None
    mismatched = {k for k in sd if k.startswith(final) and k in ours and sd[k].shape != ours[k].shape}
    if mismatched and all(sd[k].shape[0] != ours[k].shape[0] for k in mismatched):
        replaced |= mismatched
        sd = {k: v for k, v in sd.items() if k not in mismatched}
    head_prefixes = tuple(f"heads.{k}." for k in range(model.num_exits - 1)) + tuple(replaced)
    missing = [k for k in ours if k not in sd and not k.startswith(head_prefixes)]
    if missing:
        raise CheckpointError(f"--init: {path} does not fit the model: missing backbone weights such as {missing[0]}")
    unexpected = [k for k in sd if k not in ours]
    if unexpected:
        raise CheckpointError(f"--init: {path} does not fit the model: unexpected weights such as {unexpected[0]}")
    load_state_strict(model, sd, source=f"--init {path}", strict=False)


def evaluate_model(model: MultiExitModel, splits: Any, cfg: RunConfig, device: torch.device | None = None) -> dict:
    """Test-set results (the ``exits``, ``curve``, ``budgets`` and ``base_flops`` parts of results.json)."""
    device = device or next(model.parameters()).device
    example = model.example_input(1, device=device)
    costs = metrics.exit_costs(model, example)
    base = metrics.backbone_cost(model, example)
    logits, labels = metrics.evaluate(model, splits.test.batches(cfg.eval.batch_size), device=device)
    curve = metrics.threshold_curve(logits, labels, costs, thresholds=cfg.eval.thresholds, criterion=cfg.eval.criterion)
    statics = metrics.static_points(logits, labels, costs)
    for s in statics:
        s["stage"] = model.exit_after[s["index"]]
    out = {"base_flops": base, "exits": statics, "curve": curve, "budgets": metrics.budget_table(curve, statics, base)}
    if cfg.eval.criterion in ("confidence", "entropy") and len(costs) > 1:
        # thresholds chosen on validation data for each target cost, then applied unchanged to the test set
        val_logits, _ = metrics.evaluate(model, splits.val.batches(cfg.eval.batch_size), device=device)
        for mode in metrics.CALIBRATION_MODES:
            cal = metrics.calibrated_curve(val_logits, logits, labels, costs, criterion=cfg.eval.criterion, mode=mode)
            out[f"calibrated_{mode}"] = to_jsonable(cal)
        out["calibrated_budgets"] = metrics.budget_table(out["calibrated_geometric"], [], base)
    return out


def run_experiment(cfg: RunConfig, out: Path, *, resume: bool = False, force: bool = False,
                   log: Callable[..., None] | None = None) -> dict:
    """Train and evaluate one configuration; write the run folder; return results.json's content."""
    phases = parse_regime(cfg.train.regime)
    if phases[0] == "-" and phases[1] == "-" and cfg.init is None:
        raise EarlyExitError(f"regime {phases!r} trains only the ICs: it needs a trained backbone, pass --init RUN_OR_WEIGHTS")
    for p, pc in enumerate(cfg.train.phases, 1):
        if phases[p - 1] == "+" and pc.epochs <= 0:
            raise EarlyExitError(f"epochs must be > 0 (phase {p} has {pc.epochs})")
    method = None
    if cfg.method is not None:
        from .methods import get_method

        method = get_method(cfg.method)
        if method.stage is not None and cfg.train.phases[2].epochs <= 0:
            raise EarlyExitError(f"method {cfg.method!r} trains a stage of its own with phase 3's settings: "
                                 f"epochs must be > 0 (phase 3 has {cfg.train.phases[2].epochs})")
    from . import distributed as dist

    local_device(cfg.train.device)  # a bad --device fails here, before anything is read or written
    main = dist.world()[0] == 0
    if main:
        prepare_out_dir(out, resume=resume, force=force)
    if resume and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text())
        if to_dict(run_config_from_dict(saved)) != to_dict(cfg):
            raise EarlyExitError(f"--resume: the options differ from those of the run in {out} (see its config.json)")
    # everything that can fail on bad input happens before a previous run's files are touched
    splits = load_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = make_model(cfg, splits)
    if cfg.init is not None and not resume:
        load_init(model, cfg.init)
    if main and not resume:
        clear_out_dir(out)
        shapes = {"num_classes": splits.num_classes, "in_chans": splits.in_chans, "image_size": splits.image_size}
        atomic_write_json(out / "config.json", {**to_dict(cfg), "shapes": shapes})
    record: TrainRecord = train(model, splits, config=cfg.train, out_dir=out, resume=resume, augment=cfg.data.augment, log=log,
                                eval_batch_size=cfg.eval.batch_size)
    stage_rec, t_stage = None, time.time()
    if method is not None and method.stage is not None:  # e.g. ZTW's ensembles, trained on the frozen ICs
        model, stage_rec = method.stage(model, splits, cfg.train, log=log, augment=cfg.data.augment,
                                        eval_batch_size=cfg.eval.batch_size)
    stage_seconds = time.time() - t_stage
    if not main:
        return {}
    save_weights(model, out)
    res = {"regime": phases, "regime_name": cfg.train.regime, "model": cfg.model.name, "dataset": cfg.data.name,
           "seed": cfg.train.seed, **evaluate_model(model, splits, cfg),
           "method": cfg.method, "weighting": cfg.train.weighting,
           "train": {"seconds": record.seconds + stage_seconds,
                     "phases": [vars(r) for r in record.phases]}}
    if stage_rec is not None:
        res["train"]["method_stage"] = [vars(r) for r in stage_rec.phases]
    atomic_write_json(out / "results.json", res)
    maybe_plot([out], out / "curve.png")
    return res


def load_run(path: str | Path, *, device: str | torch.device = "cpu") -> tuple[MultiExitModel, RunConfig]:
    """Rebuild the model of a run folder (with its final weights) and its config."""
    from .io import load_state_strict

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EarlyExitError(f"{path} is not a run folder (no config.json)")
    try:
        raw = json.loads(cfg_file.read_text())
        cfg = run_config_from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise EarlyExitError(f"{cfg_file} is not a valid run config: {e}") from None
    if isinstance(raw.get("shapes"), dict):  # the dataset's shapes, saved by the run: no need to read the data
        from types import SimpleNamespace

        meta = SimpleNamespace(**raw["shapes"])
    else:
        meta = _data_meta(cfg)
    model = make_model(cfg, meta, staged=True)
    load_state_strict(model, load_weights(find_weights(path)), source=str(find_weights(path)))
    return model.to(device).eval(), cfg


def _data_meta(cfg: RunConfig) -> Any:
    """Shapes of the dataset (classes, channels, size), read from the data (runs without saved shapes)."""
    from types import SimpleNamespace

    s = load_data(cfg)
    return SimpleNamespace(num_classes=s.num_classes, in_chans=s.in_chans, image_size=s.image_size)


def evaluate_run(path: str | Path, *, criterion: str | None = None, device: str | None = None) -> dict:
    """Re-evaluate a run folder on its test split and rewrite its results.json."""
    from dataclasses import replace


    path = Path(path)
    dev = local_device(device)
    model, cfg = load_run(path, device=dev)
    if criterion is not None:
        cfg = replace(cfg, eval=replace(cfg.eval, criterion=criterion))
    splits = load_data(cfg)
    old = {}
    if (path / "results.json").is_file():
        try:
            old = json.loads((path / "results.json").read_text())
        except ValueError:
            old = {}
    res = {"regime": parse_regime(cfg.train.regime), "regime_name": cfg.train.regime, "model": cfg.model.name,
           "dataset": cfg.data.name, "seed": cfg.train.seed, **evaluate_model(model, splits, cfg, dev), "method": cfg.method,
           "weighting": cfg.train.weighting}
    if "train" in old:
        res["train"] = old["train"]
    atomic_write_json(path / "results.json", res)
    return res


def maybe_plot(run_dirs: list[Path], out_file: Path, *, required: bool = False, curve: str = "curve") -> bool:
    """Accuracy-vs-FLOPs curves of runs, with their static exit points; False when matplotlib is missing."""
    from .plot import plot_runs

    try:
        plot_runs(run_dirs, out_file, curve=curve)
    except ImportError:
        if required:
            raise EarlyExitError("plotting needs matplotlib: pip install 'earlyexit[plot]'") from None
        return False
    return True


def summarize_runs(run_dirs: list[Path]) -> list[dict]:
    """Mean and standard deviation over seeds of runs that share model, dataset and regime.

    Returns one dict per group: ``{model, dataset, regime, seeds, exits: [{index, mean, std}],
    budgets: {name: {mean, std}}}``; accuracies in [0, 1], std with Bessel's correction (0 for one seed).
    """
    from .plot import read_results

    groups: dict[tuple, list[dict]] = {}
    for d in run_dirs:
        r = read_results(Path(d))
        groups.setdefault((r["model"], r["dataset"], r["regime"]), []).append(r)

    def stats(vals: list[float]) -> dict:
        t = torch.tensor(vals, dtype=torch.float64)
        return {"mean": float(t.mean()), "std": float(t.std()) if len(vals) > 1 else 0.0}

    out = []
    for (model, dataset, regime), rs in groups.items():
        n_exits = min(len(r["exits"]) for r in rs)
        budgets = {}
        for k in rs[0]["budgets"]:
            vals = [r["budgets"][k] for r in rs if r["budgets"].get(k) is not None]
            budgets[k] = stats(vals) if len(vals) == len(rs) else None
        out.append({"model": model, "dataset": dataset, "regime": regime, "seeds": sorted(r["seed"] for r in rs),
                    "exits": [{"index": i, **stats([r["exits"][i]["accuracy"] for r in rs])} for i in range(n_exits)],
                    "budgets": budgets})
    return out
