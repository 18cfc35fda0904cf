"""Split objects and the cut of a training set into train and validation.

``Split`` is what every split offers (size, labels, batches per epoch);
``TensorSplit`` holds images in memory, ``ImageFolderSplit`` decodes image
files with a ``DataLoader`` (text splits: ``earlyexit.data.text.TextSplit``).
``Splits`` bundles a dataset's train / validation / test splits.
``stratified_split`` holds out a seeded, class-stratified share of the
official training set for validation, disjoint from train.

Batches are made by indexing in-memory uint8 tensors, so a batch costs one
gather, one conversion and one affine normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import DataError
from .augment import Augment, _draw_augment, _normalize, apply_augment
from .sampling import _STREAM_SPLIT, _generator, count_batches, plan_epoch


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


def check_image_files(samples: Sequence[tuple[str, int]], *, threads: int = 8) -> None:
    """Check every image file when a folder dataset is loaded, so a damaged file fails now, not mid-training.

    Per file: the header parses as an image (PIL, which reads no pixel data), PIL's ``verify`` passes
    (for PNG it reads every chunk and checks its CRC, which catches a damaged deflate stream), and a
    JPEG ends with its end-of-image marker (a truncated file does not). Damage that only a full decode
    can see (JPEG has no checksum) is still reported, naming the file, when its batch is decoded.

    Raises:
        DataError: naming the first bad file (in sample order) and why.
    """
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as im:
                fmt = im.format
                im.verify()
            if fmt == "JPEG":
                with open(path, "rb") as f:
                    f.seek(-2, 2)
                    if f.read(2) != b"\xff\xd9":
                        return "truncated JPEG (no end-of-image marker)"
        except Exception as e:  # unreadable, truncated or not an image
            return " ".join(str(e).split())[:160] or type(e).__name__
        return None

    paths = [p for p, _ in samples]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for path, why in zip(paths, pool.map(check, paths)):
            if why is not None:
                raise DataError(f"{path}: cannot decode the image: {why}")


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
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # unreadable, truncated or not an image: one line naming the file
            raise DataError(f"{path}: cannot decode the image: {' '.join(str(e).split())[:160]}") from None
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
        for (xb, yb), idx, part in zip(_one_line_errors(loader), plan.batches, plan.slices):
            if use_aug:
                offsets, flips = _draw_augment(self.augment, plan.generator, len(idx))
                xb = apply_augment(xb, self.augment.crop_pad,
                                   None if offsets is None else offsets[:, part],
                                   None if flips is None else flips[part])
            yield _normalize(xb, self.mean, self.std), yb.to(torch.int64)


def _one_line_errors(loader: Any) -> Iterator[Any]:
    """A ``DataLoader``'s batches; a worker's ``DataError`` comes back as its own one-line message."""
    try:
        yield from loader
    except DataError as e:
        text = str(e)
        if "DataError: " in text:  # re-raised from a worker process with its traceback in the message
            text = text.rsplit("DataError: ", 1)[1]
        raise DataError(text.strip().splitlines()[0]) from None


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
