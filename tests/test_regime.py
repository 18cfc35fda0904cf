"""``Regime``: the one place that knows the regime names and reads phase strings."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, strategies as st

from earlyexit.config import RunConfig, TrainConfig, run_config_from_dict, to_dict
from earlyexit.errors import ConfigError
from earlyexit.regime import NAMES, Regime

PHASE_STRINGS = [a + b + c for a in "+-" for b in "+-" for c in "+-" if a + b + c != "---"]


def test_the_paper_names_and_their_questions():
    joint, disjoint, mixed = (Regime.parse(n) for n in ("joint", "disjoint", "mixed"))
    assert (joint.phases, disjoint.phases, mixed.phases) == ("-+-", "+-+", "++-")
    assert [r.name for r in (joint, disjoint, mixed)] == ["joint", "disjoint", "mixed"] == list(NAMES)
    assert disjoint.run_phases == (1, 3) and joint.run_phases == (2,) and mixed.run_phases == (1, 2)
    assert [r.starts_from_phase1 for r in (joint, disjoint, mixed)] == [False, True, True]
    assert disjoint.after_phase1() == Regime.of(3) and mixed.after_phase1() == joint
    assert Regime.of(1).phases == "+--" and Regime.of(3).phases == "--+" and Regime.of(1, 2) == mixed
    assert Regime.parse("+-+") == disjoint and Regime.parse(disjoint) is disjoint
    assert not Regime.of(3).trains_backbone and joint.trains_backbone and Regime.of(1).trains_backbone
    assert str(mixed) == "++-" and mixed.slug == "ppm" and Regime.parse("-++").name == "-++"
    assert Regime.display("-+-") == "joint" and Regime.display("+++") == "+++" and Regime.display("theirs") == "theirs"


@pytest.mark.parametrize("bad", ["both", "++", "+x-", "---", "++++", "", None, 3])
def test_anything_else_is_a_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        Regime.parse(bad)
    assert "\n" not in str(e.value)
    assert Regime.try_parse(bad) is None
    with pytest.raises(ValueError, match="phase must be 1, 2 or 3"):
        Regime.parse("mixed").runs(4)


@given(st.sampled_from(PHASE_STRINGS))
def test_every_phase_string_reads_back_the_same(phases):
    r = Regime.parse(phases)
    assert r.phases == phases and Regime.of(*r.run_phases) == r
    assert all(r.runs(p) == (phases[p - 1] == "+") for p in (1, 2, 3))
    if r.starts_from_phase1 and r.phases != "+--":
        assert r.after_phase1().run_phases == tuple(p for p in r.run_phases if p != 1)


def test_the_config_keeps_the_spelling_given_and_writes_the_same_json():
    """config.json holds the regime as the string given (a Regime value by its name): files written before the
    type existed load unchanged and are written again byte for byte."""
    for given_as, written in (("mixed", "mixed"), ("+-+", "+-+"), (Regime.parse("+-+"), "disjoint"),
                              (Regime.of(3), "--+")):
        t = TrainConfig(regime=given_as)
        assert t.regime == written and t.parsed_regime == Regime.parse(given_as)
    cfg = RunConfig(train=TrainConfig(regime="+-+"))
    text = json.dumps(to_dict(cfg))
    again = run_config_from_dict(json.loads(text))
    assert json.dumps(to_dict(again)) == text and again == cfg
    assert dataclasses.replace(cfg.train, regime=Regime.of(1)).regime == "+--"
