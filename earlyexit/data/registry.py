"""The dataset registry: datasets by name, and ``load_dataset``, which cuts one into its splits.

Loaders register themselves where they are defined (``earlyexit.data.vision``,
``earlyexit.data.text``); importing ``earlyexit.data`` imports both, so the
registry is full.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import DataError
from .splits import Splits


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., Splits]
    arg: str | None  # what follows "name:" (e.g. "PATH"); None when the name takes no argument


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, loader_fn: Callable[..., Splits], *, arg: str | None = None,
                     replace: bool = False) -> None:
    """Make a dataset loadable by name.

    ``loader_fn`` is called with the keywords ``data_dir``, ``val_fraction``,
    ``seed``, ``train_size``, ``download``, the extra options given to
    ``load_dataset``, and ``arg`` (the text after ``name:``) when ``arg`` is set.
    It returns a ``Splits`` whose splits offer ``batches(...)`` and ``labels``
    like ``TensorSplit``; ``stratified_split``, ``plan_epoch`` and ``data_roots``
    are there to share.

    Args:
        name: the dataset's name (case-insensitive).
        loader_fn: the loader.
        arg: placeholder shown by ``list_datasets`` when the name takes an
            argument, as in ``imagefolder:PATH``; None when it takes none.
        replace: allow replacing a registered dataset of the same name.
    Raises:
        ValueError: if ``name`` is registered already (and ``replace`` is False) or malformed.
    """
    key = name.strip().lower()
    if not key or ":" in key:
        raise ValueError(f"bad dataset name {name!r}: must be non-empty and contain no ':'")
    if key in _REGISTRY and not replace and _REGISTRY[key].loader is not loader_fn:
        raise ValueError(f"dataset {key!r} is registered already")
    _REGISTRY[key] = _Entry(loader_fn, arg)


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts, e.g. ``["cifar10", ..., "imagefolder:PATH", ...]``."""
    return sorted(k if e.arg is None else f"{k}:{e.arg}" for k, e in _REGISTRY.items())


def load_dataset(name: str = "fashion-mnist", *, data_dir: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None, download: bool = True,
                 **options: Any) -> Splits:
    """Load a dataset by name into train / validation / test splits.

    Args:
        name: a name from ``list_datasets()``; ``imagefolder:PATH`` for class folders under ``PATH``.
        data_dir: folder searched first for the files (then ``$EARLYEXIT_DATA``,
            the system dataset folders, the user cache).
        val_fraction: stratified share of the (possibly truncated) training set held out for validation.
        seed: seed of the validation split.
        train_size: use only the first ``train_size`` samples of the official training set
            (for image folders, in class-interleaved order, so any prefix is balanced).
        download: let torchvision download the files when none are found locally.
        **options: dataset-specific options, e.g. ``image_size`` and ``num_workers`` for
            ``imagefolder``; ``image_size``, ``in_chans``, ``num_classes``, ``train_samples``,
            ``test_samples`` for ``synthetic``.
    Returns:
        A ``Splits``.
    Raises:
        DataError: unknown name or option, bad arguments, or data neither found nor downloadable.
    """
    key, sep, arg = name.partition(":")
    key = key.strip().lower()
    entry = _REGISTRY.get(key)
    if entry is None:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    if entry.arg is None and sep:
        raise DataError(f"dataset {key!r} takes no ':' argument, got {name!r}")
    if entry.arg is not None and not arg:
        raise DataError(f"dataset {key!r} needs an argument: {key}:{entry.arg}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if train_size is not None and train_size < 1:
        raise DataError(f"train_size must be >= 1, got {train_size}")
    kwargs = dict(data_dir=data_dir, val_fraction=val_fraction, seed=seed, train_size=train_size,
                  download=download, **options)
    if entry.arg is not None:
        kwargs["arg"] = arg
    if data_dir is not None and not os.path.isdir(os.path.expanduser(os.fspath(data_dir))):
        # a typo must not fall back silently to another copy of the data ($EARLYEXIT_DATA, the system's)
        raise DataError(f"data folder {data_dir} does not exist")
    params = inspect.signature(entry.loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(o for o in options if o not in params)
    if unknown and not takes_any:
        own = [p for p in params if p not in ("data_dir", "val_fraction", "seed", "train_size", "download", "arg")]
        raise DataError(f"dataset {key!r} does not take option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(own) or 'none'}")
    splits = entry.loader(**kwargs)
    check_labels(splits)
    return splits


def check_labels(splits: Splits) -> None:
    """Every split's labels lie in ``0 .. num_classes - 1`` (else a ``DataError`` now, not a crash mid-training)."""
    k = splits.num_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DataError(f"{splits.name}: the number of classes must be an integer >= 1, got {k!r}")
    for part in ("train", "val", "test"):
        labels = getattr(getattr(splits, part, None), "labels", None)
        if labels is None or len(labels) == 0:
            continue
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise DataError(f"{splits.name}: the {part} split has label {bad}, outside 0..{k - 1} "
                            f"({k} classes); the label file is corrupt or of another dataset")
