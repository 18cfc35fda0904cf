"""Nothing lost, even through a symbolic link or a diverging --force; every crafted file one line.

1. Symbolic links planted in a run folder (``.previous-run``, ``.lock``, a run file, an entry of the stash, a
   name like a temporary file's) are never followed: the run stops with one line naming the entry, exit 2,
   and the files outside are untouched. Only temporary files named exactly as the package names them go.
2. ``--force`` keeps the previous run until the new one has written its results: a failure (divergence,
   Ctrl-C, a full disk) after the new run's first checkpoint puts the old run back, byte for byte.
3. A crafted or damaged config.json, results.json, gradients.jsonl, checkpoint or CIFAR batch is one line and
   exit 2 in every command that reads it, never a traceback (RecursionError, TypeError, KeyError,
   AttributeError, ZeroDivisionError, LookupError).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from clihelp import QUICK, copy_run, files_of, finished_run, invoke, one_line_error

LOCK, STASH = ".lock", ".previous-run"
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads dies of RecursionError on it


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory, "tamper")


@pytest.fixture
def copy_of(finished, tmp_path):
    return copy_run(finished, tmp_path)


@pytest.fixture
def outside(tmp_path):
    """A folder outside every run folder, with files a user cares about."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data.bin").write_bytes(b"\x00\x01" * 100)
    return d


def _run(out, *extra, epochs="1"):
    return invoke(["run", *QUICK, "--epochs", epochs, "--out", str(out), *extra])


# --------------------------------------------------------------------------- 1. symbolic links


@pytest.mark.parametrize("mode", ["new", "--force", "--resume"])
def test_previous_run_link_to_a_folder_outside_is_refused(mode, copy_of, outside, tmp_path):
    """``.previous-run`` planted as a link to a folder outside: in a folder without a checkpoint a run would
    move that folder's files in ("put the previous run back"); with one it would delete them."""
    out = tmp_path / "fresh" if mode == "new" else copy_of
    out.mkdir(exist_ok=True)
    os.symlink(outside, out / STASH)
    keep, mine = files_of(outside), files_of(out)
    r = _run(out, *([] if mode == "new" else [mode]))
    one_line_error(r, f"{out / STASH} is a symbolic link", prefix="error: ")
    assert files_of(outside) == keep and files_of(out) == mine
    assert (out / STASH).is_symlink() and not (out / LOCK).exists()


@pytest.mark.parametrize("mode", ["--resume", "--force"])
@pytest.mark.parametrize("dangling", [False, True])
def test_lock_link_to_a_file_outside_is_refused(mode, dangling, copy_of, outside):
    target = outside / ("not-yet" if dangling else "thesis.tex")
    os.symlink(target, copy_of / LOCK)
    keep, mine = files_of(outside), files_of(copy_of)
    one_line_error(_run(copy_of, mode), f"{copy_of / LOCK} is a symbolic link", prefix="error: ")
    assert files_of(outside) == keep and files_of(copy_of) == mine  # not overwritten with a pid, not created
    assert (copy_of / LOCK).is_symlink()


def test_a_lock_that_is_not_a_file_is_refused(copy_of):
    os.mkfifo(copy_of / LOCK)
    mine = files_of(copy_of)
    one_line_error(_run(copy_of, "--resume"), f"{copy_of / LOCK} is not a regular file", prefix="error: ")
    assert files_of(copy_of) == mine


@pytest.mark.parametrize("name", ["results.json", "checkpoint.pt", "history.jsonl", "curve.png"])
def test_a_run_file_that_is_a_link_is_refused_by_force(name, copy_of, outside):
    (copy_of / name).unlink()
    os.symlink(outside / "thesis.tex", copy_of / name)
    keep, mine = files_of(outside), files_of(copy_of)
    one_line_error(_run(copy_of, "--force"), f"{copy_of / name} is a symbolic link", prefix="error: ")
    assert files_of(outside) == keep and files_of(copy_of) == mine


@pytest.mark.parametrize("entry", ["link", "foreign"])
def test_a_stash_holding_a_link_or_a_foreign_file_is_left_alone(entry, copy_of, outside):
    """A crash left the previous run in .previous-run; someone put a link (or a file of their own) in it:
    the next run neither moves nor deletes anything there, and says which entry is in the way."""
    from earlyexit.rundir import stash_run
    from earlyexit.runs import RUN_FILES
    from earlyexit.training import CHECKPOINT

    stash_run(copy_of, RUN_FILES, CHECKPOINT)
    if entry == "link":
        (copy_of / STASH / "curve.png").unlink()
        os.symlink(outside / "thesis.tex", copy_of / STASH / "curve.png")
        bad = copy_of / STASH / "curve.png"
    else:
        (copy_of / STASH / "my-notes.txt").write_text("mine")
        bad = copy_of / STASH / "my-notes.txt"
    keep, mine = files_of(outside), files_of(copy_of)
    one_line_error(_run(copy_of, "--resume"), str(bad), prefix="error: ")
    assert files_of(outside) == keep and files_of(copy_of) == mine


def test_only_temporary_files_of_the_package_are_removed(copy_of, outside):
    """A user's own hidden ``*.tmp`` files stay on resume; so does a link named like a temporary file of ours
    (removing it would not follow it, but it is not a file the package wrote)."""
    ours = copy_of / ".checkpoint.pt.4242.abcd_123.tmp"
    ours.write_bytes(b"half a checkpoint")
    theirs = {".notes.tmp": "mine", ".tmp": "x", ".results.json.tmp": "not ours", ".a.b.tmp": "also not",
              ".results.json.12.ABCDEFGH.tmp": "capitals: not mkstemp's", ".results.json.1.abcdefghi.tmp": "9 chars"}
    for name, text in theirs.items():
        (copy_of / name).write_text(text)
    os.symlink(outside / "thesis.tex", copy_of / ".results.json.77.abcdefgh.tmp")
    keep = files_of(outside)
    r = _run(copy_of, "--resume")
    assert r.exit_code == 0, r.output
    assert not ours.exists() and all((copy_of / n).read_text() == t for n, t in theirs.items())
    assert (copy_of / ".results.json.77.abcdefgh.tmp").is_symlink() and files_of(outside) == keep


def test_atomic_writes_use_the_pattern_the_cleanup_matches(tmp_path, monkeypatch):
    from earlyexit import io

    seen = []

    def fail(src, dst):
        seen.append(Path(src).name)
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(io.os, "replace", fail)
    with pytest.raises(OSError):
        io.atomic_write_json(tmp_path / "results.json", {"a": 1})
    assert len(seen) == 1 and io.temp_name_of(seen[0]) == "results.json" and f".{os.getpid()}." in seen[0]
    assert list(tmp_path.iterdir()) == []  # the failed write left nothing behind
    assert [io.temp_name_of(n) for n in (".notes.tmp", ".results.json.abc.tmp", "results.json.1.abcdefgh.tmp")] \
        == [None, None, None]


# --------------------------------------------------------------------------- 2. --force keeps the old run


def test_force_that_diverges_keeps_every_byte_of_the_previous_run(copy_of):
    """The issue's command: a learning rate that blows up (here in epoch 2 of phase 1, after the new run's first
    checkpoint) over a finished run. Whenever it diverges, the old run is there afterwards, byte for byte."""
    before = files_of(copy_of)
    r = _run(copy_of, "--lr", "2", "--force", epochs="3,1,1")
    one_line_error(r, "the previous run in the folder is kept)", after_progress=True, prefix="error: ")
    assert files_of(copy_of) == before


@pytest.mark.parametrize("fault", ["diverged", "ctrl-c", "full disk at the weights", "diverged at evaluation"])
def test_force_that_fails_after_its_first_checkpoint_puts_the_previous_run_back(fault, copy_of, monkeypatch):
    from earlyexit import cli, runs
    from earlyexit.errors import TrainingError

    before = files_of(copy_of)
    checkpoints = []

    def hook(event, **k):  # the progress hook, called after every epoch: phase 2 follows phase 1's checkpoint
        if event == "epoch" and k["phase"] == 2:
            checkpoints.append((copy_of / "checkpoint.pt").is_file())
            if fault == "diverged":
                raise TrainingError("training diverged: the weights are not finite after phase 2, epoch 1 at lr 0.1; "
                                    f"the last good checkpoint is kept at {copy_of / 'checkpoint.pt'}")
            if fault == "ctrl-c":
                raise KeyboardInterrupt

    monkeypatch.setattr(cli, "Progress", lambda: hook)
    if fault == "full disk at the weights":
        def full(model, out):
            checkpoints.append((out / "checkpoint.pt").is_file())
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))
        monkeypatch.setattr(runs, "save_weights", full)
    if fault == "diverged at evaluation":
        def nan(model, *a, **k):
            checkpoints.append(True)
            raise TrainingError("training diverged: the model's outputs are not finite (NaN or inf)")
        monkeypatch.setattr(runs, "evaluate_model", nan)
    r = _run(copy_of, "--force")
    assert checkpoints and checkpoints[0], "the new run had not written a checkpoint when it failed"
    if fault == "ctrl-c":
        assert r.exit_code == 130
        assert r.output.strip().splitlines()[-1] == \
            "interrupted before this run wrote its results: nothing of this run was saved " \
            "(the previous run in the folder is kept)"
    else:
        one_line_error(r, "the previous run in the folder is kept)", after_progress=True, prefix="error: ")
        assert "last good checkpoint" not in r.output  # that checkpoint went with the new run
    assert files_of(copy_of) == before
    assert not (copy_of / STASH).exists() and not (copy_of / LOCK).exists()


@pytest.mark.parametrize("wrote_results", [False, True])
def test_a_crash_after_the_new_runs_checkpoint_is_settled_by_its_results(wrote_results, copy_of, tmp_path):
    """kill -9 of a --force run after its first checkpoint: without its results the next run in the folder puts
    the previous run back; with them, the new run stays and the stash goes."""
    from earlyexit.rundir import stash_run
    from earlyexit.runs import RUN_FILES
    from earlyexit.training import CHECKPOINT

    before = files_of(copy_of)
    stash_run(copy_of, RUN_FILES, CHECKPOINT)
    new = {"config.json": before["config.json"], "checkpoint.pt": b"the new run's checkpoint"}
    if wrote_results:
        new["results.json"] = b'{"the new run": 1}'
    for name, data in new.items():
        (copy_of / name).write_bytes(data)
    (copy_of / LOCK).write_text("999999999\n")  # the dead run's lock
    from earlyexit.rundir import settle
    from earlyexit.results import RESULTS

    assert settle(copy_of, RUN_FILES, RESULTS) == ("dropped" if wrote_results else "restored")
    assert not (copy_of / STASH).exists()
    after = files_of(copy_of)
    after.pop(LOCK)
    assert after == (new if wrote_results else before)


# --------------------------------------------------------------------------- 3. crafted files: one line


def _cmd(command, run, tmp_path):
    return {"eval": ["eval", str(run)],
            "run --config": ["run", "--config", str(run / "config.json"), "--out", str(tmp_path / "again")],
            "run --resume": ["run", *QUICK, "--epochs", "1", "--out", str(run), "--resume"],
            "plot": ["plot", str(run), "-o", str(tmp_path / "f.png")],
            "summary": ["summary", str(run)],
            "analyze": ["analyze", str(run), "--what", "rank", "--max-samples", "16"]}[command]


@pytest.mark.parametrize("command", ["eval", "run --config", "run --resume", "plot", "summary", "analyze"])
def test_deeply_nested_config_json_is_one_line(command, copy_of, tmp_path):
    (copy_of / "config.json").write_text(DEEP)
    before = files_of(copy_of)
    one_line_error(invoke(_cmd(command, copy_of, tmp_path)), "config.json nests deeper than", prefix="error: ")
    assert files_of(copy_of) == before and not (tmp_path / "again").exists()


@pytest.mark.parametrize("command", ["plot", "summary", "analyze gradients"])
def test_deeply_nested_results_json_is_one_line(command, copy_of, tmp_path):
    (copy_of / "results.json").write_text(DEEP)
    _probe_log(copy_of)
    args = ["analyze", str(copy_of), "--what", "gradients", "--out", str(tmp_path / "a.json")] \
        if command == "analyze gradients" else _cmd(command, copy_of, tmp_path)
    _error_after_writes(invoke(args), "results.json nests deeper than")


def _error_after_writes(r, pattern):
    """Exit 2, no traceback, the error in one line; before it only ``wrote ...`` lines (analyze writes its JSON
    before it draws the figures, which read the run's files)."""
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.exc_info)
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and pattern in lines[-1], r.output
    assert all(ln.startswith("wrote ") for ln in lines[:-1]), r.output


def _probe_log(run: Path, extra: str = "") -> None:
    lines = [{"phase": 2, "epoch": 0, "step": s, "grid": 0, "lr": 0.1, "cos": [0.5, None, 0.9, 1.0]} for s in range(3)]
    (run / "gradients.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + extra)


@pytest.mark.parametrize("line", [DEEP, '{"phase": 2, "epoch": 0, "step": 0, "cos": "x"}', '{"phase": 2}', "[1]"],
                         ids=["deep", "cos-a-string", "keys-missing", "a-list"])
def test_a_crafted_gradient_log_is_one_line(line, copy_of, tmp_path):
    _probe_log(copy_of, line + "\n")
    r = invoke(["analyze", str(copy_of), "--what", "gradients", "--out", str(tmp_path / "a.json")])
    _error_after_writes(r, "gradients.jsonl, line 4,")


@pytest.mark.parametrize("command", ["eval", "run --config", "run --resume"])
@pytest.mark.parametrize("field,value,pattern", [
    ("data.data_dir", 5, "data.data_dir must be a string or null, got 5"),
    ("data.data_dir", ["a"], "data.data_dir must be a string or null, got a list"),
    ("init", 5, "init must be a string or null, got 5"),
    ("init", {"a": 1}, "init must be a string or null, got an object"),
    ("model.ic_after", {"a": 1}, "model.ic_after must be"),
    ("train.phases", [{"lr": "x"}] * 3, "train.phases[0].lr must be a list"),
    ("train.seed", 10 ** 30, "train.seed must be an integer"),
])
def test_fields_of_the_wrong_type_in_config_json_are_one_line(command, field, value, pattern, copy_of, tmp_path):
    cfg = json.loads((copy_of / "config.json").read_text())
    section, _, key = field.rpartition(".")
    (cfg[section] if section else cfg)[key] = value
    (copy_of / "config.json").write_text(json.dumps(cfg))
    before = files_of(copy_of)
    one_line_error(invoke(_cmd(command, copy_of, tmp_path)), pattern, prefix="error: ")
    assert files_of(copy_of) == before


def _tamper_checkpoint(run: Path, change) -> None:
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    change(ck)
    torch.save(ck, run / "checkpoint.pt")


@pytest.mark.parametrize("change,pattern", [
    (lambda c: c.pop("phases"), "phases is missing"),
    (lambda c: c.pop("grid"), "grid is missing"),
    (lambda c: c.pop("model"), "model is missing"),
    (lambda c: c.update(run_best="x"), "run_best must be an object or null, got 'x'"),
    (lambda c: c.update(model="x"), "model must be an object, got 'x'"),
    (lambda c: c.update(model={"stages.0.0.weight": "x"}), "model.stages.0.0.weight must be a tensor"),
    (lambda c: c.update(optimizer="x"), "optimizer must be an object or null"),
    (lambda c: c.update(records=["x"]), "records[0] must be an object"),
    (lambda c: c.update(records=[{"phase": 1}]), "records[0].lr is missing"),
    (lambda c: c.update(history="x"), "history must be a list"),
    (lambda c: c.update(phase=0), "phase must be 1, 2, 3 or 4"),
    (lambda c: c.update(phase=1, grid=5, epoch=0), "it resumes at learning rate 6 of phase 1, whose grid has 1"),
    (lambda c: c.update(phase=1, epoch=1, optimizer=None), "holds no optimizer state"),
    (lambda c: c.update(phases="-+-"), "was written by regime '-+-'"),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(change, pattern, copy_of):
    _tamper_checkpoint(copy_of, change)
    before = files_of(copy_of)
    one_line_error(_run(copy_of, "--resume"), pattern, prefix="error: ")
    assert files_of(copy_of) == before


@pytest.mark.parametrize("options", ["x", {"model": "x"}, {"data": {"data_dir": 5}}])
def test_a_checkpoints_options_of_the_wrong_type_are_one_line(options, copy_of):
    (copy_of / "config.json").unlink()  # the options are then read from the checkpoint
    _tamper_checkpoint(copy_of, lambda c: c.update(options=options))
    r = _run(copy_of, "--resume")
    one_line_error(r, "checkpoint.pt", prefix="error: ")


@pytest.mark.parametrize("command", ["plot", "plot --curve geometric", "summary", "summary --markdown"])
@pytest.mark.parametrize("change,pattern", [
    (lambda d: d.update(base_flops=0), "base_flops must be a positive number, got 0"),
    (lambda d: d.update(base_flops=-1e9), "base_flops must be a positive number"),
    (lambda d: d["exits"][0].update(flops="x"), "results do not fit the schema: exits[0]"),
    (lambda d: d["exits"][1].update(accuracy=None), "results do not fit the schema: exits[1]"),
    (lambda d: d["exits"][1].update(flops=float("nan")), "exits[1].flops must be a finite number, got nan"),
    (lambda d: d["curve"]["flops"].__setitem__(3, "x"), "curve.flops[3] must be a finite number"),
    (lambda d: d["curve"]["accuracy"].pop(), "curve.flops and curve.accuracy differ in length"),
    (lambda d: d["curve"].update(exit_counts=[[1.5]]), "curve.exit_counts[0][0] must be an integer"),
    (lambda d: d["budgets"].update({"50%": "x"}), "budgets.50% must be a number or null"),
    (lambda d: d["calibrated_geometric"]["accuracy"].__setitem__(0, [1]), "calibrated_geometric.accuracy[0]"),
    (lambda d: d["train"]["phases"][0].update(phase="1"), "train.phases[0].phase must be 1, 2 or 3, got '1'"),
])
def test_a_damaged_results_json_is_one_line(command, change, pattern, copy_of, tmp_path):
    d = json.loads((copy_of / "results.json").read_text())
    change(d)
    (copy_of / "results.json").write_text(json.dumps(d))
    name, *flags = command.split()
    args = ["plot", str(copy_of), "-o", str(tmp_path / "f.png"), *flags] if name == "plot" else \
        ["summary", str(copy_of), *flags]
    one_line_error(invoke(args), pattern, prefix="error: ")
    assert not (tmp_path / "f.png").exists()


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _cifar(root: Path, data: object) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0] * 4}, f, protocol=2)
    return root


@pytest.mark.parametrize("codec", ["no-such-codec", "rot13", "zlib_codec"])
def test_a_cifar_batch_naming_codecs_encode_is_one_line(codec, tmp_path):
    import codecs

    from earlyexit import data as D
    from earlyexit.errors import DataError

    root = _cifar(tmp_path / "data", _Call(codecs.encode, "abc", codec))
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR batch file: it calls _codecs.encode") as e:
        D.load_dataset("cifar10", data_dir=root, download=False)
    assert "\n" not in str(e.value)
    r = invoke(["run", "--model", "mlp", "--dataset", "cifar10", "--data-dir", str(root), "--device", "cpu",
                "--out", str(tmp_path / "out")])
    one_line_error(r, "data_batch_1 is not a CIFAR batch file", prefix="error: ")
    assert not (tmp_path / "out").exists()


def test_plain_cifar_batches_still_load(tmp_path):
    """Protocol-2 pickles spell bytes as ``_codecs.encode(text, 'latin1')``: that one call is still read."""
    from earlyexit.io import load_plain_pickle

    folder = tmp_path / "b"
    folder.mkdir()
    with open(folder / "batch", "wb") as f:
        pickle.dump({b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), "name": b"\x00\xffbytes"}, f, protocol=2)
    with open(folder / "batch", "rb") as f:
        d = load_plain_pickle(f)
    assert d["name"] == b"\x00\xffbytes" and d[b"data"].tolist() == np.arange(12).reshape(2, 6).tolist()


# --------------------------------------------------------------------------- the one reader


def test_read_json_is_one_line_for_every_damage(tmp_path):
    from earlyexit.schema import MAX_DEPTH, FileSchemaError, read_json

    f = tmp_path / "x.json"
    for content, pattern in [(DEEP, "nests deeper than"), ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "nests deeper"),
                             ("{", "is not valid JSON"), (b"\xff\xfe", "is not valid JSON"),
                             ("1" * 5000, "is not valid JSON")]:
        (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
        with pytest.raises(FileSchemaError, match=pattern) as e:
            read_json(f)
        assert "\n" not in str(e.value) and str(f) in str(e.value)
    f.write_text("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    assert read_json(f) is not None


def test_every_json_file_is_read_by_the_one_reader():
    """No module of the package parses JSON with a json.load/json.loads of its own but the schema module (the one
    reader, which never dies of a RecursionError) and the parse of a --model-opt value (settings.py)."""
    import re

    pkg = Path(__file__).parents[1] / "earlyexit"
    hits = []
    for f in pkg.rglob("*.py"):
        if f.name == "schema.py":
            continue
        for line in f.read_text().splitlines():
            if re.search(r"\bjson\.loads?\(", line.split("#", 1)[0]):
                hits.append(f"{f.relative_to(pkg)}: {line.strip()}")
    assert hits == ["settings.py: out[key.strip()] = json.loads(value)"]
