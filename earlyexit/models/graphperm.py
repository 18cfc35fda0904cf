"""Weight matching on a traced model: the permutation symmetries of its channels, read from its torch.fx graph.

Git Re-Basin's weight matching (``analysis.connectivity``) permutes hidden
units without changing what a network computes. A hand-written backbone says
which permutation acts on which axis of each weight (``permutation_axes`` on
its parts); the parts of a traced model (``models.tvgraph``) are pieces of one
graph, so ``graph_symmetry`` reads the same from the graph, one node at a time,
with rules that keep the function by construction:

- a value is *tracked* when it is a ``(B, C, H, W)`` map in NCHW layout or a
  ``(B, D)`` vector; its channel axis (axis 1) belongs to a *group*, and every
  tensor of a group is permuted alike;
- a ``Conv2d`` (one group of channels) or a ``Linear`` starts a new group, its
  weight's input axis following its input's group; a depthwise ``Conv2d``
  (``groups == in == out`` channels) keeps its input's group; a BatchNorm keeps
  it and its entries follow it; so do elementwise activations, dropout,
  pooling, torchvision's ``StochasticDepth``, a mean over the spatial axes and a
  flatten (or view) of a ``1 x 1`` map; torchvision's ``SqueezeExcitation``
  keeps it and gets a group of its own for its hidden units;
- an add, subtract, multiply or divide of maps ties their groups into one (a
  residual stream shares one permutation, a gate its map's); an operand with
  one channel broadcasts and ties nothing; torchvision's leaf ``nn.Sequential``
  s (``Conv2dNormActivation``) apply these rules child by child;
- anything else (concatenation, grouped convolutions, reshapes, permutes,
  LayerNorm, attention, a module whose parameters serve twice, a parameter read
  by a function) *fixes* the groups of its inputs and gives an unpermuted
  output; so are the model's input and its logits. A group fixed anywhere is
  fixed everywhere: it is never permuted.

The groups left free are the permutations weight matching may use (ResNets,
MobileNets, EfficientNets, RegNets: their residual streams, expansions and
squeeze-excitation units; DenseNet, GoogLeNet, Inception: what their
concatenations leave). A model left with none (ViT, Swin, ConvNeXt: their
channels meet LayerNorms, permutes and token sequences) cannot be matched, and
says so (``GraphSymmetry.reason``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
                 nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_KEEP_FUNCTIONS = {torch.relu, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid, F.sigmoid,
                   torch.tanh, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_KEEP_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
_TIE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                  operator.truediv, torch.add, torch.sub, torch.mul}
_TIE_METHODS = {"add", "add_", "sub", "mul", "mul_"}
_SHAPE_ONLY = {"size", "dim"}  # a value's shape does not change under a permutation of its channels
_INVARIANT_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}


@dataclass
class GraphSymmetry:
    """A traced model's permutation symmetries, as plain data (kept on the model, deep-copied with it).

    Attributes:
        sizes: permutation name -> number of channels it permutes.
        axes: parameter or buffer name in the traced model (``"layer1.0.conv1.weight"``) -> one permutation
            name (or None) per axis; entries not listed are not permuted.
        cut_perm: node name of every cut -> the permutation of the value an IC there reads (None: none).
        head_path: module path of the model's final classifier in the traced model (None: no classifier module).
        reason: why the model cannot be matched (no free permutation), else None.
    """

    sizes: dict[str, int] = field(default_factory=dict)
    axes: dict[str, tuple] = field(default_factory=dict)
    cut_perm: dict[str, str | None] = field(default_factory=dict)
    head_path: str | None = None
    reason: str | None = None


class _Groups:
    """Union-find over channel groups; a group is fixed when any group merged into it is."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.size: list[int] = []
        self.name: list[str] = []

    def new(self, size: int, name: str) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(False)
        self.size.append(int(size))
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def fix(self, g: int | None) -> None:
        if g is not None:
            self.fixed[self.find(g)] = True

    def tie(self, a: int | None, b: int | None) -> int | None:
        """One group of ``a`` and ``b`` (an unpermuted side, None, fixes the other)."""
        if a is None or b is None:
            self.fix(a if b is None else b)
            return None
        ra, rb = sorted((self.find(a), self.find(b)))  # the older group names the merged one
        if ra != rb:
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]
        return ra

    def resolve(self, g: int | None) -> str | None:
        if g is None:
            return None
        r = self.find(g)
        return None if self.fixed[r] else self.name[r]


def graph_symmetry(plan: Any, cuts: list[str]) -> GraphSymmetry:
    """The permutation symmetries of ``plan``'s traced model (see the module docstring).

    Args:
        plan: the traced model (``tvgraph.Plan``): its eval graph, node shapes and layouts.
        cuts: node names where the model is cut (an IC there reads that node's value).
    Returns:
        A ``GraphSymmetry``; ``reason`` is set when no permutation is free.
    """
    g = plan.eval
    modules = dict(plan.model.named_modules())
    calls: dict[str, int] = {}  # module path -> how often the graph calls it
    for n in g.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    names: dict[int, int] = {}  # parameter -> how many names it has (tied weights have several)
    for _, p in plan.model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    groups = _Groups()
    axes: dict[str, tuple] = {}  # parameter name -> group ids (resolved at the end)
    group: dict[fx.Node, int | None] = {}

    def shape(n: Any) -> tuple | None:
        return plan.shape.get(g.name[n]) if isinstance(n, fx.Node) else None

    def tracked(n: Any) -> bool:
        s = shape(n)
        return s is not None and (len(s) == 1 or (len(s) == 3 and plan.layout.get(g.name[n]) == "NCHW"))

    def unknown(n: fx.Node) -> None:
        for a in n.all_input_nodes:
            groups.fix(group.get(a))
        group[n] = None

    for n in g.nodes:
        if n.op in ("placeholder", "get_attr"):
            group[n] = None
        elif n.op == "output":
            unknown(n)  # the logits are never permuted
        elif n.op == "call_module":
            m = modules[n.target]
            x = n.args[0] if n.args else None
            own = list(m.parameters())  # a module whose parameters serve twice must read one permutation: fixed
            shared = bool(own) and (calls[n.target] > 1 or any(names[id(p)] > 1 for p in own))
            if shared or n.all_input_nodes != [x] or x not in g.batched or not tracked(x) or not tracked(n):
                unknown(n)
            elif isinstance(m, nn.Flatten):  # keeps the channels of a 1 x 1 map (the classifier's input)
                group[n] = group.get(x) if m.start_dim == 1 and shape(x)[1:] in ((1, 1), ()) else None
                if group[n] is None:
                    unknown(n)
            else:
                group[n] = _module(m, n.target, group.get(x), len(shape(x)) + 1, groups, axes)
        elif (n.op == "call_method" and n.target in _SHAPE_ONLY) or (n.target is getattr and len(n.args) > 1
                                                                      and n.args[1] in _INVARIANT_ATTRIBUTES):
            group[n] = None  # no constraint: a shape is the same whatever the permutation
        else:
            group[n] = _function(n, group, tracked, shape, groups, g.batched)
            if group[n] is None:
                unknown(n)
    head_path = next((n.target for n in g.nodes if n.op == "call_module" and modules[n.target] is plan.head), None)
    sizes: dict[str, int] = {}
    resolved: dict[str, tuple] = {}
    for key, ax in axes.items():
        resolved[key] = tuple(groups.resolve(a) for a in ax)
        for a, r in zip(ax, resolved[key]):
            if r is not None:
                sizes[r] = groups.size[groups.find(a)]
    cut_perm = {c: groups.resolve(group.get(g.by_name[c])) for c in cuts}
    sizes.update({p: groups.size[groups.find(group[g.by_name[c]])] for c, p in cut_perm.items() if p is not None})
    reason = None if sizes else ("its traced graph leaves no channel permutation free (LayerNorm, permutes, "
                                 "concatenations or token sequences tie every channel)")
    return GraphSymmetry(sizes=sizes, axes=resolved, cut_perm=cut_perm, head_path=head_path, reason=reason)


def _module(m: nn.Module, path: str, inp: int | None, rank: int, groups: _Groups, axes: dict) -> int | None:
    """The group of a module's output, given its input's; records its entries' axes in ``axes``.

    ``rank``: the number of axes of its input (4: a map, 2: a vector). Unknown modules fix ``inp``.
    """
    import torchvision

    def fixed() -> None:
        groups.fix(inp)
        return None

    if isinstance(m, nn.Sequential):  # torchvision's leaf blocks (Conv2dNormActivation): child by child
        cur = inp
        for name, child in m.named_children():
            if isinstance(child, (nn.Flatten, nn.Sequential)):
                groups.fix(cur)
                return None
            cur = _module(child, f"{path}.{name}", cur, rank, groups, axes)
            rank = 2 if isinstance(child, nn.Linear) else rank
        return cur
    if type(m) is nn.Conv2d and rank == 4:
        if m.groups == 1:
            out = groups.new(m.out_channels, path)
            axes[f"{path}.weight"] = (out, inp, None, None)
        elif m.groups == m.in_channels == m.out_channels:  # depthwise: channel i reads channel i only
            out = inp
            axes[f"{path}.weight"] = (out, None, None, None)
        else:
            return fixed()
        if m.bias is not None:
            axes[f"{path}.bias"] = (out,)
        return out
    if type(m) is nn.Linear and rank == 2:
        out = groups.new(m.out_features, path)
        axes[f"{path}.weight"] = (out, inp)
        if m.bias is not None:
            axes[f"{path}.bias"] = (out,)
        return out
    if (type(m) is nn.BatchNorm2d and rank == 4) or (type(m) is nn.BatchNorm1d and rank == 2):
        for s in ("weight", "bias", "running_mean", "running_var"):
            axes[f"{path}.{s}"] = (inp,)
        axes[f"{path}.num_batches_tracked"] = ()
        return inp
    if type(m) in _KEEP_MODULES or type(m) is torchvision.ops.StochasticDepth:
        return inp
    if type(m) is torchvision.ops.SqueezeExcitation and rank == 4:
        hidden = groups.new(m.fc1.out_channels, f"{path}.fc1")
        axes[f"{path}.fc1.weight"], axes[f"{path}.fc1.bias"] = (hidden, inp, None, None), (hidden,)
        axes[f"{path}.fc2.weight"], axes[f"{path}.fc2.bias"] = (inp, hidden, None, None), (inp,)
        return inp
    return fixed()


def _function(n: fx.Node, group: dict, tracked: Any, shape: Any, groups: _Groups, batched: set) -> int | None:
    """The group of a function's or method's output (None: an unknown operation, whose inputs get fixed)."""
    if not tracked(n):
        return None
    args = list(n.args) + list(n.kwargs.values())
    nodes = [a for a in args if isinstance(a, fx.Node)]
    x = n.args[0] if n.args else None
    op = n.target
    keep = op in _KEEP_FUNCTIONS or (n.op == "call_method" and op in _KEEP_METHODS)
    flat = op in (torch.flatten, torch.reshape, torch.squeeze) or (n.op == "call_method" and op in (
        "flatten", "view", "reshape", "squeeze"))
    mean = op is torch.mean or (n.op == "call_method" and op == "mean")
    if keep or flat or mean:
        if not isinstance(x, fx.Node) or not tracked(x) or any(a is not x and a in batched for a in nodes):
            return None
        sx, sn = shape(x), shape(n)
        if keep and sx[0] == sn[0] and len(sx) == len(sn):
            return group.get(x)
        if flat and len(sx) == 3 and sx[1:] == (1, 1) and sn in (sx, sx[:1]):  # a 1 x 1 map as a vector
            return group.get(x)
        if flat and sn == sx:
            return group.get(x)
        if mean and sx[0] == sn[0]:
            dims = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, int) for d in dims) \
                    and all(d % (len(sx) + 1) >= 2 for d in dims):
                return group.get(x)
        return None
    if op in _TIE_FUNCTIONS or (n.op == "call_method" and op in _TIE_METHODS):
        sn = shape(n)
        out: int | None = -1  # none tied yet
        for a in nodes:
            if a not in batched or not tracked(a) or len(shape(a)) != len(sn):
                return None
            if shape(a)[0] == 1 and sn[0] != 1:
                continue  # one channel, broadcast over all: nothing to tie
            if shape(a)[0] != sn[0]:
                return None
            out = group.get(a) if out == -1 else groups.tie(out, group.get(a))
        return None if out == -1 else out
    return None


__all__ = ["GraphSymmetry", "graph_symmetry"]
