"""Run configuration as frozen, typed dataclasses.

The command line only maps flags onto these fields; ``RunConfig`` is written
to ``config.json`` and read back by ``load_run``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

REGIMES = {"joint": "-+-", "disjoint": "+-+", "mixed": "++-"}


def parse_regime(regime: str) -> str:
    """Return the phase string (3 characters over ``+``/``-``) of a regime name or phase string."""
    if regime in REGIMES:
        return REGIMES[regime]
    if len(regime) == 3 and set(regime) <= {"+", "-"}:
        if regime == "---":
            raise ValueError("phase string '---' runs no phase; enable at least one of the three")
        return regime
    raise ValueError(
        f"unknown regime {regime!r}; valid: {', '.join(REGIMES)} or a 3-character phase string over +/- (e.g. '+-+')")


@dataclass(frozen=True)
class PhaseConfig:
    optimizer: str = "sgd"          # "sgd" (with momentum) or "adamw"
    lr: tuple[float, ...] = (0.1,)  # learning rate; several values = a grid, best by validation accuracy
    weight_decay: float = 5e-4      # decoupled for AdamW, L2 for SGD
    momentum: float = 0.9           # SGD momentum (ignored by AdamW)
    schedule: str = "cosine"        # "cosine" (to 0 over `epochs`) or "constant"
    epochs: int = 10                # maximum epochs
    patience: int | None = None     # early stopping: epochs without validation improvement; None = off
    metric: str = "mean"            # validation metric of phases 2/3: "mean" over exits or "final" exit (phase 1: always final)


@dataclass(frozen=True)
class TrainConfig:
    regime: str = "mixed"           # joint | disjoint | mixed | phase string such as "+-+"
    phases: tuple[PhaseConfig, PhaseConfig, PhaseConfig] = (PhaseConfig(), PhaseConfig(), PhaseConfig())
    batch_size: int = 128           # global batch size (split over DDP ranks)
    weighting: str = "uniform"      # loss weights alpha_k over exits (see earlyexit.weighting)
    seed: int = 0                   # seeds model init, data order, augmentation and dropout
    device: str | None = None       # "cpu", "cuda", "cuda:1"; None = CUDA if available
    grad_clip: float | None = None  # max global gradient norm; None = off


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"          # registry name (earlyexit.list_models())
    exits: Any = None               # IC placement: None (model default), list of block indices, "every:N", "sdn"
    kwargs: dict = field(default_factory=dict)  # extra builder arguments


@dataclass(frozen=True)
class DataConfig:
    name: str = "fashion-mnist"     # dataset name (earlyexit.data.list_datasets())
    data_dir: str | None = None     # local root searched first
    val_fraction: float = 0.1       # stratified share of the training set held out for validation
    train_size: int | None = None   # use only the first N training samples (quick runs)
    augment: bool = True            # the dataset's usual training augmentation


@dataclass(frozen=True)
class EvalConfig:
    criterion: str = "confidence"   # exit criterion of the threshold curve
    thresholds: int = 100           # number of evenly spaced thresholds
    batch_size: int = 512           # evaluation batch size


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    init: str | None = None         # weights or run folder to start from
    method: str | None = None       # early-exit method (earlyexit.methods): sdn, pbee, ztw, gpf; None = plain ICs


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a (nested) config dataclass."""
    return dataclasses.asdict(cfg)


def run_config_from_dict(d: dict) -> RunConfig:
    """Inverse of ``to_dict`` for ``RunConfig``."""
    t = dict(d["train"])
    t["phases"] = tuple(PhaseConfig(**{**p, "lr": tuple(p["lr"])}) for p in t["phases"])
    m = dict(d["model"])
    if isinstance(m.get("exits"), list):
        m["exits"] = tuple(m["exits"])
    return RunConfig(model=ModelConfig(**m), data=DataConfig(**d["data"]), train=TrainConfig(**t),
                     eval=EvalConfig(**d["eval"]), init=d.get("init"), method=d.get("method"))
