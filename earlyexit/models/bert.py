"""BERT encoder with internal classifiers.

The encoder follows BERT (Devlin et al., NAACL 2019) with Hugging Face
``BertModel`` submodule names (``word_embeddings``, ``attention.self.query``,
``intermediate.dense``, ``output.LayerNorm``, ...), so a ``BertModel``
checkpoint (``model.safetensors`` or ``pytorch_model.bin``) loads through an
explicit key map (``earlyexit.models.bert_weights``, which also resolves
weight folders and aliases). As a multi-exit model in the sense of "Joint or
Disjoint: Mixing Training Regimes for Early-Exit Models":

- the stem is the embedding layer; its output state is a dict
  ``{"hidden": (B, T, D), "mask": (B, T) bool}`` (True = real token);
- each encoder layer is one stage (state in, state out);
- every exit, IC or final, is ``BertForSequenceClassification``'s classifier:
  a pooler (dense + tanh on the ``[CLS]`` position), dropout and a linear
  layer. By default there is an IC after every encoder layer but the last.

Pretrained weights fill the embeddings, the encoder layers and the final
head's pooler; the IC poolers start from the same pooler weights (a
pretrained starting point for every exit rather than a random projection),
while all classifiers (``classifier``) start at random. The weights also
decide the text vocabulary: the registered models' ``data_options`` hand a
text dataset the ``vocab.txt`` beside them.

Exit costs (``earlyexit.metrics.exit_costs(model, model.example_input())``)
are FLOPs per sequence of ``cost_seq_len`` tokens, 64 by default (a typical
sentence-classification length; attention grows with the square of it); the
builder's ``cost_seq_len`` changes it.

The WordPiece tokenizer is ``earlyexit.data.wordpiece``. The vocabulary must
be the one the weights were trained with: ``vocab_for(weights)`` names it.

Problems with weight files (a missing folder, ``config.json``, checkpoint or
``vocab.txt``, unreadable files, keys or shapes that do not fit the model)
raise ``earlyexit.errors.CheckpointError`` with a one-line message.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import one_line, read_json_object
from .bert_weights import (load_hf_weights, read_checkpoint, resolve_weights, text_data_options,
                           weights_folder)
from .common import check_fields, resolve_ic_after
from .multiexit import MultiExitModel
from .registry import register_model


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
        d = read_json_object(p)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:  # wrong field types or unsupported settings in the file
            raise CheckpointError(f"{p}: {one_line(e)}") from None

    def replace(self, **overrides: Any) -> "BertConfig":
        """A copy with some fields changed; unknown field names raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown BERT config fields {bad}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **overrides)


_GELU_APPROX = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


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

    def gpf_state(self) -> tuple[nn.Module, int, type[nn.Module], float]:
        """How Global Past-Future reads this exit's state: a copy of the pretrained pooler (dense + tanh).

        Returns:
            ``(state head, state size D, activation of the imitators, init std of the slot projections)``.
        """
        return BertStateHead(copy.deepcopy(self.pooler)), self.pooler.dense.out_features, nn.Tanh, 0.02


class BertStateHead(nn.Module):
    """The ``[CLS]`` pooler of a BERT exit as GPF's state head: ``{"hidden", "mask"}`` -> ``(B, D)``."""

    def __init__(self, pooler: nn.Module) -> None:
        super().__init__()
        self.pooler = pooler

    def forward(self, state: dict) -> Tensor:
        return self.pooler(state["hidden"], state.get("mask"))  # (B, D)


class BertMultiExit(MultiExitModel):
    """A BERT encoder with exits; inputs are ``{"input_ids", "attention_mask"}`` dicts.

    FLOPs from ``exit_costs(model, model.example_input())`` are per sequence of
    ``cost_seq_len`` tokens (64 by default), since a transformer's cost depends
    on the sequence length.

    Args:
        cfg: encoder configuration.
        num_classes: classes of every exit.
        ic_after: IC placement (see ``earlyexit.models``); default: after every layer but the last.
        head_dropout: dropout before each classifier (default ``cfg.hidden_dropout_prob``).
        tokenizer_path: the ``vocab.txt`` that matches the embeddings (None: the default vocabulary).
        cost_seq_len: tokens per sequence of ``example_input`` by default, hence of the reported
            exit costs and of the ``"sdn"`` exit placement (capped at ``max_position_embeddings``).
        head_pool: what the IC poolers read: ``"cls"`` (the ``[CLS]`` state, as the final head) or
            ``"mean"`` (the mean of the real tokens).
    """

    def __init__(self, cfg: BertConfig, *, num_classes: int, ic_after: Any = None, head_dropout: float | None = None,
                 tokenizer_path: Path | None = None, cost_seq_len: int = 64, head_pool: str = "cls") -> None:
        if isinstance(cost_seq_len, bool) or not isinstance(cost_seq_len, int) or cost_seq_len < 1:
            raise ValueError(f"cost_seq_len must be a positive integer, got {cost_seq_len!r}")
        stem = BertEmbeddings(cfg)
        stages = [BertLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        p = cfg.hidden_dropout_prob if head_dropout is None else head_dropout
        final = BertHead(cfg.hidden_size, num_classes, dropout=p)  # the backbone's own head: [CLS], as pretrained
        info = [{"num_chs": cfg.hidden_size, "size": None, "module": f"encoder.layer.{i}"} for i in range(len(stages))]
        chosen = _resolve_bert_ic_after(ic_after, stem, stages, final, cfg, cost_seq_len)
        super().__init__(stem=stem, stages=stages, head=final, ic_after=chosen,
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


def _resolve_bert_ic_after(spec: Any, stem: nn.Module, stages: Sequence[nn.Module], head: nn.Module,
                        cfg: BertConfig, seq_len: int) -> list[int]:
    """Exit placement (``"sdn"`` measures stage costs on a batch of one ``seq_len``-token sequence)."""
    sdn = isinstance(spec, str) and spec.strip().lower() == "sdn"
    example = _example_batch(cfg, 1, seq_len, None) if sdn else None
    return resolve_ic_after(spec, stem, stages, head, example, default=list(range(len(stages) - 1)))


# --- builders ----------------------------------------------------------------

def bert(*, num_classes: int, in_chans: int | None = None, ic_after: Any = None, weights: str | Path | None = None,
         config: BertConfig | Mapping[str, Any] | str | Path | None = None, head_dropout: float | None = None,
         image_size: Any = None, cost_seq_len: int = 64, head_pool: str = "cls", **overrides: Any) -> BertMultiExit:
    """Build a multi-exit BERT, optionally with pretrained encoder weights.

    Args:
        num_classes: classes of every exit.
        in_chans: ignored (text input); accepted for the registry's uniform signature.
        ic_after: IC placement (default: after every encoder layer but the last).
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
        folder = weights_folder(path)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"no config.json beside the weights in {folder}; pass config=")
        cfg = BertConfig.from_json(folder)
    else:
        cfg = tiny_config()
    if overrides:
        cfg = cfg.replace(**overrides)
    vocab = None
    if path is not None:
        folder = weights_folder(path)
        vocab = folder / "vocab.txt" if (folder / "vocab.txt").is_file() else None
    model = BertMultiExit(cfg, num_classes=num_classes, ic_after=ic_after, head_dropout=head_dropout, tokenizer_path=vocab,
                          cost_seq_len=cost_seq_len, head_pool=head_pool)
    if path is not None:
        load_hf_weights(model, read_checkpoint(path))
    return model


# --- config and registered sizes ---------------------------------------------------

@dataclass(frozen=True)
class BertModelConfig:
    """A multi-exit BERT's build options (a registered size is an instance; ``--model-opt`` sets fields by name).

    The encoder's own architecture is a ``BertConfig`` (Hugging Face's ``config.json`` fields): ``config`` names
    it, ``encoder`` changes some of its fields.
    """

    weights: str | Path | None = None  # pretrained weights: a checkpoint folder or file, or an alias ("minilm-l6")
    config: BertConfig | dict | str | Path | None = None  # the encoder: "tiny" (tiny_config()), a BertConfig, a config.json
                                    # dict or its path; None: the weights' config.json, else tiny_config()
    encoder: dict = dataclasses.field(default_factory=dict)  # BertConfig fields to change, e.g. {"hidden_dropout_prob": 0}
    head_dropout: float | None = None  # dropout before every classifier (None: hidden_dropout_prob)
    cost_seq_len: int = 64          # tokens per sequence of example_input(): exit costs are FLOPs per sequence of this length
    head_pool: str = "cls"          # IC poolers on "cls" or on the "mean" of the real tokens

    def __post_init__(self) -> None:
        check_fields(self, sizes=("cost_seq_len",), nonnegative=("head_dropout",))
        if self.config == "tiny" and self.weights is not None:
            raise ValueError("bert_tiny takes no weights; use 'bert' with weights=...")
        if self.head_pool not in ("cls", "mean"):
            raise ValueError(f"unknown pooling {self.head_pool!r}; valid: cls, mean")


def build_bert(cfg: BertModelConfig, *, num_classes: int, in_chans: int | None = None,
               ic_after: Any = None) -> BertMultiExit:
    """The multi-exit BERT of ``cfg`` (``bert``)."""
    return bert(num_classes=num_classes, ic_after=ic_after, weights=cfg.weights,
                config=tiny_config() if cfg.config == "tiny" else cfg.config, head_dropout=cfg.head_dropout,
                cost_seq_len=cfg.cost_seq_len, head_pool=cfg.head_pool, **cfg.encoder)


MODELS = {
    "bert": BertModelConfig(),                 # random or pretrained (weights=), its size read from the weights
    "bert_tiny": BertModelConfig(config="tiny"),  # tiny_config() with random weights (2 layers, width 64)
}
for _name, _cfg in MODELS.items():
    register_model(_name, config=_cfg, input="text", tiny={}, weights_at_build=True,
                   data_options=text_data_options)(build_bert)
