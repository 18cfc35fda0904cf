"""The golden numbers of ``tests/golden/``: every value recomputed and compared with the file.

FLOPs exactly; scores within the tolerance ``scores.json`` states (relative 1e-9); training losses within a
relative 1e-4 and accuracies within one sample (``training.json``). Regenerate with
``python tests/golden/regenerate.py`` and review the diff.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import earlyexit as ee
from earlyexit.cli import main
from earlyexit.device import platform
from earlyexit.errors import DataError
from earlyexit.metrics import CRITERIA
from earlyexit.testing import assert_curve_matches, assert_exit_costs

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_regenerate", GOLDEN / "regenerate.py")
R = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(R)


def assert_close(actual, expected, *, rtol: float, atol: float, path: str = "") -> None:
    """Same structure; integers, strings, booleans and None equal; floats within ``atol + rtol * |expected|``."""
    where = path or "the root"
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            assert_close(actual[k], expected[k], rtol=rtol, atol=atol, path=f"{path}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), \
            f"{where}: expected a list of {len(expected)}, got {actual!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rtol=rtol, atol=atol, path=f"{path}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol), f"{where}: {actual!r} != golden {expected!r}"
    else:
        assert actual == expected and type(actual) is type(expected), f"{where}: {actual!r} != golden {expected!r}"


def _jsonable(obj):
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("name", sorted(R.FILES.values()))
def test_golden_files_are_in_their_reviewable_format(name):
    """Sorted keys, one value per line (a matrix row per line): what the regeneration writes, byte for byte."""
    text = (GOLDEN / name).read_text()
    assert R.golden_json(json.loads(text)) + "\n" == text


def test_the_comparison_catches_a_changed_value():
    golden = R.load("training")["runs"]["mlp-synthetic"]["regimes"]["mixed"]
    moved = json.loads(json.dumps(golden))
    moved["epochs"][0]["train_loss"] *= 1 + 1e-3
    with pytest.raises(AssertionError, match=r"\.epochs\[0\]\.train_loss: .* != golden"):
        assert_close(moved, golden, rtol=1e-4, atol=0)
    moved = json.loads(json.dumps(golden))
    moved["test_accuracy"][1] -= 2 / 200  # two of the 200 test samples
    with pytest.raises(AssertionError, match=r"test_accuracy\[1\]"):
        assert_close(moved, golden, rtol=0, atol=1 / 200 + 1e-12)
    moved["phase_string"] = "+-+"
    with pytest.raises(AssertionError, match=r"\.phase_string: '\+-\+' != golden '\+\+-'"):
        assert_close(moved, golden, rtol=1, atol=1)


# --- FLOPs ---------------------------------------------------------------------------------------

FLOPS = R.load("flops")


def test_every_registered_model_has_golden_flops():
    missing = sorted(set(ee.list_models()) - set(FLOPS["models"]))
    assert not missing, (f"no golden FLOPs for {missing}: give them a standard input in STANDARD of "
                         "tests/golden/regenerate.py and run `python tests/golden/regenerate.py flops`")
    assert sorted(FLOPS["models"]) == sorted(R.STANDARD) == ee.list_models()
    assert "2 x multiply-adds" in FLOPS["convention"] and "attention" in FLOPS["convention"]


@pytest.mark.parametrize("name", sorted(R.STANDARD))
def test_golden_flops_exactly(name):
    g = FLOPS["models"][name]
    options, described = R.STANDARD[name]
    assert g["build"] == _jsonable(options) and g["input"] == described
    model = ee.build_model(name, **options)
    example = model.example_input(1)
    assert model.exit_after == g["exit_after"]
    assert_exit_costs(model, example, g["exits"], rtol=0)
    assert ee.backbone_cost(model, example) == g["backbone"]
    assert all(isinstance(v, int) for v in g["exits"] + [g["backbone"]])


# --- the seeded logits and their scores ----------------------------------------------------------------

LOGITS = R.load("logits")
SCORES = R.load("scores")


def test_the_seeded_logits_regenerate_identically():
    assert _jsonable(R.golden_logits()) == LOGITS
    logits = torch.tensor(LOGITS["test"]["logits"], dtype=torch.float32)
    assert logits.double().tolist() == LOGITS["test"]["logits"]  # exact in float32
    top2 = logits.topk(2, dim=-1).values
    assert bool((top2[..., 0] > top2[..., 1]).all())  # no tied maxima: argmax is unambiguous


@pytest.mark.parametrize("criterion", CRITERIA)
def test_golden_scores(criterion):
    tol = SCORES["tolerance"]
    computed = _jsonable(R.compute_scores(LOGITS))
    assert computed["tolerance"] == tol and sorted(SCORES["criteria"]) == sorted(CRITERIA)
    assert_close(computed["criteria"][criterion], SCORES["criteria"][criterion], rtol=tol["rtol"], atol=tol["atol"],
                 path=criterion)
    ev = SCORES["criteria"][criterion]["evaluation"]
    assert ("calibrated_geometric" in ev) == (criterion != "patience")
    t = LOGITS["test"]
    assert_curve_matches(torch.tensor(t["logits"]), torch.tensor(t["labels"]), t["costs"], ev["curve"],
                         rtol=tol["rtol"], atol=tol["atol"])


def test_the_golden_logits_file_scores_from_the_command_line(tmp_path):
    t, v = LOGITS["test"], LOGITS["val"]
    np.savez(tmp_path / "t.npz", logits=np.array(t["logits"], np.float32), labels=np.array(t["labels"]),
             costs=np.array(t["costs"], np.float64), base_flops=np.array(t["base_flops"], np.float64))
    np.savez(tmp_path / "v.npz", logits=np.array(v["logits"], np.float32), labels=np.array(v["labels"]))
    r = CliRunner().invoke(main, ["score", str(tmp_path / "t.npz"), "--val", str(tmp_path / "v.npz"),
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "o" / "score.json").read_text())
    golden = SCORES["criteria"]["confidence"]
    assert_close(written["evaluations"][0], golden["evaluation"], rtol=1e-9, atol=1e-12)
    assert_close(written["summary"]["paper_budgets"], golden["paper_budgets"], rtol=1e-9, atol=1e-12)


# --- tiny training runs ------------------------------------------------------------------------------

TRAINING = R.load("training")


def test_the_golden_runs_state_every_option():
    for key, run in TRAINING["runs"].items():
        assert run["setup"] == _jsonable(R.TRAINING[key])
        assert run["setup"]["weighting"] == "uniform"  # explicit: a new default weighting leaves these numbers be
        assert set(run["setup"]["phase"]) == {"optimizer", "lr", "weight_decay", "momentum", "schedule", "epochs",
                                              "patience", "metric"}
        assert sorted(run["regimes"]) == sorted(R.REGIMES)


@pytest.mark.parametrize("regime", R.REGIMES)
@pytest.mark.parametrize("key", sorted(R.TRAINING))
def test_golden_training_run(key, regime):
    try:
        got = R.training_run(key, regime)
    except DataError as e:
        pytest.skip(f"data not installed: {e}")
    golden = TRAINING["runs"][key]["regimes"][regime]
    n_val, n_test = golden["val"], TRAINING["runs"][key]["setup"]["test_samples"]
    rtol, atol_val, atol_test = _training_tolerance(TRAINING, platform("cpu"), n_val, n_test)
    assert got["phase_string"] == golden["phase_string"] and (got["train"], got["val"]) == (golden["train"], golden["val"])
    assert [(e["phase"], e["epoch"]) for e in got["epochs"]] == [(e["phase"], e["epoch"]) for e in golden["epochs"]]
    for i, (a, e) in enumerate(zip(got["epochs"], golden["epochs"])):
        assert math.isclose(a["train_loss"], e["train_loss"], rel_tol=rtol), \
            f"epoch {i}: train loss {a['train_loss']!r} != golden {e['train_loss']!r}"
        assert_close(a["val_acc"], e["val_acc"], rtol=0, atol=atol_val, path=f"epochs[{i}].val_acc")
    assert_close(got["test_accuracy"], golden["test_accuracy"], rtol=0, atol=atol_test, path="test_accuracy")


def _training_tolerance(golden: dict, here: str, n_val: int, n_test: int) -> tuple[float, float, float]:
    """(loss rtol, validation and test accuracy atol): the file's tight tolerance on the platform it names, its
    wider ``other_platform`` one elsewhere (another CPU's kernels round convolutions differently)."""
    tol = golden["tolerance"]
    if golden["platform"] == here:
        return (tol["train_loss_rtol"], tol["accuracy_atol_samples"] / n_val + 1e-12,
                tol["accuracy_atol_samples"] / n_test + 1e-12)
    other = tol["other_platform"]
    return other["train_loss_rtol"], other["accuracy_atol"], other["accuracy_atol"]


def test_the_tight_training_tolerance_holds_only_on_the_golden_platform():
    tight = _training_tolerance(TRAINING, TRAINING["platform"], 64, 256)
    assert tight == (1e-4, 1 / 64 + 1e-12, 1 / 256 + 1e-12)
    wide = _training_tolerance(TRAINING, "torch 0.0.0, NONE, nobody", 64, 256)
    assert wide == (0.03, 0.125, 0.125)
    assert platform("cpu").startswith(f"torch {torch.__version__.split('+')[0]}, ")


# --- the README states what the files hold ------------------------------------------------------------

def test_readme_states_the_golden_setup():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Testing your implementation against earlyexit", 1)[1].split("\n## ", 1)[0]
    r20 = FLOPS["models"]["resnet20"]
    assert (f"exits {r20['exits'][0]}, {r20['exits'][1]} and {r20['exits'][2]} FLOPs, backbone {r20['backbone']}"
            in " ".join(section.split()))
    short = lambda x: f"{x:.0e}".replace("e-0", "e-")  # noqa: E731  (1e-09 -> 1e-9)
    assert f"| relative {short(SCORES['tolerance']['rtol'])} |" in section
    assert f"loss relative {short(TRAINING['tolerance']['train_loss_rtol'])}, accuracy within one sample" in section
    assert TRAINING["tolerance"]["accuracy_atol_samples"] == 1
    s = R.LOGITS_SHAPE
    assert f"({s['exits']} exits, {s['classes']} classes, {s['test']} samples each" in section and s["val"] == s["test"]
    fm = R.TRAINING["resnet20-fashion-mnist"]
    assert f"ResNet-20 on {fm['data']['train_size']} Fashion-MNIST images" in section
    assert all(run["phase"]["epochs"] == 1 and run["weighting"] == "uniform" for run in R.TRAINING.values())
    from earlyexit.score import REQUIRED

    for key, shape in REQUIRED.items():
        assert f"| `{key}` | {shape} |" in section
