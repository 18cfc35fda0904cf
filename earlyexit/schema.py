"""Files read back from disk, checked against their schema before any value in them is used.

A run folder, a config or a data folder someone sent may hold anything: a damaged file, a foreign one,
or one crafted to break the reader. Every file the package did not just write goes through here:

- ``read_json`` / ``read_json_lines``: the one JSON reader. A file that is not UTF-8 JSON, or that nests
  deeper than ``MAX_DEPTH`` levels (the parser would otherwise die with a ``RecursionError``), is a one-line
  ``FileSchemaError``;
- ``check_run_config``: the field types of a ``config.json`` (or a checkpoint's recorded options), read off
  the config dataclasses' annotations (``data_dir`` a string or null, ``init`` a string or null, ...); the
  values themselves are then checked by the config classes as they are built;
- ``check_results``: every field of a ``results.json`` that a reader uses (numbers where numbers belong, a
  positive ``base_flops``, ...), after ``Results.from_dict`` has checked the fields are there;
- ``check_checkpoint``: a training checkpoint's keys, their types and the position it resumes from.

A ``FileSchemaError`` is an ``EarlyExitError``: the command line prints its one line and exits with code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import EarlyExitError

MAX_DEPTH = 64  # the deepest any file of the package nests is about 6 levels


class FileSchemaError(EarlyExitError):
    """A file read from disk is damaged, foreign or crafted: it does not fit what the package writes there."""


# --------------------------------------------------------------------------- the one JSON reader


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value of ``path``; ``FileSchemaError`` (one line naming the file) when it is not UTF-8 JSON or
    nests deeper than ``MAX_DEPTH`` levels. ``OSError`` passes through (the CLI prints it as path and cause)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise FileSchemaError(f"{path} nests deeper than {MAX_DEPTH} levels (a damaged or crafted file)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, integers too long to convert
        raise FileSchemaError(f"{path} is not valid JSON ({_one_line(e)})") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise FileSchemaError(f"{path} nests deeper than {MAX_DEPTH} levels (a damaged or crafted file)")
    return value


def read_json_lines(path: str | os.PathLike, item: Callable[[Any, str], None] | None = None) -> list[Any]:
    """The values of a JSON-lines file (blank lines skipped), each checked by ``item`` (a spec of this module)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileSchemaError(f"{path} is not valid JSON lines ({_one_line(e)})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            value = _TOO_DEEP
        except ValueError as e:
            raise FileSchemaError(f"{path}, line {n}, is not valid JSON ({_one_line(e)})") from None
        if value is _TOO_DEEP or _depth_exceeds(value, MAX_DEPTH):
            raise FileSchemaError(f"{path}, line {n}, nests deeper than {MAX_DEPTH} levels (a damaged or crafted file)")
        if item is not None:
            try:
                item(value, "")
            except _Bad as e:
                raise FileSchemaError(f"{path}, line {n}, does not fit its schema: {e.text()}") from None
        out.append(value)
    return out


_TOO_DEEP = object()


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether lists / dicts / tuples nest more than ``limit`` levels (iteratively: no recursion)."""
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, (list, tuple)):
            continue
        if d > limit:
            return True
        todo.extend((x, d + 1) for x in v)
    return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


# --------------------------------------------------------------------------- specs: small checkers


class _Bad(Exception):
    """``where`` must be ``want``, got ``got``."""

    def __init__(self, where: str, want: str, got: Any, missing: bool = False) -> None:
        super().__init__(where)
        self.where, self.want, self.got, self.missing = where, want, got, missing

    def text(self) -> str:
        where = self.where or "the value"
        if self.missing:
            return f"{where} is missing"
        return f"{where} must be {self.want}, got {_describe(self.got)}"


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "a list"
    if v is None or isinstance(v, (bool, int, float, str)):
        r = repr(v) if not isinstance(v, bool) else str(v).lower()
        return r if len(r) <= 40 else r[:37] + "..."
    return f"a {type(v).__name__}"


Spec = Callable[[Any, str], None]
_INT64 = 2 ** 63


def _leaf(test: Callable[[Any], bool], want: str) -> Spec:
    def check(v: Any, where: str) -> None:
        if not test(v):
            raise _Bad(where, want, v)
    check.want = want  # type: ignore[attr-defined]
    return check


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -_INT64 <= v < _INT64


def _is_num(v: Any) -> bool:
    return _is_int(v) or isinstance(v, float)


def _is_finite(v: Any) -> bool:
    import math

    return _is_num(v) and math.isfinite(v)


def _is_tensor(v: Any) -> bool:
    import torch

    return isinstance(v, torch.Tensor)


ANY: Spec = _leaf(lambda v: True, "anything")
INT: Spec = _leaf(_is_int, "an integer")
NUM: Spec = _leaf(_is_num, "a number")
FINITE: Spec = _leaf(_is_finite, "a finite number")
STR: Spec = _leaf(lambda v: isinstance(v, str), "a string")
BOOL: Spec = _leaf(lambda v: isinstance(v, bool), "true or false")
NONE: Spec = _leaf(lambda v: v is None, "null")
TENSOR: Spec = _leaf(_is_tensor, "a tensor")


def at_least(spec: Spec, low: float, want: str) -> Spec:
    def check(v: Any, where: str) -> None:
        spec(v, where)
        if v < low:
            raise _Bad(where, want, v)
    check.want = want  # type: ignore[attr-defined]
    return check


def one_of(*specs: Spec) -> Spec:
    want = " or ".join(getattr(s, "want", "?") for s in specs)

    def check(v: Any, where: str) -> None:
        for s in specs:
            try:
                s(v, where)
                return
            except _Bad as e:
                if e.where != where:  # the right kind of value with a bad part: report the part
                    raise
        raise _Bad(where, want, v)
    check.want = want  # type: ignore[attr-defined]
    return check


def opt(spec: Spec) -> Spec:
    return one_of(spec, NONE)


def list_of(item: Spec, length: int | None = None) -> Spec:
    want = "a list" if length is None else f"a list of {length}"

    def check(v: Any, where: str) -> None:
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise _Bad(where, want, v)
        for i, x in enumerate(v):
            item(x, f"{where}[{i}]")
    check.want = want  # type: ignore[attr-defined]
    return check


def dict_of(value: Spec, key: Spec = STR) -> Spec:
    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(where, "an object", v)
        for k, x in v.items():
            key(k, f"{where}[{k!r}] (a key)" if where else f"[{k!r}] (a key)")
            value(x, _join(where, str(k)))
    check.want = "an object"  # type: ignore[attr-defined]
    return check


def obj(fields: dict[str, Spec], required: Iterable[str] = (), other: Spec = ANY) -> Spec:
    """An object whose ``fields`` (when present) fit their specs, ``required`` ones present, any other key ``other``."""
    required = tuple(required)

    def check(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(where, "an object", v)
        for name in required:
            if name not in v:
                raise _Bad(_join(where, name), "", None, missing=True)
        for k, x in v.items():
            (fields.get(k, other) if isinstance(k, str) else other)(x, _join(where, str(k)))
    check.want = "an object"  # type: ignore[attr-defined]
    return check


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _plain_json(v: Any, where: str) -> None:
    """A JSON value: null, true/false, numbers, strings, lists and objects of them (iteratively)."""
    todo = [(v, where)]
    while todo:
        x, w = todo.pop()
        if isinstance(x, dict):
            todo.extend((y, _join(w, str(k))) for k, y in x.items())
        elif isinstance(x, (list, tuple)):
            todo.extend((y, f"{w}[{i}]") for i, y in enumerate(x))
        elif not (x is None or isinstance(x, (bool, str)) or _is_num(x)):
            raise _Bad(w, "plain data (numbers, strings, lists, objects)", x)


_plain_json.want = "plain data"  # type: ignore[attr-defined]
JSON: Spec = _plain_json


def _run(spec: Spec, value: Any, message: Callable[[str], str]) -> None:
    try:
        spec(value, "")
    except _Bad as e:
        raise FileSchemaError(message(e.text())) from None


# --------------------------------------------------------------------------- config.json


def _spec_of_type(tp: Any) -> Spec:
    """The spec of a config field's annotation (JSON turns tuples into lists)."""
    import dataclasses
    import types
    import typing

    if tp is Any:
        return ANY
    if dataclasses.is_dataclass(tp):
        return _config_spec(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return one_of(*(_spec_of_type(a) for a in args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return list_of(_spec_of_type(args[0]))
        items = [_spec_of_type(a) for a in args]

        def check(v: Any, where: str) -> None:
            list_of(ANY, len(items))(v, where)
            for i, (s, x) in enumerate(zip(items, v)):
                s(x, f"{where}[{i}]")
        check.want = f"a list of {len(items)}"  # type: ignore[attr-defined]
        return check
    if tp is dict or origin is dict:
        return dict_of(ANY)
    return {int: INT, float: NUM, str: STR, bool: BOOL, type(None): NONE}.get(tp, ANY)


_CONFIG_OVERRIDES: dict[tuple[str, str], Spec] = {
    # ModelConfig.ic_after is typed Any: None (the model's default), block indices, a rule such as "every:2", or the
    # node names of a graph model (torchvision:NAME)
    ("ModelConfig", "ic_after"): one_of(NONE, STR, list_of(one_of(INT, STR))),
}


def _config_spec(cls: type) -> Spec:
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    fields = {f.name: _CONFIG_OVERRIDES.get((cls.__name__, f.name)) or _spec_of_type(hints[f.name])
              for f in dataclasses.fields(cls)}
    return obj(fields)  # missing fields keep their defaults; unknown ones are refused when the config is built


_RUN_CONFIG_SPEC: Spec | None = None


def check_run_config(raw: Any, source: str | os.PathLike) -> None:
    """The types of the fields of a run config dict (a ``config.json``, a checkpoint's options) that are present.

    A file of an earlier version is checked in today's keys (``config.upgrade_config_dict``: its ``model.exits``,
    the IC placement, as ``model.ic_after``).

    Raises:
        FileSchemaError: ``"{source} is not a valid run config: data.data_dir must be a string or null, got 5"``.
    """
    global _RUN_CONFIG_SPEC
    if not isinstance(raw, dict):
        raise FileSchemaError(f"{source} is not a valid run config: it holds {_describe(raw)}, not an object")
    if _depth_exceeds(raw, MAX_DEPTH):
        raise FileSchemaError(f"{source} is not a valid run config: it nests deeper than {MAX_DEPTH} levels")
    from .config import RunConfig, upgrade_config_dict

    if _RUN_CONFIG_SPEC is None:
        _RUN_CONFIG_SPEC = _config_spec(RunConfig)
    try:
        raw = upgrade_config_dict(raw)  # an earlier version's keys (model.exits) read as today's (model.ic_after)
    except ValueError as e:
        raise FileSchemaError(f"{source} is not a valid run config: {e}") from None
    _run(_RUN_CONFIG_SPEC, {k: v for k, v in raw.items() if k != "shapes"},
         lambda m: f"{source} is not a valid run config: {m}")


def read_config_json(path: str | os.PathLike) -> dict:
    """A ``config.json`` read safely and its field types checked (``read_json`` + ``check_run_config``)."""
    raw = read_json(path)
    check_run_config(raw, path)
    return raw


# --------------------------------------------------------------------------- results.json

_NUMS = list_of(opt(NUM))  # non-finite numbers are written as null
_COUNTS = list_of(list_of(INT))
_BUDGETS = dict_of(opt(NUM))
_CURVE = obj({"criterion": STR, "thresholds": list_of(FINITE), "flops": list_of(FINITE), "accuracy": list_of(FINITE),
              "exit_counts": _COUNTS})
_CALIBRATED = obj({"criterion": STR, "mode": STR, "targets": list_of(FINITE), "thresholds": list_of(list_of(opt(NUM))),
                   "flops": list_of(FINITE), "accuracy": list_of(FINITE), "val_flops": _NUMS, "exit_counts": _COUNTS})
_PHASE = _leaf(lambda v: _is_int(v) and 1 <= v <= 3, "1, 2 or 3")
_PHASE_RECORD = obj({"phase": _PHASE, "lr": opt(NUM), "best_epoch": opt(INT), "best_val": opt(NUM),
                     "epochs": at_least(INT, 0, "an integer >= 0"),
                     "grid": list_of(obj({"lr": opt(NUM), "best_val": opt(NUM), "best_epoch": opt(INT),
                                          "epochs": at_least(INT, 0, "an integer >= 0")}))}, required=("phase",))
RESULTS_SPEC: Spec = obj({
    "regime": STR, "regime_name": STR, "model": STR, "dataset": STR, "seed": INT,
    "base_flops": at_least(FINITE, 1e-300, "a positive number"),
    "exits": list_of(obj({"index": INT, "flops": at_least(FINITE, 0, "a number >= 0"), "accuracy": FINITE,
                          "stage": opt(INT)})),
    "curve": _CURVE, "budgets": _BUDGETS,
    "calibrated_geometric": opt(_CALIBRATED), "calibrated_global": opt(_CALIBRATED), "calibrated_budgets": opt(_BUDGETS),
    "method": opt(STR), "weighting": opt(STR),
    "train": opt(obj({"phases": list_of(_PHASE_RECORD), "method_stage": opt(list_of(JSON)), "seconds": opt(NUM)})),
    "timing": opt(obj({"train_seconds": opt(NUM), "platform": opt(STR)})),
}, required=("regime", "model", "dataset", "seed", "base_flops", "exits", "curve", "budgets"))


def check_results(raw: Any) -> None:
    """Every field of a results.json dict that a reader uses has its type (and ``base_flops`` > 0, curves of one
    length). Raises ``FileSchemaError``: ``"results do not fit the schema: curve.flops[3] must be a number, ..."``."""
    msg = lambda m: f"results do not fit the schema: {m}"  # noqa: E731
    _run(RESULTS_SPEC, raw, msg)
    c = raw["curve"]
    if not len(c["flops"]) == len(c["accuracy"]):
        raise FileSchemaError(msg(f"curve.flops and curve.accuracy differ in length ({len(c['flops'])}, "
                                  f"{len(c['accuracy'])})"))
    for k in ("calibrated_geometric", "calibrated_global"):
        cal = raw.get(k)
        if cal is not None and len(cal["flops"]) != len(cal["accuracy"]):
            raise FileSchemaError(msg(f"{k}.flops and {k}.accuracy differ in length"))


# --------------------------------------------------------------------------- gradients.jsonl

PROBE_RECORD: Spec = obj({"phase": INT, "epoch": INT, "step": INT, "cos": list_of(opt(NUM)), "grid": opt(INT),
                          "lr": opt(NUM)}, required=("phase", "epoch", "step", "cos"))


# --------------------------------------------------------------------------- training checkpoints

_STATE = dict_of(TENSOR)
_BEST = obj({"val": NUM, "epoch": INT, "state": _STATE, "lr": opt(NUM)}, required=("val", "epoch", "state"))
_OPTIMIZER = obj({"state": dict_of(dict_of(one_of(TENSOR, NUM, BOOL, NONE)), key=INT),
                  "param_groups": list_of(obj({"params": list_of(INT)}, required=("params",),
                                              other=one_of(NUM, BOOL, NONE, list_of(NUM))))},
                 required=("state", "param_groups"))
_NONNEG = at_least(INT, 0, "an integer >= 0")
CHECKPOINT_SPEC: Spec = obj({
    "version": INT, "phases": STR, "seconds": NUM,
    "phase": _leaf(lambda v: _is_int(v) and 1 <= v <= 4, "1, 2, 3 or 4"), "grid": _NONNEG, "epoch": _NONNEG,
    "bad": _NONNEG, "phase_start": opt(_STATE), "run_best": opt(_BEST), "grid_best": opt(_BEST),
    "grid_log": list_of(obj({"lr": NUM, "best_val": NUM, "best_epoch": INT, "epochs": INT},
                            required=("lr", "best_val", "best_epoch", "epochs"))),
    "optimizer": opt(_OPTIMIZER),
    "records": list_of(obj({"phase": INT, "lr": opt(NUM), "best_epoch": INT, "best_val": NUM,
                            "grid": list_of(JSON)}, required=("phase", "lr", "best_epoch", "best_val", "grid"))),
    "history": list_of(dict_of(JSON)), "exit_best": opt(list_of(NUM)), "probe_log": list_of(dict_of(JSON)),
    "options": opt(dict_of(JSON)), "model": _STATE,
}, required=("phases", "phase", "grid", "epoch", "bad", "phase_start", "run_best", "grid_best", "grid_log",
             "optimizer", "records", "history", "model"))


def check_checkpoint(d: Any, source: str | os.PathLike, *, phases: str | None = None,
                     lr_grids: Iterable[int] | None = None) -> None:
    """A training checkpoint's keys and types, and a position it can resume from.

    Args:
        d: what ``io.load_checkpoint`` read.
        source: the file (named in the error).
        phases: the phase string of the run that resumes it (another regime's checkpoint is refused first).
        lr_grids: the number of learning rates of each phase of the run that resumes it (its grid point must be one).
    Raises:
        FileSchemaError: ``"{source} is not a training checkpoint of this package: run_best must be an object or
            null, got 'x'"``.
    """
    head = f"{source} is not a training checkpoint of this package"
    if not isinstance(d, dict):
        raise FileSchemaError(f"{head}: it holds {_describe(d)}, not a dict")
    if phases is not None and isinstance(d.get("phases"), str) and d["phases"] != phases:
        raise FileSchemaError(f"{source} was written by regime {_describe(d['phases'])}, not {phases!r}")
    _run(CHECKPOINT_SPEC, d, lambda m: f"{head}: {m}")
    if d["epoch"] > 0 and d["optimizer"] is None:
        raise FileSchemaError(f"{head}: it resumes at epoch {d['epoch'] + 1} but holds no optimizer state")
    if lr_grids is not None and d["phase"] <= 3:
        n = list(lr_grids)[d["phase"] - 1]
        if d["grid"] >= n:
            raise FileSchemaError(f"{head}: it resumes at learning rate {d['grid'] + 1} of phase {d['phase']}, "
                                  f"whose grid has {n}")


def check_optimizer_shapes(optimizer: Any, shapes: list[tuple[int, ...]], source: str | os.PathLike) -> None:
    """A checkpoint's optimizer state against the shapes of the parameters it will be loaded for (those the phase
    trains, in order): as many parameters, and every per-parameter tensor (momentum, moments) of its parameter's
    shape. ``FileSchemaError`` otherwise (torch would load it and fail at the first step)."""
    head = f"{source} is not a training checkpoint of this package"
    if optimizer is None:
        return
    ids = [i for g in optimizer["param_groups"] for i in g["params"]]
    if len(set(ids)) != len(ids):
        raise FileSchemaError(f"{head}: its optimizer's parameter groups name a parameter twice")
    if len(ids) != len(shapes):
        raise FileSchemaError(f"{head}: its optimizer state covers {len(ids)} parameters, the phase trains "
                              f"{len(shapes)}")
    slot = {i: n for n, i in enumerate(ids)}
    for i, entry in optimizer["state"].items():
        if i not in slot:
            raise FileSchemaError(f"{head}: its optimizer state names parameter {i}, which no group holds")
        for k, v in entry.items():
            if _is_tensor(v) and v.dim() > 0 and tuple(v.shape) != shapes[slot[i]]:
                raise FileSchemaError(f"{head}: optimizer.state[{i}].{k} has shape {tuple(v.shape)}, its parameter "
                                      f"{shapes[slot[i]]}")


__all__ = ["MAX_DEPTH", "FileSchemaError", "read_json", "read_json_lines", "read_config_json", "check_run_config",
           "check_results", "check_checkpoint", "check_optimizer_shapes", "RESULTS_SPEC", "CHECKPOINT_SPEC", "PROBE_RECORD"]
