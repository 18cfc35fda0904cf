"""EfficientNet-B0 with internal classifiers (the paper's appendix D.3).

The backbone is torchvision's ``efficientnet_b0`` (Tan & Le, ICML 2019),
module for module and with its parameter names below each part, so that its
``state_dict`` loads exactly (``load_torchvision_efficientnet``, and the
``foreign_weights`` adapter behind ``build_model(..., weights=FILE)`` and ``--weights``):

- ``stem``: torchvision's ``features.0``, a 3x3 stride-2 convolution, BN and SiLU;
- ``stages``: the 16 MBConv blocks of ``features.1`` to ``features.7``, one stage
  per block, in order. The paper's code (``architectures/tv_models.py`` and
  ``architectures/pretrained.py`` of its repository) lets an IC follow any
  MBConv block, so the blocks, not torchvision's seven groups of blocks, are the
  stages here; a block's input and output keep their resolution within a group;
- ``heads[-1]``: ``features.8`` (1x1 convolution to 1280 channels, BN, SiLU),
  global average pooling, dropout and the linear classifier (``classifier.1``),
  which is where the paper's code attaches its final output too.

Default IC placement: after blocks 4, 6, 8, 10, 12 and 14 of 16 (0-based),
every other block from the fifth, the rule the ResNets of this package
follow. The paper's code takes the positions from each run's script
(``place_at``) and publishes none for EfficientNet-B0, so this default is this
package's choice; ``ic_after=`` chooses others (``"sdn"``, ``"every:N[:OFFSET]"``,
indices). IC heads come from ``models.heads``: ``head="sdn"`` (``SDNHead``, the
default) or ``head="sdn_exact"`` (SDN's own ``SDNExactHead``); an MBConv block
ends without an activation, so both read the block's output.

As in torchvision, training uses stochastic depth on the residual branches
(probability growing linearly from 0 to ``0.2 * 15 / 16`` over the blocks)
and dropout 0.2 before the classifier; both are identities in eval mode.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import check_fields, feature_info_for, load_backbone_strict, rename_keys, resolve_ic_after
from .heads import conv_head
from .multiexit import MultiExitModel
from .registry import register_model

# torchvision's EfficientNet-B0 table: (expand ratio, kernel, stride, input channels, output channels, blocks)
B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
LAST_CHANNELS = 1280


class ConvBNAct(nn.Sequential):
    """Convolution (no bias), BatchNorm and optionally SiLU, as torchvision's ``Conv2dNormActivation`` (keys ``0.``, ``1.``).

    Args:
        cin, cout: channels in and out.
        kernel: square kernel size (padding ``(kernel - 1) // 2``).
        stride: convolution stride.
        groups: convolution groups (``cin`` for a depthwise convolution).
        act: end with SiLU.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("0", "1")]


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (torchvision's names): ``x * sigmoid(fc2(silu(fc1(mean over H, W of x))))``.

    Args:
        channels: channels of the ``(B, C, H, W)`` map it rescales.
        squeeze: channels of the bottleneck.
    """

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))  # (B, C, 1, 1)
        return scale * x


def stochastic_depth(x: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole samples of a residual branch with probability ``p`` in training, scaling the rest by ``1 / (1 - p)``."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    if keep > 0.0:
        noise.div_(keep)
    return x * noise


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (torchvision's ``MBConv``, its names).

    ``block``: the 1x1 expansion (absent for ratio 1), the depthwise ``kernel`` x ``kernel``
    convolution (with the stride), squeeze-and-excitation and the 1x1 projection (no activation);
    a residual connection with stochastic depth where the shape is kept.

    Args:
        cin, cout: channels in and out.
        expand: expansion ratio.
        kernel: depthwise kernel size.
        stride: depthwise stride (1 or 2).
        drop_prob: stochastic-depth probability of the residual branch.
    """

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, drop_prob: float) -> None:
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [ConvBNAct(cin, mid)] if mid != cin else []
        layers += [ConvBNAct(mid, mid, kernel, stride, groups=mid), SqueezeExcitation(mid, max(1, cin // 4)),
                   ConvBNAct(mid, cout, act=False)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """``(B, cin, H, W)`` -> ``(B, cout, H / stride, W / stride)``."""
        out = self.block(x)
        if self.use_res_connect:
            out = stochastic_depth(out, self.drop_prob, self.training) + x
        return out


class EfficientNetHead(nn.Module):
    """The backbone's classifier: 1x1 convolution, BN and SiLU (``conv``), average pooling, dropout, ``fc``.

    Args:
        cin: channels of the last block's output.
        num_classes: number of logits.
        dropout: dropout probability before ``fc``.
        channels: channels of the 1x1 convolution.
    """

    def __init__(self, cin: int, num_classes: int, dropout: float = 0.2, channels: int = LAST_CHANNELS) -> None:
        super().__init__()
        self.conv = ConvBNAct(cin, channels)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, cin, H, W)`` -> ``(B, num_classes)``."""
        x = torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)  # (B, channels)
        return self.fc(self.dropout(x))


def _init_like_torchvision(modules: list[nn.Module]) -> None:
    """torchvision's EfficientNet initialisation: He-normal (fan-out) convolutions, BN at identity, uniform linear layers."""
    for part in modules:
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)


def efficientnet_b0_model(*, num_classes: int, in_chans: int = 3, ic_after: Any = None, image_size: int = 224,
                          head: str = "sdn", dropout: float = 0.2, stochastic_depth_prob: float = 0.2) -> MultiExitModel:
    """Build EfficientNet-B0 with IC heads (see the module docstring).

    Args:
        num_classes: classes of every exit.
        in_chans: input channels (torchvision's weights need 3).
        ic_after: IC placement (default: after blocks 4, 6, ..., 14).
        image_size: side of the square input images.
        head: IC head, ``"sdn"`` or ``"sdn_exact"``.
        dropout: dropout before the final linear layer.
        stochastic_depth_prob: stochastic-depth probability of the last block (block ``i`` of 16: ``p * i / 16``).
    Returns:
        A ``MultiExitModel`` with 16 stages taking ``(B, in_chans, image_size, image_size)`` images.
    """
    make_head = conv_head(head)
    stem = ConvBNAct(in_chans, B0_STAGES[0][3], 3, 2)
    total = sum(cfg[5] for cfg in B0_STAGES)
    blocks: list[nn.Module] = []
    where: list[str] = []
    for g, (expand, kernel, stride, cin, cout, n) in enumerate(B0_STAGES):
        for b in range(n):
            blocks.append(MBConv(cin if b == 0 else cout, cout, expand, kernel, stride if b == 0 else 1,
                                 stochastic_depth_prob * len(blocks) / total))
            where.append(f"features.{g + 1}.{b}")
    shape = (1, in_chans, image_size, image_size)
    info = feature_info_for(stem, blocks, shape)
    for fi, name in zip(info, where):
        fi["module"] = name
    final = EfficientNetHead(B0_STAGES[-1][4], num_classes, dropout)
    chosen = resolve_ic_after(ic_after, stem, blocks, final, shape, default=list(range(4, len(blocks) - 1, 2)))
    model = MultiExitModel(stem=stem, stages=blocks, head=final, ic_after=chosen, make_head=make_head, feature_info=info,
                           num_classes=num_classes, input_shape=(in_chans, image_size, image_size))
    _init_like_torchvision(model.backbone_modules())
    model.prefers_channels_last = True  # `bench`: about 1.45x faster training steps channels-last on 2 CPU cores
    return model


# --- torchvision weights ---------------------------------------------------------------

def torchvision_efficientnet_key_map(model: MultiExitModel) -> dict[str, str]:
    """Map of torchvision key prefixes to ours: ``features.0.`` -> ``stem.``, ``features.G.B.`` -> ``stages.I.``,
    ``features.8.`` and ``classifier.1.`` -> the final head's ``conv.`` and ``fc.``."""
    final = f"heads.{model.num_exits - 1}."
    m = {"features.0.": "stem.", f"features.{len(B0_STAGES) + 1}.": final + "conv.", "classifier.1.": final + "fc."}
    for i, fi in enumerate(model.feature_info):
        m[fi["module"] + "."] = f"stages.{i}."
    return m


def convert_torchvision_efficientnet(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torchvision ``efficientnet_b0`` ``state_dict``'s keys to this model's names.

    Raises:
        KeyError: a key that has no counterpart here.
    """
    return rename_keys(sd, r"(features\.[1-7]\.\d+\.|features\.\d+\.|classifier\.1\.)(.*)",
                       torchvision_efficientnet_key_map(model), "torchvision EfficientNet checkpoint")


def load_torchvision_efficientnet(model: MultiExitModel, sd: Mapping[str, Tensor]) -> MultiExitModel:
    """Load torchvision ``efficientnet_b0`` weights into the backbone (IC heads keep their initialisation).

    Strict for the backbone: every torchvision key maps to one of ours with the same shape, and every
    backbone key is covered.

    Raises:
        KeyError: unknown or missing keys.
        ValueError: a shape that differs.
    """
    load_backbone_strict(model, convert_torchvision_efficientnet(model, sd))
    return model


def torchvision_efficientnet_weights(model: MultiExitModel, sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The ``foreign_weights`` adapter: a torchvision ``efficientnet_b0`` ``state_dict`` in our names, None for other files."""
    if "features.0.0.weight" not in sd or "classifier.1.weight" not in sd:
        return None
    return convert_torchvision_efficientnet(model, sd)


# --- config and registered size ----------------------------------------------------------

@dataclass(frozen=True)
class EfficientNetConfig:
    """EfficientNet-B0's options (the registered size is an instance; ``--model-opt`` sets fields by name)."""

    image_size: int = 224           # side of the square input images (pixels)
    head: str = "sdn"               # IC head: "sdn" or "sdn_exact"
    dropout: float = 0.2            # dropout before the final linear layer
    stochastic_depth_prob: float = 0.2  # stochastic-depth probability of the last block (block i of 16: p * i / 16)

    def __post_init__(self) -> None:
        check_fields(self, sizes=("image_size",), nonnegative=("dropout", "stochastic_depth_prob"))
        conv_head(self.head)  # an unknown head fails here, before anything is built


def build_efficientnet(cfg: EfficientNetConfig, *, num_classes: int, in_chans: int = 3,
                       ic_after: Any = None) -> MultiExitModel:
    """EfficientNet-B0 of ``cfg`` with IC heads (``efficientnet_b0_model``)."""
    return efficientnet_b0_model(num_classes=num_classes, in_chans=in_chans, ic_after=ic_after,
                                 **dataclasses.asdict(cfg))


MODELS = {"efficientnet_b0": EfficientNetConfig()}
for _name, _cfg in MODELS.items():
    register_model(_name, config=_cfg, tiny=dict(image_size=32), foreign_weights=torchvision_efficientnet_weights,
                   grad_clip=1.0)(build_efficientnet)
