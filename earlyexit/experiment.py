"""Experiment files: one experiment of ``reproduce.sh`` as a TOML file (``configs/NAME.toml``), run by
``python -m earlyexit experiment FILE... --preset cpu|gpu|smoke --root DIR``.

A file holds run settings (``earlyexit.settings``: ``[model]``, ``[data]``, ``[train]``, ``[[train.phases]]``,
``[eval]``, ``init``, ``method``), which ``run --config FILE`` and ``compare --config FILE`` read too, and
two tables of its own:

``[experiment]``: what to run with those settings.

============  ==========================================================================================
command       ``run``, ``compare``, ``analyze``, ``plot``, ``summary`` or ``eval`` (the CLI command of that name)
out           what it writes, under the root: compare: the comparison's folder; run: the folder holding
              the run folders; analyze: the JSON file; plot: the figure; summary: the text file; eval: the
              folder that receives ``EXPERIMENT/RUN`` for each run folder (``eval --out``), e.g. the runs
              evaluated under another exit criterion (``options = { criterion = "entropy" }``)
seeds         run, compare: the seeds (default: compare's 0, 1, 2; run: ``train.seed``)
budgets       compare: the budgets, in order, e.g. ``["paper", "matched"]`` (default ``["paper"]``)
regimes       compare: the regimes to train (default all three); run: one run per regime and seed
run_name      run: each run folder's name, ``{seed}`` and ``{regime}`` filled in (default: ``run``'s)
runs          analyze, plot, summary, eval: the run folders, under the root (shell patterns allowed)
options       analyze, plot: the command's options by their long names; a list is a comma list, ``true`` a
              bare flag: ``{ what = ["rank", "plane"], max-samples = 512 }``
steps         several steps (``[[experiment.steps]]``): each a table of the keys above (the ones it leaves
              out are the experiment's) and of settings laid over the file's (``model.ic_after = "every:2"``)
presets       the presets that run it (default: cpu, gpu and those of its ``[preset.NAME]`` tables)
after         the experiments (file names without ``.toml``) that run before it
needs         files under the root without which it is skipped (e.g. the summary of the runs it analyses)
needs_data    a dataset whose files must be readable, else it is skipped (e.g. ``"cifar10"``)
vars          values for ``{name}`` in out, runs, run_name and options (``{root}`` is the root)
============  ==========================================================================================

``[preset.NAME]``: laid over the whole file (settings and ``[experiment]`` alike) for that preset, e.g.
``[preset.gpu]`` with ``data.train_size = "none"`` (TOML has no null) for the paper's full data.

Every step is one command, resumable: a run with its ``results.json``, a comparison with its summary
(``summary.json``, ``summary-matched.json``) and an analysis with its JSON file are done and skipped; a started
run (a checkpoint) or comparison (its folder) continues (``--resume``). Figures and summaries are redrawn.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import RunConfig
from .errors import ConfigError, EarlyExitError
from .settings import SECTIONS, merge, read_toml, run_config

COMMANDS = ("run", "compare", "analyze", "plot", "summary", "eval")
BUDGETS = ("paper", "matched", "flops")
PRESETS = ("cpu", "gpu")  # in the default of ``presets``
STEP_KEYS = ("command", "out", "seeds", "budgets", "regimes", "run_name", "runs", "options")
EXPERIMENT_KEYS = STEP_KEYS + ("steps", "presets", "after", "needs", "needs_data", "vars")
SETTING_KEYS = SECTIONS + ("init", "method")
OUT_FLAGS = {"analyze": "--out", "plot": "--output"}


def _summary_seeds(path: Path) -> list[int]:
    """The seeds a comparison's summary covers (none when the file is not one)."""
    from .schema import read_json

    try:
        return [int(x) for x in read_json(path).get("seeds", [])]
    except (EarlyExitError, ValueError, TypeError, AttributeError):
        return []


@dataclass(frozen=True)
class Step:
    """One command of an experiment, with everything it needs (paths already under the root)."""

    command: str                              # run | compare | analyze | plot | summary
    out: Path                                 # the run or comparison folder, or the file written
    config: RunConfig | None = None           # run, compare
    seeds: tuple[int, ...] = ()               # compare
    budget: str = "paper"                     # compare
    regimes: tuple[str, ...] | None = None    # compare: None = all three
    runs: tuple[str, ...] = ()                # analyze, plot, summary: run folders (shell patterns)
    args: tuple[str, ...] = ()                # analyze, plot: the options, as on the command line

    def state(self) -> str:
        """``"done"`` (skipped), ``"started"`` (resumed) or ``"new"``."""
        if self.command == "run":
            return "done" if (self.out / "results.json").is_file() else \
                "started" if (self.out / "checkpoint.pt").is_file() else "new"
        if self.command == "compare":  # compare.py names a budget's summary so
            name = "summary.json" if self.budget == "paper" else f"summary-{self.budget}.json"
            if (self.out / name).is_file() and set(self.seeds) <= set(_summary_seeds(self.out / name)):
                return "done"  # a summary over fewer seeds than asked (seeds added later) is resumed
            return "started" if self.out.is_dir() and any(self.out.iterdir()) else "new"
        if self.command == "analyze":
            return "done" if self.out.is_file() else "new"
        if self.command == "eval":
            done = [(t / "results.json").is_file() for t in self.eval_targets().values()]
            return "done" if all(done) else "started" if any(done) else "new"
        return "new"  # figures and summaries are cheap: drawn again

    def run_dirs(self) -> list[str]:
        """``runs`` with their shell patterns expanded (sorted; a pattern that matches nothing stays as it is)."""
        out = []
        for r in self.runs:
            hits = sorted(glob.glob(r)) if glob.has_magic(r) else []
            out += hits or [r]
        return out

    def eval_targets(self) -> dict[str, Path]:
        """eval: each run folder and the folder its evaluation goes to, ``out/EXPERIMENT/RUN`` (a shell pattern that
        matches nothing yet adds nothing: its runs are evaluated once they exist)."""
        dirs = [d for r in self.runs for d in (sorted(glob.glob(r)) if glob.has_magic(r) else [r])]
        return {d: self.out / Path(d).parent.name / Path(d).name for d in dirs}

    def describe(self) -> str:
        """One line: the command and what it writes."""
        if self.command == "compare":
            extra = f" (budget {self.budget}, seeds {','.join(map(str, self.seeds))})"
        elif self.command == "run":
            extra = f" ({self.config.train.regime}, seed {self.config.train.seed})" if self.config else ""
        else:
            extra = f" ({len(self.runs)} run folder{'s' * (len(self.runs) != 1)})"
        return f"{self.command} {self.out}{extra}"


@dataclass(frozen=True)
class Experiment:
    """An experiment file read for one preset."""

    name: str                                 # the file's name without .toml (reproduce.sh's ONLY names it)
    path: Path
    presets: tuple[str, ...]
    after: tuple[str, ...] = ()
    needs: tuple[Path, ...] = ()
    needs_data: str | None = None
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def missing(self, *, check_data: bool = True) -> str | None:
        """Why the experiment cannot run here (a file it needs, a dataset not found), or None."""
        for f in self.needs:
            if not f.exists():
                return f"{f} is not there yet"
        if self.needs_data is not None and check_data:
            from .data import load_dataset

            try:
                load_dataset(self.needs_data, train_size=10)
            except (EarlyExitError, OSError):
                return f"the {self.needs_data} files are not found"
        return None


def load_experiment(path: str | Path, *, preset: str | None = None, root: str | Path = "results") -> Experiment:
    """The experiment of a TOML file, its ``[preset.NAME]`` laid over it, its paths under ``root``.

    Raises:
        ConfigError: a bad file, key or value (one line naming the file and the key).
    """
    path, root = Path(path), Path(root)
    raw = read_toml(path)
    presets = raw.pop("preset", {})
    if not isinstance(presets, dict) or not all(isinstance(v, dict) for v in presets.values()):
        raise ConfigError(f"{path}: preset must hold tables, one per preset ([preset.gpu])")
    if preset is not None and preset in presets:
        raw = merge(raw, presets[preset])
    exp = raw.pop("experiment", None)
    if not isinstance(exp, dict):
        raise ConfigError(f"{path}: no [experiment] table (a file of run settings alone is read by run --config)")
    _check_keys(exp, EXPERIMENT_KEYS, path, "experiment")
    wanted = tuple(_strings(exp.get("presets", [*PRESETS, *(p for p in presets if p not in PRESETS)]), path,
                            "experiment.presets"))
    vars_ = {**_table(exp.get("vars", {}), path, "experiment.vars"), "root": str(root)}
    steps: list[Step] = []
    if preset is None or preset in wanted:
        base = {k: v for k, v in exp.items() if k in STEP_KEYS}
        listed = exp.get("steps")
        if listed is not None and (not isinstance(listed, list) or not all(isinstance(s, dict) for s in listed)):
            raise ConfigError(f"{path}: experiment.steps must be a list of tables ([[experiment.steps]])")
        for i, s in enumerate(listed or [{}]):
            where = f"experiment.steps[{i}]" if listed else "experiment"
            _check_keys(s, STEP_KEYS + SETTING_KEYS, path, where)
            own = {k: v for k, v in s.items() if k in STEP_KEYS}
            settings = merge(raw, {k: v for k, v in s.items() if k in SETTING_KEYS})
            steps += _steps({**base, **own}, own if listed else base, settings, path, where, root, vars_)
    return Experiment(name=path.stem, path=path, presets=wanted,
                      after=tuple(_strings(exp.get("after", []), path, "experiment.after")),
                      needs=tuple(root / _fill(n, vars_, path, "experiment.needs")
                                  for n in _strings(exp.get("needs", []), path, "experiment.needs")),
                      needs_data=_string(exp.get("needs_data"), path, "experiment.needs_data", optional=True),
                      steps=tuple(steps))


def in_order(paths: Iterable[str | Path], *, preset: str | None = None, root: str | Path = "results") -> list[Experiment]:
    """The experiments of ``paths`` that ``preset`` runs (all for None), each after those it names in ``after``
    (among these), else by name."""
    exps = sorted((load_experiment(p, preset=preset, root=root) for p in paths), key=lambda e: e.name)
    exps = [e for e in exps if preset is None or preset in e.presets]
    names = {e.name for e in exps}
    done: list[Experiment] = []
    while len(done) < len(exps):
        ready = [e for e in exps if e not in done and all(a in {d.name for d in done} or a not in names for a in e.after)]
        if not ready:
            raise ConfigError(f"experiments wait for each other in a circle: "
                              f"{', '.join(e.name for e in exps if e not in done)}")
        done.append(ready[0])
    return done


def _steps(exp: dict, own: dict, settings: dict, path: Path, where: str, root: Path, vars_: dict) -> list[Step]:
    """The steps of one table of ``[experiment]`` (``exp``: its keys and the experiment's; ``own``: its own,
    which must apply to its command)."""
    command = _string(exp.get("command"), path, f"{where}.command")
    if command not in COMMANDS:
        raise ConfigError(f"{path}: {where}.command must be one of {', '.join(COMMANDS)}, got {command!r}")
    out = root / _fill(_string(exp.get("out"), path, f"{where}.out"), vars_, path, f"{where}.out")
    for key in own:
        if key not in _USED_BY[command]:
            raise ConfigError(f"{path}: {where}.{key} does not apply to {command}")
    source = f"{path} ({where})"
    if command == "compare":
        seeds = _ints(exp.get("seeds", [0, 1, 2]), path, f"{where}.seeds")
        budgets = _strings(exp.get("budgets", ["paper"]), path, f"{where}.budgets")
        bad = [b for b in budgets if b not in BUDGETS]
        if bad or not seeds:
            raise ConfigError(f"{path}: {where}: " + (f"unknown budget {bad[0]!r}; valid: {', '.join(BUDGETS)}"
                                                      if bad else "seeds: give at least one"))
        regimes = tuple(_strings(exp["regimes"], path, f"{where}.regimes")) if "regimes" in exp else None
        cfg = run_config(merge(settings, {"train": {"regime": "mixed", "seed": seeds[0]}}), source)  # as compare
        return [Step("compare", out, cfg, tuple(seeds), b, regimes) for b in budgets]
    if command == "run":
        steps = []
        for regime in _strings(exp.get("regimes", [None]), path, f"{where}.regimes", none=True):
            for seed in _ints(exp.get("seeds", [None]), path, f"{where}.seeds", none=True):
                fixed = {k: v for k, v in (("regime", regime), ("seed", seed)) if v is not None}
                cfg = run_config(merge(settings, {"train": fixed}) if fixed else settings, source)
                name = exp.get("run_name")
                if name is None:
                    from .runs import default_out_dir

                    name = default_out_dir(cfg).name
                else:
                    name = _fill(_string(name, path, f"{where}.run_name"),
                                 {**vars_, "seed": cfg.train.seed, "regime": cfg.train.regime}, path, f"{where}.run_name")
                steps.append(Step("run", out / name, cfg))
        return steps
    runs = tuple(str(root / _fill(r, vars_, path, f"{where}.runs"))
                 for r in _strings(exp.get("runs", []), path, f"{where}.runs"))
    if not runs:
        raise ConfigError(f"{path}: {where}.runs: {command} needs at least one run folder")
    args: list[str] = [OUT_FLAGS[command], str(out)] if command in OUT_FLAGS else []
    for key, value in _table(exp.get("options", {}), path, f"{where}.options").items():
        args += _option(key, value, vars_, path, f"{where}.options.{key}")
    return [Step(command, out, runs=runs, args=tuple(args))]


# the keys of [experiment] each command reads
_USED_BY = {"run": {"command", "out", "seeds", "regimes", "run_name"},
            "compare": {"command", "out", "seeds", "budgets", "regimes"},
            "analyze": {"command", "out", "runs", "options"}, "plot": {"command", "out", "runs", "options"},
            "summary": {"command", "out", "runs"}, "eval": {"command", "out", "runs", "options"}}


def _option(key: str, value: Any, vars_: dict, path: Path, where: str) -> list[str]:
    """One option as command-line arguments: ``max-samples = 512`` -> ``["--max-samples", "512"]``."""
    flag = "--" + key
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + key]
    if isinstance(value, list) and value and all(isinstance(v, (str, int, float)) for v in value):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, (str, int, float)):
        raise ConfigError(f"{path}: {where} must be a string, a number, true/false or a list of them")
    return [flag, _fill(str(value), vars_, path, where)]


def _fill(text: str, vars_: dict, path: Path, where: str) -> str:
    """``text`` with its ``{name}`` replaced from ``vars``."""
    try:
        return text.format_map(vars_)
    except KeyError as e:
        raise ConfigError(f"{path}: {where} names {{{e.args[0]}}}, which experiment.vars does not hold") from None
    except (ValueError, IndexError) as e:
        raise ConfigError(f"{path}: {where}: {e} in {text!r}") from None


def _check_keys(d: dict, valid: tuple, path: Path, where: str) -> None:
    for k in d:
        if k not in valid:
            raise ConfigError(f"{path}: unknown key {where}.{k}; valid: {', '.join(valid)}")


def _table(v: Any, path: Path, where: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{path}: {where} must be a table, got {v!r}")
    return v


def _string(v: Any, path: Path, where: str, *, optional: bool = False) -> Any:
    if (v is None and not optional) or (v is not None and not isinstance(v, str)):
        raise ConfigError(f"{path}: {where} must be a string, got {'nothing' if v is None else repr(v)}")
    return v


def _strings(v: Any, path: Path, where: str, *, none: bool = False) -> list:
    if not isinstance(v, list) or not all(isinstance(x, str) or (none and x is None) for x in v):
        raise ConfigError(f"{path}: {where} must be a list of strings, got {v!r}")
    return v


def _ints(v: Any, path: Path, where: str, *, none: bool = False) -> list:
    ok = isinstance(v, list) and all((isinstance(x, int) and not isinstance(x, bool)) or (none and x is None) for x in v)
    if not ok:
        raise ConfigError(f"{path}: {where} must be a list of integers, got {v!r}")
    return v


__all__ = ["Experiment", "Step", "load_experiment", "in_order", "COMMANDS"]
