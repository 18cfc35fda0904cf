"""Internal-classifier (IC) head designs.

``SDNHead`` follows Shallow-Deep Networks (Kaya et al., ICML 2019): a large
feature map is reduced by a learned mix of max and average pooling, then a
linear layer maps it to logits. ``SDNExactHead`` is SDN's own layer for layer
(its pooling kernel, its unbounded mixing weight); the two agree in size on
maps whose side is a multiple of 4 and differ elsewhere (a 7x7 map: SDNHead
pools to 4x4, SDN does not reduce it). Heads are sized from the backbone's
``feature_info`` (channels and spatial size of the stage output), never by hand.

Each head also declares how weight matching permutes it (``permutation_axes``,
see ``earlyexit.analysis.connectivity``): its input features move with the
permutation of the stage it reads; its outputs (the classes) stay in place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F


class SDNHead(nn.Module):
    """SDN internal classifier for a ``(B, C, H, W)`` feature map.

    When the map is larger than ``pool_to`` x ``pool_to`` it is pooled down to
    that size with ``alpha * maxpool + (1 - alpha) * avgpool``; the result is
    flattened into a linear layer. ``alpha = sigmoid(mix)`` with a learned
    scalar ``mix`` (initialised at 0, so ``alpha = 0.5``): SDN learns ``alpha``
    itself, unbounded, which at learning rate 0.1 can run away (|alpha| in the
    millions within tens of steps) and turn the loss into NaN; the sigmoid keeps
    it a convex mix of the two poolings.

    Args:
        num_chs: channels of the feature map.
        size: spatial size ``(H, W)`` of the feature map.
        num_classes: number of logits.
        pool_to: side of the pooled map (SDN reduces to 4x4).
    """

    def __init__(self, num_chs: int, size: tuple[int, int], num_classes: int, *, pool_to: int = 4) -> None:
        super().__init__()
        h, w = size
        self.out_size = (min(h, pool_to), min(w, pool_to))
        self.reduce = (h, w) != self.out_size
        if self.reduce:
            self.mix = nn.Parameter(torch.tensor(0.0))
        self.linear = nn.Linear(num_chs * self.out_size[0] * self.out_size[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.reduce:
            mx = F.adaptive_max_pool2d(x, self.out_size)  # (B, C, h, w)
            av = F.adaptive_avg_pool2d(x, self.out_size)  # (B, C, h, w)
            alpha = torch.sigmoid(self.mix)
            x = alpha * mx + (1 - alpha) * av
        return self.linear(x.flatten(1))  # (B, num_classes)

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> None:
        """Weight matching: the linear layer reads ``C x h x w`` flattened features, so whole ``h x w`` blocks
        move with their channel (its weight is seen as ``(K, C, h*w)``)."""
        w = self.linear.weight
        n = rules.sizes[inp]
        rules.views[prefix + "linear.weight"] = (w.shape[0], n, w.shape[1] // n)
        rules.axes[prefix + "linear.weight"], rules.axes[prefix + "linear.bias"] = (None, inp, None), (None,)
        if self.reduce:
            rules.axes[prefix + "mix"] = ()


class SDNExactHead(nn.Module):
    """SDN's internal classifier, layer for layer (``InternalClassifier`` in SDN's ``aux_funcs.py``).

    A side ``s >= 4`` is reduced by max and average pooling with kernel and
    stride ``s // 4`` (no padding, so ``s // (s // 4)`` remains: 4 or 5, or
    ``s`` itself for ``4 <= s < 8``, where the kernel is 1), mixed as
    ``alpha * max + (1 - alpha) * avg`` with one learned ``alpha`` that is
    unbounded and drawn uniform in ``[0, 1)``; a map with a side below 4 is
    flattened as it is. A linear layer maps the flattened result to logits.
    SDN's maps are square; a non-square map here gets each side's kernel from
    that side, and is left unreduced when either side is below 4. SDN sizes
    the head from the input size it tracks per group (halving it at each
    stride); here the real map size (``feature_info``) is used.

    Args:
        num_chs: channels of the feature map.
        size: spatial size ``(H, W)`` of the feature map.
        num_classes: number of logits.
    """

    def __init__(self, num_chs: int, size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        h, w = size
        self.reduce = h >= 4 and w >= 4
        if self.reduce:
            self.kernel = (h // 4, w // 4)
            self.out_size = (h // self.kernel[0], w // self.kernel[1])
            self.alpha = nn.Parameter(torch.rand(1))  # (1,), SDN's initialisation, drawn before the linear layer's
        else:
            self.out_size = (h, w)
        self.linear = nn.Linear(num_chs * self.out_size[0] * self.out_size[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of a ``(B, C, H, W)`` map."""
        if self.reduce:
            mx = F.max_pool2d(x, self.kernel)  # (B, C, h, w)
            av = F.avg_pool2d(x, self.kernel)  # (B, C, h, w)
            x = self.alpha * mx + (1 - self.alpha) * av
        return self.linear(x.flatten(1))  # (B, num_classes)

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> None:
        """Weight matching: as ``SDNHead`` (whole ``h x w`` blocks of the linear layer's inputs move with their channel)."""
        w = self.linear.weight
        n = rules.sizes[inp]
        rules.views[prefix + "linear.weight"] = (w.shape[0], n, w.shape[1] // n)
        rules.axes[prefix + "linear.weight"], rules.axes[prefix + "linear.bias"] = (None, inp, None), (None,)
        if self.reduce:
            rules.axes[prefix + "alpha"] = (None,)


class LinearHead(nn.Module):
    """A linear layer on a ``(B, D)`` vector state (used by the MLP toy backbone)."""

    def __init__(self, num_chs: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_chs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> None:
        """Weight matching: the linear layer's inputs move with the state's units."""
        rules.axes[prefix + "linear.weight"], rules.axes[prefix + "linear.bias"] = (None, inp), (None,)


class PoolLinearHead(nn.Module):
    """Global average pooling and a linear layer: the ResNet classifier (``fc`` keeps torchvision's name)."""

    def __init__(self, num_chs: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(num_chs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # (B, num_classes)

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> None:
        """Weight matching: pooling keeps the channels, so ``fc``'s inputs move with them."""
        rules.axes[prefix + "fc.weight"], rules.axes[prefix + "fc.bias"] = (None, inp), (None,)


def sdn_head(info: dict, num_classes: int) -> nn.Module:
    """``make_head`` for convolutional backbones: an ``SDNHead`` sized from ``info``."""
    return SDNHead(info["num_chs"], info["size"], num_classes)


def sdn_exact_head(info: dict, num_classes: int) -> nn.Module:
    """``make_head`` for SDN's own internal classifier: an ``SDNExactHead`` sized from ``info``."""
    return SDNExactHead(info["num_chs"], info["size"], num_classes)


HEADS = {"sdn": sdn_head, "sdn_exact": sdn_exact_head}


def conv_head(name: str):
    """The ``make_head`` of a convolutional backbone's ``head=`` option (``"sdn"`` or ``"sdn_exact"``).

    Raises:
        ValueError: for another name.
    """
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid: {', '.join(HEADS)}")
    return HEADS[name]
