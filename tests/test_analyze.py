"""``analyze``: the paper's analyses of tiny trained runs, as JSON and figures (``earlyexit.analyze``)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from earlyexit.analyze import analyze_run, analyze_runs, write_figures
from earlyexit.cli import main
from earlyexit.config import DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.runs import run_experiment

FAST = ["--max-samples", "64", "--features", "64", "--steps", "4", "--landscape-steps", "3,3", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny mlp runs (joint with the gradient log and an lr grid in phase 2, mixed, disjoint)."""
    root = tmp_path_factory.mktemp("analyze")
    out = []
    for regime, seed, every in (("joint", 0, 2), ("mixed", 1, None), ("disjoint", 2, None)):
        pc = PhaseConfig(epochs=1, lr=(0.05, 0.02) if every else (0.05,))
        cfg = RunConfig(model=ModelConfig(name="mlp", kwargs={"width": 16, "depth": 3}),
                        data=DataConfig(name="synthetic"), train=TrainConfig(regime=regime, phases=(pc, pc, pc), batch_size=50, device="cpu", seed=seed, weighting="sum",
                                          grad_log_every=every), eval=EvalConfig(thresholds=5))
        run_experiment(cfg, root / regime)
        out.append(root / regime)
    return out


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    return data


def test_every_analysis_writes_json_and_its_figure(runs, tmp_path):
    out = tmp_path / "an" / "analysis.json"
    r = CliRunner().invoke(main, ["analyze", *map(str, runs), "--what", "rank,gradients,information,landscape,plane",
                                  "--split", "train", *FAST, "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [x["regime_name"] for x in res["runs"]] == ["joint", "mixed", "disjoint"]
    first = res["runs"][0]
    layers = ["stages.0.0", "stages.1.0", "stages.2.0", "heads.2.linear"]  # every backbone Linear, no IC head
    assert [row["layer"] for row in first["rank"]] == layers
    assert all(1 <= row["rank"] <= min(row["samples"], row["features"]) for row in first["rank"])
    assert [row["layer"] for row in first["information"]] == layers and first["information"][0]["method"] == "jensen"  # the default estimator
    info = first["information"][0]
    assert info["sigma_ref"] == "median" and {"mi_mc", "mi_bhattacharyya"} <= set(info)  # and the others beside it
    assert info["sigma"] == pytest.approx(0.25 * info["scale"]) and info["log_n"] == pytest.approx(math.log(64))
    rank = first["rank"][0]
    assert rank["tolerance"]["rule"] == "covariance" and rank["ceiling"] == min(rank["samples"], rank["features"])
    assert len(first["gradients"]["cos"]) == 3 and all(-1 <= c <= 1 for c in first["gradients"]["cos"])
    assert first["gradients"]["weights"] == [1.0, 1.0, 1.0]
    land = first["landscape"]
    assert len(land["total"]) == 3 and land["total"][1][1] == pytest.approx(sum(row[1][1] for row in land["loss"]))
    plane = first["plane"]
    assert len(plane["xs"]) == 4 and plane["matched"] is True and set(plane["runs"]) == {"ref", "a", "b"}
    assert "plane" not in res["runs"][1]  # the paired analysis runs once, on the first run
    for name in ("rank", "information", "plane", "gradients-joint", "landscape-joint", "landscape-mixed",
                 "landscape-disjoint"):
        _png(out.parent / f"analysis-{name}.png")
    # the runs without a gradient log get a note, not a figure
    assert not (out.parent / "analysis-gradients-mixed.png").exists()
    assert "has no gradients.jsonl" in r.output


def test_one_run_default_output_and_the_earlier_variants(runs):
    run = runs[1]
    r = CliRunner().invoke(main, ["analyze", str(run), "--what", "rank-exits,gradient-norms,information,connectivity",
                                  "--mi-method", "knn", "--other", str(runs[2]), *FAST], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads((run / "analysis.json").read_text())  # the default place
    assert res["regime_name"] == "mixed" and len(res["rank-exits"]["numerical"]) == 3
    assert len(res["gradient-norms"]["norms"]) == 3 and {"I_TY", "I_XT"} <= set(res["information"][0])
    assert len(res["connectivity"]["path"]["alphas"]) == 4 and res["connectivity"]["matched_path"] is not None
    summary = res["connectivity"]["summary"]
    assert set(summary) == {"plain", "matched"} and len(summary["matched"]["exit_barrier"]) == 3
    # the variants draw no figure; the path between the two runs does
    assert [p.name for p in run.glob("analysis-*.png")] == ["analysis-connectivity.png"]


def test_rank_figure_has_one_line_per_run_and_the_log_keeps_the_chosen_grid_point(runs, tmp_path, monkeypatch):
    results = [analyze_run(d, what=("rank", "gradients"), max_samples=32, n_features=32, device="cpu") for d in runs]
    drawn = {}
    import earlyexit.analysis.figures as figures  # write_figures looks its functions up here when it draws

    def spy(name):
        real = getattr(figures, name)

        def wrapper(data, out_file, **kw):
            drawn[name] = data
            return real(data, out_file, **kw)
        return wrapper

    monkeypatch.setattr(figures, "plot_layer_ranks", spy("plot_layer_ranks"))
    monkeypatch.setattr(figures, "plot_gradient_cosines", spy("plot_gradient_cosines"))
    written = write_figures(results, tmp_path / "a", echo=lambda m: None)
    assert list(drawn["plot_layer_ranks"]) == ["joint", "mixed", "disjoint"]
    assert [len(v) for v in drawn["plot_layer_ranks"].values()] == [4, 4, 4]
    log = [json.loads(line) for line in (runs[0] / "gradients.jsonl").read_text().splitlines()]
    chosen = json.loads((runs[0] / "results.json").read_text())["train"]["phases"][0]["lr"]
    assert {r["lr"] for r in log} == {0.05, 0.02}  # both grid points were logged ...
    assert drawn["plot_gradient_cosines"] == [r for r in log if r["lr"] == chosen]  # ... the chosen one is drawn
    assert {p.name for p in written} == {"a-rank.png", "a-gradients-joint.png"}


def test_progress_counts_every_analysis_of_every_run(runs):
    seen = []
    kw = dict(max_samples=32, n_features=16, device="cpu", path_steps=3)
    results = analyze_runs(runs[:2], what=("rank", "connectivity"), progress=lambda *a: seen.append(a), **kw)
    assert results == analyze_runs(runs[:2], what=("rank", "connectivity"), **kw)  # the same with or without it
    assert seen == [(i, 3, "analyses") for i in range(4)]  # rank on both runs, the path once


def test_gradient_cosines_of_the_trained_model_average_the_batches(runs):
    res = analyze_run(runs[0], what=("gradients",), max_samples=100, device="cpu", batch_size=50)
    per = res["gradients"]["per_batch"]
    assert len(per) == 2
    assert all(math.isclose(res["gradients"]["cos"][k], (per[0][k] + per[1][k]) / 2) for k in range(3))


@pytest.mark.parametrize("args,message", [
    (["--what", "plane"], "the plane analysis needs a second and a third run folder"),
    (["--what", "rank,sharpness"], "unknown analysis 'sharpness'"),
    (["--landscape-steps", "3,3,3", "--what", "landscape"], "--landscape-steps: expected N or N,M"),
])
def test_bad_analyze_input_is_one_line(runs, args, message):
    r = CliRunner().invoke(main, ["analyze", str(runs[0]), *args, "--device", "cpu"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.output.strip().count("\n") == 0 and message in r.output


def test_default_splits_are_the_papers(runs):
    """Rank and information on the test split (Figures 3, 5); the loss landscape on the training split (appendix A)."""
    res = analyze_run(runs[0], what=("rank", "landscape"), max_samples=32, n_features=16, landscape_steps=(3, 3),
                      device="cpu")
    assert res["split"] == "test" and res["loss_split"] == "train"
    forced = analyze_run(runs[0], what=("rank",), max_samples=32, n_features=16, split="val", device="cpu")
    assert forced["split"] == "val" and forced["loss_split"] == "val"


def test_figures_only_redraws_from_the_json(runs, tmp_path):
    out = tmp_path / "r" / "rank.json"
    args = ["analyze", str(runs[0]), str(runs[1]), "--what", "rank", *FAST, "--out", str(out)]
    assert CliRunner().invoke(main, args, catch_exceptions=False).exit_code == 0
    png = out.parent / "rank-rank.png"
    png.unlink()
    before = out.read_bytes()
    r = CliRunner().invoke(main, [*args, "--figures-only"], catch_exceptions=False)
    assert r.exit_code == 0 and _png(png) and out.read_bytes() == before  # drawn again, nothing measured
    r = CliRunner().invoke(main, ["analyze", str(runs[0]), "--figures-only", "--out", str(tmp_path / "none.json")])
    assert r.exit_code == 2 and "no results at" in r.output
