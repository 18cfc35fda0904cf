"""compare: the three regimes with a shared phase 1 give exactly what three separate runs give."""

import json

import pytest
import torch

from earlyexit.compare import compare_regimes, run_dir
from earlyexit.config import DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.errors import EarlyExitError
from earlyexit.io import load_weights
from earlyexit.runs import find_weights, run_experiment

PC = PhaseConfig(epochs=2, lr=(0.05,))
CFG = RunConfig(model=ModelConfig(name="mlp", kwargs={"width": 16, "depth": 3}), data=DataConfig(name="synthetic"),
                train=TrainConfig(phases=(PC, PC, PC), batch_size=50, device="cpu"))
# A conv net that trains channels-last: phase 1's weights leave train() contiguous and come back in.
CONV = RunConfig(model=ModelConfig(name="resnet20", ic_after="every:3"), data=DataConfig(name="synthetic", train_size=200),
                 train=TrainConfig(phases=(PhaseConfig(epochs=1, lr=(0.05,)),) * 3, batch_size=50, device="cpu"))


def _strip(obj):
    """Drop wall-clock fields, which differ between any two runs."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("seconds", "timing")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _history(d):
    return [_strip(json.loads(line)) for line in (d / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("base", [CFG, CONV], ids=["mlp", "resnet-channels-last"])
def test_shared_phase1_is_bit_identical_to_separate_runs(tmp_path, base):
    summary = compare_regimes(base, [0], tmp_path / "cmp")
    assert set(summary["runs"]) == {"joint", "disjoint", "mixed"}
    assert (tmp_path / "cmp" / "summary.json").is_file()
    for regime in ("joint", "disjoint", "mixed"):
        a = run_dir(tmp_path / "cmp", base, regime, 0)
        b = tmp_path / f"sep-{regime}"
        cfg = RunConfig(model=base.model, data=base.data, train=TrainConfig(regime=regime, phases=base.train.phases,
                                                                            batch_size=50, device="cpu"))
        run_experiment(cfg, b)
        ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
        assert _strip(ra) == _strip(rb), regime
        assert _history(a) == _history(b), regime
        wa, wb = load_weights(find_weights(a)), load_weights(find_weights(b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), regime
        assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.slow
def test_matched_budget_gives_joint_the_epochs_of_mixed_and_resume_keeps_finished_runs(tmp_path):
    out = tmp_path / "cmp"
    compare_regimes(CFG, [1], out, budget="matched")
    joint = json.loads((run_dir(out, CFG, "joint-matched", 1) / "results.json").read_text())
    assert (out / "summary-matched.json").is_file()
    assert joint["train"]["phases"][0]["grid"][0]["epochs"] == 4  # phase 1 (2) + phase 2 (2) of mixed
    before = (run_dir(out, CFG, "mixed", 1) / "results.json").read_bytes()
    with pytest.raises(EarlyExitError, match="--resume"):
        compare_regimes(CFG, [1], out)
    # a committed comparison keeps no weights: its finished runs are read back without retraining phase 1
    (out / "s1-phase1" / "phase1.pt").unlink()
    compare_regimes(CFG, [1], out, budget="matched", resume=True)
    assert (run_dir(out, CFG, "mixed", 1) / "results.json").read_bytes() == before
    assert not (out / "s1-phase1" / "phase1.pt").exists()
    # the FLOPs rule: the MLP's ICs cost little, so joint's epochs of equal training FLOPs are mixed's 2 + 2 too
    flops = compare_regimes(CFG, [1], out, budget="flops", resume=True)
    joint_f = json.loads((run_dir(out, CFG, "joint-flops", 1) / "results.json").read_text())
    assert joint_f["train"]["phases"][0]["grid"][0]["epochs"] == 4 and flops["budget"] == "flops"
    # the summary pairs the regimes seed by seed
    pairs = json.loads((out / "summary-matched.json").read_text())["pairs"]
    assert [(p["a"].split()[-1], p["b"].split()[-1]) for p in pairs] == [("++-", "-+-"), ("++-", "+-+"), ("+-+", "-+-")]
    assert all(set(p["tables"]) == {"calibrated_budgets", "paper_budgets", "budgets"} for p in pairs)


def test_flops_matched_epochs_count_the_ics():
    """ICs that cost as much as the backbone make a joint epoch 2x mixed's phase-1 epoch: 8 + 8 mixed -> 12 joint."""
    from earlyexit.compare import flops_matched_epochs

    class R:  # only what the rule reads
        base_flops = 100.0
        exits = [type("E", (), {"flops": f})() for f in (100.0, 200.0)]
        train = type("T", (), {"phases": [{"phase": 1, "lr": 0.1, "best_epoch": 8, "grid": [{"lr": 0.1, "epochs": 8}]},
                                          {"phase": 2, "lr": 0.1, "best_epoch": 8, "grid": [{"lr": 0.1, "epochs": 8}]}]})()
    # mixed: 8 x 3 x 100 + 8 x 3 x 200 = 7200 per sample; joint: 600 per epoch -> 12 epochs
    assert flops_matched_epochs(R()) == 12


def test_bad_budget_and_init_are_refused(tmp_path):
    with pytest.raises(EarlyExitError, match="unknown budget"):
        compare_regimes(CFG, [0], tmp_path, budget="lavish")
    with pytest.raises(EarlyExitError, match="--init"):
        compare_regimes(RunConfig(model=CFG.model, data=CFG.data, train=CFG.train, init="x"), [0], tmp_path)


@pytest.mark.slow
def test_compare_command_writes_runs_summary_and_figure(tmp_path):
    from click.testing import CliRunner

    from earlyexit.cli import main

    out = tmp_path / "cmp"
    args = ["compare", "--model", "mlp", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "50",
            "--device", "cpu", "--seeds", "0,1", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert [len(summary["runs"][k]) for k in ("joint", "disjoint", "mixed")] == [2, 2, 2]
    assert {g["regime"] for g in summary["summary"]} == {"-+-", "+-+", "++-"}
    assert "paper's rule" in r.output and (out / "curves.png").stat().st_size > 1000
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "--resume" in r.output
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output


def test_every_run_folder_of_a_live_comparison_is_locked(tmp_path, monkeypatch):
    """While a comparison trains a run (phase 1, disjoint, mixed, joint), that folder's lock is held: a `run`
    into it gets the one-line busy error; the locks are gone when the comparison ends."""
    import earlyexit.compare as cmp
    import earlyexit.runs as runs_mod
    from earlyexit.rundir import LOCK, RunLock

    seen = []

    def spy(real):
        def wrapped(model, data, *a, out_dir=None, **kw):
            with pytest.raises(EarlyExitError, match="is in use by another run"):
                RunLock(out_dir).acquire()
            seen.append(out_dir.name)
            return real(model, data, *a, out_dir=out_dir, **kw)
        return wrapped

    monkeypatch.setattr(cmp, "train", spy(cmp.train))
    monkeypatch.setattr(runs_mod, "train", spy(runs_mod.train))
    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=CFG.model, data=DataConfig(name="synthetic", train_size=100),
                    train=TrainConfig(phases=(pc, pc, pc), batch_size=50, device="cpu"))
    compare_regimes(cfg, [0], tmp_path / "cmp")
    assert sorted(seen) == sorted(["s0-phase1", *(run_dir(tmp_path / "cmp", cfg, r, 0).name
                                                  for r in ("disjoint", "mixed", "joint"))])
    assert not list((tmp_path / "cmp").rglob(LOCK))


def test_a_subset_of_regimes_trains_only_those_and_pairs_only_those(tmp_path):
    out = tmp_path / "cmp"
    s = compare_regimes(CFG, [0], out, budget="matched", regimes=["mixed", "joint"])
    assert set(s["runs"]) == {"joint", "mixed"}
    assert not run_dir(out, CFG, "disjoint", 0).exists()
    assert [(p["a"].split()[-1], p["b"].split()[-1]) for p in s["pairs"]] == [("++-", "-+-")]
    joint = json.loads((run_dir(out, CFG, "joint-matched", 0) / "results.json").read_text())
    assert joint["train"]["phases"][0]["grid"][0]["epochs"] == 4
    with pytest.raises(EarlyExitError, match="include mixed"):
        compare_regimes(CFG, [0], tmp_path / "b", budget="matched", regimes=["joint", "disjoint"])
    with pytest.raises(EarlyExitError, match="valid: joint, disjoint, mixed"):
        compare_regimes(CFG, [0], tmp_path / "c", regimes=["jiont"])
