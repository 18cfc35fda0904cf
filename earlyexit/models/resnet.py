"""ResNets with internal classifiers.

- CIFAR-style ResNet-20/32/56/110 (He et al., CVPR 2016, section 4.2): a 3x3
  stem with 16 channels, three groups of ``n`` basic blocks with 16/32/64
  channels, projection (1x1 conv + BN) shortcuts where the shape changes.
  Any number of input channels (Fashion-MNIST has 1). ``width=w`` multiplies
  every width (16w/32w/64w; the paper's mode-connectivity figure uses
  ResNet-20 with w=2).
- ImageNet ResNet-18/34/50 with torchvision's layout; ``load_torchvision``
  maps a torchvision ``state_dict`` onto ours through an explicit key map and
  loads it strictly. Their ``stem`` option: ``"imagenet"`` (torchvision's 7x7
  stride-2 convolution and 3x3 stride-2 max pooling, the only stem that takes
  torchvision's weights), ``"imagenet_nopool"`` (the same convolution, no
  pooling) or ``"cifar"`` (a 3x3 stride-1 convolution, no pooling); by default
  ``"cifar"`` for images of at most 64 pixels, else ``"imagenet"``. The
  ResNets of the paper's code (``architectures/resnets.py``) have no max
  pooling, and its 64-pixel (TinyImageNet) ResNet-50 script picks their 3x3
  stride-1 stem (``standard_first_conv=False``).

The registered sizes (``MODELS``) are ``ResNetConfig`` instances: ``layout``
``"cifar"`` (resnet20/32/56/110) or ``"imagenet"`` (resnet18/34/50), ``depth``,
and the options above as fields.

Every residual block is one stage; ICs sit after blocks. The default
placement follows the paper: an IC after every other block starting from
the fifth (block indices 4, 6, 8, ...), the last block's exit being the
backbone's own classifier.

IC heads (``head=``): ``"sdn"`` (``heads.SDNHead``, the default) reads a
block's output; ``"sdn_exact"`` (``heads.SDNExactHead``) is SDN's own head
and reads what SDN's heads read, the block's output before its last ReLU
(``ResNet_SDN.py`` in SDN's code). For that, a block followed by an IC returns
its pre-activation sum (``relu_output = False``) and the next block applies
the ReLU to its input (``relu_input = True``): the backbone computes the same
function with the same parameters and state-dict keys, and the states after
those blocks (what ``forward_intermediates`` returns) are pre-ReLU.

The stems and blocks declare their ``conv_bn_pairs`` (BatchNorm folding) and
their ``permutation_axes`` (weight matching): every block adds its output to
the residual stream, so all blocks between two projection shortcuts (a CIFAR
ResNet's group) share one permutation of the stream (``streamN``), a
projection shortcut starts a new one, and each block has its own
permutation(s) of its inner channels (``blockI.convJ``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .common import check_fields, feature_info_for, init_conv_bn, load_backbone_strict, rename_keys, resolve_ic_after
from .heads import PoolLinearHead, conv_head
from .multiexit import MultiExitModel
from .registry import register_model


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """Projection shortcut (1x1 conv + BN, torchvision's ``downsample``) where the shape changes, else none."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))


class ResidualBlock(nn.Module):
    """What the two residual blocks share: their conv/BN pairs, their permutation rule and the ReLU switches.

    ``relu_input`` (apply a ReLU to the input first) and ``relu_output`` (end
    with the ReLU) move the activation between a block and the next one so that
    the state between them is pre-ReLU (``head="sdn_exact"``); by default a
    block takes and returns post-ReLU maps.
    """

    convs: tuple[str, ...] = ()  # the convolutions of the residual branch, in order; ``convJ`` is followed by ``bnJ``
    relu_input = False
    relu_output = True

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        pairs = [(c, f"bn{j + 1}") for j, c in enumerate(self.convs)]
        return pairs + ([("downsample.0", "downsample.1")] if self.downsample is not None else [])

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> str:
        """Weight matching: the branch's last conv and the shortcut write the (new or same) residual stream."""
        out = inp
        if self.downsample is not None:
            out = rules.fresh("stream", self.downsample[0].out_channels)
            rules.axes[prefix + "downsample.0.weight"] = (out, inp, None, None)
            rules.norm(prefix + "downsample.1", out)
        cur = inp
        for j, c in enumerate(self.convs):
            last = j == len(self.convs) - 1
            p = out if last else rules.new(f"block{rules.stage}.{c}", getattr(self, c).out_channels)
            rules.axes[prefix + c + ".weight"] = (p, cur, None, None)
            rules.norm(prefix + f"bn{j + 1}", p)
            cur = p
        return out


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions with a residual connection (torchvision names)."""

    expansion = 1
    convs = ("conv1", "conv2")

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, cin, H, W)`` -> ``(B, planes, H / stride, W / stride)``."""
        if self.relu_input:
            x = torch.relu(x)  # not in place: the pre-ReLU input is an IC's input too
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity) if self.relu_output else out + identity


class Bottleneck(ResidualBlock):
    """1x1, 3x3 (strided, as torchvision's v1.5), 1x1 with expansion 4."""

    expansion = 4
    convs = ("conv1", "conv2", "conv3")

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = _bn(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, cin, H, W)`` -> ``(B, 4 planes, H / stride, W / stride)``."""
        if self.relu_input:
            x = torch.relu(x)  # not in place: the pre-ReLU input is an IC's input too
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity) if self.relu_output else out + identity


class CifarStem(nn.Module):
    """3x3 stride-1 convolution, BN and ReLU: ``(B, in_chans, H, W)`` -> ``(B, width, H, W)``."""

    kind = "cifar"

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv1", "bn1")]

    def permutation_axes(self, rules: Any, prefix: str, inp: None) -> str:
        """Weight matching: the stem's channels start the first residual stream."""
        p = rules.fresh("stream", self.conv1.out_channels)
        rules.axes[prefix + "conv1.weight"] = (p, inp, None, None)
        rules.norm(prefix + "bn1", p)
        return p


class ImageNetStem(CifarStem):
    """7x7/2 convolution, BN, ReLU and, with ``pool``, 3x3/2 max pooling (torchvision names).

    ``(B, in_chans, H, W)`` -> ``(B, width, H / 4, W / 4)`` with pooling, ``(B, width, H / 2, W / 2)`` without.
    """

    def __init__(self, in_chans: int, width: int, pool: bool = True) -> None:
        nn.Module.__init__(self)
        self.kind = "imagenet" if pool else "imagenet_nopool"
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        if pool:
            self.maxpool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return self.maxpool(x) if self.kind == "imagenet" else x


STEMS = ("imagenet", "imagenet_nopool", "cifar")


def make_stem(kind: str, in_chans: int, width: int) -> nn.Module:
    """The stem named ``kind`` (one of ``STEMS``, see the module docstring).

    Raises:
        ValueError: for another name.
    """
    if kind == "cifar":
        return CifarStem(in_chans, width)
    if kind in ("imagenet", "imagenet_nopool"):
        return ImageNetStem(in_chans, width, pool=kind == "imagenet")
    raise ValueError(f"unknown ResNet stem {kind!r}; valid: {', '.join(STEMS)}")


def _make_blocks(block: type, widths: Sequence[int], depths: Sequence[int], cin: int) -> tuple[list[nn.Module], list[tuple[int, int]]]:
    """Blocks of all groups, and (group, index-in-group) of each block."""
    blocks, where = [], []
    for g, (w, d) in enumerate(zip(widths, depths)):
        for b in range(d):
            stride = 2 if (g > 0 and b == 0) else 1
            blocks.append(block(cin, w, stride))
            where.append((g, b))
            cin = w * block.expansion
    return blocks, where


def resnet(
    *,
    block: type,
    depths: Sequence[int],
    widths: Sequence[int],
    stem_width: int,
    num_classes: int,
    in_chans: int = 3,
    ic_after=None,
    image_size: int = 32,
    stem: str | None = None,
    imagenet_stem: bool = False,
    head: str = "sdn",
) -> MultiExitModel:
    """Build a ResNet with IC heads (see the module docstring).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        depths: blocks per group.
        widths: base width (planes) per group.
        stem_width: channels of the stem.
        num_classes: classes of every exit.
        in_chans: input channels.
        ic_after: IC placement (``models.common``; default: every other block from the fifth).
        image_size: side of the square input images.
        stem: ``"imagenet"``, ``"imagenet_nopool"`` or ``"cifar"``; None: ``"imagenet"`` if ``imagenet_stem``
            else ``"cifar"``.
        imagenet_stem: the older spelling of ``stem="imagenet"``.
        head: IC head, ``"sdn"`` or ``"sdn_exact"`` (see the module docstring).
    Returns:
        A ``MultiExitModel`` taking ``(B, in_chans, image_size, image_size)`` images.
    """
    make_head = conv_head(head)
    stem = make_stem(stem if stem is not None else ("imagenet" if imagenet_stem else "cifar"), in_chans, stem_width)
    blocks, where = _make_blocks(block, widths, depths, stem_width)
    info = feature_info_for(stem, blocks, (1, in_chans, image_size, image_size))
    for fi, (g, b) in zip(info, where):
        fi["module"] = f"layer{g + 1}.{b}"
    final = PoolLinearHead(widths[-1] * block.expansion, num_classes)
    chosen = resolve_ic_after(ic_after, stem, blocks, final, (1, in_chans, image_size, image_size), default=default_resnet_exits(len(blocks)))
    model = MultiExitModel(stem=stem, stages=blocks, head=final, ic_after=chosen, make_head=make_head, feature_info=info, num_classes=num_classes,
                           input_shape=(in_chans, image_size, image_size))
    if head == "sdn_exact":
        _expose_pre_relu(model)
    init_conv_bn(model)
    model.prefers_channels_last = True  # `bench`: ResNet-20 steps run about 1.4x faster channels-last on 2 CPU cores
    return model


def _expose_pre_relu(model: MultiExitModel) -> None:
    """Let every block followed by an IC return its output before the last ReLU; the next block applies it."""
    for i in model.exit_after[:-1]:
        model.stages[i].relu_output = False
        model.stages[i + 1].relu_input = True


def default_resnet_exits(num_blocks: int) -> list[int]:
    """The paper's placement: every other block starting from the fifth (0-based index 4)."""
    return list(range(4, num_blocks - 1, 2))


def cifar_resnet(depth: int, *, width: float = 1, **kw: Any) -> MultiExitModel:
    """A CIFAR-style ResNet of ``depth = 6n + 2`` layers with widths ``16w``, ``32w``, ``64w``.

    Args:
        depth: 20, 32, 44, 56, 110, ... (``6n + 2``).
        width: the width multiplier ``w`` (``16 w`` must be a whole number).
        **kw: ``resnet`` options (``num_classes``, ``in_chans``, ``ic_after``, ``image_size``, ``head``).
    Returns:
        A ``MultiExitModel`` with ``3n`` stages.
    Raises:
        ValueError: for another depth, a bad width, or a ``stem`` option (these ResNets have the 3x3 stem only).
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    if "stem" in kw or "imagenet_stem" in kw:
        raise ValueError("the CIFAR ResNets have the 3x3 stem only; stem= is an option of resnet18/34/50")
    number = isinstance(width, (int, float)) and not isinstance(width, bool)
    if not (number and width > 0 and float(16 * width).is_integer()):
        raise ValueError(f"width must be a positive multiplier with 16 * width a whole number, got {width!r}")
    n, base = (depth - 2) // 6, int(16 * width)
    return resnet(block=BasicBlock, depths=(n, n, n), widths=(base, 2 * base, 4 * base), stem_width=base, stem="cifar", **kw)


_IMAGENET = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def default_stem(image_size: int) -> str:
    """The ImageNet ResNets' default stem: ``"cifar"`` for images of at most 64 pixels, else ``"imagenet"``."""
    return "cifar" if image_size <= 64 else "imagenet"


def imagenet_resnet(name: str, *, image_size: int = 224, stem: str | None = None, **kw: Any) -> MultiExitModel:
    """ResNet-18/34/50 (torchvision's layout) with the given ``stem`` (default: ``default_stem(image_size)``).

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        image_size: side of the square input images.
        stem: ``"imagenet"``, ``"imagenet_nopool"`` or ``"cifar"``.
        **kw: ``resnet`` options (``num_classes``, ``in_chans``, ``ic_after``, ``head``).
    Returns:
        A ``MultiExitModel`` with one stage per residual block.
    """
    block, depths = _IMAGENET[name]
    model = resnet(block=block, depths=depths, widths=(64, 128, 256, 512), stem_width=64, image_size=image_size,
                   stem=stem if stem is not None else default_stem(image_size), **kw)
    model.arch = name
    return model


# --- torchvision weights ---------------------------------------------------

def torchvision_key_map(model: MultiExitModel) -> dict[str, str]:
    """Map of torchvision key prefixes to ours: ``layerG.B.`` -> ``stages.I.``, stem, ``fc``."""
    m = {"conv1.": "stem.conv1.", "bn1.": "stem.bn1.", "fc.": f"heads.{model.num_exits - 1}.fc."}
    for i, fi in enumerate(model.feature_info):
        m[fi["module"] + "."] = f"stages.{i}."
    return m


def _require_imagenet_stem(model: MultiExitModel) -> None:
    """torchvision's weights assume its stem; refuse any other (they would load, or not, into another function)."""
    kind = getattr(model.stem, "kind", None)
    if kind != "imagenet":
        raise CheckpointError(f"torchvision ResNet weights need torchvision's stem (7x7/2 convolution, max pooling): "
                              f"build resnet18/34/50 with stem='imagenet' (this model's stem is {kind!r})")


def convert_torchvision_state_dict(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet ``state_dict``'s keys to this model's names.

    Raises:
        CheckpointError: the model's stem is not torchvision's (``stem="imagenet"``).
        KeyError: a key that has no counterpart here.
    """
    _require_imagenet_stem(model)
    return rename_keys(sd, r"(layer\d+\.\d+\.|conv1\.|bn1\.|fc\.)(.*)", torchvision_key_map(model),
                       "torchvision checkpoint")


def load_torchvision(model: MultiExitModel, sd: Mapping[str, Tensor]) -> MultiExitModel:
    """Load torchvision ResNet weights into the backbone (IC heads keep their init).

    Strict for the backbone: every torchvision key must map to one of ours
    with the same shape, and every backbone key must be covered.
    """
    load_backbone_strict(model, convert_torchvision_state_dict(model, sd))
    return model


def torchvision_weights(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The ``foreign_weights`` adapter: a torchvision ResNet ``state_dict`` in our names, None for other files.

    Raises:
        CheckpointError: a torchvision file for a model whose stem is not torchvision's.
    """
    if "fc.weight" not in sd or "conv1.weight" not in sd:
        return None
    return convert_torchvision_state_dict(model, sd)


# --- config and registered sizes ---------------------------------------------------

LAYOUTS = ("cifar", "imagenet")


@dataclass(frozen=True)
class ResNetConfig:
    """A ResNet's architecture (a registered size is an instance; ``--model-opt`` sets fields by name)."""

    layout: str = "cifar"           # "cifar": three groups of (depth - 2) / 6 basic blocks, 16w/32w/64w channels and
                                    # the 3x3 stem (He et al., section 4.2); "imagenet": torchvision's ResNet-18/34/50
    depth: int = 20                 # layers: 6n + 2 ("cifar"), 18, 34 or 50 ("imagenet")
    width: float = 1                # width multiplier w of the "cifar" layout (16 w must be a whole number)
    stem: str | None = None         # "imagenet", "imagenet_nopool" or "cifar" ("imagenet" layout only); None:
                                    # the "cifar" layout's 3x3 stem, else default_stem(image_size)
    head: str = "sdn"               # IC head: "sdn" or "sdn_exact" (the module docstring)
    image_size: int = 32            # side of the square input images (pixels)

    def __post_init__(self) -> None:
        check_fields(self, sizes=("depth", "image_size"), nonnegative=("width",))
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown ResNet layout {self.layout!r}; valid: {', '.join(LAYOUTS)}")
        conv_head(self.head)  # an unknown head fails here, before anything is built
        if self.layout == "cifar":
            if (self.depth - 2) % 6:
                raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {self.depth}")
            if self.stem is not None:
                raise ValueError("the CIFAR ResNets have the 3x3 stem only; stem= is an option of resnet18/34/50")
            if not (self.width > 0 and float(16 * self.width).is_integer()):
                raise ValueError(f"width must be a positive multiplier with 16 * width a whole number, got {self.width!r}")
        else:
            if f"resnet{self.depth}" not in _IMAGENET:
                raise ValueError(f"the imagenet layout has depth 18, 34 or 50, got {self.depth}")
            if self.width != 1:
                raise ValueError("width= is an option of the CIFAR ResNets (resnet20/32/56/110)")
            if self.stem is not None and self.stem not in STEMS:
                raise ValueError(f"unknown ResNet stem {self.stem!r}; valid: {', '.join(STEMS)}")


def build_resnet(cfg: ResNetConfig, *, num_classes: int, in_chans: int = 3, ic_after: Any = None) -> MultiExitModel:
    """The ResNet of ``cfg`` (``cifar_resnet`` or ``imagenet_resnet``) with IC heads."""
    kw = dict(num_classes=num_classes, in_chans=in_chans, ic_after=ic_after, image_size=cfg.image_size, head=cfg.head)
    if cfg.layout == "cifar":
        return cifar_resnet(cfg.depth, width=cfg.width, **kw)
    return imagenet_resnet(f"resnet{cfg.depth}", stem=cfg.stem, **kw)


MODELS = {
    "resnet20": ResNetConfig(depth=20),
    "resnet32": ResNetConfig(depth=32),
    "resnet56": ResNetConfig(depth=56),
    "resnet110": ResNetConfig(depth=110),
    "resnet18": ResNetConfig(layout="imagenet", depth=18, image_size=224),
    "resnet34": ResNetConfig(layout="imagenet", depth=34, image_size=224),
    "resnet50": ResNetConfig(layout="imagenet", depth=50, image_size=224),
}
_TINY = {"resnet20": dict(in_chans=1, image_size=16)}
for _name, _cfg in MODELS.items():
    _tiny = _TINY.get(_name, dict(image_size=8 if _cfg.layout == "cifar" else 32))
    register_model(_name, config=_cfg, tiny=_tiny, foreign_weights=torchvision_weights)(build_resnet)
