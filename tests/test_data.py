"""Tests of earlyexit.data: finding and reading datasets, stratified validation
splits, deterministic and data-parallel batching, and batch augmentation (the
data side of "Joint or Disjoint: Mixing Training Regimes for Early-Exit Models").
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from earlyexit import data as D
from earlyexit.data import files, registry, vision

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs
FMNIST_FIRST_TEST_LABELS = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, arr: np.ndarray) -> None:
    """Write a uint8 IDX file (gzipped when the name ends in .gz)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb")) as f:
        f.write(header + arr.tobytes())


def fake_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> dict[str, np.ndarray]:
    """Write MNIST-format files with random images and labels ``i % 10`` into ``folder``."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a)
    return arrays


def fake_cifar(root: Path, *, hundred: bool = False, per_file: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Write CIFAR python-version pickles under ``root``; return all training images (N, 3072) and labels."""
    rng = np.random.default_rng(1)
    k = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    key = "fine_labels" if hundred else "labels"
    xs, ys = [], []
    for j, name in enumerate(names):
        x = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        y = [(i + j) % k for i in range(per_file)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": x, key: y}, f, protocol=2)
        xs.append(x)
        ys.extend(y)
    with open(folder / ("test" if hundred else "test_batch"), "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), key: list(range(10))}, f, protocol=2)
    return np.concatenate(xs), np.asarray(ys)


def save_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (10, 12), fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    arr = np.clip(np.asarray(color)[None, None] + rng.integers(-20, 21, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)


def cifar_like_split(n: int = 40, seed: int = 0) -> D.TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    return D.TensorSplit(x, y, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment=D.Augment(crop_pad=2, flip=True))


def epoch(split, *args, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(split.batches(*args, **kwargs))


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No data anywhere: system roots, cache and $EARLYEXIT_DATA point at empty temporary folders."""
    monkeypatch.setattr(files, "SYSTEM_ROOTS", (str(tmp_path / "system"),))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("EARLYEXIT_DATA", raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def fmnist():
    if not all((DEBIAN_FMNIST / (s + ".gz")).is_file() for s in vision._MNIST_FILES):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("EARLYEXIT_DATA", raising=False)
        mp.setattr(files, "SYSTEM_ROOTS", (str(DEBIAN_FMNIST.parent),))
        return D.load_dataset("fashion-mnist", download=False)


# --------------------------------------------------------------------------- Fashion-MNIST from the system


def test_fashion_mnist_from_debian_location(fmnist):
    s = fmnist
    assert (s.name, s.num_classes, s.in_chans, s.image_size) == ("fashion-mnist", 10, 1, 28)
    assert (len(s.train), len(s.val), len(s.test)) == (54000, 6000, 10000)
    assert s.train.x.shape == (54000, 1, 28, 28) and s.train.x.dtype == torch.uint8
    assert s.test.labels[:10].tolist() == FMNIST_FIRST_TEST_LABELS
    all_train = torch.cat([s.train.labels, s.val.labels])
    assert torch.bincount(all_train).tolist() == [6000] * 10
    assert torch.bincount(s.test.labels).tolist() == [1000] * 10
    # The splits are exactly the raw files cut by stratified_split.
    raw_x = D.read_idx(DEBIAN_FMNIST / "train-images-idx3-ubyte.gz")
    raw_y = torch.from_numpy(D.read_idx(DEBIAN_FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int64))
    tr, va = D.stratified_split(raw_y, 0.1, seed=0)
    assert torch.equal(s.train.labels, raw_y[tr]) and torch.equal(s.val.labels, raw_y[va])
    assert torch.equal(s.val.x[:, 0], torch.from_numpy(raw_x)[va])


def test_fashion_mnist_normalisation_and_stratification(fmnist):
    x, y = next(fmnist.train.batches(4096, shuffle=True))
    assert x.dtype == torch.float32 and x.shape == (4096, 1, 28, 28) and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    counts = torch.bincount(fmnist.val.labels, minlength=10)
    assert ((counts.double() - 0.1 * 6000).abs() <= 1).all()


def test_train_size_takes_first_samples(fmnist):
    s = D.load_dataset("fashion-mnist", data_dir=DEBIAN_FMNIST.parent, train_size=1000, download=False)
    assert len(s.train) + len(s.val) == 1000 and len(s.val) == 100 and len(s.test) == 10000
    raw_y = torch.from_numpy(D.read_idx(DEBIAN_FMNIST / "train-labels-idx1-ubyte.gz")[:1000].astype(np.int64))
    assert torch.equal(torch.cat([s.train.labels, s.val.labels]).sort().values, raw_y.sort().values)


# --------------------------------------------------------------------------- stratified split


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 6), min_size=1, max_size=200), frac=st.floats(0.0, 0.9), seed=st.integers(0, 99))
def test_stratified_split_invariants(labels, frac, seed):
    y = torch.tensor(labels)
    tr, va = D.stratified_split(y, frac, seed=seed)
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(len(y)))
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)
    for c in set(labels):
        n_c = labels.count(c)
        assert abs((y[va] == c).sum().item() - frac * n_c) <= 1
    if frac > 0 and len(y) > 1:
        assert len(va) >= 1 and len(tr) >= 1
    tr2, va2 = D.stratified_split(y, frac, seed=seed)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)


def test_stratified_split_seed_changes_members():
    y = torch.arange(300) % 3
    _, a = D.stratified_split(y, 0.2, seed=0)
    _, b = D.stratified_split(y, 0.2, seed=1)
    assert len(a) == len(b) == 60 and not torch.equal(a, b)
    with pytest.raises(D.DataError, match="val_fraction"):
        D.stratified_split(y, 1.0)


# --------------------------------------------------------------------------- batching


def test_batches_deterministic_per_seed_and_epoch():
    s = cifar_like_split()
    rng_before = torch.random.get_rng_state()
    a = epoch(s, 8, shuffle=True, seed=3, epoch=2, augment=True)
    b = epoch(s, 8, shuffle=True, seed=3, epoch=2, augment=True)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is never touched
    assert same(a, b)
    assert not same(a, epoch(s, 8, shuffle=True, seed=3, epoch=3, augment=True))
    assert not same(a, epoch(s, 8, shuffle=True, seed=4, epoch=2, augment=True))
    # Each epoch visits every sample once.
    assert torch.cat([y for _, y in a]).sort().values.tolist() == s.labels.sort().values.tolist()
    plain = epoch(s, 8)
    assert torch.equal(torch.cat([y for _, y in plain]), s.labels)
    assert len(plain) == s.num_batches(8) == 5


def test_batch_count_and_drop_last():
    s = cifar_like_split(n=21)
    assert [len(y) for _, y in epoch(s, 8)] == [8, 8, 5]
    assert [len(y) for _, y in epoch(s, 8, drop_last=True)] == [8, 8]
    assert s.num_batches(8, drop_last=True) == 2
    assert len(epoch(s.subset(torch.arange(0)), 8)) == 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), per_rank=st.integers(1, 5), world=st.integers(1, 4), drop_last=st.booleans(),
       augment=st.booleans(), shuffle=st.booleans())
def test_ddp_ranks_concatenate_to_single_process_batch(n, per_rank, world, drop_last, augment, shuffle):
    s = cifar_like_split(n=n)
    bs = per_rank * world
    kw = dict(shuffle=shuffle, seed=5, epoch=1, augment=augment, drop_last=drop_last)
    single = epoch(s, bs, **kw)
    ranks = [epoch(s, bs, rank=r, world_size=world, **kw) for r in range(world)]
    steps = D.count_batches(n, bs, world_size=world, drop_last=drop_last)
    assert all(len(r) == steps for r in ranks)
    assert steps in (len(single), len(single) - 1)  # a last batch smaller than world is dropped
    for i in range(steps):
        assert all(len(r[i][1]) > 0 for r in ranks)
        assert torch.equal(torch.cat([r[i][0] for r in ranks]), single[i][0])
        assert torch.equal(torch.cat([r[i][1] for r in ranks]), single[i][1])
        if len(single[i][1]) == bs:
            assert all(len(r[i][1]) == per_rank for r in ranks)


def test_bad_batching_arguments():
    s = cifar_like_split()
    with pytest.raises(D.DataError, match="divisible"):
        next(s.batches(10, rank=0, world_size=3))
    with pytest.raises(D.DataError, match="rank"):
        next(s.batches(8, rank=2, world_size=2))
    with pytest.raises(D.DataError, match="batch_size"):
        next(s.batches(0))


def test_to_device_gives_same_batches():
    s = cifar_like_split()
    kw = dict(shuffle=True, seed=1, epoch=0, augment=True)
    assert same(epoch(s, 16, **kw), epoch(s.to("cpu"), 16, **kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches():
    s = cifar_like_split()
    kw = dict(shuffle=True, seed=1, epoch=0, augment=True)
    gpu = [(x.cpu(), y.cpu()) for x, y in s.to("cuda").batches(16, **kw)]
    assert all(torch.allclose(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(gpu, epoch(s, 16, **kw)))


# --------------------------------------------------------------------------- augmentation


def reference_augment(x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: zero-pad, crop at the offsets, flip (torchvision's RandomCrop then RandomHorizontalFlip)."""
    out = []
    H, W = x.shape[-2:]
    for i in range(len(x)):
        p = F.pad(x[i], (pad, pad, pad, pad))
        c = p[:, offsets[0, i]:offsets[0, i] + H, offsets[1, i]:offsets[1, i] + W]
        out.append(c.flip(-1) if flips[i] else c)
    return torch.stack(out)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), pad=st.integers(1, 4), h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 99))
def test_vectorized_augment_matches_per_sample_loop(b, pad, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 2, h, w), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=g)
    flips = torch.randint(0, 2, (b,), generator=g).bool()
    assert torch.equal(D.apply_augment(x, pad, offsets, flips), reference_augment(x, pad, offsets, flips))
    assert torch.equal(D.apply_augment(x, pad, None, flips), torch.where(flips[:, None, None, None], x.flip(-1), x))
    assert D.apply_augment(x, pad, None, None) is x


def test_augmentation_keeps_shape_and_changes_images():
    s = cifar_like_split(n=64)
    plain = epoch(s, 32, shuffle=True, seed=0)
    aug = epoch(s, 32, shuffle=True, seed=0, augment=True)
    for (xp, yp), (xa, ya) in zip(plain, aug):
        assert xa.shape == xp.shape == (32, 3, 8, 8) and xa.dtype == torch.float32
        assert torch.equal(ya, yp)  # same order with or without augmentation
    assert not all(torch.equal(a[0], p[0]) for a, p in zip(aug, plain))
    # Zero padding shows up as the normalised value of a black pixel.
    black = (0 - 0.5) / 0.25
    assert (torch.cat([x for x, _ in aug]) == black).any()


def test_no_augmentation_for_mnist_like(isolated):
    fake_mnist(isolated / "d" / "fashion-mnist")
    s = D.load_dataset("fashion-mnist", data_dir=isolated / "d", download=False)
    assert not s.train.augment.active
    assert same(epoch(s.train, 8, shuffle=True, augment=True), epoch(s.train, 8, shuffle=True))


# --------------------------------------------------------------------------- finding files


def test_missing_dataset_names_every_place_looked(isolated, monkeypatch):
    monkeypatch.setenv("EARLYEXIT_DATA", str(isolated / "env"))
    empty = isolated / "empty"
    empty.mkdir()
    with pytest.raises(D.DataError) as e:
        D.load_dataset("fashion-mnist", data_dir=empty, download=False)
    msg = str(e.value)
    assert "\n" not in msg
    for place in (empty / "fashion-mnist", empty / "FashionMNIST" / "raw", isolated / "env" / "fashion-mnist",
                  isolated / "system" / "fashion-mnist", isolated / "cache" / "earlyexit" / "data" / "fashion-mnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download disabled" in msg
    with pytest.raises(D.DataError, match="cifar-10-batches-py"):
        D.load_dataset("cifar10", data_dir=empty, download=False)


def test_search_order_and_torchvision_layout(isolated, monkeypatch):
    arrays = fake_mnist(isolated / "env" / "MNIST" / "raw", n_train=30, gz=False)  # torchvision layout, not gzipped
    fake_mnist(isolated / "system" / "mnist", n_train=50)
    monkeypatch.setenv("EARLYEXIT_DATA", str(isolated / "env"))
    s = D.load_dataset("mnist", val_fraction=0.2, download=False)
    assert len(s.train) + len(s.val) == 30 and len(s.val) == 6 and len(s.test) == 20  # $EARLYEXIT_DATA wins
    assert torch.equal(s.test.x[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.uint8)))
    assert len(D.load_dataset("mnist", data_dir=isolated / "system", download=False).train) == 45  # data_dir first
    monkeypatch.delenv("EARLYEXIT_DATA")
    assert len(D.load_dataset("mnist", download=False).test) == 20  # system root


def test_failed_download_becomes_one_line_error(isolated, monkeypatch):
    import socket

    import torchvision

    def offline(root, train=True, download=False):
        print("Downloading ...")  # torchvision's chatter must not reach the user
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nName or service not known")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    timeout = socket.getdefaulttimeout()
    (isolated / "d").mkdir()  # a --data-dir must exist (a missing one is an error, never a fall-back)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("fashion-mnist", data_dir=isolated / "d")
    msg = str(e.value)
    assert "\n" not in msg and "download failed (Error downloading train-images-idx3-ubyte.gz: Name or service" in msg
    assert socket.getdefaulttimeout() == timeout


def test_download_into_data_dir(isolated, monkeypatch):
    import torchvision

    def fetch(root, train=True, download=False):
        assert download
        fake_mnist(Path(root) / "FashionMNIST" / "raw", n_train=20)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fetch)
    (isolated / "d").mkdir()  # a --data-dir must exist (a missing one is an error, never a fall-back)
    s = D.load_dataset("fashion-mnist", data_dir=isolated / "d")
    assert len(s.train) + len(s.val) == 20 and (isolated / "d" / "FashionMNIST" / "raw").is_dir()


def test_read_idx_formats_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a)
    assert np.array_equal(D.read_idx(tmp_path / "a.gz"), a) and np.array_equal(D.read_idx(tmp_path / "a"), a)
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "i").write_bytes(bytes([0, 0, 0x0C, 1]) + np.array([3], ">u4").tobytes() + ints.tobytes())
    assert D.read_idx(tmp_path / "i").tolist() == [1, -2, 70000]
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(D.DataError, match="magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + np.array([5], ">u4").tobytes() + bytes(3))
    with pytest.raises(D.DataError, match="size"):
        D.read_idx(tmp_path / "short")


# --------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_from_pickle_folder(isolated):
    x, y = fake_cifar(isolated / "data")
    s = D.load_dataset("cifar10", data_dir=isolated / "data", val_fraction=0.1, download=False)
    assert (s.num_classes, s.in_chans, s.image_size) == (10, 3, 32)
    assert len(s.train) + len(s.val) == 100 and len(s.val) == 10 and len(s.test) == 10
    tr, va = D.stratified_split(torch.from_numpy(y), 0.1, seed=0)
    # Rows hold the R, G and B planes of 32x32 pixels, one after the other.
    assert torch.equal(s.train.x[0, 1].flatten(), torch.from_numpy(x[tr[0].item(), 1024:2048]))
    assert torch.equal(s.train.labels, torch.from_numpy(y)[tr])
    assert s.train.augment == D.Augment(crop_pad=4, flip=True)
    xb, yb = next(s.train.batches(16, shuffle=True, augment=True))
    assert xb.shape == (16, 3, 32, 32) and yb.shape == (16,)
    small = D.load_dataset("cifar10", data_dir=isolated / "data", train_size=30, download=False)
    assert torch.equal(torch.cat([small.train.labels, small.val.labels]).sort().values,
                       torch.from_numpy(y[:30]).sort().values)
    with pytest.raises(D.DataError, match="exceeds"):
        D.load_dataset("cifar10", data_dir=isolated / "data", train_size=101, download=False)


def test_cifar100_and_corrupt_pickle(isolated):
    _, y = fake_cifar(isolated / "data", hundred=True, per_file=200)
    s = D.load_dataset("cifar100", data_dir=isolated / "data", download=False)
    assert s.num_classes == 100 and len(s.train) + len(s.val) == 200 and len(s.val) == 20
    (isolated / "data" / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match="not a CIFAR batch file"):
        D.load_dataset("cifar100", data_dir=isolated / "data", download=False)


# --------------------------------------------------------------------------- image folders

COLORS = {"cat": (220, 40, 40), "dog": (40, 40, 220)}


def test_imagefolder_class_folders(tmp_path):
    root = tmp_path / "imagenette"
    for c, color in COLORS.items():
        for i in range(8):
            save_png(root / "train" / c / f"{c}{i}.png", color)
        for i in range(3):
            save_png(root / "val" / c / f"v{c}{i}.png", color)
    s = D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0, val_fraction=0.25)
    assert (s.num_classes, s.in_chans, s.image_size) == (2, 3, 8)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 6)
    assert torch.bincount(s.val.labels).tolist() == [2, 2]
    assert not {p for p, _ in s.train.samples} & {p for p, _ in s.val.samples}
    batches = epoch(s.train, 6, shuffle=True, seed=2, augment=True)
    assert same(batches, epoch(s.train, 6, shuffle=True, seed=2, augment=True))
    xt, yt = next(s.test.batches(6))
    assert xt.shape == (6, 3, 8, 8) and xt.dtype == torch.float32
    red_minus_blue = xt[:, 0].mean(dim=(1, 2)) - xt[:, 2].mean(dim=(1, 2))
    assert torch.equal(red_minus_blue < 0, yt == 1)  # "dog" (class 1) is blue
    # Ranks concatenate to the single-process batch here too.
    single = epoch(s.train, 6, shuffle=True, seed=2, augment=True)
    ranks = [epoch(s.train, 6, shuffle=True, seed=2, augment=True, rank=r, world_size=2) for r in range(2)]
    assert all(torch.equal(torch.cat([ranks[0][i][0], ranks[1][i][0]]), single[i][0]) for i in range(len(single)))
    # Decoding in worker processes changes nothing.
    s.train.num_workers = 1
    assert same(batches, epoch(s.train, 6, shuffle=True, seed=2, augment=True))
    # train_size takes a class-balanced prefix (classes interleaved).
    small = D.load_dataset(f"imagefolder:{root}", image_size=8, num_workers=0, train_size=4, val_fraction=0.5)
    assert torch.bincount(torch.cat([small.train.labels, small.val.labels])).tolist() == [2, 2]


def test_imagefolder_tiny_imagenet_layout(tmp_path):
    root = tmp_path / "tiny"
    wnids = {"n01": COLORS["cat"], "n02": COLORS["dog"]}
    for w, color in wnids.items():
        for i in range(4):
            save_png(root / "train" / w / "images" / f"{w}_{i}.JPEG", color, size=(16, 16), fmt="JPEG")
    lines = []
    for i, w in enumerate(["n02", "n01", "n02"]):
        save_png(root / "val" / "images" / f"val_{i}.JPEG", wnids[w], size=(16, 16), fmt="JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    s = D.load_dataset(f"imagefolder:{root}", image_size=16, num_workers=0, val_fraction=0.25)
    assert s.num_classes == 2 and s.test.labels.tolist() == [1, 0, 1]
    x, y = next(s.test.batches(3))
    assert x.shape == (3, 3, 16, 16)
    assert torch.equal(x[:, 2].mean(dim=(1, 2)) > x[:, 0].mean(dim=(1, 2)), y == 1)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(D.DataError, match="train"):
        D.load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    root = tmp_path / "r"
    save_png(root / "train" / "a" / "x.png", (0, 0, 0))
    save_png(root / "val" / "b" / "y.png", (0, 0, 0))
    with pytest.raises(D.DataError, match="not classes of"):
        D.load_dataset(f"imagefolder:{root}", num_workers=0)
    with pytest.raises(D.DataError, match="needs an argument"):
        D.load_dataset("imagefolder")


# --------------------------------------------------------------------------- synthetic data and the registry


def test_synthetic_is_deterministic_and_learnable():
    a, b = D.load_dataset("synthetic"), D.load_dataset("synthetic", seed=1)
    assert (a.num_classes, a.in_chans, a.image_size) == (10, 1, 28)
    assert len(a.train) + len(a.val) == 500 and len(a.test) == 200
    assert torch.equal(a.test.x, b.test.x)  # the data do not depend on the split seed
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(a.val.x, b.val.x)
    # Nearest class mean on the training split classifies the test split.
    x, y = next(a.train.batches(len(a.train)))
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])  # (10, 784)
    xt, yt = next(a.test.batches(len(a.test)))
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).float().mean() > 0.9
    c = D.load_dataset("synthetic", image_size=12, in_chans=3, num_classes=4, train_samples=40, test_samples=8)
    assert c.train.x.shape[1:] == (3, 12, 12) and c.num_classes == 4 and len(c.test) == 8


def test_unknown_names_and_options():
    with pytest.raises(D.DataError) as e:
        D.load_dataset("imagenet-22k")
    assert "fashion-mnist" in str(e.value) and "imagefolder:PATH" in str(e.value)
    with pytest.raises(D.DataError, match="does not take option"):
        D.load_dataset("synthetic", tokenizer="bert")
    with pytest.raises(D.DataError, match="no ':' argument"):
        D.load_dataset("synthetic:x")
    with pytest.raises(D.DataError, match="train_size"):
        D.load_dataset("synthetic", train_size=0)


def test_register_dataset(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    seen = {}

    def loader(*, data_dir, val_fraction, seed, train_size, download, max_len=8):
        seen.update(seed=seed, max_len=max_len)
        return D.load_dataset("synthetic", val_fraction=val_fraction, seed=seed)

    D.register_dataset("Toy-Text", loader)
    assert "toy-text" in D.list_datasets()
    s = D.load_dataset("toy-text", seed=7, max_len=16)
    assert isinstance(s, D.Splits) and seen == {"seed": 7, "max_len": 16}
    with pytest.raises(ValueError, match="registered already"):
        D.register_dataset("toy-text", lambda **kw: None)


