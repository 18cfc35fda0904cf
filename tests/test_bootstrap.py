"""The paired bootstrap over test samples: it rebuilds the runs' calibrated operating points exactly."""

import json

import pytest
import torch
from click.testing import CliRunner

from earlyexit.bootstrap import calibrated_correct, sample_bootstrap
from earlyexit.cli import main
from earlyexit.errors import EarlyExitError
from safetensors.torch import save_file

from earlyexit.io import load_weights
from earlyexit.runs import find_weights

QUICK = ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--device", "cpu", "--epochs", "1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("boot")
    for regime in ("joint", "mixed"):
        r = CliRunner().invoke(main, ["run", *QUICK, "--regime", regime, "--out", str(root / f"mlp-{regime}-s0")],
                               catch_exceptions=False)
        assert r.exit_code == 0, r.output
    return root / "mlp-mixed-s0", root / "mlp-joint-s0"


def test_recomputed_points_are_results_json_and_the_difference_is_theirs(two_runs):
    a, b = two_runs
    ca = calibrated_correct(a)
    stored = json.loads((a / "results.json").read_text())["calibrated_budgets"]
    assert ca["accuracy"] == pytest.approx(stored, abs=1e-9)
    res = sample_bootstrap(a, b, resamples=300)
    sb = json.loads((b / "results.json").read_text())["calibrated_budgets"]
    for name, c in res["budgets"].items():
        if c is None:
            assert stored[name] is None or sb[name] is None
            continue
        assert c["mean"] == pytest.approx(stored[name] - sb[name], abs=1e-9)
        assert c["low"] <= c["mean"] <= c["high"]
    same = sample_bootstrap(a, a, resamples=100)  # a run against itself: no difference on any resample
    assert all(c is None or (c["mean"] == c["low"] == c["high"] == 0) for c in same["budgets"].values())


def test_summary_bootstrap_and_weights_that_are_not_the_results(two_runs, tmp_path):
    a, b = two_runs
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["summary", str(a), str(b), "--pair", "*-mixed-s0:*-joint-s0", "--bootstrap",
                                  "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "bootstrap over test samples" in r.output
    boot = json.loads(out.read_text())["pairs"][0]["bootstrap"]
    assert boot["seed"] == 0 and set(boot["budgets"]) == {"25%", "50%", "75%", "100%", "max"}
    # other weights in the run folder: the recomputed table no longer matches results.json -> refused
    import shutil
    c = tmp_path / "changed"
    shutil.copytree(a, c)
    w = load_weights(find_weights(c))
    save_file({k: (v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in w.items()},
              str(find_weights(c)))
    with pytest.raises(EarlyExitError, match="not the ones the results came from"):
        calibrated_correct(c)


def test_a_pbee_run_rebuilds_its_patience_calibrated_points(tmp_path):
    """PBEE exits by patience: its calibrated_budgets come from one patience chosen on validation per target, and
    the bootstrap rebuilds them from the weights exactly."""
    run = tmp_path / "mlp-pbee-s0"
    r = CliRunner().invoke(main, ["run", *QUICK, "--regime", "joint", "--method", "pbee", "--out", str(run)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stored = json.loads((run / "results.json").read_text())
    assert stored["curve"]["criterion"] == "patience" and stored["calibrated_global"]["criterion"] == "patience"
    assert calibrated_correct(run)["accuracy"] == pytest.approx(stored["calibrated_budgets"], abs=1e-9)
