"""The command line end to end: run folders, bad input, kill + resume, DDP parity."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from earlyexit.cli import main
from earlyexit.runs import load_run
from earlyexit.io import load_weights

QUICK = ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "32", "--device", "cpu"]


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "mixed"
    r = _run(["run", *QUICK, "--epochs", "2", "--regime", "mixed", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out, r


def test_run_writes_the_documented_folder(finished_run):
    out, r = finished_run
    for name in ("config.json", "history.jsonl", "results.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert (out / "model.safetensors").is_file() or (out / "model.pt").is_file()
    res = json.loads((out / "results.json").read_text())
    for key in ("regime", "model", "dataset", "seed", "base_flops", "exits", "curve", "budgets"):
        assert key in res
    assert res["regime"] == "++-" and res["model"] == "mlp"
    assert set(res["budgets"]) == {"25%", "50%", "75%", "100%", "max"}
    assert {"criterion", "thresholds", "flops", "accuracy"} <= set(res["curve"]) and len(res["curve"]["thresholds"]) == 100
    assert [e["index"] for e in res["exits"]] == list(range(len(res["exits"])))
    assert all({"index", "flops", "accuracy"} <= set(e) for e in res["exits"])
    assert "budgets" in r.output and "test acc" in r.output


def test_load_run_and_eval_reproduce_results(finished_run, tmp_path):
    out, _ = finished_run
    model, cfg = load_run(out)
    assert cfg.model.name == "mlp" and model.num_exits == 4
    before = json.loads((out / "results.json").read_text())
    r = _run(["eval", str(out)])
    assert r.exit_code == 0, r.output
    after = json.loads((out / "results.json").read_text())
    assert [e["accuracy"] for e in after["exits"]] == [e["accuracy"] for e in before["exits"]]
    assert after["train"] == before["train"]
    fig = tmp_path / "curves.png"
    r = _run(["plot", str(out), "-o", str(fig)])
    assert r.exit_code == 0 and fig.stat().st_size > 1000
    r = _run(["plot", str(out), str(out), "-o", str(tmp_path / "twice.png")])  # one run drawn as two seeds: refused
    assert r.exit_code == 2 and "draw each run once" in r.output and not (tmp_path / "twice.png").exists()


def test_eval_out_writes_another_criterion_beside_the_run(finished_run, tmp_path):
    out, _ = finished_run
    before = {f: (out / f).read_bytes() for f in ("config.json", "results.json")}
    ent = tmp_path / "entropy"
    r = _run(["eval", str(out), "--criterion", "entropy", "--out", str(ent)])
    assert r.exit_code == 0, r.output
    assert {f: (out / f).read_bytes() for f in before} == before  # the run itself is untouched
    res, conf = (json.loads((d / "results.json").read_text()) for d in (ent, out))
    assert res["curve"]["criterion"] == "entropy" and conf["curve"]["criterion"] == "confidence"
    assert [e["accuracy"] for e in res["exits"]] == [e["accuracy"] for e in conf["exits"]]  # same model
    assert res["train"] == conf["train"]
    assert json.loads((ent / "config.json").read_text())["eval"]["criterion"] == "entropy"
    assert (ent / "history.jsonl").read_text() == (out / "history.jsonl").read_text()
    _expect_error(["eval", str(out), "--criterion", "entropy", "--out", str(ent)], "already holds results.json")


def _expect_error(args, pattern, code=2):
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, (r.exit_code, r.output, r.exc_info)
    assert isinstance(r.exception, SystemExit), r.exc_info  # a clean exit, not an exception escaping the command
    assert pattern in r.output, r.output
    assert r.output.strip().count("\n") == 0, r.output  # one line
    return r


@pytest.mark.parametrize("args,pattern", [
    (["--regime", "sideways"], "unknown regime 'sideways'; valid: joint, disjoint, mixed"),
    (["--regime", "+-"], "unknown regime '+-'"),
    (["--regime", "+*+"], "unknown regime '+*+'"),
    (["--model", "resnet7"], "unknown model 'resnet7'; valid:"),
    (["--dataset", "imagenet22k"], "unknown dataset 'imagenet22k'; valid:"),
    (["--regime", "--+"], "needs a trained backbone, pass --init"),
    (["--epochs", "0"], "epochs must be > 0"),
    (["--epochs", "-1,2,2"], "epochs must be > 0"),
    (["--weighting", "heavy"], "unknown weighting 'heavy'"),
    (["--method", "magic"], "unknown method 'magic'"),
    (["--criterion", "vibes"], "unknown criterion 'vibes'"),
    (["--weights", "somewhere"], "has no upstream weights"),
    (["--device", "tpu:3"], "device 'tpu:3'"),
    (["--device", "cuda:7"], "device 'cuda:7'"),
    (["--model", "bert_tiny"], "does not take the image inputs"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--method", "ztw", "--epochs", "1,1,0"], "phase 3 has 0"),
    (["--model-opt", "width"], "--model-opt expects KEY=VALUE"),
    (["--model-opt", "colour=blue"], "does not take the option 'colour'"),
])
def test_bad_input(args, pattern, tmp_path):
    base = ["run", "--dataset", "synthetic", "--model", "mlp", "--out", str(tmp_path / "o")]
    _expect_error(base + args, pattern)
    assert not (tmp_path / "o" / "results.json").exists()


def test_refuses_to_overwrite_and_keeps_files(finished_run):
    out, _ = finished_run
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _expect_error(["run", *QUICK, "--out", str(out)], "already holds a run; pass --force")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after


def test_corrupt_checkpoint_on_resume(tmp_path, finished_run):
    out = tmp_path / "r"
    out.mkdir()
    src, _ = finished_run
    (out / "config.json").write_text((src / "config.json").read_text())
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    _expect_error(["run", *QUICK, "--epochs", "2", "--out", str(out), "--resume"], "cannot read checkpoint")
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint at all"


def test_mismatched_init_weights(tmp_path):
    bad = tmp_path / "w.pt"
    torch.save({"stages.0.0.weight": torch.zeros(3, 3)}, bad)
    _expect_error(["run", *QUICK, "--out", str(tmp_path / "o"), "--init", str(bad)], "does not fit the model")
    pickle = tmp_path / "evil.pt"
    torch.save({"x": object()}, pickle)
    _expect_error(["run", *QUICK, "--out", str(tmp_path / "o2"), "--init", str(pickle)], "cannot read checkpoint")


def test_nan_loss_is_a_one_line_error(tmp_path):
    # a learning rate this large overflows the weights during the first epoch (the library test checks the
    # checkpoint of an earlier epoch is kept)
    _run_nan = CliRunner().invoke(main, ["run", *QUICK, "--epochs", "3", "--lr", "1e30", "--out", str(tmp_path / "nan")])
    assert _run_nan.exit_code == 2 and isinstance(_run_nan.exception, SystemExit)
    assert _run_nan.output.strip().splitlines()[-1].startswith("error: non-finite loss")


def test_force_keeps_the_old_run_when_the_new_one_cannot_start(finished_run, tmp_path):
    out = tmp_path / "kept"
    import shutil

    shutil.copytree(finished_run[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _expect_error(["run", *QUICK, "--out", str(out), "--force", "--init", str(tmp_path / "missing.pt")], "does not exist")
    _expect_error(["run", "--model", "mlp", "--dataset", "synthetic", "--out", str(out), "--force", "--ic-after", "9"],
                  "IC block indices")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    r = _run(["run", *QUICK, "--epochs", "1", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["phases"][0]["epochs"] == 1


def test_resume_with_other_options_or_foreign_checkpoint(finished_run, tmp_path):
    src, _ = finished_run
    _expect_error(["run", *QUICK, "--epochs", "3", "--out", str(src), "--resume"], "the options differ")
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    torch.save({"version": 1, "phase": 2, "phases": "+-+"}, out / "checkpoint.pt")
    _expect_error(["run", *QUICK, "--epochs", "2", "--out", str(out), "--resume"], "was written by regime")
    torch.save({"weights": torch.zeros(2)}, out / "checkpoint.pt")
    _expect_error(["run", *QUICK, "--epochs", "2", "--out", str(out), "--resume"], "not a training checkpoint")


def test_plot_refuses_missing_curve(finished_run, tmp_path):
    src, _ = finished_run
    res = json.loads((src / "results.json").read_text())
    other = tmp_path / "patience"
    other.mkdir()
    (other / "results.json").write_text(json.dumps({k: v for k, v in res.items() if not k.startswith("calibrated")}))
    _expect_error(["plot", str(other), "--curve", "geometric", "-o", str(tmp_path / "x.png")], "has no calibrated_geometric")


def test_weights_from_torchvision_for_another_number_of_classes(tmp_path):
    import torchvision

    from earlyexit import build_model
    from earlyexit.models import load_pretrained

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    m = build_model("resnet18", num_classes=10, image_size=32, stem="imagenet")
    load_pretrained(m, tmp_path / "r18.pt")
    assert torch.equal(m.stem.conv1.weight, tv.conv1.weight) and m.heads[-1].fc.weight.shape == (10, 512)
    vt = torchvision.models.vision_transformer.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                                 hidden_dim=32, mlp_dim=64)
    torch.save(vt.state_dict(), tmp_path / "vit.pt")
    m = build_model("vit", num_classes=10, image_size=32, patch_size=8, depth=2, num_heads=2, width=32, mlp_dim=64)
    load_pretrained(m, tmp_path / "vit.pt")
    assert torch.equal(m.stem.conv_proj.weight, vt.conv_proj.weight)
    # --init starts only from a run of one's own (issue 16): the upstream file is refused in one line
    r18 = ["--model", "resnet18", "--model-opt", "stem=imagenet", "--dataset", "synthetic", "--device", "cpu"]
    _expect_error(["run", *r18, "--out", str(tmp_path / "o"), "--init", str(tmp_path / "r18.pt")], "go to --weights")
    assert not (tmp_path / "o" / "results.json").exists()


def test_disjoint_from_init_run(finished_run, tmp_path):
    """'--+' trains only the ICs of a given backbone, which stays bit-identical."""
    src, _ = finished_run
    out = tmp_path / "ics"
    r = _run(["run", *QUICK, "--epochs", "1", "--regime", "--+", "--init", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    a, b = load_run(src)[0], load_run(out)[0]
    for k, v in a.state_dict().items():
        if not k.startswith("heads.") or k.startswith(f"heads.{a.num_exits - 1}."):
            assert torch.equal(v, b.state_dict()[k]), k


def _cli(*args):
    return [sys.executable, "-m", "earlyexit", "run", *QUICK, *args]


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tmp_path):
    args = ["--epochs", "3", "--lr", "0.05,0.02", "--regime", "+++"]
    full = tmp_path / "full"
    subprocess.run(_cli(*args, "--out", str(full)), check=True, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(_cli(*args, "--out", str(part)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hist = part / "history.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if hist.exists() and hist.read_text().count("\n") >= 7:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (part / "results.json").exists()
    subprocess.run(_cli(*args, "--out", str(part), "--resume"), check=True, capture_output=True)
    a, b = load_weights(_weights(full)), load_weights(_weights(part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "history.jsonl").read_text().count("\n") == (part / "history.jsonl").read_text().count("\n") == 18


def _weights(d: Path) -> Path:
    return d / "model.safetensors" if (d / "model.safetensors").exists() else d / "model.pt"


@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path):
    """Two processes train, validate and choose exactly as one: every phase (3 included), an lr grid, patience.

    Validation accuracies are compared exactly (they are all-reduced counts over the whole split), and so
    are the chosen learning rates, best epochs and the epochs early stopping ran."""
    # a gentle lr keeps rounding differences small; patience 1 stops some grid points early
    args = ["--epochs", "2", "--regime", "+++", "--lr", "0.02,0.01", "--patience", "1"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_cli(*args, "--out", str(one)), check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "earlyexit", "run", *QUICK, *args, "--out", str(two)]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    h1 = [json.loads(line) for line in (one / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(line) for line in (two / "history.jsonl").read_text().splitlines()]
    assert len(h1) == len(h2) and {h["phase"] for h in h1} == {1, 2, 3}
    for a, b in zip(h1, h2):
        assert (a["phase"], a["lr"], a["epoch"]) == (b["phase"], b["lr"], b["epoch"])
        assert a["val_acc"] == b["val_acc"] and a["val_metric"] == b["val_metric"]
        # the same global batches; only the order of floating-point sums differs
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    r1, r2 = (json.loads((d / "results.json").read_text())["train"]["phases"] for d in (one, two))
    assert r1 == r2  # chosen lr, best epoch, best validation figure, every grid point's record
    wa, wb = load_weights(_weights(one)), load_weights(_weights(two))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def test_bert_run_end_to_end_with_its_vocabulary(tmp_path):
    """`run --model bert --weights DIR --dataset sst2`: a tiny checkpoint folder with its own vocabulary."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "fun", "dull", ".", "a", "the"]
    ckpt = tmp_path / "tiny-bert"
    ckpt.mkdir()
    (ckpt / "vocab.txt").write_text("\n".join(words) + "\n")
    cfg = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
           "max_position_embeddings": 64, "vocab_size": len(words), "type_vocab_size": 2, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    hf = transformers.BertModel(transformers.BertConfig(**cfg))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(ckpt / "model.safetensors"))
    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    rows = ["good fun movie .\t1", "a dull movie .\t0", "the good movie\t1", "bad , dull\t0"] * 16
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        (data / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    r = _run(["run", "--model", "bert", "--weights", str(ckpt), "--model-opt", "head_pool=mean", "--dataset", "sst2",
              "--data-dir", str(tmp_path / "data"),
              "--optimizer", "adamw", "--lr", "1e-3", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
              "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert len(res["exits"]) == 2 and res["model"] == "bert"
    model, cfg = load_run(out)
    assert cfg.model.kwargs["head_pool"] == "mean" and model.heads[0].pooler.pool == "mean"


@pytest.mark.slow
def test_reproduce_script_smoke_preset(tmp_path):
    script = Path(__file__).parents[1] / "reproduce.sh"
    root = str(script.parent)  # this checkout's package, installed or not
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    r = subprocess.run(["bash", str(script), "smoke"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "runs" / "smoke"
    assert len(list(out.glob("mlp-synthetic-*-s*/results.json"))) == 6
    summary = (out / "mlp-synthetic-summary.txt").read_text()
    assert summary.count("seeds [0, 1]") == 3  # joint, disjoint, mixed: mean +- std over both seeds
    bad = subprocess.run(["bash", str(script), "nonsense"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2


def test_config_reruns_a_finished_run_exactly(finished_run, tmp_path):
    out, _ = finished_run
    r = _run(["run", "--config", str(out / "config.json"), "--out", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "again" / "results.json").read_text())
    assert [e["accuracy"] for e in a["exits"]] == [e["accuracy"] for e in b["exits"]] and a["curve"] == b["curve"]
    _expect_error(["run", "--config", str(out / "config.json"), "--lr", "-1", "--out", str(tmp_path / "x")],
                  "--lr: expected a number > 0, got '-1'")  # the flags given override the file, checked as ever
    (tmp_path / "bad.json").write_text("{}")
    _expect_error(["run", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "y")], "not a run configuration")
