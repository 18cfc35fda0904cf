"""Training memory layout (channels-last for the conv nets that prefer it) and the torch.compile option."""

from __future__ import annotations

import importlib

import pytest
import torch

from earlyexit.config import ConfigError, PhaseConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.device import in_format, memory_format
from earlyexit.models import build_model
from earlyexit.training.state import cpu_state

tr = importlib.import_module("earlyexit.training")


class Kill(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=16, num_classes=10, train_samples=96, test_samples=32)


def _resnet(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet20", num_classes=10, in_chans=1, image_size=16, ic_after="every:3")


def _cfg(fmt="auto", epochs=1, **kw):
    pc = PhaseConfig(lr=(0.05,), epochs=epochs)
    return TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu", memory_format=fmt, **kw)


def test_auto_is_channels_last_for_the_conv_nets_that_prefer_it():
    assert memory_format(_resnet(), "auto") is torch.channels_last
    assert memory_format(build_model("efficientnet_b0", num_classes=10, image_size=32), "auto") is torch.channels_last
    for name, kw in [("vit", dict(image_size=16, in_chans=1)), ("msdnet_cifar", {}), ("mlp", {})]:
        assert memory_format(build_model(name, num_classes=10, **kw), "auto") is torch.contiguous_format, name
    assert memory_format(_resnet(), "contiguous") is torch.contiguous_format
    with pytest.raises(ConfigError, match="memory format"):
        TrainConfig(memory_format="nhwc")
    with pytest.raises(ConfigError, match="compile"):
        TrainConfig(compile="yes")


def test_in_format_touches_only_image_batches():
    x = torch.randn(2, 3, 4, 4)
    assert in_format(x, torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    assert in_format(x, torch.contiguous_format) is x
    tokens = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    assert in_format(tokens, torch.channels_last) is tokens
    v = torch.randn(2, 8)
    assert in_format(v, torch.channels_last) is v


def test_one_step_agrees_across_layouts_to_rounding():
    """The same weights and batch give the same losses and gradients in both layouts (not bit for bit)."""
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = _resnet().to(memory_format=fmt)
        loss = sum(torch.nn.functional.cross_entropy(o, y) for o in m(in_format(x, fmt)))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    (la, ga), (lb, gb) = grads
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_training_runs_channels_last_and_hands_back_contiguous_weights(data, monkeypatch):
    seen = []
    orig = tr.loop.train_step

    def spy(setup, x, y, **k):
        seen.append((x.is_contiguous(memory_format=torch.channels_last),
                     next(setup.net.stages[0].parameters()).is_contiguous(memory_format=torch.channels_last)))
        return orig(setup, x, y, **k)

    monkeypatch.setattr(tr.loop, "train_step", spy)
    m = _resnet()
    tr.train(m, data, regime="mixed", config=_cfg())
    assert seen and all(a and b for a, b in seen)
    assert all(p.is_contiguous() for p in m.state_dict().values())
    seen.clear()
    tr.train(_resnet(), data, regime="mixed", config=_cfg("contiguous"))
    assert seen and not any(b for _, b in seen)  # (a 1-channel batch is contiguous in both layouts)


def test_channels_last_run_resumes_bit_identically(data, tmp_path):
    full = _resnet()
    tr.train(full, data, regime="mixed", config=_cfg(epochs=2), out_dir=tmp_path / "a")
    part = _resnet()
    n = []

    def log(event, **k):
        if event == "epoch":
            n.append(1)
            if len(n) == 3:  # mid-phase 2, after its first epoch: weights and SGD momentum in the checkpoint
                raise Kill

    with pytest.raises(Kill):
        tr.train(part, data, regime="mixed", config=_cfg(epochs=2), out_dir=tmp_path / "b", log=log)
    resumed = _resnet()
    tr.train(resumed, data, regime="mixed", config=_cfg(epochs=2), out_dir=tmp_path / "b", resume=True)
    a, b = cpu_state(full), cpu_state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compiled_training_matches_eager_to_rounding(data):
    """torch.compile (minutes of compilation on a CPU) trains the same model: first-epoch losses agree."""
    recs = []
    for compile_ in (False, True):
        m = _resnet()
        recs.append(tr.train(m, data, regime="+--", config=_cfg("contiguous", compile=compile_)))
    a, b = (r.history[0]["train_loss"] for r in recs)
    assert abs(a - b) <= 1e-3 * abs(a)
