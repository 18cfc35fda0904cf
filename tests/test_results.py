"""results.json has one owner, ``earlyexit.results.Results``: it reads what the previous layout wrote."""

import json
from pathlib import Path

import pytest

from earlyexit.errors import EarlyExitError
from earlyexit.results import CalibratedCurve, Curve, ExitResult, Results, Timing, TrainInfo, schema

FIXTURES = Path(__file__).parent / "fixtures"


def _in_current_layout(d: dict) -> dict:
    """A previous-layout results.json as the current layout writes it: the wall-clock time moves from
    ``train.seconds`` to ``timing.train_seconds``; every other key, value and order stays."""
    d = json.loads(json.dumps(d))
    seconds = d["train"].pop("seconds", None) if "train" in d else None
    if seconds is not None:
        d["timing"] = {"train_seconds": seconds}
    return d


@pytest.mark.parametrize("name", ["results_previous_layout.json", "results_previous_layout_pbee.json"])
def test_reads_results_of_the_previous_layout_and_writes_them_back_unchanged(name, tmp_path):
    f = FIXTURES / name
    r = Results.from_json(f)
    assert isinstance(r.curve, Curve) and all(isinstance(e, ExitResult) for e in r.exits)
    assert isinstance(r.train, TrainInfo) and r.regime == "++-" and r.model == "mlp"
    old = json.loads(f.read_text())
    assert r.to_dict() == _in_current_layout(old)
    assert r.timing.train_seconds == old["train"]["seconds"]
    out = tmp_path / "results.json"
    r.save(out)
    # byte for byte as the current layout writes it: key order and formatting too
    assert out.read_text() == json.dumps(_in_current_layout(old), indent=2) + "\n"
    again = Results.from_json(out)
    assert again == r and again.comparable() == {k: v for k, v in r.to_dict().items() if k != "timing"}


def test_timing_is_the_only_part_that_differs_between_identical_runs():
    r = Results.from_json(FIXTURES / "results_previous_layout.json")
    other = Results.from_dict({**r.to_dict(), "timing": {"train_seconds": 123.0}})
    assert other.to_dict() != r.to_dict() and other.comparable() == r.comparable()
    assert "seconds" not in json.dumps(r.comparable())


def test_optional_parts_are_absent_when_not_computed():
    pbee = Results.from_json(FIXTURES / "results_previous_layout_pbee.json")
    assert pbee.calibrated_geometric is None and "calibrated_geometric" not in pbee.to_dict()
    mlp = Results.from_json(FIXTURES / "results_previous_layout.json")
    assert isinstance(mlp.calibrated_geometric, CalibratedCurve) and mlp.calibrated_geometric.mode == "geometric"


@pytest.mark.parametrize("content,pattern", [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    ("{}", "lack the field 'regime'"),
    ('{"regime": "++-", "model": "m", "dataset": "d", "seed": 0, "base_flops": 1.0, "exits": [{"index": 0}],'
     ' "curve": {}, "budgets": {}}', "do not fit the schema"),
    ('{"regime": "++-", "model": "m", "dataset": "d", "seed": "zero", "base_flops": 1.0, "exits": [],'
     ' "curve": {"criterion": "confidence", "thresholds": [], "flops": [], "accuracy": [], "exit_counts": []},'
     ' "budgets": {}}', "seed must be an integer"),
    ('{"regime": "++-", "model": "m", "dataset": "d", "seed": 0, "base_flops": 1.0, "exits": 5,'
     ' "curve": {}, "budgets": {}}', "do not fit the schema"),
    ('{"regime": "++-", "model": "m", "dataset": "d", "seed": 0, "base_flops": 1.0, "exits": [],'
     ' "curve": {"criterion": "confidence", "thresholds": [], "flops": [], "accuracy": [], "exit_counts": []},'
     ' "budgets": [], "train": 3}', "do not fit the schema"),
])
def test_malformed_results_give_one_line(content, pattern, tmp_path):
    f = tmp_path / "results.json"
    f.write_text(content)
    with pytest.raises(EarlyExitError, match=pattern) as e:
        Results.from_json(tmp_path)
    assert "\n" not in str(e.value)


def test_missing_results_file(tmp_path):
    with pytest.raises(EarlyExitError, match="has no results.json"):
        Results.from_json(tmp_path)


def test_schema_names_every_field():
    text = schema()
    for cls in (Results, ExitResult, Curve, CalibratedCurve, TrainInfo, Timing):
        for name in cls.__dataclass_fields__:
            assert name in text
    assert "base_flops" in text and "phase string actually run" in text


def test_readme_prints_the_schema_of_the_type():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert schema() in readme
