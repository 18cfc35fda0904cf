"""ResNets with internal classifiers.

- CIFAR-style ResNet-20/32/56/110 (He et al., CVPR 2016, section 4.2): a 3x3
  stem with 16 channels, three groups of ``n`` basic blocks with 16/32/64
  channels, projection (1x1 conv + BN) shortcuts where the shape changes.
  Any number of input channels (Fashion-MNIST has 1).
- ImageNet ResNet-18/34/50 with torchvision's layout; ``load_torchvision``
  maps a torchvision ``state_dict`` onto ours through an explicit key map and
  loads it strictly.

Every residual block is one stage; ICs sit after blocks. The default
placement follows the paper: an IC after every other block starting from
the fifth (block indices 4, 6, 8, ...), the last block's exit being the
backbone's own classifier.

The stems and blocks declare their ``conv_bn_pairs`` (BatchNorm folding) and
their ``permutation_axes`` (weight matching): every block adds its output to
the residual stream, so all blocks between two projection shortcuts (a CIFAR
ResNet's group) share one permutation of the stream (``streamN``), a
projection shortcut starts a new one, and each block has its own
permutation(s) of its inner channels (``blockI.convJ``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .common import feature_info_for, init_conv_bn, resolve_exits
from .heads import PoolLinearHead, sdn_head
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
    """What the two residual blocks share: their conv/BN pairs and their permutation rule."""

    convs: tuple[str, ...] = ()  # the convolutions of the residual branch, in order; ``convJ`` is followed by ``bnJ``

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
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


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
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class CifarStem(nn.Module):
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
    """7x7/2 convolution, BN, ReLU and 3x3/2 max pooling (torchvision names)."""

    def __init__(self, in_chans: int, width: int) -> None:
        nn.Module.__init__(self)
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = _bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.maxpool(super().forward(x))


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
    imagenet_stem: bool,
    num_classes: int,
    in_chans: int = 3,
    exits=None,
    image_size: int = 32,
) -> MultiExitModel:
    """Build a ResNet with IC heads (see the module docstring)."""
    stem = (ImageNetStem if imagenet_stem else CifarStem)(in_chans, stem_width)
    blocks, where = _make_blocks(block, widths, depths, stem_width)
    info = feature_info_for(stem, blocks, (1, in_chans, image_size, image_size))
    for fi, (g, b) in zip(info, where):
        fi["module"] = f"layer{g + 1}.{b}"
    final = PoolLinearHead(widths[-1] * block.expansion, num_classes)
    chosen = resolve_exits(exits, stem, blocks, final, (1, in_chans, image_size, image_size), default=default_resnet_exits(len(blocks)))
    model = MultiExitModel(stem=stem, stages=blocks, head=final, exits=chosen, make_head=sdn_head, feature_info=info, num_classes=num_classes,
                           input_shape=(in_chans, image_size, image_size))
    init_conv_bn(model)
    return model


def default_resnet_exits(num_blocks: int) -> list[int]:
    """The paper's placement: every other block starting from the fifth (0-based index 4)."""
    return list(range(4, num_blocks - 1, 2))


def cifar_resnet(depth: int, **kw) -> MultiExitModel:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    return resnet(block=BasicBlock, depths=(n, n, n), widths=(16, 32, 64), stem_width=16, imagenet_stem=False, **kw)


_IMAGENET = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def imagenet_resnet(name: str, *, image_size: int = 224, **kw) -> MultiExitModel:
    block, depths = _IMAGENET[name]
    model = resnet(block=block, depths=depths, widths=(64, 128, 256, 512), stem_width=64, imagenet_stem=True, image_size=image_size, **kw)
    model.arch = name
    return model


# --- torchvision weights ---------------------------------------------------

def torchvision_key_map(model: MultiExitModel) -> dict[str, str]:
    """Map of torchvision key prefixes to ours: ``layerG.B.`` -> ``stages.I.``, stem, ``fc``."""
    m = {"conv1.": "stem.conv1.", "bn1.": "stem.bn1.", "fc.": f"heads.{model.num_exits - 1}.fc."}
    for i, fi in enumerate(model.feature_info):
        m[fi["module"] + "."] = f"stages.{i}."
    return m


def convert_torchvision_state_dict(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ResNet ``state_dict``'s keys to this model's names."""
    kmap = torchvision_key_map(model)
    out = {}
    for k, v in sd.items():
        m = re.match(r"(layer\d+\.\d+\.|conv1\.|bn1\.|fc\.)(.*)", k)
        if m is None or m.group(1) not in kmap:
            raise KeyError(f"unexpected key in torchvision checkpoint: {k}")
        out[kmap[m.group(1)] + m.group(2)] = v
    return out


def load_torchvision(model: MultiExitModel, sd: Mapping[str, Tensor]) -> MultiExitModel:
    """Load torchvision ResNet weights into the backbone (IC heads keep their init).

    Strict for the backbone: every torchvision key must map to one of ours
    with the same shape, and every backbone key must be covered.
    """
    ours = model.state_dict()
    conv = convert_torchvision_state_dict(model, sd)
    for k, v in conv.items():
        if k not in ours:
            raise KeyError(f"no parameter {k} in the model")
        if ours[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[k].shape)}")
    backbone_keys = {k for k in ours if not k.startswith("heads.") or k.startswith(f"heads.{model.num_exits - 1}.")}
    missing = backbone_keys - set(conv)
    if missing:
        raise KeyError(f"checkpoint lacks backbone keys: {sorted(missing)[:5]}")
    model.load_state_dict(conv, strict=False)
    return model


def torchvision_weights(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The ``foreign_weights`` adapter: a torchvision ResNet ``state_dict`` in our names, None for other files."""
    if "fc.weight" not in sd or "conv1.weight" not in sd:
        return None
    return convert_torchvision_state_dict(model, sd)


# --- registered sizes ----------------------------------------------------------

@register_model("resnet20", tiny=dict(in_chans=1, image_size=16), foreign_weights=torchvision_weights)
def resnet20(**kw: Any) -> MultiExitModel:
    return cifar_resnet(20, **kw)


@register_model("resnet32", tiny=dict(image_size=8), foreign_weights=torchvision_weights)
def resnet32(**kw: Any) -> MultiExitModel:
    return cifar_resnet(32, **kw)


@register_model("resnet56", tiny=dict(image_size=8), foreign_weights=torchvision_weights)
def resnet56(**kw: Any) -> MultiExitModel:
    return cifar_resnet(56, **kw)


@register_model("resnet110", tiny=dict(image_size=8), foreign_weights=torchvision_weights)
def resnet110(**kw: Any) -> MultiExitModel:
    return cifar_resnet(110, **kw)


@register_model("resnet18", tiny=dict(image_size=32), foreign_weights=torchvision_weights)
def resnet18(**kw: Any) -> MultiExitModel:
    return imagenet_resnet("resnet18", **kw)


@register_model("resnet34", tiny=dict(image_size=32), foreign_weights=torchvision_weights)
def resnet34(**kw: Any) -> MultiExitModel:
    return imagenet_resnet("resnet34", **kw)


@register_model("resnet50", tiny=dict(image_size=32), foreign_weights=torchvision_weights)
def resnet50(**kw: Any) -> MultiExitModel:
    return imagenet_resnet("resnet50", **kw)
