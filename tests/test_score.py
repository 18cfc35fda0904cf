"""``earlyexit.score`` and ``python -m earlyexit score``: another implementation's logits, evaluated as a run is.

The central check: the logits of one of our own tiny runs, written to a file and scored, give exactly that run's
results.json evaluation (exits, curve, budgets, calibrated parts).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import earlyexit as ee
from earlyexit.cli import main
from earlyexit.config import DataConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.errors import EarlyExitError
from earlyexit.metrics import CRITERIA, budget_table, ztw_budget_table
from earlyexit.reports import PAPER_BUDGETS_TITLE, SEED_BUDGETS_TITLE, summarize_runs
from earlyexit.results import Results
from earlyexit.runs import load_data, load_run, run_experiment
from earlyexit.score import FIGURE_FILE, SCORE_FILE, evaluate_logits, format_score, score

EVALUATION_KEYS = ("base_flops", "exits", "curve", "budgets", "calibrated_geometric", "calibrated_global",
                   "calibrated_budgets")


def _invoke(args):
    return CliRunner().invoke(main, args)


def _expect_error(args, pattern):
    r = _invoke(args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exc_info)
    assert isinstance(r.exception, SystemExit), r.exc_info  # a clean exit, never a traceback
    assert pattern in r.output, r.output
    assert r.output.strip().count("\n") == 0, r.output
    return r


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished mixed run of the MLP on synthetic data, and its model's test and validation logits as files."""
    root = tmp_path_factory.mktemp("score")
    cfg = RunConfig(model=ModelConfig(name="mlp"), data=DataConfig(name="synthetic"),
                    train=TrainConfig(regime="mixed", phases=(PhaseConfig(epochs=1, lr=0.02),) * 3, batch_size=32,
                                      device="cpu"))
    results = run_experiment(cfg, root / "run").to_dict()
    model, cfg = load_run(root / "run")
    splits = load_data(cfg)
    logits, labels = ee.evaluate(model, splits.test.batches(cfg.eval.batch_size))
    val_logits, val_labels = ee.evaluate(model, splits.val.batches(cfg.eval.batch_size))
    costs = ee.exit_costs(model, model.example_input(1))
    arrays = {"logits": logits, "labels": labels, "costs": torch.tensor(costs, dtype=torch.float64),
              "base_flops": torch.tensor(results["base_flops"], dtype=torch.float64),
              "stages": torch.tensor(model.exit_after)}
    np.savez(root / "test.npz", **{k: v.numpy() for k, v in arrays.items()})
    np.savez(root / "val.npz", logits=val_logits.numpy(), labels=val_labels.numpy())
    return {"root": root, "results": results, "arrays": arrays, "val": {"logits": val_logits, "labels": val_labels}}


def _evaluation(results: dict) -> dict:
    return {k: results[k] for k in EVALUATION_KEYS if k in results}


def test_the_logits_of_a_run_score_exactly_as_its_results_json(tiny_run, tmp_path):
    expected = _evaluation(tiny_run["results"])
    assert {"calibrated_geometric", "calibrated_global", "calibrated_budgets"} <= set(expected)
    r = _invoke(["score", str(tiny_run["root"] / "test.npz"), "--val", str(tiny_run["root"] / "val.npz"),
                 "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "s" / SCORE_FILE).read_text())
    assert written["evaluations"] == [expected]  # exactly: every float, count and threshold
    assert written["sources"] == [str(tiny_run["root"] / "test.npz")]
    assert (tmp_path / "s" / FIGURE_FILE).stat().st_size > 1000
    assert SEED_BUDGETS_TITLE in r.output and PAPER_BUDGETS_TITLE in r.output and "wrote" in r.output


def test_the_python_api_takes_tensors_arrays_and_mappings(tiny_run):
    a, expected = tiny_run["arrays"], _evaluation(tiny_run["results"])
    val = {"logits": tiny_run["val"]["logits"].numpy(), "labels": tiny_run["val"]["labels"].numpy()}
    r = ee.score(a["logits"], a["labels"].numpy(), a["costs"].tolist(), val=val, base_flops=float(a["base_flops"]))
    without_stage = {**expected, "exits": [{k: v for k, v in e.items() if k != "stage"} for e in expected["exits"]]}
    assert json.loads(json.dumps(r["evaluations"][0])) == without_stage
    r2 = ee.score(dict(a), val=tiny_run["val"])
    assert json.loads(json.dumps(r2["evaluations"][0])) == expected


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_every_file_format_scores_alike(tiny_run, tmp_path, suffix):
    a = {k: v.contiguous() for k, v in tiny_run["arrays"].items()}
    val = {k: v.contiguous() for k, v in tiny_run["val"].items()}
    if suffix == ".pt":
        torch.save(a, tmp_path / "t.pt")
        torch.save(val, tmp_path / "v.pt")
    else:
        from safetensors.torch import save_file

        save_file(a, str(tmp_path / "t.safetensors"))
        save_file(val, str(tmp_path / "v.safetensors"))
    r = score(tmp_path / f"t{suffix}", val=tmp_path / f"v{suffix}")
    assert json.loads(json.dumps(r["evaluations"][0])) == _evaluation(tiny_run["results"])


def test_base_flops_defaults_to_the_last_exit_and_the_flag_overrides_it(tiny_run, tmp_path):
    a = tiny_run["arrays"]
    np.savez(tmp_path / "plain.npz", logits=a["logits"].numpy(), labels=a["labels"].numpy(), costs=a["costs"].numpy())
    r = score(tmp_path / "plain.npz")
    assert r["base_flops"] == float(a["costs"][-1]) != float(a["base_flops"])
    assert "calibrated_geometric" not in r["evaluations"][0]  # no validation logits, no calibration
    assert all("stage" not in e for e in r["evaluations"][0]["exits"])
    out = _invoke(["score", str(tmp_path / "plain.npz"), "--base-flops", "1e9", "--out", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    written = json.loads((tmp_path / "o" / SCORE_FILE).read_text())
    assert written["base_flops"] == 1e9 and written["evaluations"][0]["budgets"]["25%"] is not None


# --- several seeds ---------------------------------------------------------------------------

COSTS = [30.0, 55.0, 80.0, 105.0]


def _seed(seed: int, n: int = 300, c: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    signal = torch.linspace(0.8, 3.0, len(COSTS))[:, None, None] * torch.rand(1, n, 1, generator=g)
    one_hot = torch.nn.functional.one_hot(labels, c)
    logits = torch.randn(len(COSTS), n, c, generator=g) + 2 * signal * one_hot
    val = torch.randn(len(COSTS), n, c, generator=g) + 2 * signal * one_hot
    return {"test": {"logits": logits, "labels": labels, "costs": COSTS},
            "val": {"logits": val, "labels": labels}}


@pytest.mark.parametrize("criterion", CRITERIA)
def test_several_seeds_give_the_tables_summary_gives_for_run_folders(criterion, tmp_path):
    seeds = [_seed(s) for s in range(3)]
    r = score([s["test"] for s in seeds], val=[s["val"] for s in seeds], base_flops=100.0, criterion=criterion)
    assert r["summary"]["seeds"] == 3 and len(r["evaluations"]) == 3
    assert r["summary"]["paper_budgets"] == ztw_budget_table([ev["curve"] for ev in r["evaluations"]], 100.0)
    dirs = []
    for i, ev in enumerate(r["evaluations"]):
        res = Results.build(regime="++-", regime_name="mixed", model="theirs", dataset="d", seed=i, evaluation=ev,
                            method=None, weighting=None)
        dirs.append(tmp_path / f"s{i}")
        dirs[-1].mkdir()
        res.save(dirs[-1])
    (summary,) = summarize_runs(dirs)
    assert r["summary"]["paper_budgets"] == summary["paper_budgets"]
    assert r["summary"]["budgets"] == summary["budgets"]
    assert [{k: e[k] for k in ("index", "mean", "std")} for e in r["summary"]["exits"]] == summary["exits"]
    if criterion == "patience":  # one patience chosen on validation per target: no per-exit (geometric) thresholds
        assert all("calibrated_geometric" not in ev and "calibrated_global" in ev for ev in r["evaluations"])
    cal = [ev["calibrated_budgets"]["75%"] for ev in r["evaluations"]]
    assert r["summary"]["calibrated_budgets"]["75%"]["mean"] == pytest.approx(sum(cal) / 3, rel=1e-12)
    text = "\n".join(format_score(r))
    assert PAPER_BUDGETS_TITLE in text and "over 3 seeds" in text


def test_several_files_on_the_command_line(tmp_path):
    files = []
    for s in range(2):
        d = _seed(s)
        np.savez(tmp_path / f"s{s}.npz", logits=d["test"]["logits"].numpy(), labels=d["test"]["labels"].numpy(),
                 costs=np.array(COSTS))
        np.savez(tmp_path / f"v{s}.npz", logits=d["val"]["logits"].numpy(), labels=d["val"]["labels"].numpy())
        files.append(str(tmp_path / f"s{s}.npz"))
    r = _invoke(["score", *files, "--val", str(tmp_path / "v0.npz"), "--val", str(tmp_path / "v1.npz"),
                 "--criterion", "entropy", "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "o" / SCORE_FILE).read_text())
    assert written["criterion"] == "entropy" and written["summary"]["seeds"] == 2
    assert written["base_flops"] == COSTS[-1] and "calibrated_budgets" in written["summary"]
    assert (tmp_path / "o" / FIGURE_FILE).stat().st_size > 1000
    _expect_error(["score", *files, "--val", str(tmp_path / "v0.npz"), "--out", str(tmp_path / "o2")],
                  "one validation output per output: 2 outputs, 1 validation outputs")


def test_the_criterion_choices_are_the_packages():
    from earlyexit.cli import score_cmd

    choice = next(p for p in score_cmd.params if p.name == "criterion").type.choices
    assert tuple(choice) == CRITERIA


def test_evaluate_logits_is_what_a_run_uses():
    import inspect

    from earlyexit import runs

    assert "evaluate_logits(" in inspect.getsource(runs.evaluate_model)
    d = _seed(0)["test"]
    ev = evaluate_logits(d["logits"], d["labels"], COSTS, 100.0, criterion="patience", val_logits=d["logits"])
    # patience: one value for every exit, calibrated on validation in the global mode only
    assert set(ev) == {"base_flops", "exits", "curve", "budgets", "calibrated_global", "calibrated_budgets"}
    assert ev["calibrated_budgets"] == budget_table(ev["calibrated_global"], [], 100.0)


# --- errors: one line, exit code 2 ---------------------------------------------------------------

def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


GOOD = {"logits": np.zeros((3, 5, 4), np.float32), "labels": np.arange(5) % 4, "costs": np.array([1.0, 2.0, 3.0])}


@pytest.mark.parametrize("change,pattern", [
    ({"labels": None}, "lacks 'labels' (expected keys: logits (E, N, C), labels (N,), costs (E,))"),
    ({"logits": None, "costs": None}, "lacks 'logits', 'costs'"),
    ({"logits": np.zeros((5, 4), np.float32)}, "logits must have shape (E, N, C) (exits, samples, classes), got (5, 4)"),
    ({"logits": np.zeros((3, 0, 4), np.float32)}, "logits must have shape (E, N, C)"),
    ({"logits": np.full((3, 5, 4), np.nan, np.float32)}, "logits hold NaN values"),
    ({"labels": np.arange(6) % 4}, "labels must have shape (5,) (one class index per sample), got (6,)"),
    ({"labels": np.array([0, 1, 2, 3, 4])}, "labels must be class indices in [0, 4), got values from 0 to 4"),
    ({"labels": np.array([0.5, 1, 2, 3, 0])}, "labels must be integers"),
    ({"costs": np.array([1.0, 2.0])}, "costs must have shape (3,) (the cumulative cost of each exit), got (2,)"),
    ({"costs": np.array([3.0, 2.0, 1.0])}, "costs must be cumulative (non-decreasing along exits)"),
    ({"costs": np.array([1.0, np.inf, 3.0])}, "costs must be finite and >= 0"),
    ({"base_flops": np.array(-1.0)}, "base_flops must be one positive number"),
    ({"stages": np.array([0, 1])}, "stages must have shape (3,)"),
    ({"logits": np.array(["a", "b"])}, "'logits' is an array of <U1, expected numbers"),
])
def test_malformed_files(change, pattern, tmp_path):
    arrays = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    f = _npz(tmp_path / "bad.npz", **arrays)
    _expect_error(["score", f, "--out", str(tmp_path / "o")], f"{f}")
    _expect_error(["score", f, "--out", str(tmp_path / "o")], pattern)
    assert not (tmp_path / "o").exists()


def test_unreadable_and_mismatched_inputs(tmp_path):
    good = _npz(tmp_path / "good.npz", **GOOD)
    out = ["--out", str(tmp_path / "o")]
    _expect_error(["score", str(tmp_path / "missing.npz"), *out], "missing.npz does not exist")
    _expect_error(["score", str(tmp_path / "x.csv"), *out], "unknown format '.csv'; expected .npz, .pt, .safetensors")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    _expect_error(["score", str(tmp_path / "corrupt.npz"), *out], "cannot read")
    torch.save({"logits": object()}, tmp_path / "pickle.pt")
    _expect_error(["score", str(tmp_path / "pickle.pt"), *out], "holds objects other than tensors")
    torch.save([1, 2], tmp_path / "list.pt")
    _expect_error(["score", str(tmp_path / "list.pt"), *out], "holds a list, expected a dict with the keys logits")
    np.savez(tmp_path / "obj.npz", logits=np.array([{"a": 1}], dtype=object), labels=GOOD["labels"], costs=GOOD["costs"])
    _expect_error(["score", str(tmp_path / "obj.npz"), *out], "cannot read")
    other = _npz(tmp_path / "other.npz", logits=np.zeros((2, 5, 4), np.float32), labels=GOOD["labels"],
                 costs=np.array([1.0, 2.0]))
    _expect_error(["score", good, other, *out], "has 2 exits and 4 classes")
    val = _npz(tmp_path / "val.npz", logits=np.zeros((2, 7, 4), np.float32), labels=np.zeros(7, np.int64))
    _expect_error(["score", good, "--val", val, *out], "validation logits have 2 exits and 4 classes")
    nolabels = _npz(tmp_path / "nolabels.npz", logits=np.zeros((3, 7, 4), np.float32))
    _expect_error(["score", good, "--val", nolabels, *out], "lacks 'labels' (expected keys: logits (E, N, C), labels (N,))")
    othercosts = _npz(tmp_path / "vc.npz", logits=np.zeros((3, 7, 4), np.float32), labels=np.zeros(7, np.int64),
                      costs=np.array([1.0, 2.0, 4.0]))
    _expect_error(["score", good, "--val", othercosts, *out], "differ from those of")
    _expect_error(["score", good, "--base-flops", "-3", *out], "base_flops must be a positive number")
    zero = _npz(tmp_path / "zero.npz", **{**GOOD, "costs": np.zeros(3)})
    _expect_error(["score", zero, *out], "the last exit costs 0")
    (tmp_path / "afile").write_text("")
    _expect_error(["score", good, "--out", str(tmp_path / "afile")], "is a file, expected a folder")
    (tmp_path / "d.npz").mkdir()
    _expect_error(["score", str(tmp_path / "d.npz"), *out], "d.npz is not a file")


def test_python_api_errors_are_one_line():
    with pytest.raises(EarlyExitError, match="pass labels= and costs="):
        score(torch.zeros(3, 5, 4))
    with pytest.raises(EarlyExitError, match="give the logits with both labels and costs"):
        score(torch.zeros(3, 5, 4), labels=torch.zeros(5, dtype=torch.long))
    with pytest.raises(EarlyExitError, match="unknown criterion 'vibes'"):
        score(GOOD, criterion="vibes")
    with pytest.raises(EarlyExitError, match=r"outputs\[0\]: expected a mapping"):
        score([torch.zeros(3, 5, 4)])
    with pytest.raises(EarlyExitError, match="give the validation logits with their labels"):
        score(GOOD, val=torch.zeros(3, 5, 4))


def test_progress_is_told_of_every_file_read_and_scored(tiny_run):
    seen = []
    files = [tiny_run["root"] / "test.npz"] * 2
    r = score(files, val=[tiny_run["root"] / "val.npz"] * 2, progress=lambda *a: seen.append(a))
    assert r == score(files, val=[tiny_run["root"] / "val.npz"] * 2)  # the same result with or without it
    assert seen == [(0, 2, "reading"), (1, 2, "reading"), (2, 2, "reading"),
                    (0, 2, "reading validation outputs"), (1, 2, "reading validation outputs"),
                    (2, 2, "reading validation outputs"), (0, 2, "scoring"), (1, 2, "scoring"), (2, 2, "scoring")]


def test_eval_reports_every_batch_and_writes_the_same_results(tiny_run, tmp_path):
    from earlyexit.runs import evaluate_run

    seen = []
    plain = evaluate_run(tiny_run["root"] / "run", out=tmp_path / "a")
    tracked = evaluate_run(tiny_run["root"] / "run", out=tmp_path / "b", progress=lambda *a: seen.append(a))
    assert tracked == plain
    _, cfg = load_run(tiny_run["root"] / "run")
    splits = load_data(cfg)
    for split, label in ((splits.test, "test batches"), (splits.val, "validation batches")):
        n = -(-len(split) // cfg.eval.batch_size)
        assert [s for s in seen if s[2] == label] == [(i, n, label) for i in range(n + 1)]
