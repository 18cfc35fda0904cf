"""Vision Transformers (ViT) with internal classifiers.

Follows "Joint or Disjoint: Mixing Training Regimes for Early-Exit Models",
whose ViT experiments use a small ViT trained from scratch on CIFAR and
ImageNet ViTs (Dosovitskiy et al., ICLR 2021) in torchvision's layout.

The model is a pre-norm ViT: a patch embedding (strided convolution), a
class token and a learned position embedding form the stem; every encoder
block (``x + attn(LN(x))``, then ``x + MLP(LN(x))``) is one stage; the
backbone's own classifier is the final LayerNorm and a linear layer on the
class token. Attention uses ``scaled_dot_product_attention`` with packed
query/key/value projections. Submodules carry torchvision's names
(``conv_proj``, ``class_token``, ``pos_embedding``, ``ln_1``,
``self_attention.in_proj_weight``, ``mlp.0``, ``mlp.3``, ``ln``, ``head``), so
``load_torchvision_vit`` only renames prefixes.

Registered sizes:

- ``vit``: the small CIFAR model (32x32 input, patch 4, width 256, 7 blocks,
  8 heads, MLP width 512: ratio 2, a usual choice for small CIFAR ViTs;
  ``mlp_ratio=`` changes it). Default ICs after blocks 2 to 6
  (1-based), i.e. stage indices 1..5; block 7 ends with the final head.
- ``vit_t16`` / ``vit_s16`` / ``vit_b16``: ViT-Ti/16, ViT-S/16, ViT-B/16
  (widths 192 / 384 / 768, 12 blocks, 3 / 6 / 12 heads, MLP ratio 4; 224x224
  input). Default ICs after every block except the last (stage indices 0..10).

IC heads (``head=``) read the token sequence ``(B, T, D)``: ``"token"`` is
LayerNorm + linear on the class token (``head_pool="mean"`` averages the
patch tokens instead); ``"mlp1024"``, ``"mlp2048"``, ``"mlp1024x1024"``, ...
insert one or more GELU hidden layers of those widths (the IC-size study);
``head_hidden=(...)`` gives the hidden widths directly.

Every size reads torchvision ``VisionTransformer`` checkpoints through
``build_model(..., weights=FILE)`` / ``--weights`` (its ``foreign_weights`` adapter, ``torchvision_weights``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import check_fields, resolve_ic_after
from .multiexit import MultiExitModel
from .registry import register_model

_LN_EPS = 1e-6  # torchvision's (and the original ViT's) LayerNorm epsilon


# --- backbone ----------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Patchify convolution, class token and learned position embedding (the stem).

    Args:
        in_chans: input channels.
        width: hidden size ``D``.
        image_size: side of the (square) input image.
        patch_size: side of a patch; must divide ``image_size``.
        dropout: dropout after adding the position embedding.
    """

    def __init__(self, in_chans: int, width: int, image_size: int, patch_size: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.num_tokens = self.grid * self.grid + 1  # patches and the class token
        self.conv_proj = nn.Conv2d(in_chans, width, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            raise ValueError(f"ViT expects (B, C, {self.image_size}, {self.image_size}) images, got {tuple(x.shape)}")
        x = self.conv_proj(x)  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D), patches in row-major order
        cls = self.class_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding  # (B, T, D)
        return self.dropout(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    Parameters are laid out as in ``nn.MultiheadAttention`` (one packed
    ``in_proj_weight`` of shape ``(3D, D)`` holding the query, key and value
    projections, then ``out_proj``), so torchvision weights load unchanged.
    """

    def __init__(self, width: int, num_heads: int, *, attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3D)
        q, k, v = qkv.view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, T, D/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (torchvision names)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dropout: float = 0.0, attention_dropout: float = 0.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=_LN_EPS)
        self.self_attention = SelfAttention(width, num_heads, attention_dropout=attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width, eps=_LN_EPS)
        # indices 0 and 3 hold the linear layers, as in torchvision's MLPBlock
        self.mlp = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, width), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.self_attention(self.ln_1(x)))  # (B, T, D)
        return x + self.mlp(self.ln_2(x))  # (B, T, D)


# --- heads -------------------------------------------------------------------

class TokenHead(nn.Module):
    """Classifier on a token sequence ``(B, T, D)``: pool, LayerNorm, optional GELU MLP, linear.

    With ``pool="token"`` and no hidden layers this is the ViT classifier
    (torchvision's ``encoder.ln`` + ``heads.head``, here ``ln`` + ``head``);
    LayerNorm acts per token, so normalising the pooled class token equals
    normalising every token and then taking the class token.

    Args:
        num_chs: hidden size ``D`` of the tokens.
        num_classes: number of logits.
        pool: ``"token"`` (the class token, index 0) or ``"mean"`` (mean of
            the patch tokens, class token excluded).
        hidden: widths of hidden ``Linear + GELU`` layers between the
            LayerNorm and the output layer (``()``: a linear head).
    """

    def __init__(self, num_chs: int, num_classes: int, *, pool: str = "token", hidden: Sequence[int] = ()) -> None:
        super().__init__()
        if pool not in ("token", "mean"):
            raise ValueError(f"unknown token pooling {pool!r}; valid: token, mean")
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden layer widths must be positive, got {hidden}")
        self.pool = pool
        self.ln = nn.LayerNorm(num_chs, eps=_LN_EPS)
        layers: list[nn.Module] = []
        d = num_chs
        for h in hidden:
            layers += [nn.Linear(d, h), nn.GELU()]
            d = h
        self.mlp = nn.Sequential(*layers)  # empty (no parameters) for a linear head
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = x[:, 0] if self.pool == "token" else x[:, 1:].mean(dim=1)  # (B, D)
        return self.head(self.mlp(self.ln(z)))  # (B, num_classes)


def parse_head(head: str | Sequence[int]) -> tuple[int, ...]:
    """Hidden widths of an IC head design.

    Args:
        head: ``"token"`` (a linear head), ``"mlpH"`` or ``"mlpH1xH2..."``
            (GELU hidden layers of widths ``H1, H2, ...``), or the widths.
    Returns:
        The hidden widths, ``()`` for a linear head.
    """
    if not isinstance(head, str):
        return tuple(int(h) for h in head)
    s = head.strip().lower()
    if s in ("token", "linear"):
        return ()
    m = re.fullmatch(r"mlp(\d+(?:x\d+)*)", s)
    if m is None:
        raise ValueError(f"unknown ViT head {head!r}; valid: token, mlpH or mlpH1xH2 (e.g. mlp1024, mlp1024x1024)")
    return tuple(int(h) for h in m.group(1).split("x"))


# --- builder -----------------------------------------------------------------

def _init_weights(model: MultiExitModel) -> None:
    """torchvision's ViT initialisation, except that classifiers get small random weights.

    torchvision zeroes the final classifier; here every head (ICs and the
    final one) starts at truncated normal weights (std 0.02) so that the exits
    differ from the first step.
    """
    stem = model.stem
    fan_in = stem.conv_proj.in_channels * stem.conv_proj.kernel_size[0] * stem.conv_proj.kernel_size[1]
    nn.init.trunc_normal_(stem.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(stem.conv_proj.bias)
    nn.init.normal_(stem.pos_embedding, std=0.02)
    nn.init.zeros_(stem.class_token)
    for block in model.stages:
        nn.init.xavier_uniform_(block.self_attention.in_proj_weight)
        nn.init.zeros_(block.self_attention.in_proj_bias)
        nn.init.zeros_(block.self_attention.out_proj.bias)
        for m in block.mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
    for head in model.heads:
        for m in head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)


def vision_transformer(
    *,
    num_classes: int,
    in_chans: int = 3,
    ic_after: Any = None,
    image_size: int = 32,
    patch_size: int = 4,
    width: int = 256,
    depth: int = 7,
    num_heads: int = 8,
    mlp_ratio: float = 2.0,
    mlp_dim: int | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
    head: str | Sequence[int] = "token",
    head_hidden: Sequence[int] | None = None,
    head_pool: str = "token",
    first_exit: int = 1,
) -> MultiExitModel:
    """Build a ViT with IC heads (see the module docstring).

    Args:
        num_classes: classes of every exit.
        in_chans: input channels.
        ic_after: IC placement (``earlyexit.models`` docstring); default: after
            every block from ``first_exit`` to the second-to-last.
        image_size: side of the square input.
        patch_size: side of a patch (divides ``image_size``).
        width: hidden size ``D`` (divisible by ``num_heads``).
        depth: number of encoder blocks (= stages).
        num_heads: attention heads.
        mlp_ratio: MLP width as a multiple of ``width`` (ignored if ``mlp_dim``).
        mlp_dim: MLP width.
        dropout: dropout after the position embedding, attention and MLP.
        attention_dropout: dropout on the attention weights.
        head: IC head design, ``"token"`` or ``"mlpH[xH...]"`` (``parse_head``).
        head_hidden: hidden widths of the IC heads (instead of ``head``).
        head_pool: pooling of the IC heads, ``"token"`` or ``"mean"``; the
            final head always reads the class token.
        first_exit: first stage index with an IC in the default placement.
    Returns:
        A ``MultiExitModel`` whose states are token sequences ``(B, T, D)``.
    """
    if image_size < 1 or patch_size < 1 or image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of patch_size ({patch_size})")
    if width < 1 or num_heads < 1 or width % num_heads:
        raise ValueError(f"width ({width}) must be a positive multiple of num_heads ({num_heads})")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if head_hidden is not None and not (isinstance(head, str) and parse_head(head) == ()):
        raise ValueError("give either head or head_hidden, not both")
    hidden = tuple(int(h) for h in head_hidden) if head_hidden is not None else parse_head(head)
    mlp_dim = int(mlp_dim) if mlp_dim is not None else int(round(width * mlp_ratio))

    stem = PatchEmbedding(in_chans, width, image_size, patch_size, dropout=dropout)
    blocks = [EncoderBlock(width, num_heads, mlp_dim, dropout=dropout, attention_dropout=attention_dropout) for _ in range(depth)]
    info = [{"num_chs": width, "size": None, "num_tokens": stem.num_tokens, "reduction": patch_size,
             "module": f"encoder.layers.encoder_layer_{i}"} for i in range(depth)]
    final = TokenHead(width, num_classes)
    input_shape = (in_chans, image_size, image_size)
    chosen = resolve_ic_after(ic_after, stem, blocks, final, (1, *input_shape), default=list(range(first_exit, depth - 1)))
    model = MultiExitModel(stem=stem, stages=blocks, head=final, ic_after=chosen,
                           make_head=lambda fi, c: TokenHead(fi["num_chs"], c, pool=head_pool, hidden=hidden),
                           feature_info=info, num_classes=num_classes, input_shape=input_shape)
    _init_weights(model)
    return model


# --- torchvision weights ------------------------------------------------------

_BLOCK_KEYS = ("ln_1.weight", "ln_1.bias", "self_attention.in_proj_weight", "self_attention.in_proj_bias",
               "self_attention.out_proj.weight", "self_attention.out_proj.bias", "ln_2.weight", "ln_2.bias",
               "mlp.0.weight", "mlp.0.bias", "mlp.3.weight", "mlp.3.bias")
# names of torchvision's MLP linear layers in checkpoints saved before it adopted ops.MLP
_LEGACY_MLP = {"mlp.linear_1.": "mlp.0.", "mlp.linear_2.": "mlp.3."}


def _check_vit(model: MultiExitModel) -> None:
    if not isinstance(model.stem, PatchEmbedding):
        raise TypeError(f"expected a ViT built by earlyexit.models.vit, got a model with stem {type(model.stem).__name__}")


def torchvision_vit_key_map(model: MultiExitModel) -> dict[str, str]:
    """Explicit map from torchvision ``VisionTransformer`` keys to this model's keys.

    Args:
        model: a ViT from this module.
    Returns:
        ``{torchvision key: our key}`` for the stem, every encoder block and
        the final head (``encoder.ln`` and ``heads.head``).
    """
    _check_vit(model)
    last = f"heads.{model.num_exits - 1}."
    kmap = {
        "conv_proj.weight": "stem.conv_proj.weight",
        "conv_proj.bias": "stem.conv_proj.bias",
        "class_token": "stem.class_token",
        "encoder.pos_embedding": "stem.pos_embedding",
        "encoder.ln.weight": last + "ln.weight",
        "encoder.ln.bias": last + "ln.bias",
        "heads.head.weight": last + "head.weight",
        "heads.head.bias": last + "head.bias",
    }
    for i in range(len(model.stages)):
        for k in _BLOCK_KEYS:
            kmap[f"encoder.layers.encoder_layer_{i}.{k}"] = f"stages.{i}.{k}"
    return kmap


def interpolate_pos_embedding(pos: Tensor, grid: int) -> Tensor:
    """Resample a ViT position embedding to a ``grid`` x ``grid`` patch grid.

    The class token's embedding is kept; the patch embeddings are resized
    bicubically on their square grid (corners aligned, as torchvision's
    ``interpolate_embeddings``), so resizing to the same grid is the identity.

    Args:
        pos: ``(1, 1 + g*g, D)`` position embedding.
        grid: side of the new patch grid.
    Returns:
        ``(1, 1 + grid*grid, D)``.
    """
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected a (1, T, D) position embedding, got {tuple(pos.shape)}")
    _, T, D = pos.shape
    g = math.isqrt(T - 1)
    if g * g != T - 1:
        raise ValueError(f"position embedding has {T - 1} patch positions, not a square grid")
    cls, patches = pos[:, :1], pos[:, 1:]  # (1, 1, D), (1, g*g, D)
    img = patches.transpose(1, 2).reshape(1, D, g, g)  # (1, D, g, g)
    img = F.interpolate(img.float(), size=(grid, grid), mode="bicubic", align_corners=True).to(pos.dtype)  # (1, D, grid, grid)
    return torch.cat([cls, img.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + grid*grid, D)


def convert_torchvision_vit_state_dict(model: MultiExitModel, sd: Mapping[str, Tensor], *,
                                       load_head: bool = True) -> dict[str, Tensor]:
    """Rename a torchvision ViT ``state_dict`` to this model's keys, resampling the position embedding.

    Args:
        model: a ViT from this module.
        sd: torchvision ``VisionTransformer`` state dict (``vit_b_16`` etc.).
        load_head: also convert the final linear layer (``heads.head``);
            ``False`` keeps ours (e.g. for another number of classes).
    Returns:
        A state dict in our names, shapes checked against ``model``.
    """
    kmap = torchvision_vit_key_map(model)
    ours = model.state_dict()
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", k))}
    if len(layers) != len(model.stages):
        raise ValueError(f"checkpoint has {len(layers)} encoder layers, the model {len(model.stages)}")
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        for old, new in _LEGACY_MLP.items():
            k = k.replace(old, new)
        if k not in kmap:
            raise KeyError(f"unexpected key in torchvision ViT checkpoint: {k}")
        if not load_head and k.startswith("heads.head."):
            continue
        ok = kmap[k]
        if ok == "stem.pos_embedding" and v.shape != ours[ok].shape and v.dim() == 3 and v.shape[-1] == ours[ok].shape[-1]:
            v = interpolate_pos_embedding(v, model.stem.grid)
        if v.shape != ours[ok].shape:
            raise ValueError(f"shape mismatch for {k} -> {ok}: checkpoint {tuple(v.shape)} vs model {tuple(ours[ok].shape)}")
        out[ok] = v
    needed = {v for k, v in kmap.items() if load_head or not k.startswith("heads.head.")}
    missing = needed - set(out)
    if missing:
        raise KeyError(f"checkpoint lacks backbone keys: {sorted(missing)[:5]}")
    return out


def load_torchvision_vit(model: MultiExitModel, sd: Mapping[str, Tensor], *, load_head: bool = True) -> MultiExitModel:
    """Load torchvision ViT weights into the backbone (IC heads keep their init).

    Strict for the backbone: every checkpoint key maps to one of ours with the
    same shape (the position embedding is resampled when the patch grid
    differs), and every backbone key is covered.

    Args:
        model: a ViT from this module.
        sd: torchvision ``VisionTransformer`` state dict.
        load_head: also load the final linear layer.
    Returns:
        ``model``, loaded in place.
    """
    model.load_state_dict(convert_torchvision_vit_state_dict(model, sd, load_head=load_head), strict=False)
    return model


def torchvision_weights(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The ``foreign_weights`` adapter: a torchvision ViT ``state_dict`` in our names, None for other files.

    The final linear layer is taken only when it has the model's number of classes; otherwise ours
    keeps its initialisation (e.g. ImageNet weights for a 10-class task).
    """
    if "conv_proj.weight" not in sd or "class_token" not in sd:
        return None
    same = sd.get("heads.head.weight", torch.empty(0)).shape[:1] == (model.num_classes,)
    return convert_torchvision_vit_state_dict(model, sd, load_head=same)


# --- config and registered sizes ---------------------------------------------------

@dataclass(frozen=True)
class ViTConfig:
    """A ViT's architecture (a registered size is an instance; ``--model-opt`` sets fields by name)."""

    image_size: int = 32            # side of the square input images (pixels), a multiple of patch_size
    patch_size: int = 4             # side of a patch (pixels)
    width: int = 256                # hidden size D, a multiple of num_heads
    depth: int = 7                  # encoder blocks (= stages)
    num_heads: int = 8              # attention heads
    mlp_ratio: float = 2.0          # MLP width as a multiple of width (unless mlp_dim)
    mlp_dim: int | None = None      # MLP width
    dropout: float = 0.0            # dropout after the position embedding, attention and MLP
    attention_dropout: float = 0.0  # dropout on the attention weights
    head: str | tuple[int, ...] = "token"  # IC head design: "token" or "mlpH[xH...]" (parse_head), or hidden widths
    head_hidden: tuple[int, ...] | None = None  # hidden widths of the IC heads (instead of head)
    head_pool: str = "token"        # pooling of the IC heads: "token" or "mean" (the final head reads the class token)
    first_exit: int = 1             # first block with an IC in the default placement

    def __post_init__(self) -> None:
        check_fields(self, sizes=("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim"),
                     nonnegative=("mlp_ratio", "dropout", "attention_dropout", "first_exit"))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of patch_size "
                             f"({self.patch_size})")
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.head_hidden is not None and not (isinstance(self.head, str) and parse_head(self.head) == ()):
            raise ValueError("give either head or head_hidden, not both")
        parse_head(self.head)
        if self.head_pool not in ("token", "mean"):
            raise ValueError(f"unknown token pooling {self.head_pool!r}; valid: token, mean")


def build_vit(cfg: ViTConfig, *, num_classes: int, in_chans: int = 3, ic_after: Any = None) -> MultiExitModel:
    """The ViT of ``cfg`` with IC heads (``vision_transformer``)."""
    return vision_transformer(num_classes=num_classes, in_chans=in_chans, ic_after=ic_after, **dataclasses.asdict(cfg))


MODELS = {
    "vit": ViTConfig(),  # the small CIFAR ViT of the paper's code
    "vit_t16": ViTConfig(image_size=224, patch_size=16, width=192, depth=12, num_heads=3, mlp_ratio=4.0, first_exit=0),
    "vit_s16": ViTConfig(image_size=224, patch_size=16, width=384, depth=12, num_heads=6, mlp_ratio=4.0, first_exit=0),
    "vit_b16": ViTConfig(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_ratio=4.0, first_exit=0),
}
for _name, _cfg in MODELS.items():
    register_model(_name, config=_cfg, tiny=dict(image_size=16 if _name == "vit" else 32),
                   foreign_weights=torchvision_weights, grad_clip=1.0)(build_vit)
