"""Datasets by name -> train / validation / test splits, local files first.

Image classification data for training and comparing the regimes of "Joint
or Disjoint: Mixing Training Regimes for Early-Exit Models": (Fashion-)MNIST,
CIFAR-10/100, ImageNet-style class folders (Tiny ImageNet, Imagenette), and a
tiny generated ``synthetic`` set for tests. Text datasets register
themselves through ``register_dataset`` from ``earlyexit.textdata``.

Splits: ``train`` and ``val`` come from the official training set (``val`` a
seeded, stratified share of it, disjoint from ``train``); ``test`` is the
official test set (for image folders: the ``val`` folder, the labelled held-out
set those datasets ship) and is meant for final numbers only.

Files are searched, in order, in ``data_dir``, ``$EARLYEXIT_DATA``, the system
dataset folders (``SYSTEM_ROOTS``; Debian's ``dataset-fashion-mnist`` installs
into ``/usr/share/datasets/fashion-mnist``) and a user cache folder; inside
each root both our layout (``ROOT/fashion-mnist``, ``ROOT/cifar-10-batches-py``)
and torchvision's (``ROOT/FashionMNIST/raw``) are recognised. torchvision only
downloads when nothing is found locally and ``download=True``.

Batches are made by indexing in-memory uint8 tensors, so a batch costs one
gather, one conversion and one affine normalisation. Order and augmentation
depend only on ``(seed, epoch)`` through a local ``torch.Generator``; under data
parallelism every rank draws the same plan for the global batch and keeps its
own contiguous slice, so the ranks together see exactly the single-process
batch.
"""

from __future__ import annotations

import contextlib
import gzip
import inspect
import io
import os
import pickle
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

# System folders holding datasets installed by a package manager.
SYSTEM_ROOTS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")
# Seconds a download may wait on a silent socket before it counts as failed.
DOWNLOAD_TIMEOUT_S = 20.0

# Independent random streams derived from the same user seed.
_STREAM_ORDER, _STREAM_SPLIT, _STREAM_SYNTHETIC = 0, 1, 2

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")


# --------------------------------------------------------------------------- randomness and batch plans


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(stream, seed, epoch)`` only (never the global RNG).

    ``SeedSequence`` mixes the three numbers so that nearby seeds and epochs give
    unrelated streams.
    """
    words = [stream % 2**64, seed % 2**64, epoch % 2**64]
    state = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(state)


@dataclass
class EpochPlan:
    """The batches of one epoch as seen by one rank.

    Attributes:
        generator: the epoch's generator, positioned after the permutation; draw
            augmentation parameters from it for each global batch, in order.
        batches: global batches of sample indices, each ``(G,)`` with ``G <= batch_size``.
        slices: this rank's contiguous part of each global batch.
    """

    generator: torch.Generator
    batches: list[Tensor]
    slices: list[slice]


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size % world_size:
        raise DataError(f"batch_size {batch_size} is not divisible by world_size {world_size}; "
                        "the global batch is split evenly over the ranks")


def count_batches(n: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
    """Number of batches ``plan_epoch`` yields per epoch (the same on every rank).

    Args:
        n: number of samples.
        batch_size: global batch size.
        world_size: number of data-parallel ranks.
        drop_last: drop the last, partial global batch.
    Returns:
        The number of batches.
    """
    full, rest = divmod(n, batch_size)
    # A partial batch smaller than world_size would leave some rank empty: it is dropped.
    return full + int(rest > 0 and not drop_last and rest >= world_size)


def plan_epoch(n: int, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
               rank: int = 0, world_size: int = 1, drop_last: bool = False) -> EpochPlan:
    """Cut one epoch over ``n`` samples into global batches and this rank's slices.

    The order depends only on ``(seed, epoch)``. Rank ``r`` gets the ``r``-th of
    ``world_size`` contiguous, equal slices of each global batch, so averaging the
    ranks' mean losses gives the single-process loss. The last, partial global
    batch (unless ``drop_last``) is cut into near-equal contiguous parts
    (``torch.tensor_split``); if it holds fewer samples than ranks it is dropped,
    so that every rank runs the same number of steps.

    Args:
        n: number of samples.
        batch_size: global batch size (divisible by ``world_size``).
        shuffle: permute the samples; otherwise keep their order.
        seed: seed of the order (and of augmentation drawn from the generator).
        epoch: epoch number; each epoch has its own order.
        rank: this process's rank.
        world_size: number of data-parallel ranks.
        drop_last: drop the last, partial global batch.
    Returns:
        An ``EpochPlan``.
    Raises:
        DataError: on a bad batch size, rank or world size.
    """
    _check_batching(batch_size, rank, world_size)
    g = _generator(seed, epoch, _STREAM_ORDER)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)  # (n,)
    steps = count_batches(n, batch_size, world_size=world_size, drop_last=drop_last)
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]  # each (G,)
    slices = []
    for b in batches:
        if len(b) == batch_size:
            per = batch_size // world_size
            slices.append(slice(rank * per, (rank + 1) * per))
        else:
            bounds = [len(p) for p in torch.arange(len(b)).tensor_split(world_size)]
            lo = sum(bounds[:rank])
            slices.append(slice(lo, lo + bounds[rank]))
    return EpochPlan(generator=g, batches=batches, slices=slices)


# --------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augment:
    """A dataset's training augmentation, applied to whole batches at once."""

    crop_pad: int = 0   # random crop of the original size after zero padding by this many pixels per side; 0 = off
    flip: bool = False  # horizontal flip with probability 1/2

    @property
    def active(self) -> bool:
        return self.crop_pad > 0 or self.flip


def _draw_augment(spec: Augment, g: torch.Generator, size: int) -> tuple[Tensor | None, Tensor | None]:
    """Crop offsets ``(2, size)`` and flip flags ``(size,)`` for one global batch (None when off)."""
    offsets = torch.randint(0, 2 * spec.crop_pad + 1, (2, size), generator=g) if spec.crop_pad else None
    flips = torch.randint(0, 2, (size,), generator=g).bool() if spec.flip else None
    return offsets, flips


def apply_augment(x: Tensor, pad: int, offsets: Tensor | None, flips: Tensor | None) -> Tensor:
    """Random crop with zero padding, then horizontal flip, as one gather over the batch.

    Args:
        x: images ``(B, C, H, W)`` of any dtype (zero is the padding value).
        pad: zero padding per side before cropping (ignored when ``offsets`` is None).
        offsets: top/left crop offsets in the padded image, ``(2, B)``, each in ``[0, 2 * pad]``; None = no crop.
        flips: ``(B,)`` bool, True = flip horizontally; None = no flip.
    Returns:
        The augmented images, same shape and dtype as ``x``.
    """
    if offsets is None and flips is None:
        return x
    B, C, H, W = x.shape
    dev = x.device
    rows = torch.arange(H, device=dev).expand(B, H)  # (B, H)
    cols = torch.arange(W, device=dev).expand(B, W)  # (B, W)
    if flips is not None:
        # Flipping after the crop reads the crop window right to left.
        cols = torch.where(flips.to(dev)[:, None], W - 1 - cols, cols)  # (B, W)
    if offsets is not None and pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
        offsets = offsets.to(dev)
        rows = rows + offsets[0][:, None]  # (B, H)
        cols = cols + offsets[1][:, None]  # (B, W)
    # One gather over flattened planes is ~3x faster than 4-D advanced indexing.
    flat = (rows[:, :, None] * x.shape[-1] + cols[:, None, :]).reshape(B, 1, H * W)  # (B, 1, H*W)
    out = x.reshape(B, C, x.shape[-2] * x.shape[-1]).gather(2, flat.expand(B, C, H * W))  # (B, C, H*W)
    return out.reshape(B, C, H, W)


def _normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(B, C, H, W)`` in [0, 255] (or float in [0, 1]) -> float32 ``(x - mean) / std``."""
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device)
    mul = (scale / std_t).view(1, -1, 1, 1)  # (1, C, 1, 1)
    sub = (torch.tensor(mean, dtype=torch.float32, device=x.device) / std_t).view(1, -1, 1, 1)  # (1, C, 1, 1)
    return x.to(torch.float32).mul_(mul).sub_(sub)  # (B, C, H, W)


# --------------------------------------------------------------------------- split objects


class Split:
    """What every split offers besides ``batches(...)``: its size, its labels ``y`` and batches per epoch."""

    y: Tensor  # (N,) int64 labels, set by the subclass

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> Tensor:
        """Labels ``(N,)`` int64."""
        return self.y

    def num_batches(self, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per epoch that ``batches`` yields with these arguments (on every rank)."""
        return count_batches(len(self), batch_size, world_size=world_size, drop_last=drop_last)


class TensorSplit(Split):
    """A split held in memory: images ``x`` and integer labels ``y``.

    Args:
        x: ``(N, C, H, W)`` uint8 in [0, 255], or float in [0, 1].
        y: ``(N,)`` integer class labels.
        mean: per-channel normalisation mean (on the [0, 1] scale).
        std: per-channel normalisation standard deviation.
        augment: the training augmentation, applied when ``batches(augment=True)``.
    """

    def __init__(self, x: Tensor, y: Tensor, *, mean: Sequence[float], std: Sequence[float],
                 augment: Augment = Augment()) -> None:
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
            raise DataError(f"TensorSplit needs x (N, C, H, W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        if len(mean) != x.shape[1] or len(std) != x.shape[1]:
            raise DataError(f"mean/std need {x.shape[1]} channel values, got {len(mean)} and {len(std)}")
        self.x = x
        self.y = y.to(torch.int64)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment

    def __repr__(self) -> str:
        return f"TensorSplit(n={len(self)}, shape={tuple(self.x.shape[1:])}, dtype={self.x.dtype})"

    def subset(self, index: Tensor | Sequence[int]) -> "TensorSplit":
        """The samples at ``index`` (a new split sharing mean, std and augmentation)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorSplit(self.x[index], self.y[index], mean=self.mean, std=self.std, augment=self.augment)

    def to(self, device: torch.device | str) -> "TensorSplit":
        """The same split with its tensors on ``device``; batches then come out there.

        Random draws stay on the CPU generator, so batches are identical on any device.
        """
        return TensorSplit(self.x.to(device), self.y.to(device), mean=self.mean, std=self.std,
                           augment=self.augment)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                augment: bool = False, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate over one epoch.

        Args:
            batch_size: global batch size (over all ranks).
            shuffle: random order (a function of ``seed`` and ``epoch`` only).
            seed: seed of order and augmentation.
            epoch: epoch number.
            augment: apply the split's augmentation (no-op when it has none).
            rank: this process's data-parallel rank.
            world_size: number of ranks; must divide ``batch_size``.
            drop_last: drop the last, partial global batch.
        Yields:
            ``(x, y)``: normalised float32 images ``(b, C, H, W)`` and int64 labels ``(b,)``,
            ``b = batch_size // world_size`` except maybe in the last batch.
        """
        plan = plan_epoch(len(self), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                          world_size=world_size, drop_last=drop_last)
        use_aug = augment and self.augment.active
        for idx, part in zip(plan.batches, plan.slices):
            if use_aug:
                # Drawn for the whole global batch, so every rank sees the same parameters.
                offsets, flips = _draw_augment(self.augment, plan.generator, len(idx))
            local = idx[part].to(self.x.device)  # (b,)
            xb = self.x[local]  # (b, C, H, W)
            if use_aug:
                xb = apply_augment(xb, self.augment.crop_pad,
                                   None if offsets is None else offsets[:, part],
                                   None if flips is None else flips[part])
            yield _normalize(xb, self.mean, self.std), self.y[local]


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> uint8 ``(3, S, S)``: shorter side resized to ``S``, then centre-cropped."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image
        from torchvision.transforms import functional as TF

        path, label = self.samples[i]
        with Image.open(path) as im:
            img = im.convert("RGB")
        if img.size != (self.image_size, self.image_size):
            img = TF.center_crop(TF.resize(img, self.image_size), self.image_size)
        return TF.pil_to_tensor(img), label  # (3, S, S) uint8


class ImageFolderSplit(Split):
    """A split of image files, decoded by a ``DataLoader``; same ``batches`` contract as ``TensorSplit``.

    The plan (order, rank slices, augmentation parameters) is drawn in the main
    process, and augmentation runs on whole decoded batches there, so batches
    do not depend on the number of workers.

    Args:
        samples: ``(path, label)`` pairs.
        image_size: side ``S`` of the square images produced.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        augment: the training augmentation.
        num_workers: decoding processes of the ``DataLoader`` (0 = in this process).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], augment: Augment = Augment(), num_workers: int = 0) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self.num_workers = num_workers
        self.y = torch.tensor([label for _, label in self.samples], dtype=torch.int64)  # (N,)

    def __repr__(self) -> str:
        return f"ImageFolderSplit(n={len(self)}, image_size={self.image_size})"

    def subset(self, index: Tensor | Sequence[int]) -> "ImageFolderSplit":
        """The samples at ``index`` (a new split with the same settings)."""
        index = torch.as_tensor(index, dtype=torch.long).tolist()
        return ImageFolderSplit([self.samples[i] for i in index], image_size=self.image_size, mean=self.mean,
                                std=self.std, augment=self.augment, num_workers=self.num_workers)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                augment: bool = False, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate over one epoch; arguments and yields as ``TensorSplit.batches``."""
        plan = plan_epoch(len(self), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                          world_size=world_size, drop_last=drop_last)
        if not plan.batches:
            return
        loader = torch.utils.data.DataLoader(
            _ImageFiles(self.samples, self.image_size),
            batch_sampler=[idx[part].tolist() for idx, part in zip(plan.batches, plan.slices)],
            num_workers=self.num_workers)
        use_aug = augment and self.augment.active
        for (xb, yb), idx, part in zip(loader, plan.batches, plan.slices):
            if use_aug:
                offsets, flips = _draw_augment(self.augment, plan.generator, len(idx))
                xb = apply_augment(xb, self.augment.crop_pad,
                                   None if offsets is None else offsets[:, part],
                                   None if flips is None else flips[part])
            yield _normalize(xb, self.mean, self.std), yb.to(torch.int64)


@dataclass
class Splits:
    """A dataset cut into train / validation / test splits."""

    name: str                # the name it was loaded by
    train: Any               # TensorSplit, ImageFolderSplit or a text split: has batches() and labels
    val: Any                 # stratified share of the official training set, disjoint from train
    test: Any                # the official test set (final numbers only)
    num_classes: int
    in_chans: int | None     # image channels; None for text
    image_size: int | None   # image side in pixels; None for text


# --------------------------------------------------------------------------- splitting


def stratified_split(labels: Tensor | Sequence[int], val_fraction: float, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Seeded split of sample indices into train and validation, stratified by class.

    Class ``c`` with ``n_c`` samples gives ``floor`` or ``ceil`` of
    ``val_fraction * n_c`` samples to validation (largest remainders get the
    ceiling), so that the validation set has ``round(val_fraction * N)``
    samples (at least 1 when ``val_fraction > 0``).

    Args:
        labels: ``(N,)`` integer labels.
        val_fraction: share of samples for validation, in [0, 1).
        seed: seed of which samples of each class are held out.
    Returns:
        ``(train_idx, val_idx)``: disjoint, ascending int64 index tensors covering ``range(N)``.
    Raises:
        DataError: if ``val_fraction`` is outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)  # (N,)
    n = len(y)
    if n == 0 or val_fraction == 0.0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    classes, counts = torch.unique(y, return_counts=True)  # (K,), (K,)
    want = val_fraction * counts.double()  # (K,)
    take = want.floor().long()  # (K,)
    total = min(max(1, round(val_fraction * n)), n - 1) if n > 1 else 0
    extra = total - int(take.sum())
    if extra > 0:
        by_remainder = torch.sort(want - take, descending=True, stable=True).indices  # (K,)
        take[by_remainder[:extra]] += 1
    g = _generator(seed, 0, _STREAM_SPLIT)
    perm = torch.randperm(n, generator=g)  # (N,)
    grouped = perm[torch.sort(y[perm], stable=True).indices]  # (N,) class by class, random within a class
    cls = torch.searchsorted(classes, y[grouped])  # (N,) class index of each grouped sample
    starts = torch.cumsum(counts, 0) - counts  # (K,)
    pos = torch.arange(n) - starts[cls]  # (N,) position within its class
    held = pos < take[cls]  # (N,)
    return grouped[~held].sort().values, grouped[held].sort().values


def _first(n_total: int, train_size: int | None, name: str) -> int:
    if train_size is None:
        return n_total
    if train_size > n_total:
        raise DataError(f"train_size={train_size} exceeds the {n_total} training samples of {name}")
    return train_size


def _tensor_splits(name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                   num_classes: int, mean: Sequence[float], std: Sequence[float], augment: Augment,
                   val_fraction: float, seed: int, train_size: int | None) -> Splits:
    n = _first(len(y_train), train_size, name)
    x_train, y_train = x_train[:n], y_train[:n]
    tr, va = stratified_split(y_train, val_fraction, seed=seed)

    def make(x: Tensor, y: Tensor) -> TensorSplit:
        return TensorSplit(x, y, mean=mean, std=std, augment=augment)

    return Splits(name=name, train=make(x_train[tr], y_train[tr]), val=make(x_train[va], y_train[va]),
                  test=make(x_test, y_test), num_classes=num_classes, in_chans=x_train.shape[1],
                  image_size=x_train.shape[-1])


# --------------------------------------------------------------------------- finding and reading files


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "earlyexit" / "data"


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for datasets, in order.

    Args:
        data_dir: a folder searched first (the CLI's ``--data-dir``).
    Returns:
        ``data_dir``, ``$EARLYEXIT_DATA``, ``SYSTEM_ROOTS`` and the user cache folder, without repeats.
    """
    roots = [data_dir, os.environ.get("EARLYEXIT_DATA") or None, *SYSTEM_ROOTS, _cache_root()]
    out: list[Path] = []
    for r in roots:
        if r is not None and Path(r).expanduser() not in out:
            out.append(Path(r).expanduser())
    return out


def _download_root(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir or os.environ.get("EARLYEXIT_DATA") or _cache_root()).expanduser()


def _candidates(roots: Sequence[Path], folders: Sequence[str]) -> list[Path]:
    """Folders a dataset may live in: ``root/<folder>`` for each root, and a root that is itself such a folder."""
    out: list[Path] = []
    for r in roots:
        for f in folders:
            for d in (r / f, r) if r.name == f else (r / f,):
                if d not in out:
                    out.append(d)
    return out


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _download(fn: Callable[[], Any]) -> str | None:
    """Run a torchvision download; return None on success or a one-line reason on failure.

    torchvision prints progress and retries mirrors: its output is captured, and a
    socket timeout keeps an unreachable network from hanging the call.
    """
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            fn()
    except Exception as e:  # any failure (network, checksum, disk) becomes the reason in a DataError
        return _one_line(e)
    finally:
        socket.setdefaulttimeout(old)
    return None


def _not_found(name: str, looked: Sequence[Path], download: bool, reason: str | None, how: str) -> DataError:
    if reason:
        tried = f"download failed ({reason})"
    else:
        tried = "download gave no files" if download else "download disabled"
    return DataError(f"{name}: data not found; looked in {', '.join(str(p) for p in looked)}; {tried}; {how}")


def _locate(name: str, folders: Sequence[str], files: Sequence[str], *, data_dir: Any, download: bool,
            fetch: Callable[[Path], None], how: str, any_suffix: Sequence[str] = ("",)) -> Path:
    """Find the folder holding all ``files`` (each with any of ``any_suffix``), downloading if allowed."""

    def complete(d: Path) -> bool:
        return all(any((d / (f + s)).is_file() for s in any_suffix) for f in files)

    looked = _candidates(data_roots(data_dir), folders)
    for d in looked:
        if complete(d):
            return d
    reason = None
    if download:
        target = _download_root(data_dir)
        reason = _download(lambda: fetch(target))
        if reason is None:
            for d in _candidates([target], folders):
                if complete(d):
                    return d
    raise _not_found(name, looked, download, reason, how)


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
    except OSError as e:
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


def _read_mnist_folder(d: Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xtr, ytr, xte, yte = (read_idx(_idx_file(d, s)) for s in _MNIST_FILES)
    if xtr.ndim != 3 or len(xtr) != len(ytr) or xte.ndim != 3 or len(xte) != len(yte):
        raise DataError(f"{d}: image and label files do not match")
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))[:, None]  # (N, 1, H, W)
    as_y = lambda a: torch.from_numpy(a.astype(np.int64))  # (N,)
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte)


def _mnist_like(name: str, *, folders: Sequence[str], tv_class: str, package: str | None, mean: float, std: float,
                data_dir: Any, val_fraction: float, seed: int, train_size: int | None, download: bool) -> Splits:
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
    return _tensor_splits(name, xtr, ytr, xte, yte, num_classes=10, mean=(mean,), std=(std,), augment=Augment(),
                          val_fraction=val_fraction, seed=seed, train_size=train_size)


def _load_fashion_mnist(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                        train_size: int | None = None, download: bool = True) -> Splits:
    # Mean and standard deviation of the 60000 training images.
    return _mnist_like("fashion-mnist", folders=("fashion-mnist", "FashionMNIST/raw"), tv_class="FashionMNIST",
                       package="dataset-fashion-mnist", mean=0.2860, std=0.3530, data_dir=data_dir,
                       val_fraction=val_fraction, seed=seed, train_size=train_size, download=download)


def _load_mnist(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                train_size: int | None = None, download: bool = True) -> Splits:
    return _mnist_like("mnist", folders=("mnist", "MNIST/raw"), tv_class="MNIST", package=None,
                       mean=0.1307, std=0.3081, data_dir=data_dir, val_fraction=val_fraction, seed=seed,
                       train_size=train_size, download=download)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # The official CIFAR files are Python 2 pickles of plain arrays and lists.
            d = pickle.load(f, encoding="latin1")
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)  # rows are R, G, B planes of 32x32
        y = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
        raise DataError(f"{path} is not a CIFAR batch file: {_one_line(e)}") from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _cifar(name: str, *, folder: str, train_files: Sequence[str], test_file: str, label_key: str,
           num_classes: int, tv_class: str, mean: Sequence[float], std: Sequence[float], data_dir: Any,
           val_fraction: float, seed: int, train_size: int | None, download: bool) -> Splits:
    def fetch(root: Path) -> None:
        import torchvision

        getattr(torchvision.datasets, tv_class)(str(root), train=True, download=True)

    how = f"put the official python version ({folder}/) in DIR and pass --data-dir DIR (or set EARLYEXIT_DATA=DIR)"
    d = _locate(name, (folder,), (*train_files, test_file), data_dir=data_dir, download=download, fetch=fetch,
                how=how)
    parts = [_read_cifar_batch(d / f, label_key) for f in train_files]
    xte, yte = _read_cifar_batch(d / test_file, label_key)
    xtr = np.concatenate([p[0] for p in parts])
    ytr = np.concatenate([p[1] for p in parts])
    if ytr.min(initial=0) < 0 or max(ytr.max(initial=0), yte.max(initial=0)) >= num_classes:
        raise DataError(f"{d}: labels outside 0..{num_classes - 1}")
    t = torch.from_numpy
    return _tensor_splits(name, t(xtr), t(ytr), t(xte), t(yte), num_classes=num_classes, mean=mean, std=std,
                          augment=Augment(crop_pad=4, flip=True), val_fraction=val_fraction, seed=seed,
                          train_size=train_size)


def _load_cifar10(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                  train_size: int | None = None, download: bool = True) -> Splits:
    return _cifar("cifar10", folder="cifar-10-batches-py", train_files=[f"data_batch_{i}" for i in range(1, 6)],
                  test_file="test_batch", label_key="labels", num_classes=10, tv_class="CIFAR10",
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), data_dir=data_dir,
                  val_fraction=val_fraction, seed=seed, train_size=train_size, download=download)


def _load_cifar100(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                   train_size: int | None = None, download: bool = True) -> Splits:
    return _cifar("cifar100", folder="cifar-100-python", train_files=["train"], test_file="test",
                  label_key="fine_labels", num_classes=100, tv_class="CIFAR100",
                  mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), data_dir=data_dir,
                  val_fraction=val_fraction, seed=seed, train_size=train_size, download=download)


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


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    loader: Callable[..., Splits]
    arg: str | None  # what follows "name:" (e.g. "PATH"); None when the name takes no argument


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(name: str, loader_fn: Callable[..., Splits], *, arg: str | None = None,
                     replace: bool = False) -> None:
    """Make a dataset loadable by name.

    ``loader_fn`` is called with the keywords ``data_dir``, ``val_fraction``,
    ``seed``, ``train_size``, ``download``, the extra options given to
    ``load_dataset``, and ``arg`` (the text after ``name:``) when ``arg`` is set.
    It returns a ``Splits`` whose splits offer ``batches(...)`` and ``labels``
    like ``TensorSplit``; ``stratified_split``, ``plan_epoch`` and ``data_roots``
    are there to share.

    Args:
        name: the dataset's name (case-insensitive).
        loader_fn: the loader.
        arg: placeholder shown by ``list_datasets`` when the name takes an
            argument, as in ``imagefolder:PATH``; None when it takes none.
        replace: allow replacing a registered dataset of the same name.
    Raises:
        ValueError: if ``name`` is registered already (and ``replace`` is False) or malformed.
    """
    key = name.strip().lower()
    if not key or ":" in key:
        raise ValueError(f"bad dataset name {name!r}: must be non-empty and contain no ':'")
    if key in _REGISTRY and not replace and _REGISTRY[key].loader is not loader_fn:
        raise ValueError(f"dataset {key!r} is registered already")
    _REGISTRY[key] = _Entry(loader_fn, arg)


def _ensure_registered() -> None:
    """Import ``earlyexit.textdata`` so that its datasets register themselves.

    Imported here rather than at the top because ``textdata`` itself imports this module.
    """
    from . import textdata  # noqa: F401


def list_datasets() -> list[str]:
    """Names ``load_dataset`` accepts, e.g. ``["cifar10", ..., "imagefolder:PATH", ...]``."""
    _ensure_registered()
    return sorted(k if e.arg is None else f"{k}:{e.arg}" for k, e in _REGISTRY.items())


def load_dataset(name: str = "fashion-mnist", *, data_dir: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None, download: bool = True,
                 **options: Any) -> Splits:
    """Load a dataset by name into train / validation / test splits.

    Args:
        name: a name from ``list_datasets()``; ``imagefolder:PATH`` for class folders under ``PATH``.
        data_dir: folder searched first for the files (then ``$EARLYEXIT_DATA``,
            the system dataset folders, the user cache).
        val_fraction: stratified share of the (possibly truncated) training set held out for validation.
        seed: seed of the validation split.
        train_size: use only the first ``train_size`` samples of the official training set
            (for image folders, in class-interleaved order, so any prefix is balanced).
        download: let torchvision download the files when none are found locally.
        **options: dataset-specific options, e.g. ``image_size`` and ``num_workers`` for
            ``imagefolder``; ``image_size``, ``in_chans``, ``num_classes``, ``train_samples``,
            ``test_samples`` for ``synthetic``.
    Returns:
        A ``Splits``.
    Raises:
        DataError: unknown name or option, bad arguments, or data neither found nor downloadable.
    """
    _ensure_registered()
    key, sep, arg = name.partition(":")
    key = key.strip().lower()
    entry = _REGISTRY.get(key)
    if entry is None:
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(list_datasets())}")
    if entry.arg is None and sep:
        raise DataError(f"dataset {key!r} takes no ':' argument, got {name!r}")
    if entry.arg is not None and not arg:
        raise DataError(f"dataset {key!r} needs an argument: {key}:{entry.arg}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if train_size is not None and train_size < 1:
        raise DataError(f"train_size must be >= 1, got {train_size}")
    kwargs = dict(data_dir=data_dir, val_fraction=val_fraction, seed=seed, train_size=train_size,
                  download=download, **options)
    if entry.arg is not None:
        kwargs["arg"] = arg
    params = inspect.signature(entry.loader).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(o for o in options if o not in params)
    if unknown and not takes_any:
        own = [p for p in params if p not in ("data_dir", "val_fraction", "seed", "train_size", "download", "arg")]
        raise DataError(f"dataset {key!r} does not take option(s) {', '.join(unknown)}; "
                        f"its options: {', '.join(own) or 'none'}")
    return entry.loader(**kwargs)


register_dataset("fashion-mnist", _load_fashion_mnist)
register_dataset("mnist", _load_mnist)
register_dataset("cifar10", _load_cifar10)
register_dataset("cifar100", _load_cifar100)
register_dataset("imagefolder", _load_imagefolder, arg="PATH")
register_dataset("synthetic", _load_synthetic)
