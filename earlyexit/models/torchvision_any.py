"""``torchvision:NAME``: early exits on any classifier of ``torchvision.models``.

``build_model("torchvision:NAME", num_classes=, ic_after=, weights=, image_size=)``
builds torchvision's model (``torchvision.models.get_model``, no weights
downloaded), loads ``weights``, traces it and cuts it into stages at its
natural blocks and IC nodes (``models.tvgraph``). The final exit is the model
itself: on the same weights its logits equal torchvision's. Options (the fields of
``TorchvisionConfig``, and ``ic_after``):

- ``weights``: a torchvision state-dict file (``.pth``, ``.safetensors``), or a
  member of the model's weights enum (``"IMAGENET1K_V1"``, ``"DEFAULT"``) that
  is already in torch's hub cache (nothing is downloaded). Keys and shapes must
  match, except the final classifier's when ``num_classes`` differs from the
  file's (it keeps its fresh initialisation, as fine-tuning does), a ViT's
  position embedding at another ``image_size`` (interpolated as torchvision
  does), and GoogLeNet's / Inception's auxiliary classifiers (not built);
- ``image_size``: the input side (ViT and MaxViT are built for it; the others
  adapt by their pooling); ``in_chans`` other than 3 replaces the first
  convolution (with weights: summed over RGB for one channel, else tiled);
- ``ic_after``: block indices, ``"every:N"``, ``"sdn"`` (the default), ``"none"``,
  ``"cost:0.25,0.5,0.75"`` or node names (``tvgraph.resolve_graph_ic_after``);
  ``python -m earlyexit models --nodes torchvision:NAME`` lists the blocks;
- ``head``: the head of convolutional ICs (``"sdn"``, ``"sdn_exact"``);
  ``token_pool``: what ICs on token sequences read (``"auto"``, ``"token"``, ``"mean"``).

``load_pretrained`` (``--weights``) also reads a torchvision state dict of the model (``foreign_weights``).

``from_module(module, input_shape=...)`` does the same for a user's own traceable
classifier (no registry name: it is trained and evaluated from Python).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError
from .common import check_fields
from .heads import conv_head
from .multiexit import MultiExitModel
from .registry import ModelSpec, register_family
from .tvgraph import cut_model, plan_graph, trace

PREFIX = "torchvision"
TINY_SIZE = {"inception_v3": 75, "maxvit_t": 224, "alexnet": 64}  # the smallest sides these run on; 32 for the others
_AUX = ("aux1.", "aux2.", "AuxLogits.")  # GoogLeNet / Inception auxiliary classifiers (not built here)


def torchvision_names() -> list[str]:
    """Every classification model of ``torchvision.models``."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _check_name(name: str) -> None:
    if name not in torchvision_names():
        raise ConfigError(f"unknown torchvision model {name!r}; valid: {', '.join(torchvision_names())}")


def _construct(name: str, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's model ``name`` without weights, for ``num_classes`` and (ViT, MaxViT) ``image_size``."""
    import torchvision

    kw: dict[str, Any] = {"num_classes": num_classes}
    if name.startswith("vit_"):
        kw["image_size"] = image_size
    elif name.startswith("maxvit"):
        kw["input_size"] = (image_size, image_size)
    elif name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=True)
    try:
        return torchvision.models.get_model(name, weights=None, **kw)
    except (AssertionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"torchvision model {name!r} cannot be built for {image_size}-pixel inputs: "
                          f"{' '.join(str(e).split())[:160]}") from None


def _read_weights(name: str, weights: str) -> dict[str, Tensor]:
    """A state dict from a file, or from torch's hub cache for a member of the model's weights enum."""
    from ..io import load_weights

    path = Path(weights).expanduser()
    if path.exists() or not (weights.isidentifier() and weights.isupper()):  # enum members: IMAGENET1K_V1, DEFAULT
        return load_weights(path)
    import os
    from urllib.parse import urlparse

    import torchvision

    enum = torchvision.models.get_model_weights(name)
    member = enum.DEFAULT if weights == "DEFAULT" else getattr(enum, weights, None)
    if member is None:
        raise CheckpointError(f"weights {weights!r}: neither a file nor one of {name}'s weights "
                              f"({', '.join(w.name for w in enum)}, DEFAULT)")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)
    if not cached.is_file():
        raise CheckpointError(f"torchvision weights {name} {member.name} are not in the hub cache ({cached}); "
                              "nothing is downloaded: pass a state-dict file")
    return load_weights(cached)


def load_torchvision_weights(tv: nn.Module, sd: Mapping[str, Tensor], *, num_classes: int, what: str) -> None:
    """Load a torchvision state dict into ``tv`` (see the module docstring for what may differ)."""
    ours, meta = tv.state_dict(), getattr(sd, "_metadata", None)
    sd = {k: v for k, v in sd.items() if not (k.startswith(_AUX) and k not in ours)}
    pos = "encoder.pos_embedding"
    if pos in sd and pos in ours and sd[pos].shape != ours[pos].shape and hasattr(tv, "patch_size"):
        from torchvision.models.vision_transformer import interpolate_embeddings

        sd = interpolate_embeddings(tv.image_size, tv.patch_size, dict(sd))
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or unexpected:
        which = f"lack {missing[0]}" if missing else f"have an unexpected {unexpected[0]}"
        raise CheckpointError(f"{what} do not fit the model: they {which} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    keep: Any = OrderedDict()
    if meta is not None:  # module versions (MNASNet refuses a state dict without them)
        keep._metadata = meta
    for k, v in sd.items():
        if v.shape != ours[k].shape:
            if ours[k].shape[:1] == (num_classes,) and v.shape[0] != num_classes and v.shape[1:] == ours[k].shape[1:]:
                continue  # the final classifier, for another number of classes: keeps its initialisation
            raise CheckpointError(f"{what} do not fit the model: {k} has shape {tuple(v.shape)}, "
                                  f"the model {tuple(ours[k].shape)}")
        keep[k] = v
    tv.load_state_dict(keep, strict=False)


def _adapt_input(tv: nn.Module, in_chans: int) -> None:
    """Replace the first 3-channel convolution by one reading ``in_chans`` channels (weights summed or tiled)."""
    for name, m in tv.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, m.padding_mode)
            with torch.no_grad():
                w = m.weight  # (O, 3, kh, kw)
                new.weight.copy_(w.sum(1, keepdim=True) if in_chans == 1
                                 else w.repeat(1, -(-in_chans // 3), 1, 1)[:, :in_chans] * (3 / in_chans))
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(tv.get_submodule(parent), child, new)
            return
    raise ConfigError(f"found no 3-channel convolution to read {in_chans}-channel inputs")


def build_torchvision(name: str, *, num_classes: int, in_chans: int = 3, ic_after: Any = None,
                      weights: str | None = None, image_size: int = 224, head: str = "sdn",
                      token_pool: str = "auto") -> MultiExitModel:
    """torchvision's ``name`` as a ``MultiExitModel`` (see the module docstring).

    Raises:
        ConfigError: an unknown name, a model that cannot be traced or run at ``image_size``, a bad ``ic_after``.
        CheckpointError: ``weights`` that cannot be read or do not fit.
    """
    from .tvgraph import cut_model

    _check_name(name)
    tv = _construct(name, num_classes, image_size)
    if weights:
        load_torchvision_weights(tv, _read_weights(name, str(weights)), num_classes=num_classes,
                                 what=f"weights {weights}")
    if in_chans != 3:
        _adapt_input(tv, in_chans)
    plan = _plan(tv, name, in_chans, image_size)
    model = cut_model(plan, num_classes=num_classes, input_shape=(in_chans, image_size, image_size), ic_after=ic_after,
                      head=head, token_pool=token_pool)
    mine = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    model.torchvision_keys = {k: mine[id(t)] for k, t in tv.state_dict(keep_vars=True).items() if id(t) in mine}
    return model


def _plan(tv: nn.Module, name: str, in_chans: int, image_size: int) -> Any:
    what = f"torchvision model {name!r}"
    example = torch.randn(2, in_chans, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return plan_graph(tv, trace(tv, what), example, what)


def torchvision_state_dict(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The ``foreign_weights`` adapter: a torchvision state dict of the model in our names, None for other files.

    The final classifier is left out when its number of classes differs (it keeps its initialisation).
    """
    keys = getattr(model, "torchvision_keys", None)
    if not keys or not set(keys) <= set(sd) | {k for k in keys if k.startswith(_AUX)} or set(sd) - set(keys):
        return None
    ours = model.state_dict()
    final = f"heads.{model.num_exits - 1}."
    out = {}
    for k, v in sd.items():
        mine = keys[k]
        if v.shape != ours[mine].shape:
            if mine.startswith(final) and v.shape[:1] != ours[mine].shape[:1]:
                continue
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[mine].shape)}")
        out[mine] = v
    return out


def describe_nodes(name: str, *, image_size: int = 224, in_chans: int = 3) -> dict[str, Any]:
    """The candidate IC nodes of ``torchvision:NAME``: its natural blocks with their output shapes and the
    cumulative per-sample FLOPs up to them (``python -m earlyexit models --nodes``).

    Returns:
        ``{"blocks": [{"index", "module", "node", "shape", "flops", "share"}], "end": node, "flops": total}``,
        ``share`` the block's cumulative FLOPs over the backbone's (to the input of its final head).
    """
    name = name.split(":", 1)[1] if name.startswith(PREFIX + ":") else name
    _check_name(name)
    plan = _plan(_construct(name, 1000, image_size), name, in_chans, image_size)
    total = plan.flops[plan.end]
    rows = [{"index": i, "module": path, "node": node, "shape": plan.shape[node], "flops": plan.flops[node],
             "share": plan.flops[node] / total if total else 0.0} for i, (path, node) in enumerate(plan.blocks)]
    return {"blocks": rows, "end": plan.end, "flops": total}


def from_module(module: nn.Module, *, input_shape: Sequence[int] | None = None, example_input: Tensor | None = None,
                num_classes: int | None = None, ic_after: Any = None, head: str = "sdn",
                token_pool: str = "auto") -> MultiExitModel:
    """Early exits on your own classifier: ``module`` traced with torch.fx and cut into stages, as
    ``torchvision:NAME`` (its natural blocks, ``ic_after=`` and the IC heads chosen by node shape alike).

    The model shares ``module``'s parameters (training one trains the other); its last exit is ``module`` itself.

    Args:
        module: an ``nn.Module`` mapping a ``(B, *input_shape)`` batch to ``(B, classes)`` logits, traceable
            by torch.fx (no control flow on the data).
        input_shape: one sample's shape, e.g. ``(3, 32, 32)``; or give ``example_input`` instead.
        example_input: a batch of real inputs (its first two samples are traced through).
        num_classes: the module's number of classes (checked; default: read from its output).
        ic_after: the IC placement (``tvgraph.resolve_graph_ic_after``: block indices, ``"every:N"``,
            ``"cost:0.25,0.5"``, node names; default ``"sdn"``).
        head, token_pool: the IC heads (see the module docstring).
    Returns:
        A ``MultiExitModel``.
    Raises:
        ConfigError: an untraceable module (naming where tracing failed), a wrong shape or ``num_classes``,
            a bad ``ic_after``.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"from_module needs an nn.Module, not {type(module).__name__}")
    if (input_shape is None) == (example_input is None):
        raise ConfigError("give exactly one of input_shape and example_input")
    if example_input is not None:
        if not isinstance(example_input, Tensor) or example_input.dim() < 2 or not len(example_input):
            raise ConfigError("example_input must be a (B, ...) tensor batch")
        example = example_input[:2].detach() if len(example_input) >= 2 else \
            example_input[:1].detach().expand(2, *example_input.shape[1:])
    else:
        device = next(module.parameters(), torch.empty(0)).device  # traced where the module lives
        example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    what = f"the module {type(module).__name__}"
    plan = plan_graph(module, trace(module, what), example, what)
    out = plan.shape[plan.eval.name[next(n for n in plan.eval.nodes if n.op == "output").args[0]]]
    if num_classes is not None and out != (num_classes,):
        raise ConfigError(f"{what} gives {out[0]} logits, not num_classes={num_classes}; replace its classifier first")
    return cut_model(plan, num_classes=out[0], input_shape=tuple(example.shape[1:]), ic_after=ic_after, head=head,
                     token_pool=token_pool)


@dataclass(frozen=True)
class TorchvisionConfig:
    """The options of a ``torchvision:NAME`` model (the module docstring); ``--model-opt`` sets fields by name."""

    weights: str | Path | None = None  # a state-dict file or a member of the weights enum ("IMAGENET1K_V1", "DEFAULT")
    image_size: int = 224           # side of the square input images (pixels)
    head: str = "sdn"               # the head of convolutional ICs: "sdn" or "sdn_exact"
    token_pool: str = "auto"        # what ICs on token sequences read: "auto", "token" or "mean"

    def __post_init__(self) -> None:
        check_fields(self, sizes=("image_size",))
        conv_head(self.head)  # an unknown head fails here, before anything is built
        if self.token_pool not in ("auto", "token", "mean"):
            raise ValueError(f"unknown token_pool {self.token_pool!r}; valid: auto, token, mean")


def _spec(name: str) -> ModelSpec:
    _check_name(name)

    def builder(cfg: TorchvisionConfig, *, num_classes: int, in_chans: int = 3, ic_after: Any = None) -> MultiExitModel:
        return build_torchvision(name, num_classes=num_classes, in_chans=in_chans, ic_after=ic_after,
                                 **dataclasses.asdict(cfg))

    clip = 1.0 if name.startswith(("vit_", "efficientnet")) else None  # as the paper's ViT and EfficientNet
    return ModelSpec(name=f"{PREFIX}:{name}", builder=builder, config=TorchvisionConfig(), input="image",
                     tiny={"image_size": TINY_SIZE.get(name, 32)}, foreign_weights=torchvision_state_dict,
                     weights_at_build=True, grad_clip=clip)


register_family(PREFIX, _spec, "any classifier of torchvision.models")

__all__ = ["TorchvisionConfig", "build_torchvision", "describe_nodes", "from_module", "load_torchvision_weights", "torchvision_names",
           "torchvision_state_dict"]
