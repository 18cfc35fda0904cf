"""Command line: ``python -m earlyexit run | eval | plot | bench``.

The commands only map flags onto the config dataclasses and call the library.
User errors print one line (``error: ...``) and exit with code 2.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import click

from .config import (LOG_SINKS, MEMORY_FORMATS, OPTIMIZERS, SCHEDULES, VAL_METRICS, DataConfig, ModelConfig,
                     PhaseConfig, RunConfig, TrainConfig)
from .errors import EarlyExitError
from .settings import parse_number as _number  # flag text -> number, errors naming the flag

if TYPE_CHECKING:
    from .results import Results


def _user_errors(fn):
    """Turn the package's own errors (``EarlyExitError``) and file-system errors (``OSError``) into one line on
    stderr and exit code 2. Anything else (a ``ValueError``, ``KeyError``, ``RuntimeError``...) is a bug of ours
    and keeps its traceback: code that checks user input raises an ``EarlyExitError`` subclass.

    Under torchrun only rank 0 prints (every rank meets the same error); Ctrl-C exits with 130.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EarlyExitError, OSError) as e:  # the package's own errors (ConfigError, DataError, ...) and the OS's
            if isinstance(e, OSError):
                from .rundir import describe_os_error

                msg = describe_os_error(e, "cannot access")
            else:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _echo_once(f"error: {msg}")
            sys.exit(2)
        except KeyboardInterrupt as e:
            _echo_once(str(e) or "interrupted")
            sys.exit(130)

    return wrapper


def _echo_once(msg: str) -> None:
    """Print on stderr from one process only (rank 0 under torchrun)."""
    import os

    if os.environ.get("RANK", "0") == "0":
        click.echo(msg, err=True)


class Progress:
    """Rank 0's log hook: a progress line per epoch on a terminal, a summary line per epoch always."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.wants_steps = self.tty  # the per-step bar is drawn on a terminal only
        self.t_epoch = time.time()

    def __call__(self, event: str, **k) -> None:
        if event == "phase":
            click.echo(f"phase {k['phase']}: exits {k['exits']}, lr grid {k['lr_grid']}, up to {k['epochs']} epochs", err=True)
        elif event == "step" and self.tty:
            n, total = k["step"], k["steps"]
            bar = "#" * int(24 * n / total)
            self.stream.write(f"\r  p{k['phase']} e{k['epoch']} [{bar:<24}] {n}/{total} loss {k['loss']:.4f} "
                              f"acc {k['acc'] * 100:.1f}")
            self.stream.flush()
        elif event == "epoch":
            if self.tty:
                self.stream.write("\r" + " " * 72 + "\r")
            acc = " ".join(f"{a * 100:.1f}" for a in k["val_acc"])
            eta = f", about {k['eta'] / 60:.0f} min left" if "eta" in k else ""
            click.echo(f"  phase {k['phase']} lr {k['lr']:g} epoch {k['epoch']}: loss {k['train_loss']:.4f}, "
                       f"val acc [{acc}] ({k['seconds']:.0f}s{eta})", err=True)
        elif event == "run":
            click.echo(f"{k['regime']}, seed {k['seed']}: {k['out']}", err=True)


def print_summary(res: Results) -> None:
    base = res.base_flops
    click.echo(f"\n{res.model} on {res.dataset}, regime {res.regime_name} ({res.regime}), seed {res.seed}")
    click.echo(f"{'exit':>4} {'stage':>5} {'cost %':>7} {'test acc %':>10}")
    for e in res.exits:
        stage = "" if e.stage is None else e.stage
        click.echo(f"{e.index:>4} {stage:>5} {e.flops / base * 100:>7.1f} {e.accuracy * 100:>10.2f}")
    cells = "  ".join(f"{k}: {'-' if v is None else f'{v * 100:.2f}'}" for k, v in res.budgets.items())
    click.echo(f"budgets (best accuracy at <= share of backbone cost, {res.curve.criterion}): {cells}")


# The defaults shown and used are the config's own (one set of defaults for the library and the CLI).
_P, _T, _M, _D = PhaseConfig(), TrainConfig(), ModelConfig(), DataConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Early-exit networks trained jointly, disjointly or mixed."""


def _config_options(fn: Callable) -> Callable:
    """The options that build a ``RunConfig`` (model, data, optimisation, method, device): shared by run and compare."""
    for option in reversed([
        click.option("--model", "model_name", default=_M.name, show_default=True, help="Backbone (see `python -m earlyexit models`)."),
        click.option("--ic-after", default=None, help="IC placement, the blocks ICs follow: indices '4,6,8', 'every:N', 'sdn', 'none' or 'default'."),
        click.option("--weights", default=None, help="Pretrained weights: a torchvision state_dict file (ResNet, ViT, "
                  "EfficientNet, torchvision:NAME), a torchvision weights name, a BERT folder or 'minilm-l6', or a run "
                  "folder of this package's (any model)."),
        click.option("--model-opt", "model_opts", multiple=True, metavar="KEY=VALUE",
                  help="A field of the model's config, repeatable, e.g. head_pool=mean (BERT), head=mlp1024 (ViT), width=2 "
                  "(ResNet-20)."),
        click.option("--dataset", default=_D.name, show_default=True, help="Dataset name (see `python -m earlyexit datasets`)."),
        click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Local data root searched first."),
        click.option("--train-size", default=None, type=int, help="Use only the first N training samples (train + validation)."),
        click.option("--epochs", default=str(_P.epochs), show_default=True,
                  help="Max epochs: one value, or three (phases 1,2,3 or 1;2;3)."),
        click.option("--lr", default=None, help="Learning rate(s): a comma list is a grid (best by val acc); one setting for "
                  "every phase or three separated by ';', e.g. '5e-4;1e-3,1e-4;1e-3'. Default 0.1 (SGD) or 1e-3 (AdamW): "
                  "earlyexit.config.DEFAULT_LR."),
        click.option("--optimizer", default=None, help=f"{' or '.join(OPTIMIZERS)}, for every phase or 'P1;P2;P3' "
                  f"(default {_P.optimizer})."),
        click.option("--weight-decay", default=None, help=f"Weight decay, for every phase or 'P1;P2;P3' "
                  f"(default {_P.weight_decay:g})."),
        click.option("--schedule", default=None, help=f"LR schedule per phase: {' or '.join(SCHEDULES)}, for every phase or "
                  f"'P1;P2;P3' (default {_P.schedule})."),
        click.option("--warmup", default=None, help="Steps of linear lr warmup at each phase's start, for every phase or "
                  f"'P1;P2;P3' (default {_P.warmup}; 0 = off)."),
        click.option("--patience", default=None, help="Early stopping: epochs without validation improvement, for every "
                  "phase or 'P1;P2;P3' ('none' = off; default off)."),
        click.option("--early-stop", default=None, help=f"Early stopping rule, for every phase or 'P1;P2;P3': 'metric' "
                  "(patience on --val-metric) or 'per_exit' (one patience count per exit, stop when every exit has "
                  f"stalled, keep the last weights in which any exit improved; the paper's). Default {_P.early_stop}."),
        click.option("--grad-clip", default=None, help="Clip the global gradient norm to this value, or 'none' "
                     "(default: the model's, as the paper's code: 1 for the ViT and EfficientNet, off for the others)."),
        click.option("--grad-log-every", default=None, help="Every N steps of phases 2 and 3, log each exit's gradient "
                  "cosine with the total backbone gradient to gradients.jsonl (the paper's Figure 4; default off). "
                  "Training is unchanged, bit for bit."),
        click.option("--image-size", default=None, help="Resize images to this side (CIFAR, (Fashion-)MNIST, imagefolder:; "
                  "e.g. 224 for ViT-B/16 with ImageNet weights; default: the dataset's own)."),
        click.option("--val-metric", type=click.Choice(VAL_METRICS), default=_P.metric, show_default=True,
                  help="Validation accuracy that picks the best epoch and lr in phases 2 and 3: mean over exits, or the "
                  "final exit (phase 1 always uses the final exit)."),
        click.option("--batch-size", default=_T.batch_size, show_default=True, type=int, help="Global batch size."),
        click.option("--method", default=None, help="Early-exit method: sdn, pbee, ztw, gpf (default: plain ICs)."),
        click.option("--weighting", default=None, help="Loss weights over exits: mean, sum (alias uniform), sdn, sdn:R "
                     "(SDN's ramp over R epochs), han, han-decreasing, pabee, gradient-equilibrium (default: the "
                     "method's, else mean)."),
        click.option("--criterion", default=None, help="Exit criterion of the threshold curve: confidence, entropy, patience "
                  "(default: the method's, else confidence)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)."),
        click.option("--memory-format", type=click.Choice(MEMORY_FORMATS), default=_T.memory_format, show_default=True,
                     help="Memory layout of weights and image batches in training: auto is channels_last for the "
                     "models that train faster in it (ResNet, EfficientNet; see `bench`), else contiguous."),
        click.option("--compile", "compile_", is_flag=True, default=False,
                     help="Train through torch.compile (faster steps after a one-off compile; see `bench --compile`)."),
        click.option("--log", default=None, help=f"Also log every epoch to: {', '.join(LOG_SINKS)} (event files in "
                     "RUN/tensorboard; pip install 'earlyexit[tensorboard]'); a comma list, or 'none'. history.jsonl "
                     "and history.csv are always written."),
    ]):
        fn = option(fn)
    return fn


def _file_options(fn: Callable) -> Callable:
    """``--config FILE`` and ``--set KEY=VALUE``: run settings from a file, overridden key by key (run and compare)."""
    fn = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                      help="Override one setting by its dotted path, e.g. train.phases.1.lr=0.05 (phase 2; list "
                      "indices from 0) or train.phases.epochs=4 (every phase); the value is read as TOML.")(fn)
    return click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False),
                        help="Start from the settings of this TOML file (keys: RunConfig's fields, e.g. configs/*.toml) "
                        "or of a run's config.json (a committed run reruns as it ran); --set and the options given "
                        "here override it.")(fn)


def _config_of(ctx: click.Context, config_file: str | None, sets: Sequence[str], flags: dict, **fixed: Any) -> RunConfig:
    """The ``RunConfig`` of ``--config``, then each ``--set``, then the flags given on the command line (the flags
    left at their defaults leave the file's values); ``fixed``: train settings the command sets itself."""
    from .settings import load_config

    given = {k: v for k, v in flags.items() if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
    return load_config(config_file, sets, given, **fixed)


@main.command()
@click.option("--regime", default=_T.regime, show_default=True,
              help="joint (-+-), disjoint (+-+), mixed (++-), or any 3-character phase string over +/-.")
@_config_options
@click.option("--seed", default=_T.seed, show_default=True, type=int, help="Seed of init, data order and augmentation.")
@click.option("--init", default=None, help="Start from a run of your own: its folder or a weights file it wrote "
              "(a trained backbone instead of phase 1; '--+' needs it or --weights).")
@_file_options
@click.option("--out", default=None, help="Run folder (default runs/MODEL-DATASET-REGIME-sSEED).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a run already in --out.")
@click.pass_context
@_user_errors
def run(ctx, config_file, sets, out, resume, force, **flags) -> None:
    """Train one model in one regime, evaluate it, write a run folder."""
    if resume and force:
        raise EarlyExitError("--resume and --force exclude each other")
    _train_one(_config_of(ctx, config_file, sets, flags), Path(out) if out else None, resume=resume, force=force)


def _train_one(cfg: RunConfig, out_dir: Path | None, *, resume: bool, force: bool) -> None:
    """``run``'s work: train and evaluate ``cfg`` into ``out_dir`` (None: the default folder), print its table."""
    from . import distributed as dist
    from .runs import default_out_dir, run_experiment

    out_dir = out_dir or default_out_dir(cfg)
    t0 = time.time()
    try:
        res = run_experiment(cfg, out_dir, resume=resume, force=force, log=Progress())
    finally:
        dist.cleanup()
    if res:
        print_summary(res)
        click.echo(f"total time {time.time() - t0:.0f}s; results in {out_dir}")


@main.command()
@_config_options
@_file_options
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds; each trains the three regimes.")
@click.option("--budget", type=click.Choice(["paper", "matched", "flops"]), default="paper", show_default=True,
              help="paper: every phase to its epochs / early stopping; matched: joint gets as many epochs as mixed "
              "spends in phases 1 and 2 together; flops: joint gets the epochs whose training FLOPs come nearest "
              "mixed's.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The comparison's folder.")
@click.option("--resume", is_flag=True, help="Continue a comparison in --out (finished runs are kept).")
@click.option("--regimes", default="joint,disjoint,mixed", show_default=True,
              help="The regimes to train, e.g. joint,mixed (the matched and FLOPs budgets need mixed).")
@click.pass_context
@_user_errors
def compare(ctx, config_file, sets, seeds, budget, out, resume, regimes, **flags) -> None:
    """Train joint, disjoint and mixed over seeds (phase 1 shared per seed); write their runs, summary.json, curves.png."""
    seed_list = [_number(t, "--seeds", kind=int) for t in seeds.split(",") if t.strip()]
    if not seed_list:
        raise EarlyExitError("--seeds: give at least one seed")
    cfg = _config_of(ctx, config_file, sets, flags, regime="mixed", seed=seed_list[0])
    _compare_seeds(cfg, seed_list, Path(out), budget=budget, resume=resume,
                   regimes=[r.strip() for r in regimes.split(",") if r.strip()])


def _compare_seeds(cfg: RunConfig, seeds: list[int], out: Path, *, budget: str, resume: bool,
                   regimes: Sequence[str] | None) -> None:
    """``compare``'s work: the regimes over the seeds into ``out``, then their summary tables."""
    from .compare import Progress as Eta, compare_regimes, planned_epochs
    from .reports import format_summary

    t0 = time.time()
    summary = compare_regimes(cfg, seeds, out, budget=budget, resume=resume,
                              log=Eta(Progress(), planned_epochs(cfg, seeds)),
                              **({"regimes": list(regimes)} if regimes is not None else {}))
    for group in summary["summary"]:
        click.echo("\n".join(format_summary(group)))
    click.echo(f"total time {time.time() - t0:.0f}s; comparison in {out}")


@main.command("experiment")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--preset", default=None, help="Lay each file's [preset.NAME] over it, and run only the files made for "
              "that preset (reproduce.sh: smoke, cpu, gpu).")
@click.option("--root", default="results", show_default=True, type=click.Path(file_okay=False),
              help="The folder the experiments write into.")
@click.option("--dry", is_flag=True, help="Print every step and its state (new, started, done); run nothing.")
@click.option("--list", "list_only", is_flag=True, help="Print the files --preset runs, in the order they run "
              "(each after those its `after` names); run nothing.")
@_user_errors
def experiment_cmd(files, preset, root, dry, list_only) -> None:
    """Run experiment files (configs/*.toml; their keys: earlyexit/experiment.py): every step a run, compare,
    analyze, plot or summary. Finished steps are skipped and started ones resumed: running a file again continues it."""
    from .experiment import in_order

    exps = in_order(files, preset=preset, root=root)
    if list_only:
        click.echo("\n".join(str(e.path) for e in exps))
        return
    for e in exps:  # the options of every analyze, plot and eval step, parsed before anything runs
        for step in e.steps:
            if step.command in ("analyze", "plot", "eval"):
                args = [*step.runs, *step.args] if step.command != "eval" else [step.runs[0], *step.args, "--out", "-"]
                try:
                    main.commands[step.command].make_context(step.command, args)
                except click.ClickException as err:
                    raise EarlyExitError(f"{e.path}: {step.describe()}: {err.format_message()}") from None
    for e in exps:
        why = e.missing(check_data=not dry)
        if why:
            click.echo(f"{e.name}: skipped{' when run now' if dry else ''}: {why}", err=not dry)
            if not dry:
                continue
        for step in e.steps:
            state = step.state()
            click.echo(f"{e.name}: {step.describe()}: {state}", err=not dry)
            if not dry and state != "done":
                _run_step(step, resume=state == "started")


def _run_step(step: Any, *, resume: bool) -> None:
    """One ``experiment.Step``, by the code of the command it names."""
    if step.command == "run":
        _train_one(step.config, step.out, resume=resume, force=False)
    elif step.command == "compare":
        _compare_seeds(step.config, list(step.seeds), step.out, budget=step.budget, resume=resume, regimes=step.regimes)
    elif step.command == "eval":  # each run evaluated into a folder of its own (eval --out), the run untouched
        for run, target in step.eval_targets().items():
            if not (target / "results.json").is_file():
                main.commands["eval"].main([run, *step.args, "--out", str(target)], prog_name="earlyexit eval",
                                           standalone_mode=False)
    elif step.command == "summary":  # summary's tables, also written to the step's file
        from .io import atomic_write_text
        from .reports import format_summary, summarize_runs

        text = "\n".join("\n".join(format_summary(g)) for g in summarize_runs([Path(d) for d in step.run_dirs()]))
        click.echo(text)
        step.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(step.out, text + "\n")
    else:
        import importlib.util

        if step.command == "plot" and importlib.util.find_spec("matplotlib") is None:
            click.echo(f"no figure {step.out}: matplotlib is not installed", err=True)
            return
        step.out.parent.mkdir(parents=True, exist_ok=True)
        main.commands[step.command].main([*step.run_dirs(), *step.args], prog_name=f"earlyexit {step.command}",
                                         standalone_mode=False)


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--criterion", default=None, help="Exit criterion (default: the run's).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write the evaluation to this new folder (config, results, history) and leave RUN_DIR as it is.")
@_user_errors
def eval_cmd(run_dir, criterion, device, out) -> None:
    """Re-evaluate a run folder on its test split (rewrites results.json, or writes a new folder with --out)."""
    from .progress import terminal_progress
    from .runs import evaluate_run

    print_summary(evaluate_run(run_dir, criterion=criterion, device=device, out=out, progress=terminal_progress()))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
@click.option("--curve", type=click.Choice(["test", "geometric", "global"]), default="test", show_default=True,
              help="Thresholds swept on the test set, or calibrated on validation data (geometric / global).")
@click.option("--note", default=None, help="A second title line saying what the legend cannot (e.g. 'joint: the "
              "matched budget, 16 epochs').")
@_user_errors
def plot(run_dirs, output, curve, note) -> None:
    """Overlay runs' accuracy-vs-FLOPs curves with their static exit points; the seeds of one configuration
    (model, dataset, regime, method) as a mean curve with a +- std band, one colour per configuration."""
    from .reports import maybe_plot

    maybe_plot([Path(d) for d in run_dirs], Path(output), required=True,
               curve="curve" if curve == "test" else f"calibrated_{curve}", note=note)
    click.echo(f"wrote {output}")


@main.command()
@click.option("--model", "model_name", default=_M.name, show_default=True, help="Backbone to time.")
@click.option("--dataset", default=_D.name, show_default=True, help="Dataset whose shapes and loader are timed.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Local data root searched first.")
@click.option("--batch-size", default=_T.batch_size, show_default=True, type=int, help="Training batch size.")
@click.option("--steps", default=10, show_default=True, type=int, help="Timed steps per measurement.")
@click.option("--run", "run_dir", default=None, type=click.Path(file_okay=False),
              help="A trained run folder for the inference section (default: the untrained model).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--compile", "compile_", is_flag=True, help="Also time training steps through torch.compile (compiles first).")
@_user_errors
def bench(model_name, dataset, data_dir, batch_size, steps, run_dir, device, compile_) -> None:
    """Measure step-time, sweep and loading ratios (and early-exit inference) on this machine."""
    from .bench import run_bench

    run_bench(model=model_name, dataset=dataset, data_dir=data_dir, batch_size=batch_size, steps=steps,
              run_dir=run_dir, device=device, echo=click.echo, compile=compile_)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--markdown", is_flag=True, help="Print Markdown tables (as RESULTS.md holds them).")
@click.option("--pair", "pairs", multiple=True, metavar="A:B",
              help="Compare two configurations seed by seed: shell patterns over the run folders' names, e.g. "
              "'*-mixed-s?:*-joint-matched-s?'. Prints a - b at every budget with its 95 % t interval and the "
              "verdict (repeatable).")
@click.option("--claim", type=click.Choice(["a>b", "a<b"]), default="a>b", show_default=True,
              help="The direction the paper claims, for the verdicts of --pair.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write the summaries (and pairs) to this JSON file.")
@click.option("--bootstrap", is_flag=True,
              help="With --pair: also a paired bootstrap over the test samples for the lowest seed both sides "
              "share (rebuilds the two runs from their weights; validation-calibrated budgets).")
@_user_errors
def summary(run_dirs, markdown, pairs, claim, json_out, bootstrap) -> None:
    """Mean +- std over seeds of per-exit accuracy and three budget tables, grouped by model, dataset, regime
    and method: validation-calibrated (first; the verdicts use it), the paper's rule (curves averaged over
    seeds) and each seed's best within budget (a test-set oracle); with --pair, paired intervals."""
    from .pairs import format_pair, markdown_pair, pair_summary, select
    from .reports import format_summary, markdown_summary, summarize_runs

    dirs = [Path(d) for d in run_dirs]
    paired, used = [], []
    for spec in pairs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise EarlyExitError(f"--pair: expected A:B (two patterns of run folder names), got {spec!r}")
        sides = [select(dirs, pat) for pat in (a, b)]
        for pat, side in zip((a, b), sides):
            if not side:
                raise EarlyExitError(f"--pair: no run folder matches {pat!r}")
        paired.append(pair_summary(*sides, direction=1 if claim == "a>b" else -1))
        if bootstrap:
            paired[-1]["bootstrap"] = _seed_bootstrap(*sides)
        used += [side for side in sides if side not in used]
    # with pairs: each side summarised on its own (joint and its matched control are both regime -+-)
    groups = [g for side in used for g in summarize_runs(side)] if pairs else summarize_runs(dirs)
    if json_out:
        from .io import atomic_write_json

        atomic_write_json(Path(json_out), {"summary": groups, "pairs": paired})
    if markdown:
        click.echo(markdown_summary(groups) + "".join("\n" + markdown_pair(p) for p in paired), nl=False)
        return
    for g in groups:
        click.echo("\n".join(format_summary(g)))
    for p in paired:
        click.echo("\n".join(format_pair(p)))
        if p.get("bootstrap"):
            from .bootstrap import format_bootstrap

            click.echo("  " + "\n  ".join(format_bootstrap(p["bootstrap"])))


def _seed_bootstrap(a_dirs: list[Path], b_dirs: list[Path]) -> dict:
    """``sample_bootstrap`` of the two runs of the lowest seed both sides of a pair hold."""
    from .bootstrap import sample_bootstrap
    from .results import Results

    seeds = [{Results.from_json(d).seed: d for d in side} for side in (a_dirs, b_dirs)]
    common = sorted(set(seeds[0]) & set(seeds[1]))
    if not common:
        raise EarlyExitError("--bootstrap: the two sides of the pair share no seed")
    return {"seed": common[0], **sample_bootstrap(seeds[0][common[0]], seeds[1][common[0]])}


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--what", default="rank,gradients,information", show_default=True,
              help="Comma list of: rank (Fig. 3), gradients (Fig. 4), information (Fig. 5), landscape (appendix A), "
              "plane (Fig. 2, needs three runs), connectivity (the path between two runs), and the earlier "
              "estimators rank-exits, gradient-norms.")
@click.option("--other", default=None, type=click.Path(file_okay=False),
              help="Second run (plane, connectivity; default: the second RUN_DIR).")
@click.option("--third", default=None, type=click.Path(file_okay=False),
              help="Third run (plane; default: the third RUN_DIR).")
@click.option("--max-samples", default=512, show_default=True, type=int,
              help="Samples used by each analysis (10000: the whole Fashion-MNIST test split).")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Data split of every analysis (default: the paper's, test for rank and information, train for "
              "the landscapes, the plane and the path).")
@click.option("--rank-tol", "rank_tolerance", type=click.Choice(["covariance", "numpy"]), default="covariance",
              show_default=True, help="Rank rule: the authors' rank of the centred covariance with "
              "torch.linalg.matrix_rank's tolerance (k x eps on its eigenvalues), or numpy's rule on the activations.")
@click.option("--columns", type=click.Choice(["shared", "layer"]), default="shared", show_default=True,
              help="Column subsets: the same indices for every layer wide enough (the paper's), or one per layer.")
@click.option("--mi-method", default="jensen,mc,bhattacharyya", show_default=True,
              help="Estimator of information, optionally with others beside it after commas (jensen,mc,bhattacharyya):"
              " I(X; Z) per layer by the Jensen (pairwise) upper bound, Monte Carlo, the Bhattacharyya lower bound or "
              "the earlier jensen-sampled; binning (binned entropy per layer); knn (per-exit I(T; Y), alone).")
@click.option("--mi-ref-size", default=None, type=int,
              help="Reference samples of the estimators after the first in --mi-method (default: all).")
@click.option("--sigma", default=0.25, show_default=True, type=float,
              help="Noise of I(X; Z): the factor on each layer's scale (--sigma-ref), or its std in feature units "
              "with --sigma-ref absolute.")
@click.option("--sigma-ref", type=click.Choice(["median", "std", "absolute"]), default="median", show_default=True,
              help="Each layer's scale of --sigma: the median pairwise distance of its features, their RMS distance "
              "to the mean, or 1 (absolute).")
@click.option("--distance-dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Precision of the distance products of I(X; Z)'s pairwise bounds (float32: twice as fast).")
@click.option("--features", "n_features", default=6000, show_default=True, type=int,
              help="Columns kept per layer (rank, information).")
@click.option("--memory-gib", default=1.0, show_default=True, type=float,
              help="Memory for the per-layer accumulators of one pass over the data (rank, information).")
@click.option("--landscape-steps", default="11,11", show_default=True, help="Landscape grid: N (1-D) or N,M (2-D).")
@click.option("--landscape-span", default=1.0, show_default=True, type=float,
              help="Landscape extent along each direction (filter-normalised units).")
@click.option("--landscape-direction", type=click.Choice(["gaussian", "uniform"]), default="gaussian",
              show_default=True, help="Entries of the landscape's directions (both filter-normalised).")
@click.option("--landscape-bn/--no-landscape-bn", default=True, show_default=True,
              help="Re-estimate BatchNorm statistics at every landscape point.")
@click.option("--landscape-range", default=None,
              help="LO,HI: one fixed colour scale of the landscape figures (default: one over the runs given).")
@click.option("--plane-range", default=None, help="LO,HI: a fixed colour scale of the plane figure (stated in it).")
@click.option("--steps", default=21, show_default=True, type=int,
              help="Plane grid points per axis; points on the connectivity path.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of batches, column subsets, noise, directions.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="JSON file of the results (default RUN_DIR/analysis.json of the first run); the figures are "
              "written beside it as STEM-ANALYSIS.png.")
@click.option("--figures-only", is_flag=True,
              help="Measure nothing: draw the figures again from the JSON file that --out names.")
@_user_errors
def analyze(run_dirs, what, other, third, max_samples, split, rank_tolerance, columns, mi_method, mi_ref_size, sigma,
            sigma_ref, distance_dtype, n_features, memory_gib, landscape_steps, landscape_span, landscape_direction,
            landscape_bn, landscape_range, plane_range, steps, seed, device, out_file, figures_only) -> None:
    """The paper's analyses of trained runs, as JSON and figures (several runs: one line per run)."""
    from .analyze import MI_METHODS, analyze_runs, write_figures
    from .io import atomic_write_json
    from .progress import terminal_progress
    from .tree import to_jsonable

    kinds = tuple(w.strip() for w in what.split(",") if w.strip())
    grid = tuple(_number(t, "--landscape-steps", kind=int, low=1) for t in landscape_steps.split(","))
    if not 1 <= len(grid) <= 2:
        raise EarlyExitError(f"--landscape-steps: expected N or N,M, got {landscape_steps!r}")
    methods = [m.strip() for m in mi_method.split(",") if m.strip()]
    if not methods or any(m not in MI_METHODS for m in methods):
        raise EarlyExitError(f"--mi-method: expected a comma list of {', '.join(MI_METHODS)}, got {mi_method!r}")
    if "knn" in methods[1:] or "binning" in methods[1:] or (methods[0] == "knn" and len(methods) > 1):
        raise EarlyExitError("--mi-method: knn stands alone, and binning can only come first")
    if mi_ref_size is not None and mi_ref_size < 1:
        raise EarlyExitError(f"--mi-ref-size: expected an integer >= 1, got {mi_ref_size}")
    ranges = {}
    for flag, text in (("--landscape-range", landscape_range), ("--plane-range", plane_range)):
        if text is not None:
            lo_hi = tuple(_number(t, flag) for t in text.split(","))
            if len(lo_hi) != 2 or not lo_hi[0] < lo_hi[1]:
                raise EarlyExitError(f"{flag}: expected LO,HI with LO < HI, got {text!r}")
            ranges[flag] = lo_hi
    if memory_gib <= 0:
        raise EarlyExitError(f"--memory-gib: expected a number > 0, got {memory_gib}")
    out = Path(out_file) if out_file else Path(run_dirs[0]) / "analysis.json"
    if figures_only:
        from .schema import read_json

        if not out.is_file():
            raise EarlyExitError(f"--figures-only: no results at {out}")
        data = read_json(out)  # the one JSON reader: a damaged or crafted file is one line
        results = data["runs"] if isinstance(data, dict) and "runs" in data else [data]
        for f in write_figures(results, out.with_suffix(""), echo=lambda m: click.echo(m, err=True),
                               plane_range=ranges.get("--plane-range"),
                               landscape_range=ranges.get("--landscape-range")):
            click.echo(f"wrote {f}")
        return
    results = analyze_runs(run_dirs, what=kinds, other=other, third=third, max_samples=max_samples, split=split,
                           device=device, mi_method=methods[0], mi_also=tuple(methods[1:]),
                           mi_also_ref_size=mi_ref_size, sigma=sigma, sigma_ref=sigma_ref,
                           distance_dtype=distance_dtype, n_features=n_features, rank_tolerance=rank_tolerance,
                           columns=columns, max_bytes=int(memory_gib * 2**30), landscape_steps=grid,
                           landscape_span=landscape_span, landscape_direction=landscape_direction,
                           landscape_bn=landscape_bn, steps=steps, path_steps=steps, seed=seed,
                           progress=terminal_progress())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, to_jsonable(results[0] if len(results) == 1 else {"runs": results}))
    click.echo(f"wrote {out}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        click.echo("no figures: matplotlib is not installed", err=True)
        return
    for f in write_figures(results, out.with_suffix(""), echo=lambda m: click.echo(m, err=True),
                           plane_range=ranges.get("--plane-range"), landscape_range=ranges.get("--landscape-range")):
        click.echo(f"wrote {f}")


@main.command("score")
@click.argument("files", nargs=-1, required=True)
@click.option("--val", "val_files", multiple=True,
              help="Validation outputs (logits, labels), one per FILE in the same order: adds the calibrated "
              "curves and budgets.")
@click.option("--base-flops", default=None, type=float,
              help="Reference cost of the budgets (default: the file's base_flops, else its last exit's cost).")
@click.option("--criterion", type=click.Choice(["confidence", "entropy", "patience"]), default="confidence",
              show_default=True, help="Exit criterion of the threshold curve.")
@click.option("--out", default="score", show_default=True, help="Folder for score.json and curve.png.")
@_user_errors
def score_cmd(files, val_files, base_flops, criterion, out) -> None:
    """Score another implementation's per-exit test logits as a run is evaluated.

    Each FILE (.npz, .pt or .safetensors) holds `logits` (E, N, C), `labels` (N,) and `costs` (E,), the
    cumulative cost of each exit; several FILEs are the seeds of one configuration (mean +- std tables)."""
    from .progress import terminal_progress
    from .score import format_score, score, write_score

    result = score(list(files), val=list(val_files) or None, base_flops=base_flops, criterion=criterion,
                   progress=terminal_progress())
    written = write_score(result, out)
    click.echo("\n".join(format_score(result)))
    click.echo(f"wrote {', '.join(str(p) for p in written)}")


@main.command()
@click.option("--nodes", "nodes_of", default=None, metavar="torchvision:NAME",
              help="List the candidate IC nodes of a torchvision model (its blocks: index, module, output node, "
              "shape, cumulative FLOPs and their share), for --ic-after as indices, cost:F1,F2,.. or node names.")
@click.option("--image-size", default=224, show_default=True, type=int, help="Input side for --nodes.")
@_user_errors
def models(nodes_of, image_size) -> None:
    """List the registered models (and `torchvision:NAME`, any torchvision classifier)."""
    from .models import list_models

    if nodes_of is None:
        click.echo("\n".join(list_models() + ["torchvision:NAME  (any classifier of torchvision.models; "
                                              "see --nodes)"]))
        return
    from .models.torchvision_any import describe_nodes

    d = describe_nodes(nodes_of, image_size=image_size)
    click.echo(f"{'index':>5}  {'module':<32} {'node':<36} {'shape':<18} {'MFLOPs':>10}  share")
    for r in d["blocks"]:
        click.echo(f"{r['index']:>5}  {r['module']:<32} {r['node']:<36} {str(r['shape']):<18} "
                   f"{r['flops'] / 1e6:>10.1f}  {r['share']:.3f}")
    click.echo(f"final head reads node {d['end']!r} ({d['flops'] / 1e6:.1f} MFLOPs per sample at {image_size} px); "
               "any node of torchvision's get_graph_node_names can also be named in --ic-after")


@main.command()
def datasets() -> None:
    """List the dataset names."""
    from .data import list_datasets

    click.echo("\n".join(list_datasets()))


if __name__ == "__main__":  # pragma: no cover
    main()
