"""`reproduce.sh cpu` and `reproduce.sh gpu`, dry: every command they would run is parsed by the real CLI.

The script runs with PYTHON pointing at a stub that, instead of training, parses each `python -m earlyexit ...`
call with the command's own click parser, maps run/compare flags onto a ``RunConfig`` (the config checks every
value), builds the model with its exits and options (no weights are loaded), writes the marker file the script
checks before its next step, and logs the call. So a misspelt option, a bad value or an exit placement the model
rejects fails here, on a machine that will never run the GPU preset.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "reproduce.sh"

STUB = r'''
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
if args[:1] == ["-c"]:
    sys.exit(0)  # the CIFAR probe: pretend the files are there, so those commands are checked too
assert args[:2] == ["-m", "earlyexit"], args
from earlyexit import cli
from earlyexit.preflight import build_checked

name, rest = args[2], args[3:]
cmd = cli.main.commands[name]
params = cmd.make_context(name, list(rest)).params  # unknown options and bad types fail here
if name in ("run", "compare"):
    flags = {k: v for k, v in params.items() if k not in ("seeds", "budget", "out", "resume", "force", "config_file")}
    cfg = cli._run_config(**flags) if name == "run" else cli._run_config(regime="mixed", seed=0, init=None, **flags)
    m = cfg.model
    if "weights" not in m.kwargs:  # the pretrained loaders read files this check does not need
        mnist = "mnist" in cfg.data.name  # the shapes only: 28-pixel grey images or 32-pixel colour ones
        kw = {**m.kwargs, "image_size": 28 if mnist else 32} if m.name != "bert" else dict(m.kwargs)
        exits = list(m.exits) if isinstance(m.exits, tuple) else m.exits
        build_checked(m.name, num_classes=10, in_chans=1 if mnist else 3, exits=exits, options=kw)
    out = Path(params["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / ("summary.json" if name == "compare" else "results.json")).write_text("{}")
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps([name, *rest]) + "\n")
'''


def _dry(preset: str, tmp_path: Path) -> list[list[str]]:
    stub = tmp_path / "stub.py"
    stub.write_text(STUB)
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{stub}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / f"{preset}.log"
    root = str(SCRIPT.parent)  # the stub imports this checkout's package, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHON": str(py), "STUB_LOG": str(log), "PYTHONPATH": path}
    env.pop("ONLY", None)
    work = tmp_path / preset
    work.mkdir()
    r = subprocess.run(["bash", str(SCRIPT), preset], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in log.read_text().splitlines()]


def _experiments(calls: list[list[str]], root: str) -> set[str]:
    """The experiment folders (first level under ``root``) that the calls write into."""
    outs = set()
    for call in calls:
        for i, a in enumerate(call[:-1]):
            if a == "--out" and call[i + 1].startswith(root + "/"):
                outs.add(call[i + 1].split("/")[1])
    return outs


@pytest.mark.slow
def test_cpu_and_gpu_presets_parse_and_run_the_same_experiments(tmp_path):
    cpu = _dry("cpu", tmp_path)
    gpu = _dry("gpu", tmp_path)
    cpu_exps, gpu_exps = _experiments(cpu, "results"), _experiments(gpu, "results-gpu")
    assert {"resnet20-fmnist", "resnet20-fmnist-paper-exits", "resnet20-fmnist-undertrained", "vit-fmnist",
            "vit-fmnist-every1", "vit-fmnist-every2", "vit-fmnist-every3", "vit-fmnist-head-mlp1024", "bert-sst2",
            "resnet20-fmnist-analyses"} <= cpu_exps
    assert cpu_exps <= gpu_exps, f"gpu lacks {sorted(cpu_exps - gpu_exps)}"
    assert {"resnet56-cifar10", "vit-cifar10"} <= gpu_exps  # CIFAR joins when its files are there
    # the same analyses on both machines, and the matched-budget control beside experiment 1
    for calls in (cpu, gpu):
        assert sum(c[0] == "analyze" for c in calls) == 6
        plots = sorted(c[-1].split("/", 1)[1] for c in calls if c[0] == "plot")
        assert plots == ["resnet20-fmnist-undertrained-lr/curves.png", "vit-fmnist-density/curves.png"]
        assert any(c[0] == "compare" and "matched" in c for c in calls)
    # the GPU preset trains at the paper's scale: full data, early stopping
    for c in gpu:
        if c[0] in ("run", "compare"):
            assert "--train-size" not in c and "--patience" in c, c
