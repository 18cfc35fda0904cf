"""A ``RunConfig`` from layers of settings: a file, ``--set`` overrides, the command line's flags.

Settings are a nested dict shaped like ``config.to_dict(RunConfig)`` in which any key may be left out (it
keeps the config's default): the tables ``model``, ``data``, ``train`` and ``eval`` and the keys ``init`` and
``method``; ``train.phases`` is a list of three tables (phases 1, 2, 3) or one table for every phase. The
layers, each over the one before:

1. a file (``--config``): TOML (the RunConfig part of an experiment file, ``earlyexit.experiment``), or a run
   folder's ``config.json``, read by ``earlyexit.schema`` as every file from disk is;
2. ``--set KEY=VALUE``: one key by its dotted path, ``train.phases.1.lr=0.05`` (a list index counts from 0; a
   key under ``train.phases`` without an index sets it in every phase), the value read as TOML, else as a string;
3. the flags given on the command line (``flag_settings``): ``--lr 1e-3`` sets every phase's ``lr``, and the
   older per-phase form ``--lr "5e-4;1e-3,1e-4;1e-3"`` is still read there.

Tables merge key by key; a table laid over a list of tables (``train.phases``) sets its keys in every element,
and two lists of tables of one length merge element by element. TOML has no null: ``"none"`` stands for null
in a field that may be null (``data.train_size = "none"``: the whole training split). Keys are checked against
the config classes first (an unknown one is a one-line ``ConfigError`` naming it), then the values' types
(``schema.check_run_config``), then the values themselves as the configs are built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import EARLY_STOPS, OPTIMIZERS, SCHEDULES, RunConfig, upgrade_config_dict, upgrade_run_record
from .errors import ConfigError, EarlyExitError

SECTIONS = ("model", "data", "train", "eval")  # the tables of a RunConfig (its other keys: init, method)
NULL = "none"  # TOML's stand-in for null


# --------------------------------------------------------------------------- files


def read_toml(path: str | Path) -> dict:
    """The table of a TOML file; a missing file or bad syntax is a one-line ``ConfigError``."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {' '.join(str(e).split())}") from None


def load_settings(path: str | Path) -> dict:
    """The run settings of ``path``: a TOML file (its ``experiment`` and ``preset`` tables left out: they are
    ``earlyexit.experiment``'s) or a run folder's ``config.json`` (written by the package: every section present;
    files from before ``warmup`` existed trained without it)."""
    path = Path(path)
    if path.suffix != ".json":
        return {k: v for k, v in read_toml(path).items() if k not in ("experiment", "preset")}
    from .schema import read_config_json

    try:
        raw = read_config_json(path)  # JSON read safely, the fields' types checked (one line otherwise)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    missing = [k for k in SECTIONS if k not in raw] or ([] if "phases" in raw["train"] else ["train.phases"])
    if missing:
        raise ConfigError(f"{path} is not a run configuration (the field {missing[0]!r} is missing)")
    raw = {k: v for k, v in raw.items() if k != "shapes"}  # the run's data shapes, not settings
    return upgrade_run_record(raw)  # an earlier version's keys, and its phases' missing warmup 0


# --------------------------------------------------------------------------- layers


def merge(base: Any, over: Any) -> Any:
    """``over`` laid over ``base`` (see the module docstring); neither is changed."""
    if isinstance(over, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if k in base else v
        return out
    if isinstance(over, dict) and _tables(base):
        return [merge(b, over) for b in base]
    if _tables(over) and isinstance(base, dict):
        return [merge(base, o) for o in over]
    if _tables(over) and _tables(base) and len(over) == len(base):
        return [merge(b, o) for b, o in zip(base, over)]
    return over


def _tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def parse_set(item: str) -> dict:
    """The settings of one ``--set KEY=VALUE``: ``"train.phases.1.lr=0.05"`` ->
    ``{"train": {"phases": [{}, {"lr": 0.05}, {}]}}`` (a list index makes a list of three: the phases')."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set expects KEY=VALUE with a dotted KEY (e.g. train.phases.1.lr=0.05), got {item!r}")
    value = parse_value(text.strip())
    for i, part in enumerate(reversed(parts)):
        part = part.strip()
        if part.isdigit():
            if int(part) > 2:
                raise ConfigError(f"--set {key.strip()}: index {part} is out of range (the phases are 0, 1, 2)")
            value = [value if j == int(part) else {} for j in range(3)]
            if not isinstance(value[int(part)], dict):
                raise ConfigError(f"--set {key.strip()}: an index selects a table (e.g. train.phases.1.lr)")
        else:
            value = {part: value}
    if not isinstance(value, dict):
        raise ConfigError(f"--set {key.strip()}: the path must start with a name (e.g. train.seed)")
    return value


def parse_value(text: str) -> Any:
    """``text`` as a TOML value (a number, true, a string in quotes, an array), else the text itself."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def with_sets(settings: dict, items: Iterable[str]) -> dict:
    """``settings`` with each ``--set KEY=VALUE`` of ``items`` laid over it, in order."""
    for item in items:
        settings = merge(settings, parse_set(item))
    return settings


# --------------------------------------------------------------------------- building the config


def run_config(settings: dict, source: str | None = None) -> RunConfig:
    """The ``RunConfig`` of ``settings``.

    Args:
        settings: a settings dict (module docstring); the values of flags may be tuples.
        source: what the settings came from (a file, ``--set``), named in errors; errors also name the table
            of the value they concern then. ``None`` (flags only): the config's own messages, unchanged.
    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range (one line).
    """
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: expected a table of settings, got {type(settings).__name__}")
    settings = upgrade_config_dict(settings)  # a config.json of an earlier version: model.exits is model.ic_after
    settings = _checked(RunConfig, settings, "", source)
    if source is not None:
        from .schema import check_run_config

        check_run_config(settings, source)
    return _build(RunConfig, settings, "", source)


def _checked(cls: type, d: dict, where: str, source: str | None) -> dict:
    """``d`` with its keys checked against ``cls``'s fields, ``"none"`` read as null where a field may be null,
    one value where a tuple belongs made a list, and one table for every phase made three."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else str(k)
        if k not in names:
            at = f"{source}: " if source else ""
            raise ConfigError(f"{at}unknown key {path}; valid: {', '.join(names)}")
        tp = hints[k]
        item = _item_class(tp)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _checked(tp, v, path, source)
        elif item is not None:
            if isinstance(v, dict):
                v = [v] * len(typing.get_args(tp))
            if isinstance(v, (list, tuple)):
                v = [_checked(item, p, f"{path}[{i}]", source) if isinstance(p, dict) else p for i, p in enumerate(v)]
        elif v == NULL and _nullable(tp):
            v = None
        elif _is_variadic(tp) and v is not None and not isinstance(v, (list, tuple)):
            v = [v]  # one learning rate: a grid of one
        out[k] = _as_float(tp, v)
    return out


def _as_float(tp: Any, v: Any) -> Any:
    """An integer where only a float belongs made a float (``weight_decay = 0`` in TOML is ``0.0`` on the command
    line), so that a file and the flags write the same config.json; in lists too (``lr = [1, 0.5]``)."""
    kinds = set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}
    if isinstance(v, list):
        items = {a for t in kinds if typing.get_origin(t) is tuple for a in typing.get_args(t) if a is not Ellipsis}
        return [_as_float(float, x) if items == {float} else x for x in v]
    if float in kinds and int not in kinds and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _nullable(tp: Any) -> bool:
    """A field that may be null and is not a string or null (whose "none" could be a name: ``data_dir``)."""
    args = set(typing.get_args(tp))
    return type(None) in args and args - {type(None)} != {str}


def _item_class(tp: Any) -> type | None:
    """The dataclass of a ``tuple[PhaseConfig, ...]`` field's items (None for other fields)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _is_variadic(tp: Any) -> bool:
    """``tuple[X, ...]``, alone or in a union (``PhaseConfig.lr``)."""
    kinds = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return any(typing.get_origin(t) is tuple and typing.get_args(t)[-1:] == (Ellipsis,) for t in kinds)


def _build(cls: type, d: dict, where: str, source: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        tp = hints[k]
        item = _item_class(tp)
        if dataclasses.is_dataclass(tp):
            v = _build(tp, v, path, source)
        elif item is not None:
            v = tuple(_build(item, p, f"{path}[{i}]", source) for i, p in enumerate(v))
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    try:
        return cls(**kw)
    except ConfigError as e:
        if source is None:
            raise
        raise ConfigError(f"{source}: {where + ': ' if where else ''}{e}") from None


def load_config(path: str | Path | None = None, sets: Iterable[str] = (), flags: dict | None = None,
                **fixed: Any) -> RunConfig:
    """The ``RunConfig`` of a file, ``--set`` items and the flags given (``flag_settings``), in that order.

    ``fixed`` sets top-level train keys last (``compare``: ``regime="mixed"``, the first seed).
    """
    sets = tuple(sets)
    settings = load_settings(path) if path is not None else {}
    settings = with_sets(settings, sets)
    settings = merge(settings, flag_settings(flags or {}))
    if fixed:
        settings = merge(settings, {"train": fixed})
    source = str(path) if path is not None else ("--set" if sets else None)
    return run_config(settings, source)


# --------------------------------------------------------------------------- the command line's flags


def parse_number(text: str, flag: str, *, kind: type = float, low: float | None = None, strict: bool = False) -> Any:
    """``text`` as a finite ``kind`` (>= ``low``, > when ``strict``), or a one-line error naming ``flag``."""
    try:
        v = kind(text)
    except (TypeError, ValueError):
        v = None
    if v is None or not math.isfinite(v) or (low is not None and (v <= low if strict else v < low)):
        bound = "" if low is None else f" {'>' if strict else '>='} {low:g}"
        what = "an integer" if kind is int else "a number"
        raise EarlyExitError(f"{flag}: expected {what}{bound}, got {text!r}")
    return v


def _per_phase(text: str, flag: str, parse: Callable[[str, str], Any], *, sep: str = ";") -> tuple:
    """One value for every phase, or three separated by ``sep`` (phases 1, 2, 3)."""
    parts = [t.strip() for t in str(text).split(sep)]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise EarlyExitError(f"{flag}: expected one value or three separated by '{sep}' (phases 1{sep}2{sep}3), "
                             f"got {len(parts)} in {text!r}")
    return tuple(parse(t, flag) for t in parts)


def _lr_grid(text: str, flag: str) -> list[float]:
    vals = [parse_number(t, flag, low=0, strict=True) for t in text.split(",") if t.strip()]
    if not vals:
        raise EarlyExitError(f"{flag}: expected comma-separated learning rates, got {text!r}")
    return vals


def _choice(valid: Iterable[str]) -> Callable[[str, str], str]:
    valid = tuple(valid)

    def parse(text: str, flag: str) -> str:
        if text not in valid:
            raise EarlyExitError(f"{flag}: expected one of {', '.join(valid)}, got {text!r}")
        return text
    return parse


def _patience(text: str, flag: str) -> int | None:
    if text.lower() in ("none", "off", ""):
        return None
    return parse_number(text, flag, kind=int, low=1)


PER_PHASE_FLAGS: dict[str, Callable[[str, str], Any]] = {
    "lr": _lr_grid, "optimizer": _choice(OPTIMIZERS), "weight_decay": lambda t, f: parse_number(t, f, low=0),
    "schedule": _choice(SCHEDULES), "warmup": lambda t, f: parse_number(t, f, kind=int, low=0),
    "patience": _patience, "early_stop": _choice(EARLY_STOPS)}


def model_options(items: Iterable[str]) -> dict:
    """``--model-opt KEY=VALUE`` pairs; values are read as JSON where they parse (numbers, true, lists), else as
    strings."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise EarlyExitError(f"--model-opt expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def flag_settings(flags: dict) -> dict:
    """The settings of the run/compare flags given (click's parameter names; a value of None or a missing name:
    not given, so the layers below keep theirs). Bad text is a one-line error naming its flag."""
    f = {k: v for k, v in flags.items() if v is not None}
    model: dict = {}
    data: dict = {}
    train: dict = {}
    if "batch_size" in f and f["batch_size"] <= 0:  # named by its flag here; the config checks every value again
        raise EarlyExitError(f"--batch-size must be > 0, got {f['batch_size']}")
    phases: list[dict] = [{}, {}, {}]
    if "epochs" in f:
        text = str(f["epochs"])
        per = _per_phase(text, "--epochs", lambda t, g: parse_number(t, g, kind=int), sep=";" if ";" in text else ",")
        for p, e in zip(phases, per):
            p["epochs"] = e
    if "val_metric" in f:
        for p in phases:
            p["metric"] = f["val_metric"]
    for name, parse in PER_PHASE_FLAGS.items():
        if name in f:
            for p, v in zip(phases, _per_phase(f[name], "--" + name.replace("_", "-"), parse)):
                p[name] = v
    if any(phases):
        train["phases"] = phases
    if "grad_clip" in f:
        text = f["grad_clip"]
        train["grad_clip"] = None if text.strip().lower() in ("none", "off") else \
            parse_number(text, "--grad-clip", low=0, strict=True)
    if "grad_log_every" in f:
        train["grad_log_every"] = parse_number(f["grad_log_every"], "--grad-log-every", kind=int, low=1)
    if "log" in f:  # a comma list of sinks, or none (TrainConfig checks the names)
        sinks = [t.strip() for t in f["log"].split(",") if t.strip()]
        train["log"] = [] if [t.lower() for t in sinks] in ([], ["none"]) else sinks
    if "image_size" in f:
        data["image_size"] = parse_number(f["image_size"], "--image-size", kind=int, low=1)
    kwargs = {"weights": f["weights"]} if f.get("weights") else {}
    kwargs.update(model_options(f.get("model_opts", ())))
    if kwargs:
        model["kwargs"] = kwargs
    if "ic_after" in f:
        model["ic_after"] = f["ic_after"]  # parsed once, by ModelConfig ("4,6,8" -> block indices)
    for flag, (table, key) in _PLAIN_FLAGS.items():
        if flag in f:
            {"model": model, "data": data, "train": train}[table][key] = f[flag]
    out: dict = {k: v for k, v in (("model", model), ("data", data), ("train", train)) if v}
    if "criterion" in f:
        out["eval"] = {"criterion": f["criterion"]}
    for key in ("init", "method"):
        if key in f:
            out[key] = f[key]
    return out


# flag (click's name) -> (table, key) of the flags whose value is the setting as it is
_PLAIN_FLAGS = {
    "model_name": ("model", "name"), "dataset": ("data", "name"), "data_dir": ("data", "data_dir"),
    "train_size": ("data", "train_size"), "regime": ("train", "regime"), "seed": ("train", "seed"),
    "batch_size": ("train", "batch_size"), "weighting": ("train", "weighting"), "device": ("train", "device"),
    "memory_format": ("train", "memory_format"), "compile_": ("train", "compile"),
}

__all__ = ["load_settings", "read_toml", "merge", "parse_set", "parse_value", "with_sets", "run_config", "load_config",
           "flag_settings", "model_options", "parse_number"]
