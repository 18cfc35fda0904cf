"""Datasets by name -> train / validation / test splits, local files first.

Image classification data for training and comparing the regimes of "Joint
or Disjoint: Mixing Training Regimes for Early-Exit Models": (Fashion-)MNIST,
CIFAR-10/100, ImageNet-style class folders (Tiny ImageNet, Imagenette), a
tiny generated ``synthetic`` set for tests, and text classification data
(SST-2, Rotten Tomatoes, BBC News, 20 Newsgroups) for the BERT experiments.
``load_dataset(name)`` gives a ``Splits``; ``list_datasets()`` names them all;
``register_dataset`` adds one.

Splits: ``train`` and ``val`` come from the official training set (``val`` a
seeded, stratified share of it, disjoint from ``train``); ``test`` is the
official test set (for image folders: the ``val`` folder, the labelled held-out
set those datasets ship) and is meant for final numbers only.

Batches are made by indexing in-memory tensors. Order and augmentation depend
only on ``(seed, epoch)`` through a local ``torch.Generator``; under data
parallelism every rank draws the same plan for the global batch and keeps its
own contiguous slice, so the ranks together see exactly the single-process
batch.

Modules, one concern each:

- ``registry``: ``register_dataset``, ``list_datasets``, ``load_dataset``;
- ``sampling``: seeded generators and per-epoch batch plans (``plan_epoch``, ``count_batches``);
- ``augment``: batch-wise crop / flip augmentation and normalisation;
- ``splits``: ``Split``, ``TensorSplit``, ``ImageFolderSplit``, ``Splits``, ``stratified_split``;
- ``files``: where dataset files are looked for (``data_roots``) and downloads;
- ``vision``: the image datasets (and ``read_idx`` for MNIST's IDX files);
- ``text``: the text datasets and ``TextSplit``;
- ``wordpiece``: BERT's WordPiece tokenizer, which the text datasets tokenize with.

Importing this package imports ``vision`` and ``text``, whose datasets
register themselves, so the registry is full.
"""

from __future__ import annotations

from ..errors import DataError
from .augment import Augment, apply_augment
from .files import data_roots
from .registry import list_datasets, load_dataset, register_dataset
from .sampling import EpochPlan, count_batches, plan_epoch
from .splits import ImageFolderSplit, Split, Splits, TensorSplit, stratified_split
from .text import TextSplit, read_sst2_tsv, sst2_has_labels
from .vision import read_idx

__all__ = [
    "load_dataset", "list_datasets", "register_dataset", "Splits", "Split", "TensorSplit", "ImageFolderSplit",
    "TextSplit", "Augment", "apply_augment", "EpochPlan", "plan_epoch", "count_batches", "stratified_split",
    "data_roots", "read_idx", "read_sst2_tsv", "sst2_has_labels", "DataError",
]
