"""The image-size option: CIFAR and (Fashion-)MNIST resized per batch, image folders decoded at that size,
and the run option that carries it (``DataConfig.image_size``, ``run --image-size``)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from earlyexit import data as D
from earlyexit.cli import main
from earlyexit.config import ConfigError, DataConfig
from earlyexit.data.vision import ResizedTensorSplit
from test_data import fake_cifar, fake_mnist, isolated, save_png  # noqa: F401  (isolated: a fixture)


def test_cifar_at_224_pixels(isolated):
    fake_cifar(isolated / "data")
    native = D.load_dataset("cifar10", data_dir=isolated / "data", download=False)
    big = D.load_dataset("cifar10", data_dir=isolated / "data", download=False, image_size=224)
    assert big.image_size == 224 and (big.num_classes, big.in_chans) == (10, 3)
    assert isinstance(big.train, ResizedTensorSplit) and big.train.x.shape[-1] == 32  # kept native in memory
    for kw in ({}, {"shuffle": True, "seed": 3, "augment": True, "epoch": 1}):
        (xs, ys), (xb, yb) = next(native.train.batches(8, **kw)), next(big.train.batches(8, **kw))
        assert xb.shape == (8, 3, 224, 224) and xb.dtype == torch.float32 and torch.equal(ys, yb)
        # the same (augmented, normalised) native batch, resized bilinearly
        want = F.interpolate(xs, size=(224, 224), mode="bilinear", align_corners=False)
        assert torch.equal(xb, want)
    xt, _ = next(big.test.batches(4))
    assert xt.shape == (4, 3, 224, 224)
    assert len(big.train) == len(native.train) and torch.equal(big.val.labels, native.val.labels)
    sub = big.train.subset([0, 1, 2])
    assert isinstance(sub, ResizedTensorSplit) and next(sub.batches(3))[0].shape == (3, 3, 224, 224)
    # shrinking is antialiased
    small = D.load_dataset("cifar10", data_dir=isolated / "data", download=False, image_size=16)
    xs16, _ = next(small.test.batches(4))
    xs32, _ = next(native.test.batches(4))
    assert torch.allclose(xs16, F.interpolate(xs32, size=(16, 16), mode="bilinear", antialias=True), atol=1e-6)
    # the native size changes nothing
    same = D.load_dataset("cifar10", data_dir=isolated / "data", download=False, image_size=32)
    assert type(same.train) is D.TensorSplit


def test_mnist_resized_and_bad_sizes(isolated):
    fake_mnist(isolated / "data" / "fashion-mnist")
    s = D.load_dataset("fashion-mnist", data_dir=isolated / "data", download=False, image_size=32)
    assert s.image_size == 32 and next(s.train.batches(4))[0].shape == (4, 1, 32, 32)
    with pytest.raises(D.DataError, match="image_size"):
        D.load_dataset("fashion-mnist", data_dir=isolated / "data", download=False, image_size=0)
    with pytest.raises(ConfigError, match="image size"):
        DataConfig(image_size=0)


def test_imagefolder_image_size(tmp_path):
    root = tmp_path / "folder"
    for c, color in {"a": (200, 30, 30), "b": (30, 30, 200)}.items():
        for i in range(4):
            save_png(root / "train" / c / f"{i}.png", color, size=(20, 20))
        save_png(root / "val" / c / "v.png", color, size=(20, 20))
    s = D.load_dataset(f"imagefolder:{root}", image_size=12, num_workers=0)
    assert s.image_size == 12 and next(s.test.batches(2))[0].shape == (2, 3, 12, 12)


def test_run_image_size_flag_reaches_the_data_and_the_model(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", "mlp", "--dataset", "synthetic", "--batch-size", "50", "--device", "cpu", "--epochs", "1",
            "--regime", "joint", "--image-size", "12", "--out", str(out)]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["image_size"] == 12 and cfg["shapes"]["image_size"] == 12
    from earlyexit.runs import load_run

    model, _ = load_run(out)
    assert model.input_shape == (1, 12, 12)
    bad = CliRunner().invoke(main, args[:-2] + ["--image-size", "-3", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and bad.output.strip() == "error: --image-size: expected an integer >= 1, got '-3'"
