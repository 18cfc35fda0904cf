"""Every fault is one line and exit code 2, and nothing a user had is lost.

One test (or one parametrized family) per class of fault: corrupt or foreign data files, file-system
errors, bad model options, numbers that blow up, a lost history line, a missing config.json on resume,
tampered config.json / results.json, stale temporary files, Ctrl-C, torchrun's other ranks, a missing
--data-dir, and summaries that would pool the wrong runs.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from earlyexit import data as D
from earlyexit.cli import main

from clihelp import QUICK, copy_run, files_of, finished_run, invoke, one_line_error
from earlyexit.config import ModelConfig, RunConfig
from earlyexit.errors import ConfigError, DataError, TrainingError
from earlyexit.runs import make_model

def _invoke(args, **kw):
    return invoke(args, **kw)


def _one_line_error(r, pattern, code=2, *, after_progress=False):
    one_line_error(r, pattern, code, after_progress=after_progress, prefix='')


_files = files_of


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory, 'failures')


@pytest.fixture
def copy_of(finished, tmp_path):
    return copy_run(finished, tmp_path)


# --------------------------------------------------------------------------- 4. corrupt data files


def _idx(path: Path, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes() + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _mnist(root: Path, labels: np.ndarray | None = None) -> Path:
    d = root / "mnist"
    rng = np.random.default_rng(0)
    _idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _idx(d / "train-labels-idx1-ubyte.gz", np.arange(40) % 10 if labels is None else labels)
    _idx(d / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return d


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def _corrupt_deflate(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[10] = 0xFF  # the first deflate block header: an invalid block type (zlib.error, not an OSError)
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage,file", [
    (_truncate, "train-images-idx3-ubyte.gz"),
    (_corrupt_deflate, "train-images-idx3-ubyte.gz"),
    (_truncate, "t10k-labels-idx1-ubyte.gz"),
])
def test_damaged_gz_is_a_data_error_naming_the_file(damage, file, tmp_path):
    d = _mnist(tmp_path / "data")
    damage(d / file)
    with pytest.raises(DataError, match=file) as e:
        D.load_dataset("mnist", data_dir=tmp_path / "data", download=False)
    assert "\n" not in str(e.value)
    r = _invoke(["run", "--model", "mlp", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                 "--out", str(tmp_path / "out")])
    _one_line_error(r, file)  # not click's "Aborted!" with exit 1
    assert not (tmp_path / "out").exists()  # the folder the run would have made is gone again


def test_out_of_range_labels_are_refused_at_load_time(tmp_path):
    _mnist(tmp_path / "data", labels=(np.arange(40) % 10) + (np.arange(40) == 7) * 5)  # one label 12
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: labels outside 0..9"):
        D.load_dataset("mnist", data_dir=tmp_path / "data", download=False)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10 if i == 2 else 3]}, f)
    with pytest.raises(DataError, match=r"data_batch_3: labels outside 0..9"):
        D.load_dataset("cifar10", data_dir=tmp_path / "cifar", download=False)


def test_every_dataset_has_its_labels_checked(monkeypatch):
    """A registered dataset whose labels exceed its class count is refused by load_dataset itself."""
    from earlyexit.data import registry

    def bad(**kw):
        s = D.load_dataset("synthetic", train_samples=40, test_samples=20)
        s.test.y[3] = s.num_classes
        return s

    monkeypatch.setitem(registry._REGISTRY, "badlabels", registry._Entry(bad, None))
    with pytest.raises(DataError, match="the test split has label 10, outside 0..9"):
        D.load_dataset("badlabels")


def _image_folder(root: Path, fmt: str = "PNG", ext: str = "png") -> None:
    from PIL import Image

    for c in ("a", "b"):
        for i in range(4):
            (root / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (40 * i, 0, 9 * i)).save(root / "train" / c / f"{i}.{ext}", fmt)
        (root / "val" / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16)).save(root / "val" / c / f"v.{ext}", fmt)


def _png_damaged_inside(f: Path) -> None:  # one byte of the compressed pixel data changed; the file keeps its length
    b = bytearray(f.read_bytes())
    i = b.index(b"IDAT") + 8
    b[i] ^= 0xFF
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage,fmt,ext", [
    (lambda f: f.write_bytes(b"\x89PNG\r\n\x1a\n truncated"), "PNG", "png"),   # header cut short
    (lambda f: f.write_bytes(f.read_bytes()[:-20]), "PNG", "png"),               # end cut off
    (_png_damaged_inside, "PNG", "png"),                                          # damaged deflate stream
    (lambda f: f.write_bytes(f.read_bytes()[:-30]), "JPEG", "jpg"),              # truncated JPEG
    (lambda f: f.write_text("not an image"), "PNG", "png"),                       # not an image at all
], ids=["png-header", "png-truncated", "png-deflate", "jpeg-truncated", "text"])
def test_damaged_image_fails_at_load_time_naming_the_file(tmp_path, damage, fmt, ext):
    root = tmp_path / "folder"
    _image_folder(root, fmt, ext)
    D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0)  # the intact folder loads
    damage(root / "train" / "a" / f"2.{ext}")
    with pytest.raises(DataError, match=rf"2\.{ext}: cannot decode the image") as e:
        D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0)
    assert "\n" not in str(e.value)
    damage(root / "val" / "b" / f"v.{ext}")  # the held-out images are checked too
    (root / "train" / "a" / f"2.{ext}").unlink()
    with pytest.raises(DataError, match=rf"v\.{ext}: cannot decode the image"):
        D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0)


def test_an_image_that_fails_only_when_decoded_names_the_file_in_one_line(tmp_path, monkeypatch):
    """What passes the load-time check but not the decoder (JPEG has no checksum) still fails in one line."""
    root = tmp_path / "folder"
    _image_folder(root)
    s = D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0, val_fraction=0.25)
    (root / "train" / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged after loading")
    with pytest.raises(DataError, match=r"2.png: cannot decode the image") as e:
        for split in (s.train, s.val):
            list(split.batches(4))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- 5. file-system errors


def test_uncreatable_out_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    _one_line_error(_invoke(["run", *QUICK, "--out", str(tmp_path / "file" / "run")]),
                    "cannot create the run folder")


def test_full_disk_mid_run_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from earlyexit.training import state

    real, calls = state.atomic_torch_save, []

    def full(obj, path):
        calls.append(path)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(state, "atomic_torch_save", full)
    out = tmp_path / "run"
    r = _invoke(["run", *QUICK, "--epochs", "2", "--out", str(out)])
    _one_line_error(r, "no space left on the device; the last good checkpoint is kept", after_progress=True)
    assert str(out / "checkpoint.pt") in r.output.strip().splitlines()[-1]
    monkeypatch.setattr(state, "atomic_torch_save", real)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["history"]) == 1  # the epoch before the fault
    r = _invoke(["run", *QUICK, "--epochs", "2", "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert len((out / "history.jsonl").read_text().splitlines()) == 4


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder(copy_of):
    before = _files(copy_of)
    os.chmod(copy_of, 0o555)
    try:
        _one_line_error(_invoke(["run", *QUICK, "--out", str(copy_of), "--force"]), "Permission denied")
    finally:
        os.chmod(copy_of, 0o755)
    assert _files(copy_of) == before


def test_plot_and_analyze_into_a_missing_or_blocked_folder(finished, tmp_path):
    _one_line_error(_invoke(["plot", str(finished), "-o", str(tmp_path / "no" / "such" / "f.png")]),
                    str(tmp_path / "no" / "such"))
    (tmp_path / "file").write_text("x")
    _one_line_error(_invoke(["analyze", str(finished), "--what", "rank", "--max-samples", "16",
                             "--out", str(tmp_path / "file" / "a.json")]), str(tmp_path / "file"))


# --------------------------------------------------------------------------- 6. model options


META = SimpleNamespace(num_classes=10, in_chans=3, image_size=16)


@pytest.mark.parametrize("name,options,pattern", [
    ("mlp", {"width": 0}, "expects a size >= 1"),
    ("mlp", {"width": "64"}, "expects an integer"),
    ("mlp", {"depth": 2.5}, "expects an integer"),
    ("mlp", {"width": True}, "expects an integer"),
    ("mlp", {"image_size": 8}, "contradicts the data's 16-pixel images"),
    ("resnet20", {"width": "abc"}, "expects a number"),
    ("resnet20", {"width": -1}, "expects a value >= 0"),
    ("resnet20", {"width": 0}, "positive multiplier"),
    ("resnet20", {"head": 3}, "expects a string"),
    ("resnet20", {"head": "xyz"}, "unknown head"),
    ("vit", {"patch_size": 0}, "expects a size >= 1"),
    ("vit", {"num_heads": "x"}, "expects an integer"),
    ("vit", {"width": 30}, "multiple of num_heads"),
    ("vit", {"depth": 0}, "expects a size >= 1"),
    ("efficientnet_b0", {"dropout": -1}, "expects a value >= 0"),
    ("bert_tiny", {"cost_seq_len": 0}, "expects a size >= 1"),
])
def test_model_options_are_checked_before_anything_runs(name, options, pattern):
    meta = SimpleNamespace(num_classes=2, in_chans=None, image_size=None) if name.startswith("bert") else META
    with pytest.raises((ConfigError, ValueError), match=pattern) as e:
        make_model(RunConfig(model=ModelConfig(name=name, kwargs=options)), meta)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["num_classes", "in_chans", "ic_after"])
def test_options_that_clash_with_the_builders_own_arguments(key):
    with pytest.raises(ConfigError, match=f"model option '{key}' is set by the run"):
        ModelConfig(name="mlp", kwargs={key: 3})


# --------------------------------------------------------------------------- 7. numbers


@pytest.mark.parametrize("args,pattern", [
    (["--lr", "nan"], "--lr: expected a number > 0, got 'nan'"),
    (["--lr", "inf"], "--lr: expected a number > 0, got 'inf'"),
    (["--lr", "1e39"], "learning rate must be at most 3.403e+38"),
    (["--weight-decay", "nan"], "--weight-decay: expected a number >= 0, got 'nan'"),
    (["--weight-decay", "1e39"], "weight decay must be at most 3.403e+38"),
    (["--grad-clip", "1e39"], "gradient clipping norm must be at most"),
])
def test_numbers_are_refused_up_front(args, pattern, tmp_path):
    _one_line_error(_invoke(["run", *QUICK, "--out", str(tmp_path / "o"), *args]), pattern)
    assert not (tmp_path / "o").exists()


def test_weights_that_blow_up_without_a_nan_loss_say_training_diverged(tmp_path):
    from earlyexit import build_model, train
    from earlyexit.config import PhaseConfig, TrainConfig
    from earlyexit.runs import evaluate_model

    data = D.load_dataset("synthetic", train_samples=64, test_samples=32)
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=8, depth=2)
    with torch.no_grad():
        next(model.heads[0].parameters()).view(-1)[0] = float("inf")  # an IC head: phase 1's loss never sees it
    pc = PhaseConfig(epochs=1)
    with pytest.raises(TrainingError, match="training diverged: the weights are not finite after phase 1, epoch 1"):
        train(model, data, regime="+--", config=TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu"),
              out_dir=tmp_path)
    with pytest.raises(TrainingError, match="training diverged: the model's weights are not finite"):
        evaluate_model(model, data, RunConfig())  # not "thresholds must not be NaN"


# --------------------------------------------------------------------------- 8., 9. resume


def test_a_lost_history_line_comes_back_on_resume(copy_of):
    full = (copy_of / "history.jsonl").read_text()
    (copy_of / "history.jsonl").write_text("".join(full.splitlines(keepends=True)[:-1]))
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume"])
    assert r.exit_code == 0, r.output
    assert (copy_of / "history.jsonl").read_text() == full


def test_resume_without_config_json_checks_the_checkpoints_options_and_writes_it_back(copy_of):
    cfg = (copy_of / "config.json").read_text()
    (copy_of / "config.json").unlink()
    _one_line_error(_invoke(["run", *QUICK, "--epochs", "3", "--out", str(copy_of), "--resume"]),
                    "the options differ from those of the run")
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume", "--lr", "0.5"])
    _one_line_error(r, "train.phases[0].lr")
    assert "see its checkpoint" in r.output and not (copy_of / "config.json").exists()
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume"])
    assert r.exit_code == 0, r.output
    assert json.loads((copy_of / "config.json").read_text()) == json.loads(cfg)


# --------------------------------------------------------------------------- 10. tampered files


BAD_CONFIGS = ["{", "[]", "{}", '{"model": 5, "data": {}, "train": {}, "eval": {}}',
               '{"model": {"name": "mlp"}, "data": {"name": "synthetic"}, "train": {"phases": 3}, "eval": {}}']


@pytest.mark.parametrize("content", BAD_CONFIGS)
@pytest.mark.parametrize("command", ["resume", "eval", "init", "analyze"])
def test_tampered_config_json_is_one_line(content, command, copy_of, tmp_path):
    (copy_of / "config.json").write_text(content)
    before = _files(copy_of)
    args = {"resume": ["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume"],
            "eval": ["eval", str(copy_of)],
            "init": ["run", *QUICK, "--epochs", "1", "--init", str(copy_of), "--out", str(tmp_path / "new")],
            "analyze": ["analyze", str(copy_of), "--what", "rank", "--max-samples", "16"]}[command]
    r = _invoke(args)
    if command == "init":  # --init reads the weights only: a foreign config does not matter
        assert r.exit_code == 0, r.output
    else:
        _one_line_error(r, "config.json")
        assert _files(copy_of) == before


@pytest.mark.parametrize("content", ["{", "[]", "{}", '{"regime": 1}', '{"regime": "++-", "model": "m", '
                                     '"dataset": "d", "seed": "0", "base_flops": 1, "exits": [], "budgets": {}, '
                                     '"curve": {"criterion": "c", "thresholds": [], "flops": [], "accuracy": [], '
                                     '"exit_counts": []}}'])
@pytest.mark.parametrize("command", ["plot", "summary"])
def test_tampered_results_json_is_one_line(content, command, copy_of, tmp_path):
    (copy_of / "results.json").write_text(content)
    args = ["plot", str(copy_of), "-o", str(tmp_path / "f.png")] if command == "plot" else ["summary", str(copy_of)]
    _one_line_error(_invoke(args), "results.json")


def test_eval_of_a_run_with_a_tampered_results_json_rewrites_it(copy_of):
    (copy_of / "results.json").write_text("[]")
    r = _invoke(["eval", str(copy_of)])
    assert r.exit_code == 0, r.output
    assert json.loads((copy_of / "results.json").read_text())["model"] == "mlp"


# --------------------------------------------------------------------------- 11. temporary files


@pytest.mark.parametrize("mode", ["--force", "--resume"])
def test_temp_files_of_killed_writes_are_removed_by_the_next_run(mode, copy_of):
    # ".NAME.<pid>.<8 random characters>.tmp": exactly what io.atomic_write_bytes names its temporary files
    for name in (".checkpoint.pt.12345.k1ll3d_x.tmp", ".results.json.7.abc_12zz.tmp", ".history.jsonl.999.x0000000.tmp"):
        (copy_of / name).write_bytes(b"half")
    mine = {".notes.txt": "mine", ".notes.tmp": "mine too", ".checkpoint.pt.k1ll3d.tmp": "an old name: not ours"}
    for name, text in mine.items():  # not temporary files of ours (a user's own hidden *.tmp included): kept
        (copy_of / name).write_text(text)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), mode])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in copy_of.glob(".*.tmp")) == [".checkpoint.pt.k1ll3d.tmp", ".notes.tmp"]
    assert all((copy_of / name).read_text() == text for name, text in mine.items())


# --------------------------------------------------------------------------- 12. Ctrl-C, other ranks


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path, monkeypatch):
    import earlyexit.runs as runs

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", interrupted)
    r = _invoke(["run", *QUICK, "--out", str(tmp_path / "o")])
    assert r.exit_code == 130 and r.output.strip() == \
        "interrupted before the first checkpoint: nothing of this run was saved"


def test_ctrl_c_after_a_checkpoint_says_it_is_kept(tmp_path, monkeypatch):
    def stop(event, **k):
        if event == "epoch" and k["phase"] == 2:
            raise KeyboardInterrupt

    from earlyexit import cli

    monkeypatch.setattr(cli, "Progress", lambda: stop)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 130 and "interrupted; the last checkpoint is kept" in r.output.strip().splitlines()[-1]
    assert (tmp_path / "o" / "checkpoint.pt").is_file()


def test_only_rank_0_prints_a_user_error(tmp_path):
    r = CliRunner(env={"RANK": "1", "WORLD_SIZE": "2"}).invoke(main, ["run", *QUICK, "--regime", "sideways"])
    assert r.exit_code == 2 and r.output == ""
    r = CliRunner(env={"RANK": "0", "WORLD_SIZE": "2"}).invoke(main, ["run", *QUICK, "--regime", "sideways"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown regime")


# --------------------------------------------------------------------------- 13. data folder, summary


def test_a_missing_data_dir_is_an_error_not_a_fall_back(tmp_path, monkeypatch):
    _mnist(tmp_path / "system")
    from earlyexit.data import files

    monkeypatch.setattr(files, "SYSTEM_ROOTS", (str(tmp_path / "system"),))
    assert len(D.load_dataset("mnist", download=False).test) == 20  # the system copy, when no folder is named
    with pytest.raises(DataError, match="data folder .*typo does not exist"):
        D.load_dataset("mnist", data_dir=tmp_path / "typo", download=False)


def test_summary_refuses_the_same_run_twice_and_configs_that_differ(finished, tmp_path):
    _one_line_error(_invoke(["summary", str(finished), str(finished)]), "is given twice")
    twin = tmp_path / "twin"
    shutil.copytree(finished, twin)
    _one_line_error(_invoke(["summary", str(finished), str(twin)]), "are both seed 0")
    other = tmp_path / "other"
    r = _invoke(["run", *QUICK, "--epochs", "1", "--seed", "1", "--lr", "0.05", "--out", str(other)])
    assert r.exit_code == 0, r.output
    _one_line_error(_invoke(["summary", str(finished), str(other)]), "differ in train.phases[0].lr")
    seed1 = tmp_path / "seed1"
    r = _invoke(["run", *QUICK, "--epochs", "1", "--seed", "1", "--out", str(seed1)])
    assert r.exit_code == 0, r.output
    r = _invoke(["summary", str(finished), str(seed1)])
    assert r.exit_code == 0 and "(seeds [0, 1])" in r.output, r.output


# --------------------------------------------------------------------------- tests that guard the claims


def test_property_tests_run_derandomized():
    """CI's hypothesis profile draws the same examples on every run: a catch is reproducible, not luck."""
    from hypothesis import settings

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert settings.default.derandomize and settings.default.deadline is None


@pytest.mark.parametrize("args,pattern", [
    (["eval", "{missing}"], "is not a run folder (no config.json)"),
    (["eval", "{run}", "--criterion", "vibes"], "unknown criterion 'vibes'"),
    (["summary", "{missing}"], "has no results.json"),
    (["plot", "{missing}", "-o", "{tmp}/f.png"], "has no results.json"),
    (["analyze", "{missing}"], "is not a run folder (no config.json)"),
    (["analyze", "{run}", "--what", "nonsense"], "unknown analysis 'nonsense'"),
    (["analyze", "{run}", "--what", "rank", "--max-samples", "0"], "max_samples must be >= 1"),
    (["bench", "--model", "nope"], "unknown model 'nope'"),
    (["bench", "--model", "mlp", "--dataset", "synthetic", "--steps", "0"], "steps >= 1"),
    (["bench", "--model", "mlp", "--dataset", "synthetic", "--run", "{missing}"], "is not a run folder"),
])
def test_every_command_fails_in_one_line(args, pattern, finished, tmp_path):
    fill = {"missing": str(tmp_path / "missing"), "run": str(finished), "tmp": str(tmp_path)}
    _one_line_error(_invoke([a.format(**fill) for a in args]), pattern)


@pytest.mark.parametrize("bug", [ValueError("bad index"), KeyError("exits"), RuntimeError("shape mismatch")])
def test_an_internal_bug_keeps_its_traceback(bug, finished, monkeypatch):
    """Only the package's own errors (and the OS's) become one line: a stray ValueError, KeyError or RuntimeError
    from our code is a bug, and the command ends with it (exit 1, the exception and its traceback kept)."""
    import earlyexit.runs

    raised = [bug]

    def broken(*a, **k):
        raise raised[0]

    monkeypatch.setattr(earlyexit.runs, "evaluate_run", broken)
    r = CliRunner().invoke(main, ["eval", str(finished)])
    assert r.exit_code == 1 and r.exception is bug and "error:" not in r.output, r.output
    raised[0] = ConfigError(f"the same place, a user's error: {bug}")
    _one_line_error(CliRunner().invoke(main, ["eval", str(finished)]), "error: the same place, a user's error")


def test_results_json_holds_exactly_the_documented_schema(finished):
    """Every key of a real run's results.json is a documented field of its part, and no documented required
    field is missing (the schema printed in the README is generated from the same dataclasses)."""
    import dataclasses

    from earlyexit.results import CalibratedCurve, Curve, ExitResult, Results, Timing, TrainInfo

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    def required(cls):
        return {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}

    res = json.loads((finished / "results.json").read_text())
    assert required(Results) <= set(res) <= names(Results)
    assert {"calibrated_geometric", "calibrated_global", "calibrated_budgets", "train", "timing"} <= set(res)
    for e in res["exits"]:
        assert required(ExitResult) <= set(e) <= names(ExitResult)
    assert set(res["curve"]) == names(Curve)
    for k in ("calibrated_geometric", "calibrated_global"):
        assert set(res[k]) == names(CalibratedCurve)
    assert set(res["train"]) <= names(TrainInfo) and "phases" in res["train"]
    assert set(res["timing"]) == names(Timing) and res["timing"]["train_seconds"] > 0
    from earlyexit.device import platform

    assert res["timing"]["platform"] == platform("cpu")  # a rerun matches its digits only where this string does
    assert set(res["budgets"]) == set(res["calibrated_budgets"]) == {"25%", "50%", "75%", "100%", "max"}
    for p in res["train"]["phases"]:
        assert set(p) == {"phase", "lr", "best_epoch", "best_val", "grid"}
        assert all(set(g) == {"lr", "best_val", "best_epoch", "epochs"} for g in p["grid"])
    assert Results.from_json(finished).to_dict() == res


def test_a_folder_in_the_way_and_a_foreign_run_for_bench(finished, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(_invoke(["run", *QUICK, "--out", str(tmp_path / "afile")]), "it exists and is not a folder")
    bad = tmp_path / "bad"
    shutil.copytree(finished, bad)
    (bad / "config.json").write_text("[]")
    _one_line_error(_invoke(["bench", "--model", "mlp", "--dataset", "synthetic", "--run", str(bad)]),
                    "is not a valid run config")  # before any timing is printed
    shapes = json.loads((finished / "config.json").read_text())
    shapes["shapes"] = {"num_classes": "ten"}
    (bad / "config.json").write_text(json.dumps(shapes))
    _one_line_error(_invoke(["run", *QUICK, "--epochs", "1", "--out", str(bad), "--resume"]), "its shapes")
