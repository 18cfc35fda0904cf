"""MSDNet: Multi-Scale Dense Networks as multi-exit models.

Follows Huang et al., "Multi-Scale Dense Networks for Resource Efficient Image
Classification" (ICLR 2018) and the layer layout of the authors' code:

- First layer (our ``stem``): one feature map per scale. CIFAR: a 3x3 conv at
  full resolution; ImageNet: a 7x7/2 conv and a 3x3/2 max pool. Every further
  scale is a 3x3/2 conv of the previous one (conv, BN, ReLU throughout).
- Dense layers: at scale ``s`` a layer appends ``growth * gr_factor[s]`` new
  channels to its input. If the next finer scale is present, half of them come
  from a strided 3x3 conv of the finer map ("down") and half from a 3x3 conv of
  the same-scale map ("normal"); otherwise all come from the "normal" conv.
  Each conv has a 1x1 bottleneck of ``min(c_in, bn_factor[s] * c_out)``
  channels in front of it.
- Scale pruning ("max" mode): the network's ``L`` layers are cut into
  ``n_scales`` runs of ``ceil(L / n_scales)`` layers; at the start of each run
  the finest remaining scale is dropped, and a transition layer (1x1 conv per
  scale) compresses the channels by ``reduction`` (0.5).
- Blocks: the first has ``base`` layers, each later one ``step`` layers
  ("even") or ``step * i + 1`` layers ("lin_grow").
- Classifiers (one after every block) read the coarsest scale: two 3x3/2
  convs (128 channels on CIFAR; as many as the input on ImageNet), global
  average pooling and a linear layer. The authors average-pool with a fixed
  2x2 window, which equals global pooling at the standard 32 / 224 inputs;
  global pooling also serves other input sizes.

Every MSDNet block is one stage; the state between stages is a list of
``(B, C_s, H_s, W_s)`` tensors, one per active scale, finest first. The last
block's classifier is the backbone's own head; by default every earlier block
carries an IC (the paper's layout: a classifier after every block). The model
(``MSDNet``) declares that its ICs read the coarsest scale (``map_ic_input``).

Every convolution is followed by its BatchNorm (``ConvBNReLU``); the parts
declare these pairs (``conv_bn_pairs``) for folding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .common import check_fields, init_conv_bn, resolve_ic_after
from .multiexit import MultiExitModel
from .registry import register_model


class ConvBNReLU(nn.Sequential):
    """``kernel x kernel`` conv (padding keeps the size at stride 1), BN, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("0", "1")]


class BottleneckConv(nn.Sequential):
    """Optional 1x1 bottleneck (conv, BN, ReLU), then a 3x3 conv (stride 1 or 2), BN, ReLU.

    Args:
        cin: input channels.
        cout: output channels.
        stride: 2 for the "down" path from the finer scale, 1 for the "normal" path.
        bn_width: bottleneck width factor; the bottleneck has ``min(cin, bn_width * cout)``
            channels. ``None`` skips the bottleneck.
    """

    def __init__(self, cin: int, cout: int, *, stride: int, bn_width: int | None) -> None:
        layers: list[nn.Module] = []
        inner = cin
        if bn_width is not None:
            inner = min(cin, bn_width * cout)
            layers += list(ConvBNReLU(cin, inner, 1))
        layers += list(ConvBNReLU(inner, cout, 3, stride))
        super().__init__(*layers)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        # conv, BN, ReLU per convolution, laid out flat
        return [(str(i), str(i + 1)) for i in range(0, len(self), 3)]


class ScaleUnit(nn.Module):
    """One dense layer at one scale: the same-scale input plus its new channels, concatenated.

    Args:
        c_same: channels of the same-scale input.
        c_finer: channels of the finer-scale input, or ``None`` if that scale is absent.
        growth: new channels (split in halves between the two paths when ``c_finer`` is set).
        bn_same: bottleneck factor of this scale.
        bn_finer: bottleneck factor of the finer scale (used by the "down" path).
        bottleneck: whether the convs have a 1x1 bottleneck.
    """

    def __init__(self, c_same: int, c_finer: int | None, growth: int, *, bn_same: int, bn_finer: int | None,
                 bottleneck: bool = True) -> None:
        super().__init__()
        self.down = None
        if c_finer is not None:
            # half of the new channels see the finer map (strided), half the same-scale map
            self.down = BottleneckConv(c_finer, growth // 2, stride=2, bn_width=bn_finer if bottleneck else None)
            growth = growth // 2
        self.normal = BottleneckConv(c_same, growth, stride=1, bn_width=bn_same if bottleneck else None)

    def forward(self, same: Tensor, finer: Tensor | None = None) -> Tensor:
        parts = [same]  # (B, C, H, W): dense connectivity keeps the input
        if self.down is not None:
            parts.append(self.down(finer))  # (B, g/2, H, W)
        parts.append(self.normal(same))  # (B, g or g/2, H, W)
        return torch.cat(parts, dim=1)  # (B, C + g, H, W)


class MSDLayer(nn.Module):
    """One MSDNet layer over all active scales, optionally dropping the finest.

    Args:
        nin: base input channels (scale ``s`` has ``nin * gr_factor[s]``).
        growth: base growth rate (scale ``s`` grows by ``growth * gr_factor[s]``).
        in_scales: number of active input scales (the coarsest ones).
        out_scales: number of output scales (``in_scales`` or ``in_scales - 1``).
        gr_factor: channel factor per scale.
        bn_factor: bottleneck factor per scale.
        bottleneck: whether the convs have a 1x1 bottleneck.
    """

    def __init__(self, nin: int, growth: int, *, in_scales: int, out_scales: int, gr_factor: Sequence[int],
                 bn_factor: Sequence[int], bottleneck: bool = True) -> None:
        super().__init__()
        n = len(gr_factor)
        self.first_in = n - in_scales  # absolute index of the finest input scale
        self.first_out = n - out_scales
        units = []
        for s in range(self.first_out, n):
            has_finer = s - 1 >= self.first_in
            units.append(ScaleUnit(
                nin * gr_factor[s], nin * gr_factor[s - 1] if has_finer else None, growth * gr_factor[s],
                bn_same=bn_factor[s], bn_finer=bn_factor[s - 1] if has_finer else None, bottleneck=bottleneck))
        self.units = nn.ModuleList(units)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for j, unit in enumerate(self.units):
            i = self.first_out + j - self.first_in  # position of this scale in the input list
            out.append(unit(xs[i], xs[i - 1] if unit.down is not None else None))  # (B, C_s + g_s, H_s, W_s)
        return out


class Transition(nn.Module):
    """A 1x1 conv, BN, ReLU per scale: compresses ``nin * gr_factor[s]`` to ``nout * gr_factor[s]`` channels."""

    def __init__(self, nin: int, nout: int, factors: Sequence[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(ConvBNReLU(nin * f, nout * f, 1) for f in factors)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self.convs, xs)]  # (B, nout * f_s, H_s, W_s) each


class FirstLayer(nn.Module):
    """MSDNet's first layer: one feature map per scale, each a strided conv of the previous one.

    Args:
        in_chans: input image channels.
        nchannels: base channels (scale ``s`` has ``nchannels * gr_factor[s]``).
        gr_factor: channel factor per scale (its length is the number of scales).
        imagenet: 7x7/2 conv and 3x3/2 max pool at the finest scale (else a 3x3 conv).
    """

    def __init__(self, in_chans: int, nchannels: int, gr_factor: Sequence[int], *, imagenet: bool) -> None:
        super().__init__()
        c0 = nchannels * gr_factor[0]
        if imagenet:
            first = ConvBNReLU(in_chans, c0, 7, 2).append(nn.MaxPool2d(3, 2, 1))
        else:
            first = ConvBNReLU(in_chans, c0, 3)
        convs = [first]
        for s in range(1, len(gr_factor)):
            convs.append(ConvBNReLU(nchannels * gr_factor[s - 1], nchannels * gr_factor[s], 3, 2))
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for conv in self.convs:
            x = conv(x)  # (B, C_s, H_s, W_s), halving H, W after the first
            out.append(x)
        return out


class MSDClassifier(nn.Module):
    """MSDNet classifier on the coarsest scale: two 3x3/2 convs, global average pooling, linear.

    Args:
        num_chs: channels of the coarsest scale.
        num_classes: number of logits.
        width: channels of the two convs (CIFAR: 128); ``None`` keeps ``num_chs`` (ImageNet).
    """

    def __init__(self, num_chs: int, num_classes: int, *, width: int | None = None) -> None:
        super().__init__()
        width = num_chs if width is None else width
        self.convs = nn.Sequential(ConvBNReLU(num_chs, width, 3, 2), ConvBNReLU(width, width, 3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width, num_classes)

    def forward(self, xs: list[Tensor]) -> Tensor:
        x = self.convs(xs[-1])  # (B, width, H/4, W/4) from the coarsest map
        return self.linear(self.pool(x).flatten(1))  # (B, num_classes)


class MSDNet(MultiExitModel):
    """A ``MultiExitModel`` whose states are lists of scales and whose ICs read the coarsest one."""

    def map_ic_input(self, state: list[Tensor], fn: Any) -> list[Tensor]:
        """``fn`` on the coarsest scale only: the part MSDNet's classifiers read (and IMTA rescales)."""
        return [*state[:-1], fn(state[-1])]


def msdnet_head(info: dict, num_classes: int, *, width: int | None = None) -> nn.Module:
    """``make_head`` for MSDNet: its own classifier, sized from ``info["num_chs"]`` (the coarsest scale).

    Args:
        info: a ``feature_info`` entry of an MSDNet stage.
        num_classes: number of logits.
        width: conv channels of the classifier (``None``: as many as the input).
    Returns:
        An ``MSDClassifier``.
    """
    return MSDClassifier(info["num_chs"], num_classes, width=width)


def block_depths(num_blocks: int, base: int, step: int, step_mode: str) -> list[int]:
    """Layers per block: ``base`` for the first, then ``step`` ("even") or ``step * i + 1`` ("lin_grow").

    Args:
        num_blocks: number of blocks (= exits).
        base: layers of the first block.
        step: step size.
        step_mode: "even" or "lin_grow".
    Returns:
        A list of ``num_blocks`` positive layer counts.
    """
    if step_mode not in ("even", "lin_grow"):
        raise ValueError(f"step_mode must be 'even' or 'lin_grow', got {step_mode!r}")
    depths = [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, num_blocks)]
    if num_blocks < 1 or min(depths) < 1:
        raise ValueError(f"every block needs at least one layer; got num_blocks={num_blocks}, layers {depths}")
    return depths


def scale_schedule(num_layers: int, n_scales: int) -> list[tuple[int, int]]:
    """(input scales, output scales) of each layer under "max" pruning.

    The layers are cut into runs of ``ceil(num_layers / n_scales)``; the first layer
    of every run after the first drops the finest remaining scale.

    Args:
        num_layers: total number of MSDNet layers.
        n_scales: number of scales at the start.
    Returns:
        One ``(in_scales, out_scales)`` pair per layer.
    """
    interval = math.ceil(num_layers / n_scales)
    out = []
    for layer in range(1, num_layers + 1):
        out.append((n_scales - max(0, layer - 2) // interval, n_scales - (layer - 1) // interval))
    return out


@torch.no_grad()
def _feature_info(stem: nn.Module, stages: Sequence[nn.Module], input_shape: Sequence[int]) -> list[dict]:
    """Shapes of each stage's output list, in eval mode; ``num_chs``/``size`` describe the coarsest scale."""
    mods = (stem, *stages)
    was = [m.training for m in mods]
    info = []
    try:
        for m in mods:
            m.eval()
        xs = stem(torch.zeros(1, *input_shape))
        for i, s in enumerate(stages):
            xs = s(xs)
            info.append({
                "num_chs": xs[-1].shape[1],
                "size": tuple(xs[-1].shape[2:]),
                "scales": [(x.shape[1], tuple(x.shape[2:])) for x in xs],
                "module": f"stages.{i}",
            })
    finally:
        for m, w in zip(mods, was):
            m.train(w)
    return info


def msdnet(
    *,
    num_classes: int,
    in_chans: int = 3,
    ic_after: Any = None,
    image_size: int = 32,
    num_blocks: int,
    base: int,
    step: int,
    step_mode: str = "even",
    nchannels: int,
    growth: int,
    gr_factor: Sequence[int],
    bn_factor: Sequence[int],
    reduction: float = 0.5,
    bottleneck: bool = True,
    imagenet_stem: bool,
    head_width: int | None,
) -> MultiExitModel:
    """Build an MSDNet with one classifier after every block (see the module docstring).

    Args:
        num_classes: classes of every exit.
        in_chans: input image channels.
        ic_after: IC placement (block indices or a spec, see ``earlyexit.models``); default: every block.
        image_size: side of the square input.
        num_blocks: number of blocks (stages), each followed by a classifier.
        base: layers of the first block.
        step: layers of later blocks ("even") or their growth ("lin_grow").
        step_mode: "even" or "lin_grow".
        nchannels: base channels of the first layer.
        growth: base growth rate.
        gr_factor: channel factor per scale; its length is the number of scales.
        bn_factor: bottleneck factor per scale.
        reduction: channel compression of the transition layers (0 disables them).
        bottleneck: whether the dense convs have a 1x1 bottleneck.
        imagenet_stem: 7x7/2 conv + max pool first layer instead of a 3x3 conv.
        head_width: conv channels of the classifiers (``None``: the coarsest scale's channels).
    Returns:
        A ``MultiExitModel`` whose states are lists of per-scale tensors.
    """
    n_scales = len(gr_factor)
    if n_scales < 1 or len(bn_factor) != n_scales:
        raise ValueError(f"gr_factor and bn_factor need one entry per scale; "
                         f"got {list(gr_factor)} and {list(bn_factor)}")
    if num_classes < 1 or in_chans < 1 or nchannels < 1 or growth < 1:
        raise ValueError(f"num_classes, in_chans, nchannels and growth must be >= 1; got "
                         f"{num_classes}, {in_chans}, {nchannels}, {growth}")
    if not 0 <= reduction <= 1:
        raise ValueError(f"reduction must lie in [0, 1], got {reduction}")
    if image_size < 2 ** (n_scales + 1):
        raise ValueError(f"image_size {image_size} is too small for {n_scales} scales")
    depths = block_depths(num_blocks, base, step, step_mode)
    schedule = scale_schedule(sum(depths), n_scales)

    stem = FirstLayer(in_chans, nchannels, gr_factor, imagenet=imagenet_stem)
    stages, nin, layer = [], nchannels, 0
    for depth in depths:
        layers: list[nn.Module] = []
        for _ in range(depth):
            in_s, out_s = schedule[layer]
            layer += 1
            layers.append(MSDLayer(nin, growth, in_scales=in_s, out_scales=out_s, gr_factor=gr_factor,
                                   bn_factor=bn_factor, bottleneck=bottleneck))
            nin += growth
            if in_s > out_s and reduction > 0:
                nout = math.floor(reduction * nin)
                layers.append(Transition(nin, nout, gr_factor[n_scales - out_s:]))
                nin = nout
        stages.append(nn.Sequential(*layers))

    input_shape = (in_chans, image_size, image_size)
    info = _feature_info(stem, stages, input_shape)
    make_head = functools.partial(msdnet_head, width=head_width)
    final = make_head(info[-1], num_classes)
    chosen = resolve_ic_after(ic_after, stem, stages, final, (1, *input_shape), default=list(range(num_blocks - 1)))
    model = MSDNet(stem=stem, stages=stages, head=final, ic_after=chosen, make_head=make_head,
                   feature_info=info, num_classes=num_classes, input_shape=input_shape)
    init_conv_bn(model, zero_linear_bias=True)  # the authors' init
    return model


# --- config and registered sizes ---------------------------------------------------

@dataclass(frozen=True)
class MSDNetConfig:
    """An MSDNet's architecture (a registered size is an instance; ``--model-opt`` sets fields by name)."""

    image_size: int = 32            # side of the square input images (pixels)
    num_blocks: int = 7             # blocks (stages), each followed by a classifier
    base: int = 4                   # layers of the first block
    step: int = 2                   # layers of later blocks ("even") or their growth ("lin_grow")
    step_mode: str = "even"         # "even" or "lin_grow"
    nchannels: int = 16             # base channels of the first layer
    growth: int = 6                 # base growth rate (channels a layer adds)
    gr_factor: tuple[int, ...] = (1, 2, 4)  # channel factor per scale; its length is the number of scales
    bn_factor: tuple[int, ...] = (1, 2, 4)  # bottleneck factor per scale
    reduction: float = 0.5          # channel compression of the transition layers (0 disables them)
    bottleneck: bool = True         # the dense convs have a 1x1 bottleneck
    imagenet_stem: bool = False     # 7x7/2 conv + max pool first layer instead of a 3x3 conv
    head_width: int | None = 128    # conv channels of the classifiers (None: the coarsest scale's channels)

    def __post_init__(self) -> None:
        check_fields(self, sizes=("image_size", "nchannels", "growth", "head_width"),
                     nonnegative=("reduction",))


def build_msdnet(cfg: MSDNetConfig, *, num_classes: int, in_chans: int = 3, ic_after: Any = None) -> MultiExitModel:
    """The MSDNet of ``cfg`` (``msdnet``)."""
    return msdnet(num_classes=num_classes, in_chans=in_chans, ic_after=ic_after, **dataclasses.asdict(cfg))


MODELS = {
    "msdnet_cifar": MSDNetConfig(),  # the anytime setting on CIFAR: 7 blocks, step 2, 3 scales
    "msdnet_imagenet": MSDNetConfig(image_size=224, num_blocks=5, step=4, nchannels=32, growth=16,
                                    gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), imagenet_stem=True,
                                    head_width=None),  # 5 blocks, step 4, 4 scales
}
for _name, _cfg in MODELS.items():
    register_model(_name, config=_cfg, tiny=dict(image_size=64 if _cfg.imagenet_stem else 32))(build_msdnet)
