"""`reproduce.sh cpu` and `reproduce.sh gpu`, dry: every experiment file they run (configs/*.toml) is read for
its preset, every step checked as the real command would check it.

Each file's steps come from ``earlyexit.experiment`` (the code that runs them); the settings of every run and
comparison become a ``RunConfig`` (the config checks every value), whose model is built with its exits and
options (no weights are loaded), and every analyze, plot and summary step is parsed by the command's own click
parser. So a misspelt key, a bad value or an exit placement the model rejects fails here, on a machine that will
never run the GPU preset. The script itself runs with a stub interpreter that records the experiments it starts.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "reproduce.sh"
CONFIGS = ROOT / "configs"
ROOTS = {"cpu": "results", "gpu": "results-gpu"}


def _build(cfg, seen: set) -> None:
    """The model of ``cfg`` with its IC placement and options, as the run builds it (shapes only, no weights)."""
    from earlyexit.preflight import build_checked

    m = cfg.model
    if "weights" in m.kwargs:  # the pretrained loaders read files this check does not need
        return
    mnist = "mnist" in cfg.data.name  # the shapes only: 28-pixel grey images or 32-pixel colour ones
    kw = {**m.kwargs, "image_size": 28 if mnist else 32} if m.name != "bert" else dict(m.kwargs)
    key = repr((m.name, mnist, m.ic_after, sorted(kw.items())))
    if key not in seen:
        seen.add(key)
        build_checked(m.name, num_classes=10, in_chans=1 if mnist else 3, ic_after=m.ic_after, options=kw)


def _dry(preset: str) -> list:
    """Every step of the preset, in the order the script runs them, each checked."""
    from earlyexit import cli
    from earlyexit.experiment import in_order

    steps, seen = [], set()
    for exp in in_order(sorted(CONFIGS.glob("*.toml")), preset=preset, root=ROOTS[preset]):
        for step in exp.steps:
            if step.config is not None:
                _build(step.config, seen)
            elif step.command == "eval":  # one run folder per call
                cli.main.commands["eval"].make_context("eval", [step.runs[0], *step.args, "--out", str(step.out)])
            else:  # unknown options and bad types fail here
                cli.main.commands[step.command].make_context(step.command, [*step.runs, *step.args])
            steps.append(step)
    return steps


def _experiments(steps: list, root: str) -> set[str]:
    """The experiment folders (first level under ``root``) that the steps write into."""
    return {step.out.relative_to(root).parts[0] for step in steps}


def test_cpu_and_gpu_presets_parse_and_run_the_same_experiments():
    cpu = _dry("cpu")
    gpu = _dry("gpu")
    cpu_exps, gpu_exps = _experiments(cpu, "results"), _experiments(gpu, "results-gpu")
    assert {"resnet20-fmnist", "resnet20-fmnist-paper-exits", "resnet20-fmnist-undertrained", "vit-fmnist",
            "vit-fmnist-every1", "vit-fmnist-every2", "vit-fmnist-every3", "vit-fmnist-head-mlp1024", "bert-sst2",
            "vit-fmnist-plateau",
            "resnet20-fmnist-analyses"} <= cpu_exps
    assert cpu_exps <= gpu_exps, f"gpu lacks {sorted(cpu_exps - gpu_exps)}"
    assert {"resnet56-cifar10", "vit-cifar10"} <= gpu_exps  # CIFAR joins when its files are there
    # the same analyses on both machines, and the matched-budget control beside experiment 1
    for steps, root in ((cpu, "results"), (gpu, "results-gpu")):
        assert sum(s.command == "analyze" for s in steps) == 6
        plots = sorted(str(s.out.relative_to(root)) for s in steps if s.command == "plot")
        assert plots == ["entropy/bert-sst2/curves-matched.png", "entropy/bert-sst2/curves.png",
                         "entropy/mobilenetv2-pretrained-fmnist/curves-matched.png",
                         "entropy/resnet20-fmnist-5seeds/curves-matched.png", "entropy/vit-fmnist-every1/curves.png",
                         "resnet20-fmnist-undertrained-lr/curves.png",
                         "resnet20-fmnist-weighting/joint.png", "resnet20-fmnist-weighting/mixed.png",
                         "vit-fmnist-density/curves.png"]
        assert any(s.command == "compare" and s.budget == "matched" for s in steps)
    # the GPU preset trains at the paper's scale: full data, early stopping
    for s in gpu:
        if s.command in ("run", "compare"):
            assert s.config.data.train_size is None and any(p.patience for p in s.config.train.phases), s


STUB = r'''
import json, os, sys

args = sys.argv[1:]
assert args[:3] == ["-m", "earlyexit", "experiment"], args
if "--list" in args:  # the order of the experiments: the real command
    from earlyexit import cli

    cli.main(args[2:], prog_name="earlyexit")
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(args[3:]) + "\n")
'''


def _script(preset: str, tmp_path: Path, only: str | None = None) -> tuple[subprocess.CompletedProcess, list]:
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / f"{preset}.log"
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHON": str(py), "STUB_LOG": str(log), "PYTHONPATH": path}
    env.pop("ONLY", None)
    env.pop("DRY", None)
    if only is not None:
        env["ONLY"] = only
    r = subprocess.run(["bash", str(SCRIPT), preset], cwd=tmp_path, env=env, capture_output=True, text=True)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return r, [c for c in calls if "--list" not in c]


def test_the_script_runs_each_experiment_file_of_its_preset_once_in_order(tmp_path):
    from earlyexit.experiment import in_order

    r, calls = _script("gpu", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    want = [e.name for e in in_order(sorted(CONFIGS.glob("*.toml")), preset="gpu")]
    assert [Path(c[0]).stem for c in calls] == want
    assert all(c[1:] == ["--preset", "gpu", "--root", "results-gpu"] for c in calls)
    assert want.index("resnet20") < want.index("analyses")  # the analyses read experiment 1's models
    r, calls = _script("cpu", tmp_path, only="vit analyses")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [Path(c[0]).stem for c in calls] == ["analyses", "vit"]
    bad, _ = _script("nonsense", tmp_path)
    assert bad.returncode == 2
