"""Each experiment file reproduces its committed runs: the training settings that a default has changed since
(gradient clipping, warmup) and those that change the result (batch size, optimizer, weight decay) agree
between every run or comparison step of ``reproduce.sh cpu`` and the config.json of each committed run it writes.

A config that relies on a default of the day trains something else than the committed folder it names once the
default moves (the first pass clipped every model at norm 1 without warmup; the defaults now follow the paper's
code); this test fails until the file states the committed settings.
"""

import json
from pathlib import Path

import pytest

from earlyexit.config import upgrade_run_record
from earlyexit.experiment import in_order
from earlyexit.runs import with_model_defaults

ROOT = Path(__file__).parents[1]


def _settings(grad_clip, batch_size, phases) -> dict:
    return {"grad_clip": grad_clip, "batch_size": batch_size,
            "warmup": [p["warmup"] for p in phases], "optimizer": [p["optimizer"] for p in phases],
            "weight_decay": [p["weight_decay"] for p in phases]}


def _pairs() -> list:
    """(experiment, step's settings, committed run folder) for every committed run a cpu step writes."""
    out = []
    for exp in in_order(sorted((ROOT / "configs").glob("*.toml")), preset="cpu", root=ROOT / "results"):
        for step in exp.steps:
            if step.config is None:
                continue
            t = with_model_defaults(step.config).train  # grad_clip "model" as config.json states it
            want = _settings(t.grad_clip, t.batch_size, [vars(p) for p in t.phases])
            dirs = [step.out] if step.command == "run" else sorted(step.out.glob("*"))
            out += [(exp.name, want, d) for d in dirs if (d / "config.json").is_file()]
    return out


PAIRS = _pairs()


def test_every_committed_comparison_is_checked():
    names = {name for name, _, _ in PAIRS}
    assert {"resnet20", "resnet20-5seeds", "vit", "vit-density", "bert", "bert-matched", "undertrained"} <= names


@pytest.mark.parametrize("name,want,run", PAIRS, ids=[f"{n}:{r.parent.name}/{r.name}" for n, _, r in PAIRS])
def test_config_states_the_committed_settings(name, want, run):
    c = upgrade_run_record(json.loads((run / "config.json").read_text()))["train"]
    got = _settings(c.get("grad_clip"), c["batch_size"], c["phases"])
    assert got == want, f"configs/{name}.toml does not reproduce {run.relative_to(ROOT)}"
