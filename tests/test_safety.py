"""What must never happen: code run from a data file, a run lost to --force, two runs in one folder.

Each test plays the attack or the careless command of the issue against a real run folder and checks
that the previous files keep their bytes, that the answer is one line with exit code 2, and that a
planted payload never runs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from earlyexit import data as D

from clihelp import QUICK, copy_run, files_of, finished_run, invoke, one_line_error
from earlyexit.errors import DataError

LOCK, STASH = ".lock", ".previous-run"  # earlyexit.rundir's names (imported where needed)

def _invoke(args, **kw):
    return invoke(args, **kw)


def _one_line_error(r, pattern, code=2, *, after_progress=False):
    one_line_error(r, pattern, code, after_progress=after_progress, prefix='error: ')


_files = files_of


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return finished_run(tmp_path_factory, 'safety')


@pytest.fixture
def copy_of(finished, tmp_path):
    return copy_run(finished, tmp_path)


# --------------------------------------------------------------------------- 1. no code from data files


class _Payload:
    """Unpickling this calls ``fn(*args)``: what a poisoned file would do."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path) -> dict[str, object]:
    return {"open": _Payload(open, str(marker), "w"),  # builtins.open creates the marker
            "system": _Payload(os.system, f"touch {marker}"),  # a shell command
            "in-array": np.array([_Payload(open, str(marker), "w")], dtype=object)}  # inside an object array


def _poisoned_cifar(root: Path, payload: object) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": payload, "labels": [0] * 4}, f, protocol=2)
    return root


@pytest.mark.parametrize("kind", ["open", "system", "in-array"])
def test_poisoned_cifar_batch_runs_nothing(kind, tmp_path):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[kind]
    pickle.loads(pickle.dumps(payload))  # the control: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    root = _poisoned_cifar(tmp_path / "data", payload)
    with pytest.raises(DataError, match="data_batch_1 is not a CIFAR batch file: it names") as e:
        D.load_dataset("cifar10", data_dir=root, download=False)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_foreign_run_naming_a_poisoned_data_dir_runs_nothing(command, copy_of, tmp_path):
    """A run folder someone sent: its config.json names a data_dir that holds a planted CIFAR batch."""
    marker = tmp_path / "pwned"
    root = _poisoned_cifar(tmp_path / "data", _payloads(marker)["open"])
    cfg = json.loads((copy_of / "config.json").read_text())
    cfg["data"].update(name="cifar10", data_dir=str(root))
    (copy_of / "config.json").write_text(json.dumps(cfg))
    args = ["eval", str(copy_of)] if command == "eval" else ["analyze", str(copy_of), "--what", "rank"]
    _one_line_error(_invoke(args), "is not a CIFAR batch file")
    assert not marker.exists()


def test_real_cifar_layouts_still_load(tmp_path):
    """Python 2 pickles (the official files: numpy.core names, byte strings) and numpy 2's own pickles."""
    raw = bytes(range(6))
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03K\x00"
           b"\x85U\x01b\x87R(K\x01K\x02K\x03\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R(K\x03U\x01|NNN"
           b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + len(raw).to_bytes(4, "little") + raw +
           b"tbU\x06labels]q\x05(K\x01K\x02eu.")
    from earlyexit.io import load_plain_pickle

    d = load_plain_pickle(io.BytesIO(py2))
    assert d["labels"] == [1, 2] and d["data"].tolist() == [[0, 1, 2], [3, 4, 5]] and d["data"].dtype == np.uint8
    now = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [1, 2], "name": "x", "b": b"y",
           "f": np.float32(1.5), "s": {1, 2}}
    for protocol in (2, 4, 5):
        back = load_plain_pickle(io.BytesIO(pickle.dumps(now, protocol=protocol)))
        assert back["data"].tolist() == now["data"].tolist() and back["s"] == {1, 2} and back["f"] == 1.5


def test_no_unsafe_loader_in_the_package():
    """Every pickle, torch.load, numpy.load, eval/exec and yaml.load in the package is one of the safe ones."""
    import re

    pkg = Path(__file__).parents[1] / "earlyexit"
    unsafe = re.compile(r"pickle\.loads?\(|\bUnpickler\(|torch\.load\((?![^)]*weights_only=True)|"
                        r"(?:np|numpy)\.load\((?![^)]*allow_pickle=False)|allow_pickle\s*=\s*True|(?<![.\w])(?<!def )eval\(|(?<![.\w])exec\(|yaml\.(unsafe_)?load\(")
    hits = []
    for f in pkg.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if unsafe.search(code) and "_PlainUnpickler(f" not in code:
                hits.append(f"{f.relative_to(pkg)}:{i}: {line.strip()}")
    assert hits == []


# --------------------------------------------------------------------------- 2. --force never loses a run


@pytest.mark.parametrize("args,pattern", [
    (["--lr", "0"], "--lr: expected a number > 0"),
    (["--lr", "nan"], "--lr: expected a number > 0"),
    (["--lr", "inf"], "--lr: expected a number > 0"),
    (["--lr", "-1"], "--lr: expected a number > 0"),
    (["--lr", "1e39"], "overflows float32"),
    (["--weight-decay", "-1"], "--weight-decay: expected a number >= 0"),
    (["--weight-decay", "nan"], "--weight-decay: expected a number >= 0"),
    (["--batch-size", "5000"], "larger than the training set"),
    (["--train-size", "10"], "larger than the training set"),
    (["--model-opt", "width=0"], "expects a size >= 1"),
    (["--model-opt", "width=abc"], "expects an integer"),
    (["--model-opt", "depth=-1"], "expects a size >= 1"),
    (["--model-opt", "num_classes=3"], "is set by the run"),
    (["--model-opt", "image_size=5"], "contradicts the data's 28-pixel images"),
    (["--model-opt", "colour=blue"], "does not take the option 'colour'"),
    (["--ic-after", "9"], "IC block indices"),
    (["--init", "missing.pt"], "does not exist"),
    (["--data-dir", "no/such/folder"], "does not exist"),
    # fails only in training, before the first checkpoint (the error follows the progress lines)
    (["--lr", "1e30"], "at lr 1e+30 (the previous run in the folder is kept)"),
])
def test_force_keeps_every_byte_of_the_previous_run(args, pattern, copy_of):
    before = _files(copy_of)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--force", *args])
    _one_line_error(r, pattern, after_progress=args == ["--lr", "1e30"])
    assert _files(copy_of) == before


def test_ctrl_c_before_the_first_checkpoint_puts_the_previous_run_back(copy_of, monkeypatch):
    import earlyexit.runs as runs

    before = _files(copy_of)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "train", interrupted)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--force"])
    assert r.exit_code == 130 and r.output.strip().count("\n") == 0
    assert "nothing of this run was saved (the previous run in the folder is kept)" in r.output
    assert _files(copy_of) == before


def test_a_crash_mid_replacement_is_settled_by_the_next_run(copy_of):
    """kill -9 after --force set the old run aside, before the new one's first checkpoint: the next run in
    the folder puts the old run back (here --resume, which then continues it)."""
    from earlyexit.rundir import stash_run
    from earlyexit.runs import RUN_FILES
    from earlyexit.training import CHECKPOINT

    before = _files(copy_of)
    stash_run(copy_of, RUN_FILES, CHECKPOINT)
    (copy_of / "config.json").write_text("{}")  # the new run's config, written before it died
    (copy_of / LOCK).write_text("999999999\n")  # its lock, naming a dead pid
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume"])
    assert r.exit_code == 0, r.output
    after = _files(copy_of)
    assert after["config.json"] == before["config.json"] and after["history.jsonl"] == before["history.jsonl"]
    assert not (copy_of / STASH).exists() and not (copy_of / LOCK).exists()


def test_a_crash_while_setting_the_previous_run_aside_loses_nothing(copy_of):
    """kill -9 in the middle of moving the previous run aside (the checkpoint and results moved, the rest not):
    the next run in the folder puts every file back as it was."""
    before = _files(copy_of)
    (copy_of / STASH).mkdir()
    for name in ("checkpoint.pt", "results.json"):
        os.replace(copy_of / name, copy_of / STASH / name)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), "--resume"])
    assert r.exit_code == 0, r.output
    after = _files(copy_of)
    for name in ("config.json", "history.jsonl", "model.safetensors", "checkpoint.pt"):
        if name in before:
            assert after[name] == before[name], name
    assert not (copy_of / STASH).exists()


def test_force_replaces_the_run_once_the_new_one_has_started(copy_of):
    r = _invoke(["run", *QUICK, "--epochs", "2", "--out", str(copy_of), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((copy_of / "config.json").read_text())["train"]["phases"][0]["epochs"] == 2
    assert len((copy_of / "history.jsonl").read_text().splitlines()) == 4
    assert not (copy_of / STASH).exists() and not (copy_of / LOCK).exists()


# --------------------------------------------------------------------------- 3. one run per folder


@pytest.mark.parametrize("force", [False, True])
def test_a_live_lock_refuses_a_second_run(copy_of, force):
    (copy_of / LOCK).write_text(f"{os.getpid()}\n")  # a live pid: this test's own
    before = _files(copy_of)
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(copy_of), *(["--force"] if force else ["--resume"])])
    _one_line_error(r, f"is in use by another run (pid {os.getpid()})")
    assert _files(copy_of) == before


def test_a_stale_lock_is_taken_over_and_cleared(tmp_path):
    from earlyexit.rundir import lock_holder

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{dead.pid}\n")
    (out / f".checkpoint.pt.{dead.pid}.abc123xy.tmp").write_bytes(b"half a file")  # a write a kill cut short
    assert lock_holder(out) is None
    r = _invoke(["run", *QUICK, "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert not (out / LOCK).exists() and not list(out.glob(".*.tmp"))


def test_lock_held_by_another_process(tmp_path):
    """A lock flock-ed by a live process (whatever pid its file names) is refused; released, it is free."""
    from earlyexit.rundir import RunLock, lock_holder

    child = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; from earlyexit.rundir import RunLock; "
                              f"RunLock({str(tmp_path / 'r')!r}).acquire(); print('locked', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    try:
        assert child.stdout.readline().strip() == "locked"
        assert lock_holder(tmp_path / "r") == child.pid
        with pytest.raises(Exception, match=f"pid {child.pid}"):
            RunLock(tmp_path / "r").acquire()
    finally:
        child.kill()
        child.wait()
    assert lock_holder(tmp_path / "r") is None  # the holder died: stale
    with RunLock(tmp_path / "r") as lock:
        assert (tmp_path / "r" / LOCK).read_text().strip() == str(os.getpid()) and lock.fd is not None
    assert not (tmp_path / "r" / LOCK).exists()


@pytest.mark.slow
def test_two_runs_into_one_folder(tmp_path):
    """A second `run` (and a `run --force`) into the folder of a run in progress in another process: one
    line, exit 2, nothing touched; the first run finishes with its own config and weights."""
    from earlyexit.rundir import lock_holder

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    first = subprocess.Popen([sys.executable, "-m", "earlyexit", "run", *QUICK, "--epochs", "8", "--lr", "0.02",
                              "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "history.jsonl").exists() and first.poll() is None:
        time.sleep(0.02)
    try:
        assert lock_holder(out) == first.pid, "the first run is not in progress"
        for extra in ([], ["--force"], ["--resume"]):
            before = {k: v for k, v in _files(out).items() if not k.startswith(".")}
            r = _invoke(["run", *QUICK, "--epochs", "8", "--lr", "0.02", "--out", str(out), *extra])
            _one_line_error(r, f"is in use by another run (pid {first.pid})")
            after = {k: v for k, v in _files(out).items() if not k.startswith(".")}
            assert set(after) >= set(before)  # nothing removed (the first run goes on writing)
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["phases"][0]["epochs"] == 8 and len((out / "history.jsonl").read_text().splitlines()) == 16
    assert not (out / LOCK).exists()
