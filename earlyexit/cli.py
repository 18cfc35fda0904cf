"""Command line: ``python -m earlyexit run | eval | plot | bench``.

The commands only map flags onto the config dataclasses and call the library.
User errors print one line (``error: ...``) and exit with code 2.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click

from .config import (OPTIMIZERS, SCHEDULES, VAL_METRICS, DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig,
                     TrainConfig)
from .errors import EarlyExitError


def _user_errors(fn):
    """Turn the package's user-facing errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EarlyExitError, ValueError) as e:  # DataError and CheckpointError are EarlyExitErrors
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; the last checkpoint is kept (continue with --resume)", err=True)
            sys.exit(130)

    return wrapper


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=what) from None
    if not vals:
        raise click.BadParameter("expected at least one value", param_hint=what)
    return vals


def _ints3(text: str, what: str) -> tuple[int, int, int]:
    try:
        vals = [int(t) for t in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected an integer or three comma-separated integers, got {text!r}", param_hint=what) from None
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise click.BadParameter(f"expected 1 or 3 values (one per phase), got {len(vals)}", param_hint=what)
    return tuple(vals)  # type: ignore[return-value]


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
            click.echo(f"  phase {k['phase']} lr {k['lr']:g} epoch {k['epoch']}: loss {k['train_loss']:.4f}, "
                       f"val acc [{acc}] ({k['seconds']:.0f}s)", err=True)


def print_summary(res: dict) -> None:
    base = res["base_flops"]
    click.echo(f"\n{res['model']} on {res['dataset']}, regime {res.get('regime_name', res['regime'])} ({res['regime']}), seed {res['seed']}")
    click.echo(f"{'exit':>4} {'stage':>5} {'cost %':>7} {'test acc %':>10}")
    for e in res["exits"]:
        click.echo(f"{e['index']:>4} {e.get('stage', ''):>5} {e['flops'] / base * 100:>7.1f} {e['accuracy'] * 100:>10.2f}")
    b = res["budgets"]
    cells = "  ".join(f"{k}: {'-' if v is None else f'{v * 100:.2f}'}" for k, v in b.items())
    click.echo(f"budgets (best accuracy at <= share of backbone cost, {res['curve']['criterion']}): {cells}")


# The defaults shown and used are the config's own (one set of defaults for the library and the CLI).
_P, _T, _M, _D = PhaseConfig(), TrainConfig(), ModelConfig(), DataConfig()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Early-exit networks trained jointly, disjointly or mixed."""


@main.command()
@click.option("--regime", default=_T.regime, show_default=True,
              help="joint (-+-), disjoint (+-+), mixed (++-), or any 3-character phase string over +/-.")
@click.option("--model", "model_name", default=_M.name, show_default=True, help="Backbone (see `python -m earlyexit models`).")
@click.option("--exits", default=None, help="IC placement: block indices '4,6,8', 'every:N', 'sdn' or 'default'.")
@click.option("--weights", default=None, help="Pretrained weights the model builder reads (BERT: a folder or 'minilm-l6').")
@click.option("--model-opt", "model_opts", multiple=True, metavar="KEY=VALUE",
              help="A model builder option, repeatable, e.g. head_pool=mean (BERT), head=mlp1024 (ViT), width=128.")
@click.option("--dataset", default=_D.name, show_default=True, help="Dataset name (see `python -m earlyexit datasets`).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False), help="Local data root searched first.")
@click.option("--train-size", default=None, type=int, help="Use only the first N training samples (train + validation).")
@click.option("--epochs", default=str(_P.epochs), show_default=True, help="Max epochs: one value, or three (phases 1,2,3).")
@click.option("--lr", default=None, help="Learning rate(s) for every phase; a comma list is a grid (best by val acc). "
              "Default 0.1 (SGD) or 1e-3 (AdamW): earlyexit.config.DEFAULT_LR.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_P.optimizer, show_default=True, help="Optimizer of every phase.")
@click.option("--weight-decay", default=_P.weight_decay, show_default=True, type=float, help="Weight decay.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_P.schedule, show_default=True, help="LR schedule per phase.")
@click.option("--patience", default=None, type=int, help="Early stopping: epochs without validation improvement.")
@click.option("--val-metric", type=click.Choice(VAL_METRICS), default=_P.metric, show_default=True,
              help="Validation accuracy that picks the best epoch and lr in phases 2 and 3: mean over exits, or the "
              "final exit (phase 1 always uses the final exit).")
@click.option("--batch-size", default=_T.batch_size, show_default=True, type=int, help="Global batch size.")
@click.option("--method", default=None, help="Early-exit method: sdn, pbee, ztw, gpf (default: plain ICs).")
@click.option("--weighting", default=None, help="Loss weights over exits: mean, sum (alias uniform), sdn, sdn:R (SDN's "
              "ramp over R epochs), han, han-decreasing, pabee, gradient-equilibrium (default: the method's, else mean).")
@click.option("--criterion", default=None, help="Exit criterion of the threshold curve: confidence, entropy, patience "
              "(default: the method's, else confidence).")
@click.option("--seed", default=_T.seed, show_default=True, type=int, help="Seed of init, data order and augmentation.")
@click.option("--init", default=None, help="Start from these weights: a run folder or a weights file "
              "(a pretrained backbone instead of phase 1; required by '--+').")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available).")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run folder (default runs/MODEL-DATASET-REGIME-sSEED).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite a run already in --out.")
@_user_errors
def run(regime, model_name, exits, weights, model_opts, dataset, data_dir, train_size, epochs, lr, optimizer, weight_decay, schedule,
        patience, val_metric, batch_size, method, weighting, criterion, seed, init, device, out, resume, force) -> None:
    """Train one model in one regime, evaluate it, write a run folder."""
    from .runs import default_out_dir, run_experiment

    if resume and force:
        raise EarlyExitError("--resume and --force exclude each other")
    ep = _ints3(epochs, "--epochs")
    lrs = _floats(lr, "--lr") if lr else None  # None: the optimizer's default
    if batch_size <= 0:  # named by its flag here; the config checks every value again
        raise EarlyExitError(f"--batch-size must be > 0, got {batch_size}")
    phases = tuple(PhaseConfig(optimizer=optimizer, lr=lrs, weight_decay=weight_decay, schedule=schedule, epochs=e,
                               patience=patience, metric=val_metric) for e in ep)
    kwargs = {"weights": weights} if weights else {}
    kwargs.update(_model_options(model_opts))
    exits_v = tuple(int(t) for t in exits.split(",")) if exits and exits.replace(",", "").strip().isdigit() else exits
    cfg = RunConfig(model=ModelConfig(name=model_name, exits=exits_v, kwargs=kwargs),
                    data=DataConfig(name=dataset, data_dir=data_dir, train_size=train_size),
                    train=TrainConfig(regime=regime, phases=phases, batch_size=batch_size, weighting=weighting, seed=seed,
                                      device=device),
                    eval=EvalConfig(criterion=criterion), init=init, method=method)
    out_dir = Path(out) if out else default_out_dir(cfg)
    t0 = time.time()
    from . import distributed as dist

    try:
        res = run_experiment(cfg, out_dir, resume=resume, force=force, log=Progress())
    finally:
        dist.cleanup()
    if res:
        print_summary(res)
        click.echo(f"total time {time.time() - t0:.0f}s; results in {out_dir}")


def _model_options(items: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` pairs; values are read as JSON where they parse (numbers, true, lists), else as strings."""
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


@main.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--criterion", default=None, help="Exit criterion (default: the run's).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@_user_errors
def eval_cmd(run_dir, criterion, device) -> None:
    """Re-evaluate a run folder on its test split (rewrites results.json)."""
    from .runs import evaluate_run

    print_summary(evaluate_run(run_dir, criterion=criterion, device=device))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Figure file (.png, .pdf, .svg).")
@click.option("--curve", type=click.Choice(["test", "geometric", "global"]), default="test", show_default=True,
              help="Thresholds swept on the test set, or calibrated on validation data (geometric / global).")
@_user_errors
def plot(run_dirs, output, curve) -> None:
    """Overlay several runs' accuracy-vs-FLOPs curves with their static exit points."""
    from .reports import maybe_plot

    maybe_plot([Path(d) for d in run_dirs], Path(output), required=True,
               curve="curve" if curve == "test" else f"calibrated_{curve}")
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
@_user_errors
def bench(model_name, dataset, data_dir, batch_size, steps, run_dir, device) -> None:
    """Measure step-time, sweep and loading ratios (and early-exit inference) on this machine."""
    from .bench import run_bench

    run_bench(model=model_name, dataset=dataset, data_dir=data_dir, batch_size=batch_size, steps=steps,
              run_dir=run_dir, device=device, echo=click.echo)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@_user_errors
def summary(run_dirs) -> None:
    """Mean +- std over seeds of per-exit accuracy and budgets, grouped by model, dataset and regime."""
    from .reports import summarize_runs

    for g in summarize_runs([Path(d) for d in run_dirs]):
        click.echo(f"{g['model']} {g['dataset']} {g['regime']} (seeds {g['seeds']})")
        click.echo("  exits:   " + "  ".join(f"{e['mean'] * 100:.2f}+-{e['std'] * 100:.2f}" for e in g["exits"]))
        click.echo("  budgets: " + "  ".join(f"{k}: " + ("-" if v is None else f"{v['mean'] * 100:.2f}+-{v['std'] * 100:.2f}")
                                           for k, v in g["budgets"].items()))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--what", default="rank,gradients,information", show_default=True,
              help="Comma list of: rank, gradients, information, landscape, connectivity.")
@click.option("--other", default=None, type=click.Path(file_okay=False), help="Second run folder (connectivity).")
@click.option("--max-samples", default=512, show_default=True, type=int, help="Samples used by each analysis.")
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True, help="Data split.")
@click.option("--mi-method", type=click.Choice(["knn", "binning"]), default="knn", show_default=True,
              help="Mutual-information estimator.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N.")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@_user_errors
def analyze(run_dir, what, other, max_samples, split, mi_method, device, out_file) -> None:
    """The paper's analyses of a trained run: numerical rank, gradient dominance, mutual information, ..."""
    import json

    from .analysis import analyze_run
    from .tree import to_jsonable
    from .io import atomic_write_json

    kinds = tuple(w.strip() for w in what.split(",") if w.strip())
    res = to_jsonable(analyze_run(run_dir, what=kinds, max_samples=max_samples, split=split, other=other,
                                  device=device, mi_method=mi_method))
    if out_file:
        atomic_write_json(out_file, res)
        click.echo(f"wrote {out_file}")
    else:
        click.echo(json.dumps(res, indent=1))


@main.command()
def models() -> None:
    """List the registered models."""
    from .models import list_models

    click.echo("\n".join(list_models()))


@main.command()
def datasets() -> None:
    """List the dataset names."""
    from .data import list_datasets

    click.echo("\n".join(list_datasets()))


if __name__ == "__main__":  # pragma: no cover
    main()
