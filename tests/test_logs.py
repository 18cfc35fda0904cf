"""The log sinks beside ``history.jsonl``: ``history.csv`` (always) and TensorBoard (``--log tensorboard``)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from torch import nn

from earlyexit.config import PhaseConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.errors import ConfigError
from earlyexit.models.heads import LinearHead
from earlyexit.models.multiexit import MultiExitModel
from earlyexit.training import HISTORY, HISTORY_CSV, TensorBoardLog, log_hook, train
from earlyexit.training.logs import flatten, history_csv


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=8, num_classes=4, train_samples=64, test_samples=16)


def _model():
    torch.manual_seed(0)
    stage = lambda d: nn.Sequential(nn.Linear(d, 12), nn.ReLU())  # noqa: E731
    return MultiExitModel(stem=nn.Flatten(), stages=[stage(64), stage(12)], head=LinearHead(12, 4), ic_after=[0],
                          make_head=lambda fi, c: nn.Linear(fi["num_chs"], c), feature_info=[{"num_chs": 12}] * 2,
                          num_classes=4, input_shape=(1, 8, 8))


def _cfg():
    pc = PhaseConfig(lr=(0.05, 0.02), epochs=2)
    return TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu")


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_flatten_names_list_positions_and_dict_keys():
    assert flatten({"phase": 1, "val_acc": [0.5, 0.75], "x": {"a": None, "b": [1]}}) == \
        {"phase": 1, "val_acc.0": 0.5, "val_acc.1": 0.75, "x.a": None, "x.b.0": 1}
    assert history_csv([]) == ""
    assert history_csv([{"a": 1, "l": [0.1]}, {"a": 2, "l": [0.2, 0.3], "b": True}]) == \
        "a,l.0,l.1,b\n1,0.1,,\n2,0.2,0.3,true\n"


def test_history_csv_holds_the_rows_of_history_jsonl(data, tmp_path):
    rec = train(_model(), data, regime="mixed", config=_cfg(), out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / HISTORY).read_text().splitlines()]
    table = _csv_rows(tmp_path / HISTORY_CSV)
    assert rows == rec.history and len(table) == len(rows) == 8  # 2 phases x 2 grid points x 2 epochs
    assert list(table[0])[:4] == ["phase", "lr", "epoch", "train_loss"]
    for row, line in zip(rows, table):
        flat = flatten(row)
        assert {k: v for k, v in line.items() if v != ""} == {k: str(v) for k, v in flat.items()}
        assert all(float(line[k]) == v for k, v in flat.items() if isinstance(v, float))  # every digit kept
    assert table[0]["val_acc.1"] == "" and table[-1]["val_acc.1"] != ""  # phase 1 validates its one exit


def test_tensorboard_gets_every_epoch_and_the_inner_hook_every_event(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    inner = lambda event, **k: seen.append(event)  # noqa: E731
    hook = log_hook(("tensorboard",), tmp_path, inner)
    assert isinstance(hook, TensorBoardLog) and not (tmp_path / "tensorboard").exists()  # nothing before the run
    rec = train(_model(), data, regime="joint", config=_cfg(), log=hook)
    assert seen.count("epoch") == len(rec.history) == 4 and seen[-1] == "done"
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for lr in (0.05, 0.02):
        rows = [h for h in rec.history if h["lr"] == lr]
        got = acc.Scalars(f"phase2-lr{lr:g}/val_acc/exit1")
        assert [e.step for e in got] == [1, 2]
        assert [e.value for e in got] == pytest.approx([h["val_acc"][1] for h in rows], rel=1e-6)
        assert [e.value for e in acc.Scalars(f"phase2-lr{lr:g}/train_loss")] == \
            pytest.approx([h["train_loss"] for h in rows], rel=1e-6)


def test_a_comparison_logs_each_run_into_its_own_folder(data, tmp_path):
    pytest.importorskip("tensorboard")
    hook = log_hook(("tensorboard",), tmp_path / "cmp")
    for name in ("a", "b"):
        hook("run", regime=name, seed=0, out=str(tmp_path / name))
        train(_model(), data, regime="joint", config=_cfg(), log=hook)
    assert all(any((tmp_path / name / "tensorboard").iterdir()) for name in ("a", "b"))
    assert not (tmp_path / "cmp").exists()


def test_a_missing_tensorboard_or_an_unknown_sink_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"^--log tensorboard needs the tensorboard package: pip install"):
        log_hook(("tensorboard",), tmp_path)
    with pytest.raises(ConfigError, match="unknown log sink 'wandb'; valid: tensorboard"):
        log_hook(("wandb",), tmp_path)
    assert log_hook((), tmp_path) is None and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- --log on the command line

RUN = ["--model", "mlp", "--dataset", "synthetic", "--device", "cpu", "--epochs", "1", "--batch-size", "50"]


def test_log_tensorboard_writes_event_files_into_the_run_folder(tmp_path):
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner

    from earlyexit.cli import main

    r = CliRunner().invoke(main, ["run", *RUN, "--log", "tensorboard", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["log"] == ["tensorboard"]


def test_force_replaces_the_tensorboard_folder_and_a_failed_replacement_puts_it_back(tmp_path):
    """--force: the new run's events alone (an old run's never mix in); a replacement that fails before its results
    leaves the previous run's folder, events included, as it was."""
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner

    from earlyexit.cli import main

    out = tmp_path / "run"
    tb = out / "tensorboard"
    assert CliRunner().invoke(main, ["run", *RUN, "--log", "tensorboard", "--out", str(out)]).exit_code == 0
    (tb / "marker").write_text("the old run's")  # a file only the old run's folder has
    r = CliRunner().invoke(main, ["run", *RUN, "--log", "tensorboard", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert not (tb / "marker").exists() and len(list(tb.glob("events.out.tfevents.*"))) == 1
    assert not (out / ".previous-run").exists()
    # a replacement that diverges (lr 1e30) fails after its first events: the previous run comes back whole
    new = sorted(p.name for p in tb.iterdir())
    r = CliRunner().invoke(main, ["run", *RUN, "--log", "tensorboard", "--out", str(out), "--force", "--lr", "1e30"])
    assert r.exit_code != 0 and "previous run in the folder is kept" in r.output, r.output
    assert sorted(p.name for p in tb.iterdir()) == new
    # a run without the TensorBoard log after one with it leaves no stale folder
    assert CliRunner().invoke(main, ["run", *RUN, "--out", str(out), "--force"]).exit_code == 0
    assert not tb.exists()


@pytest.mark.slow
def test_log_tensorboard_in_a_comparison_writes_each_run_into_its_own_folder(tmp_path):
    """Phase 1's epochs into the shared phase 1's folder, each regime's own epochs into its run folder."""
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner

    from earlyexit.cli import main

    args = ["compare", *RUN, "--seeds", "0", "--regimes", "disjoint,joint", "--log", "tensorboard"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    events = list((tmp_path / "cmp").rglob("events.out.tfevents.*"))
    assert sorted(e.parent.parent.name for e in events) == ["mlp-synthetic-disjoint-s0", "mlp-synthetic-joint-s0",
                                                             "s0-phase1"]


@pytest.mark.parametrize("command", ["run", "compare"])
@pytest.mark.parametrize("how", [["--log", "wandb"], ["--set", "train.log=wandb"]])
def test_an_unknown_log_sink_is_one_line_and_exit_code_2(tmp_path, command, how):
    from click.testing import CliRunner

    from earlyexit.cli import main

    r = CliRunner().invoke(main, [command, *RUN, *how, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.endswith("unknown log sink 'wandb'; valid: tensorboard\n"), r.output
    assert r.output.count("\n") == 1 and r.output.startswith("error: ") and not (tmp_path / "o").exists()


def test_a_settings_file_names_the_sinks_and_committed_configs_load_without_any(tmp_path):
    from earlyexit.config import RunConfig, run_config_from_dict, to_dict
    from earlyexit.settings import load_config

    f = tmp_path / "run.toml"
    f.write_text('[train]\nlog = ["tensorboard"]\n')
    assert load_config(f).train.log == ("tensorboard",)
    old = to_dict(RunConfig())
    del old["train"]["log"]  # a config.json written before the field existed
    assert run_config_from_dict(old) == RunConfig()
