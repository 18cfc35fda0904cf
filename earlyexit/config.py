"""Run configuration as frozen, typed, validated dataclasses: the one set of defaults.

Every config checks itself when it is built (``__post_init__``): an unknown
optimizer, schedule, validation metric, weighting, criterion, method or regime,
or an out-of-range number, raises a one-line ``ConfigError`` before any data
is read or any step is taken. The library and the command line share these
defaults: the CLI maps only the flags a user gives onto fields.

Policy resolved here, once:

- the regime (a name or a phase string, ``earlyexit.regime``) is checked when
  ``TrainConfig`` is built; ``TrainConfig.regime`` keeps the spelling given (as
  config.json holds it), ``TrainConfig.parsed_regime`` is the ``Regime``;
- a phase's learning rate defaults by optimizer (SGD 0.1, AdamW 1e-3);
- ``RunConfig`` fills the loss weighting and the exit criterion from its
  method's defaults (``METHOD_DEFAULTS``), else ``DEFAULT_WEIGHTING`` and
  ``DEFAULT_CRITERION``, so ``RunConfig(method="pbee")`` trains and evaluates
  exactly as ``run --method pbee`` does.

``RunConfig`` is written to ``config.json`` (``to_dict``) and read back by
``run_config_from_dict``, which reads files of earlier versions too
(``upgrade_config_dict``: e.g. the IC placement under its old key ``model.exits``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .regime import Regime

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")  # TrainConfig.memory_format (earlyexit.device)
LOG_SINKS = ("tensorboard",)  # TrainConfig.log: sinks beside history.jsonl and history.csv (earlyexit.training.logs)
VAL_METRICS = ("mean", "final")
EARLY_STOPS = ("metric", "per_exit")
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}
DEFAULT_WEIGHTING = "mean"       # the paper's code averages the exits' losses (earlyexit.weighting)
DEFAULT_CRITERION = "confidence"
CRITERIA = ("confidence", "entropy", "patience")  # exit criteria: max-softmax > t, entropy <= t, the same prediction
                                                  # for t exits in a row (earlyexit.metrics.criteria computes them)


@dataclass(frozen=True)
class MethodDefaults:
    weighting: str                  # loss weighting over exits (earlyexit.weighting)
    criterion: str                  # exit criterion of the threshold curve (CRITERIA)
    paper: str = ""


# The early-exit methods' loss weighting and exit rule (earlyexit.methods implements them). The weightings
# follow the code of "Joint or Disjoint": it averages the exits' losses for PBEE and both ZTW stages, and
# weighs GPF's exits as PABEE does; SDN keeps its own ramp (that code averages SDN's losses as well).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {
    "sdn": MethodDefaults("sdn", "confidence", "Kaya et al., ICML 2019"),
    "pbee": MethodDefaults("mean", "patience", "Zhou et al., NeurIPS 2020"),
    "ztw": MethodDefaults("mean", "confidence", "Wołczyk et al., NeurIPS 2021"),
    "gpf": MethodDefaults("pabee", "entropy", "Liao et al., NAACL 2021"),
}


def _choice(value: Any, valid: Any, what: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(sorted(valid))}")


FLOAT32_MAX = 3.4028234663852886e38  # optimizer settings enter float32 arithmetic: larger values overflow


def _number(value: Any, what: str, *, low: float | None = None, strict: bool = False, integer: bool = False,
            float32: bool = False) -> None:
    """``value`` must be a finite number (an int if ``integer``; finite in float32 if ``float32``) >= ``low``
    (> when ``strict``)."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    if float32 and abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{what} must be at most {FLOAT32_MAX:.4g} (it overflows float32), got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ConfigError(f"{what} must be {'>' if strict else '>='} {low}, got {value!r}")


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclasses normalise their own fields in __post_init__


@dataclass(frozen=True)
class PhaseConfig:
    optimizer: str = "sgd"          # "sgd" (with momentum) or "adamw"
    lr: tuple[float, ...] | None = None  # learning rate; several = a grid, best by validation; None = DEFAULT_LR[optimizer]
    weight_decay: float = 5e-4      # decoupled for AdamW, L2 for SGD
    momentum: float = 0.9           # SGD momentum (ignored by AdamW)
    schedule: str = "cosine"        # "cosine" (to 0 over `epochs`) or "constant"
    warmup: int = 20                # steps of linear warmup at the phase's start (lr * (s+1)/warmup); 0 = off. It keeps
                                    # fresh ICs stable at lr 0.1 without gradient clipping (tests/test_stability.py)
    epochs: int = 3                 # maximum epochs
    patience: int | None = None     # early stopping: epochs without validation improvement; None = off
    metric: str = "mean"            # validation metric of phases 2/3: "mean" over exits or "final" exit (phase 1: always final)
    early_stop: str = "metric"      # "metric": patience on `metric`; "per_exit": one count per validated exit,
                                    # stop when every exit has stalled, keep the last weights any exit improved in

    def __post_init__(self) -> None:
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.early_stop, EARLY_STOPS, "early stopping rule")
        _choice(self.schedule, SCHEDULES, "schedule")
        _choice(self.metric, VAL_METRICS, "validation metric")
        lr = self.lr
        if lr is None:
            lr = (DEFAULT_LR[self.optimizer],)
        elif isinstance(lr, (int, float)):
            lr = (lr,)
        lr = tuple(lr)
        if not lr:
            raise ConfigError("learning rates: give at least one")
        for v in lr:
            _number(v, "learning rate", low=0, strict=True, float32=True)
        _set(self, "lr", lr)
        _number(self.weight_decay, "weight decay", low=0, float32=True)
        _number(self.momentum, "momentum", low=0, float32=True)
        _number(self.warmup, "warmup steps", low=0, integer=True)
        _number(self.epochs, "epochs", integer=True)
        if self.epochs < 0:
            raise ConfigError(f"epochs must be > 0 (or 0 in a phase that does not run), got {self.epochs}")
        if self.patience is not None:
            _number(self.patience, "patience", low=1, integer=True)


GRAD_CLIP_MODEL = "model"  # TrainConfig.grad_clip: take the model's own default (earlyexit.models.registry)


@dataclass(frozen=True)
class TrainConfig:
    regime: str = "mixed"           # joint | disjoint | mixed | phase string such as "+-+" (a Regime is kept by its name)
    phases: tuple[PhaseConfig, PhaseConfig, PhaseConfig] = (PhaseConfig(), PhaseConfig(), PhaseConfig())
    batch_size: int = 128           # global batch size (split over DDP ranks)
    weighting: str | None = None    # loss weights alpha_k over exits (earlyexit.weighting); None = DEFAULT_WEIGHTING
    seed: int = 0                   # seeds model init, data order, augmentation and dropout
    device: str | None = None       # "cpu", "cuda", "cuda:1"; None = CUDA if available
    grad_clip: float | str | None = "model"  # max global gradient norm; None = off; "model" = the model's default
                                    # (ModelSpec.grad_clip: 1 for the ViT and EfficientNet as in the paper's code, else off)
    grad_log_every: int | None = None  # phases 2 and 3: every N steps, the step probe's record (run_experiment: each
                                       # exit's gradient cosine, gradients.jsonl); None = off
    memory_format: str = "auto"     # auto (channels_last for the conv nets that train faster in it) | channels_last | contiguous
    compile: bool = False           # train through torch.compile (faster steps after a one-off compile)
    log: tuple[str, ...] = ()       # where each epoch is also logged (LOG_SINKS): "tensorboard" writes RUN/tensorboard
                                    # (the tensorboard extra); history.jsonl and history.csv always. Changes no number

    def __post_init__(self) -> None:
        regime = Regime.parse(self.regime)
        if isinstance(self.regime, Regime):
            _set(self, "regime", regime.name)  # config.json holds the regime as a string
        if len(self.phases) != 3 or not all(isinstance(p, PhaseConfig) for p in self.phases):
            raise ConfigError("phases: expected three PhaseConfig, one per phase")
        _set(self, "phases", tuple(self.phases))
        for p, pc in enumerate(self.phases, 1):
            if regime.runs(p) and pc.epochs <= 0:
                raise ConfigError(f"epochs must be > 0 (phase {p} has {pc.epochs})")
        _number(self.batch_size, "batch size", low=1, integer=True)
        _number(self.seed, "seed", integer=True)
        if self.weighting is not None:
            from .weighting import get_weighting

            try:
                get_weighting(self.weighting)  # a registered name, or a parametrised one such as "sdn:20"
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.grad_clip is not None and self.grad_clip != GRAD_CLIP_MODEL:
            if isinstance(self.grad_clip, str):
                raise ConfigError(f"gradient clipping norm must be a number, null or {GRAD_CLIP_MODEL!r}, "
                                  f"got {self.grad_clip!r}")
            _number(self.grad_clip, "gradient clipping norm", low=0, strict=True, float32=True)
        if self.grad_log_every is not None:
            _number(self.grad_log_every, "gradient log interval (steps)", low=1, integer=True)
        _choice(self.memory_format, MEMORY_FORMATS, "memory format")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        sinks = (self.log,) if isinstance(self.log, str) else self.log
        if not isinstance(sinks, (list, tuple)) or not all(isinstance(s, str) for s in sinks):
            raise ConfigError(f"log must be a list of sink names ({', '.join(LOG_SINKS)}), got {self.log!r}")
        for sink in sinks:
            _choice(sink, LOG_SINKS, "log sink")
        _set(self, "log", tuple(dict.fromkeys(sinks)))

    @property
    def parsed_regime(self) -> Regime:
        """The ``Regime`` of ``regime`` (checked when the config was built)."""
        return Regime.parse(self.regime)

    @property
    def loss_weighting(self) -> str:
        """The weighting's name, the default filled in."""
        return self.weighting if self.weighting is not None else DEFAULT_WEIGHTING


def parse_ic_after(spec: Any) -> Any:
    """An IC placement in its one parsed form: None (the model's default), a tuple of block indices, or a rule string.

    Args:
        spec: None, ``"default"``, ``"none"``, ``"sdn"``, ``"every:N[:OFFSET]"``, block indices (a list or a
            comma-separated string such as ``"4,6,8"``), or, for graph models, ``"cost:..."`` or node names
            (``earlyexit.models.common`` says what each means).
    Returns:
        None, a tuple of ints, or a string (the rule words lower-cased; node names as given).
    Raises:
        ConfigError: a malformed rule or a non-integer index (a ValueError too; the range is checked against the
            model by ``resolve_ic_after``).
    """
    if isinstance(spec, str):
        rule = spec.strip().lower()
        if rule == "default":
            return None
        if rule in ("none", "sdn") or rule.startswith("cost:"):
            return rule
        if rule.startswith("every:"):
            every_rule(rule)
            return rule
        if not rule.replace(",", "").replace(" ", "").isdigit():
            return spec.strip()  # node names of a graph model; other models refuse them when they are built
        spec = [t for t in rule.split(",") if t.strip()]
    if spec is None:
        return None
    bad = ConfigError(f"bad ic_after spec {spec!r}: expected block indices, every:N, sdn, default or none")
    if not isinstance(spec, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, (int, str)) for i in spec):
        raise bad
    if spec and all(isinstance(t, str) and not t.strip().isdigit() for t in spec):
        return tuple(spec)  # node names
    try:
        return tuple(int(i) for i in spec)
    except ValueError:
        raise bad from None


def every_rule(spec: str) -> tuple[int, int]:
    """``(N, OFFSET)`` of an ``"every:N[:OFFSET]"`` placement (OFFSET defaults to N - 1).

    Raises:
        ConfigError: not two integers, N < 1 or OFFSET < 0.
    """
    parts = spec.strip().lower().split(":")[1:]
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        step = int(parts[0])
        offset = int(parts[1]) if len(parts) == 2 else step - 1
    except ValueError:
        raise ConfigError(f"bad ic_after spec {spec!r}: expected every:N or every:N:OFFSET with integers") from None
    if step < 1:
        raise ConfigError(f"bad ic_after spec {spec!r}: N must be >= 1")
    if offset < 0:
        raise ConfigError(f"bad ic_after spec {spec!r}: OFFSET must be >= 0")
    return step, offset


# Builder arguments the run itself sets; a model option of the same name would clash with them.
RUN_MODEL_ARGS = {"num_classes": "the dataset's classes", "in_chans": "the dataset's channels",
                  "ic_after": "ModelConfig.ic_after, --ic-after"}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"          # registry name (earlyexit.list_models())
    ic_after: Any = None            # IC placement, the stages ICs follow: None (model default), block indices,
                                    # "every:N[:OFFSET]", "sdn", "none" (earlyexit.models.common), parsed once here
    kwargs: dict = field(default_factory=dict)  # the model's options: fields of its config (e.g. ResNetConfig), weights

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"model options must be a dict, got {type(self.kwargs).__name__}")
        for key in self.kwargs:
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"model option names must be identifiers, got {key!r}")
            if key in RUN_MODEL_ARGS:
                raise ConfigError(f"model option {key!r} is set by the run, not by a model option "
                                  f"({RUN_MODEL_ARGS[key]})")
        _set(self, "ic_after", parse_ic_after(self.ic_after))


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"     # dataset name (earlyexit.data.list_datasets())
    data_dir: str | None = None     # local root searched first
    val_fraction: float = 0.1       # stratified share of the training set held out for validation
    train_size: int | None = None   # use only the first N training samples (quick runs)
    augment: bool = True            # the dataset's usual training augmentation
    image_size: int | None = None   # images resized to this side (CIFAR, (Fashion-)MNIST, imagefolder:); None = native

    def __post_init__(self) -> None:
        _number(self.val_fraction, "validation fraction", low=0, strict=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"validation fraction must be < 1, got {self.val_fraction!r}")
        if self.train_size is not None:
            _number(self.train_size, "train size", low=1, integer=True)
        if self.image_size is not None:
            _number(self.image_size, "image size", low=1, integer=True)


@dataclass(frozen=True)
class EvalConfig:
    criterion: str | None = None    # exit criterion of the threshold curve; None = the method's, else DEFAULT_CRITERION
    thresholds: int = 100           # number of evenly spaced thresholds
    batch_size: int = 512           # evaluation batch size

    def __post_init__(self) -> None:
        if self.criterion is not None:
            _choice(self.criterion, CRITERIA, "criterion")
        _number(self.thresholds, "number of thresholds", low=1, integer=True)
        _number(self.batch_size, "evaluation batch size", low=1, integer=True)


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    init: str | None = None         # weights or run folder to start from
    method: str | None = None       # early-exit method (earlyexit.methods): sdn, pbee, ztw, gpf; None = plain ICs

    def __post_init__(self) -> None:
        defaults = MethodDefaults(DEFAULT_WEIGHTING, DEFAULT_CRITERION)
        if self.method is not None:
            _choice(self.method, METHOD_DEFAULTS, "method")
            defaults = METHOD_DEFAULTS[self.method]
            if self.method == "ztw" and self.train.phases[2].epochs <= 0:
                raise ConfigError(f"method {self.method!r} trains a stage of its own with phase 3's settings: "
                                  f"epochs must be > 0 (phase 3 has {self.train.phases[2].epochs})")
        if self.train.weighting is None:
            _set(self, "train", dataclasses.replace(self.train, weighting=defaults.weighting))
        if self.eval.criterion is None:
            _set(self, "eval", dataclasses.replace(self.eval, criterion=defaults.criterion))
        regime = self.train.parsed_regime
        if not regime.trains_backbone and self.init is None and self.model.kwargs.get("weights") is None:
            raise ConfigError(f"regime {regime.phases!r} trains only the ICs: it needs a trained backbone, "
                              "pass --init RUN (a run of your own) or --weights NAME_OR_FILE (pretrained)")


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the fields in which two config dicts differ, e.g. ``["train.phases[0].lr"]``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += config_diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b) and \
            any(isinstance(v, (dict, list, tuple)) for v in a):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in config_diff(x, y, f"{prefix}[{i}]")]
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (JSON turns tuples into lists)
    return [] if norm(a) == norm(b) else [prefix or "(the whole config)"]


def upgrade_config_dict(d: dict) -> dict:
    """A run config dict (``config.json``, a checkpoint's options) of an earlier version in today's keys.

    ``model.exits`` (the IC placement, named so before ``ic_after``; "exits" now always means exit indices)
    becomes ``model.ic_after``. Anything else is returned as it is (a copy where something changed).
    """
    m = d.get("model") if isinstance(d, dict) else None
    if not isinstance(m, dict) or "exits" not in m:
        return d
    m = dict(m)
    old = m.pop("exits")
    if m.get("ic_after") is not None and old is not None and m["ic_after"] != old:
        raise ConfigError("model.exits is the old name of model.ic_after: give only model.ic_after")
    m.setdefault("ic_after", old)
    return {**d, "model": m}


def upgrade_run_record(d: dict) -> dict:
    """A run's written config (``config.json``, a checkpoint's options) of an earlier version in today's keys and
    meaning: ``upgrade_config_dict``, and a phase without ``warmup`` (written before warmup existed, so trained
    without it) has ``warmup = 0``, not today's default. (A settings file leaves a missing warmup at the default.)"""
    d = upgrade_config_dict(d)
    t = d.get("train") if isinstance(d, dict) else None
    phases = t.get("phases") if isinstance(t, dict) else None
    if isinstance(phases, (list, tuple)) and any(isinstance(p, dict) and "warmup" not in p for p in phases):
        d = {**d, "train": {**t, "phases": [{"warmup": 0, **p} if isinstance(p, dict) else p for p in phases]}}
    return d


def run_config_from_dict(d: dict) -> RunConfig:
    """Inverse of ``to_dict`` for ``RunConfig`` (validated like any other config); files of earlier versions are
    read through ``upgrade_run_record`` (their ``model.exits`` is today's ``model.ic_after``, a missing warmup 0)."""
    d = upgrade_run_record(d)
    t = dict(d["train"])
    t["phases"] = tuple(PhaseConfig(**{**p, "lr": tuple(p["lr"])}) for p in t["phases"])
    return RunConfig(model=ModelConfig(**d["model"]), data=DataConfig(**d["data"]), train=TrainConfig(**t),
                     eval=EvalConfig(**d["eval"]), init=d.get("init"), method=d.get("method"))
