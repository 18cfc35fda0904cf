"""Image classification datasets: (Fashion-)MNIST, CIFAR-10/100, class folders, and a synthetic set.

The image data for training and comparing the regimes of "Joint or Disjoint:
Mixing Training Regimes for Early-Exit Models": (Fashion-)MNIST from IDX
files, CIFAR-10/100 from the official python batches, ImageNet-style class
folders (Tiny ImageNet, Imagenette) as ``imagefolder:PATH``, and a tiny
generated ``synthetic`` set for tests. Each registers itself with
``earlyexit.data.registry`` at the end of this module.

``train`` and ``val`` come from the official training set (``val`` a seeded,
stratified share of it); ``test`` is the official test set (for image
folders: the labelled held-out ``val`` folder those datasets ship).

``image_size`` resizes: image folders decode every file to that side (default
64); (Fashion-)MNIST and CIFAR keep their native images in memory and
``ResizedTensorSplit`` resizes each batch (bilinear, antialiased when
shrinking) after the native-size augmentation, e.g. CIFAR at 224 pixels for a
ViT-B/16 with ImageNet weights.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataError
from ..io import load_plain_pickle
from .augment import Augment
from .files import _locate, _one_line
from .registry import register_dataset
from .sampling import _STREAM_SYNTHETIC, _generator
from .splits import ImageFolderSplit, Splits, check_image_files, TensorSplit, _first, _tensor_splits, stratified_split

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ResizedTensorSplit(TensorSplit):
    """A ``TensorSplit`` whose batches are resized to ``image_size`` x ``image_size``.

    Images stay in memory at their native size; each batch is augmented there (crop offsets and
    flips as ``TensorSplit`` draws them), normalised, then resized bilinearly (antialiased when
    shrinking). Normalisation is per-channel affine and bilinear weights sum to 1, so the order of
    the two does not matter.
    """

    def __init__(self, x: Tensor, y: Tensor, *, image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: Augment = Augment()) -> None:
        super().__init__(x, y, mean=mean, std=std, augment=augment)
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        self.image_size = int(image_size)

    def __repr__(self) -> str:
        return f"ResizedTensorSplit(n={len(self)}, shape={tuple(self.x.shape[1:])}, image_size={self.image_size})"

    def subset(self, index: Tensor | Sequence[int]) -> "ResizedTensorSplit":
        index = torch.as_tensor(index, dtype=torch.long)
        return ResizedTensorSplit(self.x[index], self.y[index], image_size=self.image_size, mean=self.mean,
                                  std=self.std, augment=self.augment)

    def to(self, device: torch.device | str) -> "ResizedTensorSplit":
        return ResizedTensorSplit(self.x.to(device), self.y.to(device), image_size=self.image_size, mean=self.mean,
                                  std=self.std, augment=self.augment)

    def batches(self, batch_size: int, **kw: Any) -> Any:
        """As ``TensorSplit.batches``, with images ``(b, C, image_size, image_size)``."""
        s = self.image_size
        for xb, yb in super().batches(batch_size, **kw):
            if xb.shape[-2:] != (s, s):
                shrink = s < max(xb.shape[-2:])
                xb = F.interpolate(xb, size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)
            yield xb, yb


def _resized(splits: Splits, image_size: int | None) -> Splits:
    """``splits`` with every in-memory split resized to ``image_size`` (None or the native side: unchanged)."""
    if image_size is None or image_size == splits.image_size:
        return splits
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be an integer >= 1, got {image_size!r}")

    def wrap(t: TensorSplit) -> ResizedTensorSplit:
        return ResizedTensorSplit(t.x, t.y, image_size=image_size, mean=t.mean, std=t.std, augment=t.augment)

    return dataclasses.replace(splits, train=wrap(splits.train), val=wrap(splits.val), test=wrap(splits.test),
                               image_size=image_size)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped when the name ends in ``.gz``.

    Args:
        path: the file.
    Returns:
        The array, with the shape stored in the file.
    Raises:
        DataError: if the file is not a valid IDX file.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # EOFError: a truncated .gz; zlib.error: a corrupt deflate stream
        raise DataError(f"cannot read {path}: {_one_line(e)}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape))
    if len(raw) != header + count * dtype.itemsize:
        raise DataError(f"{path}: size does not match its IDX header (shape {shape})")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_file(d: Path, stem: str) -> Path:
    return d / stem if (d / stem).is_file() else d / (stem + ".gz")


def _read_mnist_folder(d: Path, num_classes: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xtr, ytr, xte, yte = (read_idx(_idx_file(d, s)) for s in _MNIST_FILES)
    if xtr.ndim != 3 or len(xtr) != len(ytr) or xte.ndim != 3 or len(xte) != len(yte):
        raise DataError(f"{d}: image and label files do not match")
    for stem, y in ((_MNIST_FILES[1], ytr), (_MNIST_FILES[3], yte)):
        if y.ndim != 1 or (y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
            raise DataError(f"{_idx_file(d, stem)}: labels outside 0..{num_classes - 1}")
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))[:, None]  # (N, 1, H, W)
    as_y = lambda a: torch.from_numpy(a.astype(np.int64))  # (N,)
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte)


def _mnist_like(name: str, *, folders: Sequence[str], tv_class: str, package: str | None, mean: float, std: float,
                data_dir: Any, val_fraction: float, seed: int, train_size: int | None, download: bool,
                image_size: int | None = None) -> Splits:
    def fetch(root: Path) -> None:
        import torchvision

        for train in (True, False):
            getattr(torchvision.datasets, tv_class)(str(root), train=train, download=True)

    how = (f"get it with `apt-get install {package}` or put " if package else "put ") + \
        f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz in DIR/{folders[0]} and pass --data-dir DIR " \
        "(or set EARLYEXIT_DATA=DIR)"
    d = _locate(name, folders, _MNIST_FILES, data_dir=data_dir, download=download, fetch=fetch, how=how,
                any_suffix=(".gz", ""))
    xtr, ytr, xte, yte = _read_mnist_folder(d)
    return _resized(_tensor_splits(name, xtr, ytr, xte, yte, num_classes=10, mean=(mean,), std=(std,),
                                   augment=Augment(), val_fraction=val_fraction, seed=seed, train_size=train_size),
                    image_size)


def _load_fashion_mnist(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                        train_size: int | None = None, download: bool = True,
                        image_size: int | None = None) -> Splits:
    # Mean and standard deviation of the 60000 training images.
    return _mnist_like("fashion-mnist", folders=("fashion-mnist", "FashionMNIST/raw"), tv_class="FashionMNIST",
                       package="dataset-fashion-mnist", mean=0.2860, std=0.3530, data_dir=data_dir,
                       val_fraction=val_fraction, seed=seed, train_size=train_size, download=download,
                       image_size=image_size)


def _load_mnist(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                train_size: int | None = None, download: bool = True,
                image_size: int | None = None) -> Splits:
    return _mnist_like("mnist", folders=("mnist", "MNIST/raw"), tv_class="MNIST", package=None,
                       mean=0.1307, std=0.3081, data_dir=data_dir, val_fraction=val_fraction, seed=seed,
                       train_size=train_size, download=download, image_size=image_size)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # The official CIFAR files are Python 2 pickles of plain arrays and lists: read without running
            # anything a file names (a planted batch in --data-dir, or in a foreign run's data_dir, is refused).
            d = load_plain_pickle(f, encoding="latin1")
        if not isinstance(d, dict):
            raise TypeError(f"it holds a {type(d).__name__}, not a dict")
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
        missing = [k for k in ("data", label_key) if k not in d]
        if missing:
            raise ValueError(f"it has no {missing[0]!r} entry")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
        y = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError, AttributeError,
            IndexError, MemoryError, zlib.error) as e:
        raise DataError(f"{path} is not a CIFAR batch file: {_one_line(e)}") from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _cifar(name: str, *, folder: str, train_files: Sequence[str], test_file: str, label_key: str,
           num_classes: int, tv_class: str, mean: Sequence[float], std: Sequence[float], data_dir: Any,
           val_fraction: float, seed: int, train_size: int | None, download: bool,
           image_size: int | None = None) -> Splits:
    def fetch(root: Path) -> None:
        import torchvision

        getattr(torchvision.datasets, tv_class)(str(root), train=True, download=True)

    how = f"put the official python version ({folder}/) in DIR and pass --data-dir DIR (or set EARLYEXIT_DATA=DIR)"
    d = _locate(name, (folder,), (*train_files, test_file), data_dir=data_dir, download=download, fetch=fetch,
                how=how)
    parts = [_read_cifar_batch(d / f, label_key) for f in train_files]
    xte, yte = _read_cifar_batch(d / test_file, label_key)
    for f, (_, y) in zip([*train_files, test_file], [*parts, (xte, yte)]):
        if y.ndim != 1 or (y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes)):
            raise DataError(f"{d / f}: labels outside 0..{num_classes - 1}")
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    t = torch.from_numpy
    return _resized(_tensor_splits(name, t(xtr), t(ytr), t(xte), t(yte), num_classes=num_classes, mean=mean, std=std,
                                   augment=Augment(crop_pad=4, flip=True), val_fraction=val_fraction, seed=seed,
                                   train_size=train_size), image_size)


def _load_cifar10(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                  train_size: int | None = None, download: bool = True,
                  image_size: int | None = None) -> Splits:
    return _cifar("cifar10", folder="cifar-10-batches-py", train_files=[f"data_batch_{i}" for i in range(1, 6)],
                  test_file="test_batch", label_key="labels", num_classes=10, tv_class="CIFAR10",
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), data_dir=data_dir,
                  val_fraction=val_fraction, seed=seed, train_size=train_size, download=download,
                  image_size=image_size)


def _load_cifar100(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                   train_size: int | None = None, download: bool = True,
                   image_size: int | None = None) -> Splits:
    return _cifar("cifar100", folder="cifar-100-python", train_files=["train"], test_file="test",
                  label_key="fine_labels", num_classes=100, tv_class="CIFAR100",
                  mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), data_dir=data_dir,
                  val_fraction=val_fraction, seed=seed, train_size=train_size, download=download,
                  image_size=image_size)


def _scan_classes(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and ``(path, label)`` samples of a class-folder tree (torchvision's ImageFolder rules)."""
    from torchvision.datasets import ImageFolder

    try:
        ds = ImageFolder(str(folder), loader=lambda p: p, is_valid_file=None)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{folder}: {_one_line(e)}") from None
    return list(ds.classes), [(p, int(c)) for p, c in ds.samples]


def _round_robin(samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Interleave classes (1st of each class, then 2nd of each, ...) so that any prefix is balanced."""
    labels = np.array([c for _, c in samples], dtype=np.int64)
    seen: dict[int, int] = {}
    rank = np.empty(len(labels), dtype=np.int64)
    for i, c in enumerate(labels.tolist()):
        rank[i] = seen.get(c, 0)
        seen[c] = rank[i] + 1
    order = np.lexsort((labels, rank))  # by rank within class, then by class
    return [samples[i] for i in order]


def _heldout_samples(root: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """Labelled held-out images: ``val/`` (Tiny ImageNet's annotation file or class folders), else ``test/``."""
    val = root / "val"
    ann = val / "val_annotations.txt"
    if ann.is_file():
        out = []
        for line in ann.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            fname, wnid = fields[0].strip(), fields[1].strip()
            if wnid not in class_to_idx:
                raise DataError(f"{ann}: class {wnid!r} is not a class of {root / 'train'}")
            path = val / "images" / fname
            out.append((str(path if path.is_file() else val / fname), class_to_idx[wnid]))
        return out
    for folder in (val, root / "test"):
        if folder.is_dir():
            classes, samples = _scan_classes(folder)
            unknown = [c for c in classes if c not in class_to_idx]
            if unknown:
                raise DataError(f"{folder}: classes {unknown[:3]} are not classes of {root / 'train'}")
            return [(p, class_to_idx[classes[c]]) for p, c in samples]
    raise DataError(f"{root}: no held-out set found (expected val/ with class folders or val_annotations.txt, "
                    "or test/ with class folders)")


def _load_imagefolder(*, arg: str, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                      train_size: int | None = None, download: bool = True, image_size: int = 64,
                      num_workers: int | None = None) -> Splits:
    root = Path(arg).expanduser()
    if not root.is_dir() and data_dir is not None and (Path(data_dir) / arg).is_dir():
        root = Path(data_dir) / arg
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: {root / 'train'} is not a folder; expected PATH/train/<class>/*.JPEG "
                        "and PATH/val/<class>/... (or Tiny ImageNet's val/images + val_annotations.txt)")
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}")
    classes, samples = _scan_classes(root / "train")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = _round_robin(samples)
    samples = samples[: _first(len(samples), train_size, f"imagefolder:{arg}")]
    test_samples = _heldout_samples(root, class_to_idx)
    check_image_files(samples + test_samples)  # a damaged file fails at load time, naming it
    tr, va = stratified_split([c for _, c in samples], val_fraction, seed=seed)
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    # ImageNet statistics; crop padding 1/8 of the side, as 4 pixels on CIFAR's 32.
    opts = dict(image_size=image_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                augment=Augment(crop_pad=max(1, image_size // 8), flip=True), num_workers=num_workers)
    return Splits(name=f"imagefolder:{arg}", train=ImageFolderSplit([samples[i] for i in tr.tolist()], **opts),
                  val=ImageFolderSplit([samples[i] for i in va.tolist()], **opts),
                  test=ImageFolderSplit(test_samples, **opts), num_classes=len(classes), in_chans=3,
                  image_size=image_size)


def _load_synthetic(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                    train_size: int | None = None, download: bool = True, image_size: int = 28,
                    in_chans: int = 1, num_classes: int = 10, train_samples: int = 500,
                    test_samples: int = 200) -> Splits:
    """Class prototypes (smooth random patterns) plus per-sample noise; the data do not depend on ``seed``."""
    if min(image_size, in_chans, num_classes, train_samples, test_samples) < 1:
        raise DataError("synthetic: image_size, in_chans, num_classes and the sample counts must be >= 1")
    g = _generator(0, 0, _STREAM_SYNTHETIC)
    low = max(2, image_size // 4)
    protos = torch.rand(num_classes, in_chans, low, low, generator=g)  # (K, C, l, l)
    protos = F.interpolate(protos, size=(image_size, image_size), mode="bilinear", align_corners=False)  # (K, C, S, S)
    n = train_samples + test_samples
    y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]  # (n,) balanced, shuffled
    noise = torch.rand(n, in_chans, image_size, image_size, generator=g)  # (n, C, S, S)
    x = ((0.6 * protos[y] + 0.4 * noise) * 255).round().to(torch.uint8)  # (n, C, S, S)
    xtr = x[:train_samples].float() / 255
    mean = xtr.mean(dim=(0, 2, 3)).tolist()
    std = xtr.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return _tensor_splits("synthetic", x[:train_samples], y[:train_samples], x[train_samples:], y[train_samples:],
                          num_classes=num_classes, mean=mean, std=std, augment=Augment(),
                          val_fraction=val_fraction, seed=seed, train_size=train_size)


register_dataset("fashion-mnist", _load_fashion_mnist)
register_dataset("mnist", _load_mnist)
register_dataset("cifar10", _load_cifar10)
register_dataset("cifar100", _load_cifar100)
register_dataset("imagefolder", _load_imagefolder, arg="PATH")
register_dataset("synthetic", _load_synthetic)
