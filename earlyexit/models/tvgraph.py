"""Any traceable classifier as a ``MultiExitModel``: its torch.fx graph cut into stages at chosen nodes.

The model is traced twice, in train and in eval mode (torchvision's
``NodePathTracer``, with torchvision's leaf modules, so node names are those of
``torchvision.models.feature_extraction.get_graph_node_names``), because a
graph bakes in whatever its Python code decided from ``self.training``.
``plan_graph`` runs the eval graph once on an example to record every node's
output shape and the FLOPs counted up to it (``flops.count_flops``:
2 x multiply-adds). ``cut_model`` then cuts both graphs at the same nodes:

- stage ``i`` maps the state after cut ``i - 1`` to the state after cut ``i``
  (stage 0 reads the input); the last stage ends at the input of the model's
  final ``nn.Linear``, which becomes the backbone's own head (``heads[-1]``),
  or at the logits when the model ends otherwise (the head is then the identity);
- the state passed on is every value a later node still needs (a skip
  connection crossing a cut is carried): one tensor when the cut node's output
  is the only such value, else a dict of them keyed by node name, the cut node
  first (an IC reads that entry; ``map_ic_input``); values that do not depend
  on the input (parameters, constants) are recomputed in the stage that uses
  them; an int or other non-tensor that depends on the input cannot cross a cut;
- each ``GraphStage`` holds the submodules its nodes call under their own paths
  (so a state dict keeps the model's names under ``stages.I.``) and runs the
  train or the eval graph after its ``training`` flag.

Natural blocks (``natural_blocks``): where an IC may go by index. A *stack* is
an ``nn.Sequential`` / ``nn.ModuleList`` whose children all have children of
their own, or at least two of them do; the blocks are the children of the
outermost stacks (a child that is itself a stack is expanded), e.g. ResNet's
``layer1.0`` .. ``layer4.1``, MobileNet's ``features.N``, ViT's
``encoder.layers.encoder_layer_N``, Swin's ``features.N`` / ``features.N.M``.
Only blocks whose output is the one value crossing the cut are kept; a model
left with fewer than two (VGG, GoogLeNet) falls back to its top-level
children, containers expanded. Stages are the blocks (the last block with the tail up to the
classifier), so ``ic_after=`` block indices mean what they mean for the other
backbones; an IC placed at another node adds a cut there.

IC heads are chosen from the shape of the node they read (``make_ic_head``):
a ``(B, C, H, W)`` map gets the SDN head (``head=``), a channels-last
``(B, H, W, C)`` map (found by following permutes from the convolutions, as in
Swin) LayerNorm + mean over ``H, W`` + linear, a ``(B, T, D)`` sequence
LayerNorm + linear on the class token or the mean of the tokens
(``vit.TokenHead``), a ``(B, D)`` vector a linear layer.

Weight matching (``analysis.connectivity``) permutes what ``models.graphperm`` reads
from the graph at cut time (``GraphMultiExit.permutation_axes``).
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx, nn

from ..errors import ConfigError
from ..flops import count_flops
from .common import resolve_ic_after, sdn_placement
from .graphperm import GraphSymmetry, graph_symmetry
from .heads import LinearHead, conv_head
from .multiexit import MultiExitModel
from .vit import TokenHead

HINT = "write a hand-written backbone instead (CONTRIBUTING.md, 'Adding a backbone')"


# --- tracing ---------------------------------------------------------------------

def _tracer_kwargs() -> dict:
    """torchvision's defaults: its ``ops`` modules are leaves and its ``ops`` functions are wrapped."""
    import torchvision

    leaves = [c for _, c in inspect.getmembers(torchvision.ops) if inspect.isclass(c) and issubclass(c, nn.Module)]
    return {"autowrap_modules": (math, torchvision.ops), "leaf_modules": leaves}


def _tracer() -> Any:
    from torchvision.models.feature_extraction import NodePathTracer

    class PathTracer(NodePathTracer):
        """Also records each module's output node and the innermost module a failed trace was in."""

        def __init__(self) -> None:
            super().__init__(**_tracer_kwargs())
            self.outputs: dict[str, fx.Node] = {}
            self.failed_at: str | None = None

        def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
            path = self.path_of_module(m)
            try:
                out = super().call_module(m, forward, args, kwargs)
            except Exception:
                if self.failed_at is None:
                    self.failed_at = path
                raise
            if isinstance(out, fx.Proxy):
                self.outputs[path] = out.node
            return out

    return PathTracer()


@dataclass
class Traced:
    """One traced graph: its nodes in execution order, their names, each module's output node."""

    graph: fx.Graph
    nodes: list[fx.Node]
    name: dict[fx.Node, str]           # node -> node name (get_graph_node_names')
    module_out: dict[str, fx.Node]     # module path -> the node of its output
    pos: dict[fx.Node, int] = field(default_factory=dict)
    last_use: dict[fx.Node, int] = field(default_factory=dict)
    batched: set = field(default_factory=set)  # nodes whose value depends on the input

    def __post_init__(self) -> None:
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {v: k for k, v in self.name.items()}
        for n in self.nodes:
            self.last_use[n] = max((self.pos[u] for u in n.users), default=-1)
            if n.op == "placeholder" or any(a in self.batched for a in n.all_input_nodes):
                self.batched.add(n)

    def live(self, p: int) -> list[fx.Node]:
        """Input-dependent values computed at or before position ``p`` that a later node uses."""
        return [n for n in self.nodes[:p + 1] if n in self.batched and self.last_use[n] > p]

    def find(self, name: str) -> fx.Node | None:
        """A node by its name, or a module's output by the module's path."""
        return self.by_name.get(name) or self.module_out.get(name)


def trace(model: nn.Module, what: str) -> dict[bool, Traced]:
    """The model's graphs in train (``True``) and eval (``False``) mode; its mode is restored.

    Raises:
        ConfigError: the model cannot be traced (data-dependent control flow and the like), naming the
            innermost module the trace was in.
    """
    was = model.training
    out = {}
    try:
        for mode in (True, False):
            tracer = _tracer()
            try:
                graph = tracer.trace(model.train(mode))
            except Exception as e:  # noqa: BLE001  (whatever stops the tracer is the user's model's)
                where = f"node {tracer.failed_at!r}" if tracer.failed_at else "its own forward"
                msg = " ".join(str(e).split())[:160] or type(e).__name__
                raise ConfigError(f"cannot trace {what} at {where}: {type(e).__name__}: {msg}; {HINT}") from None
            names = {n: q for n, q in tracer.node_to_qualname.items()}
            nodes = list(graph.nodes)
            for n in nodes:
                names.setdefault(n, n.name)
            out[mode] = Traced(graph, nodes, names, dict(tracer.outputs))
    finally:
        model.train(was)
    if [out[True].name[n] for n in out[True].nodes] != [out[False].name[n] for n in out[False].nodes]:
        raise ConfigError(f"{what} has different graphs in train and eval mode; {HINT}")
    return out


# --- what the eval graph computes -------------------------------------------------

@dataclass
class Plan:
    """A traced model and what its eval graph computes on an example (see the module docstring)."""

    model: nn.Module
    graphs: dict[bool, Traced]
    shape: dict[str, tuple | None]     # node name -> per-sample shape of a tensor output (None: not a batch tensor)
    layout: dict[str, str]             # node name -> "NCHW" / "NHWC" for 4-D outputs
    flops: dict[str, float]            # node name -> cumulative per-sample FLOPs up to and including the node
    end: str                           # node whose output the backbone's own head reads
    head: nn.Module                    # the model's final nn.Linear, or nn.Identity
    blocks: list[tuple[str, str]]      # natural blocks: (module path, output node name), clean cuts before ``end``
    token_pool: str                    # what a (B, T, D) IC reads: "token" when the model reads x[:, 0], else "mean"

    @property
    def eval(self) -> Traced:
        return self.graphs[False]

    def node(self, name: str) -> str:
        """The node name of a node or module path (``ConfigError`` for one the graph lacks)."""
        n = self.eval.find(name)
        if n is None:
            raise ConfigError(f"no node or module {name!r} in the model's graph; list them with "
                              "`python -m earlyexit models --nodes NAME`")
        return self.eval.name[n]

    def check_cut(self, name: str) -> None:
        """``ConfigError`` unless an IC may read ``name``: a tensor of the batch before the final head, whose cut
        carries tensors only."""
        g = self.eval
        n = g.by_name[name]
        if self.shape.get(name) is None:
            raise ConfigError(f"node {name!r} does not give a tensor of the batch; an IC cannot read it")
        if g.pos[n] >= g.pos[g.by_name[self.end]]:
            raise ConfigError(f"node {name!r} lies at or after the input of the final head ({self.end!r})")
        bad = [g.name[m] for m in g.live(g.pos[n]) if self.shape.get(g.name[m]) is None]
        if bad:
            raise ConfigError(f"cannot cut the graph at node {name!r}: the non-tensor value {bad[0]!r} crosses "
                              f"it; choose another node or {HINT}")

    def clean(self, name: str) -> bool:
        g = self.eval
        n = g.by_name[name]
        return g.live(g.pos[n]) == [n]


def _layouts(g: Traced, shape: dict[str, tuple | None], modules: dict[str, nn.Module]) -> dict[str, str]:
    """Axis order of every 4-D output: NCHW from convolutions, changed by permutes, inherited otherwise."""
    out: dict[str, str] = {}
    for n in g.nodes:
        s = shape.get(g.name[n])
        if s is None or len(s) != 3:
            continue
        src = next((out[g.name[a]] for a in n.all_input_nodes if g.name[a] in out), None)
        dims = None
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, nn.Conv2d) or n.target is torch.nn.functional.conv2d:
            src = "NCHW"
        elif m is not None and isinstance(getattr(m, "dims", None), (list, tuple)):
            dims = m.dims
        elif n.target in ("permute", torch.permute):
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
        if dims is not None and src is not None and len(dims) == 4 and all(isinstance(d, int) for d in dims):
            src = "".join(src[d] for d in dims)
        out[g.name[n]] = src if src in ("NCHW", "NHWC") else "NCHW"
    return out


def plan_graph(model: nn.Module, graphs: dict[bool, Traced], example: Tensor, what: str) -> Plan:
    """Run the eval graph on ``example`` (a batch of 2, so that the batch dimension shows): shapes, layouts,
    cumulative FLOPs per sample, the end and the blocks."""
    g = graphs[False]
    b = example.shape[0]
    gm = fx.GraphModule(model, g.graph)
    shape: dict[str, tuple | None] = {}
    flops: dict[str, float] = {}
    total = [0.0]

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            c, out = count_flops(super().run_node, n)
            total[0] += c / b
            name = g.name[n]
            flops[name] = total[0]
            batch = isinstance(out, Tensor) and out.dim() >= 1 and out.shape[0] == b and n in g.batched
            shape[name] = tuple(out.shape[1:]) if batch else None
            return out

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(example)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (the user's model on the user's input shape)
        msg = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(f"{what} does not run on inputs of shape {tuple(example.shape[1:])}: {msg}") from None
    finally:
        model.train(was)
    modules = dict(model.named_modules())
    end_node, head = _final_head(g, modules, shape, what)
    token = any(n.target is operator.getitem and isinstance(n.args[1], tuple) and n.args[1][1:2] == (0,)
                for n in g.nodes)
    plan = Plan(model, graphs, shape, _layouts(g, shape, modules), flops, g.name[end_node], head, [],
                "token" if token else "mean")
    for loose in (False, True):  # a model whose stacks give no two clean blocks: its top-level children
        plan.blocks = _clean_blocks(plan, natural_blocks(model, loose=loose), g.pos[end_node])
        if len(plan.blocks) >= 2:
            break
    return plan


def _clean_blocks(plan: Plan, paths: list[str], end: int) -> list[tuple[str, str]]:
    """``(path, node)`` of the blocks whose output is the only value crossing it, in graph order, before ``end``."""
    g, out = plan.eval, []
    for path in paths:
        n = g.module_out.get(path)
        if n is None or g.pos[n] >= end or plan.shape.get(g.name[n]) is None or not plan.clean(g.name[n]):
            continue
        if not out or g.pos[g.by_name[out[-1][1]]] < g.pos[n]:
            out.append((path, g.name[n]))
    return out


def _final_head(g: Traced, modules: dict[str, nn.Module], shape: dict, what: str) -> tuple[fx.Node, nn.Module]:
    """The node the backbone's own head reads and that head: the final ``nn.Linear`` or the identity."""
    out = next(n for n in reversed(g.nodes) if n.op == "output")
    res = out.args[0]
    if not isinstance(res, fx.Node) or shape.get(g.name[res]) is None or len(shape[g.name[res]]) != 1:
        raise ConfigError(f"{what} must return one (B, classes) tensor of logits in both train and eval mode")
    m = modules.get(res.target) if res.op == "call_module" else None
    if isinstance(m, nn.Linear) and len(res.users) == 1 and res.args and isinstance(res.args[0], fx.Node) \
            and g.live(g.pos[res.args[0]]) == [res.args[0]]:
        return res.args[0], m
    return res, nn.Identity()


def natural_blocks(model: nn.Module, *, loose: bool = False) -> list[str]:
    """Module paths of the model's natural blocks, in module order (see the module docstring); ``loose``: the
    top-level children, every ``nn.Sequential`` / ``nn.ModuleList`` expanded (the fallback)."""
    def compound(m: nn.Module) -> bool:
        return next(m.children(), None) is not None

    def stack(m: nn.Module) -> bool:
        if not isinstance(m, (nn.Sequential, nn.ModuleList)) or not compound(m):
            return False
        kids = [compound(c) for c in m.children()]
        return loose or all(kids) or sum(kids) >= 2

    def walk(path: str, m: nn.Module, inside: bool, out: list[str]) -> None:
        for name, c in m.named_children():
            p = f"{path}.{name}" if path else name
            if stack(c):
                walk(p, c, True, out)
            elif inside or loose:
                out.append(p)
            else:
                walk(p, c, False, out)

    blocks: list[str] = []
    walk("", model, stack(model), blocks)
    return blocks


# --- stages -----------------------------------------------------------------------

def _share(root: nn.Module, to: nn.Module, target: str) -> None:
    """Install ``root``'s attribute ``target`` (a dotted path) under the same path in ``to``, by reference."""
    *prefix, last = target.split(".")
    src, dst = root, to
    for item in prefix:
        f, t = getattr(src, item), getattr(dst, item, None)
        if f is t:
            return
        if t is None:
            t = nn.Module()
            setattr(dst, item, t)
        src, dst = f, t
    orig = getattr(src, last)
    if isinstance(orig, Tensor) and not isinstance(orig, nn.Parameter):
        dst.register_buffer(last, orig, persistent=last not in src._non_persistent_buffers_set)
    else:
        setattr(dst, last, orig)


class GraphStage(nn.Module):
    """A piece of a traced graph as a module: the submodules it calls, and its train and eval code."""

    def __init__(self, root: nn.Module, graphs: dict[bool, fx.Graph]) -> None:
        super().__init__()
        for g in graphs.values():
            for n in g.nodes:
                if n.op in ("call_module", "get_attr"):
                    _share(root, self, n.target)
        self._fns = {}
        self._pairs: list[tuple[str, str]] = []
        for mode, g in graphs.items():
            gm = fx.GraphModule(self, g)
            self._fns[mode] = type(gm).forward  # generated code that reads the parts through ``self``
            if not mode:
                self.code = gm.code
                self._pairs = _conv_bn(g, dict(self.named_modules()))

    def forward(self, state: Any) -> Any:
        return self._fns[self.training](self, state)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """``(Conv2d, BatchNorm2d)`` module paths where the BatchNorm alone reads the convolution."""
        return list(self._pairs)


def _conv_bn(g: fx.Graph, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    calls: dict[str, int] = {}
    for n in g.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in g.nodes:
        if n.op == "call_module" and type(modules.get(n.target)) is nn.BatchNorm2d and calls[n.target] == 1:
            c = n.args[0] if n.args else None
            if isinstance(c, fx.Node) and c.op == "call_module" and type(modules.get(c.target)) is nn.Conv2d \
                    and len(c.users) == 1 and calls[c.target] == 1:
                pairs.append((c.target, n.target))
    return pairs


def _carried(t: Traced, name: str) -> list[fx.Node]:
    """What the state after the cut at node ``name`` holds: that node first, then every other value a later node
    needs."""
    n = t.by_name[name]
    return [n] + [m for m in t.live(t.pos[n]) if m is not n]


def _piece(t: Traced, start: int, stop: int, state_in: list[fx.Node], state_out: list[fx.Node]) -> fx.Graph:
    """Nodes ``(start, stop]`` of ``t`` as a graph from the state ``state_in`` to the state ``state_out`` (one
    tensor for a single value, else a dict by node name)."""
    g = fx.Graph()
    state = g.placeholder("state")
    env: dict[fx.Node, fx.Node] = {}
    if len(state_in) == 1:
        env[state_in[0]] = state
    else:
        for n in state_in:
            env[n] = g.call_function(operator.getitem, (state, t.name[n]))

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:  # an input-free value (a parameter, a constant) from an earlier piece: recompute it
            if n in t.batched:
                raise RuntimeError(f"node {t.name[n]!r} is needed after a cut that does not carry it")
            env[n] = g.node_copy(n, arg)
        return env[n]

    for n in t.nodes[start + 1:stop + 1]:
        if n.op != "placeholder":
            env[n] = g.node_copy(n, arg)
    g.output(env[state_out[0]] if len(state_out) == 1 else {t.name[n]: env[n] for n in state_out})
    return g


class GraphMultiExit(MultiExitModel):
    """A ``MultiExitModel`` of ``GraphStage`` s; a dict state's first entry is what its IC reads."""

    graph_symmetry: GraphSymmetry | None = None  # set by ``cut_model``

    def map_ic_input(self, state: Any, fn: Callable[[Any], Any]) -> Any:
        if isinstance(state, dict):
            key = next(iter(state))
            return {k: fn(v) if k == key else v for k, v in state.items()}
        return fn(state)

    def permutation_axes(self, rules: Any, prefix: str = "", inp: None = None) -> None:
        """Weight matching (``analysis.connectivity``): the whole model's permutations at once, as read from its
        graph (``models.graphperm``); IC heads declare theirs on the permutation of the node they read.

        Raises:
            ValueError: a graph with no free permutation (the reason), or an IC head that declares none.
        """
        sym = self.graph_symmetry
        if sym is None or sym.reason is not None:
            raise ValueError(f"weight matching cannot permute this traced model: "
                             f"{sym.reason if sym is not None else 'it was not cut by cut_model'}")
        for name, size in sym.sizes.items():
            rules.new(name, size)
        final = f"heads.{self.num_exits - 1}."
        for key, t in self.state_dict().items():
            if key.startswith("stages."):
                own = key.split(".", 2)[2]  # the stage holds the model's parts under their own paths
            elif key.startswith(final) and sym.head_path is not None:
                own = f"{sym.head_path}.{key[len(final):]}"
            else:
                own = None
            rules.axes[prefix + key] = (sym.axes.get(own) if own is not None else None) or (None,) * t.dim()
        for k, h in enumerate(self.heads[:-1]):
            perm = sym.cut_perm.get(self.nodes[self.exit_after[k]])
            if perm is None:
                continue  # an unpermuted input: the head's entries stay as they are (declared above)
            if not hasattr(h, "permutation_axes"):
                raise ValueError(f"weight matching does not know the head type {type(h).__name__} (exit {k})")
            h.permutation_axes(rules, f"{prefix}heads.{k}.", perm)


class ReadNode(nn.Module):
    """An IC head on a dict state: reads its first entry (the value of the cut node)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, state: Any) -> Tensor:
        return self.head(next(iter(state.values())) if isinstance(state, dict) else state)

    def permutation_axes(self, rules: Any, prefix: str, inp: str) -> None:
        """Weight matching: the head's own rule, on the cut node's permutation."""
        declare = getattr(self.head, "permutation_axes", None)
        if declare is None:
            raise ValueError(f"weight matching does not know the head type {type(self.head).__name__}")
        declare(rules, prefix + "head.", inp)


class ChannelsLastHead(nn.Module):
    """IC on a channels-last ``(B, H, W, C)`` map (Swin): LayerNorm over C, mean over H and W, linear."""

    def __init__(self, num_chs: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(num_chs)
        self.linear = nn.Linear(num_chs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.norm(x).mean(dim=(1, 2)))  # (B, num_classes)


def make_ic_head(info: dict, num_classes: int, *, head: str = "sdn", token_pool: str = "token") -> nn.Module:
    """The IC head for a node of ``info["shape"]`` (per sample) and ``info["layout"]`` (module docstring)."""
    s = info["shape"]
    if len(s) == 3 and info.get("layout") == "NHWC":
        ic: nn.Module = ChannelsLastHead(s[2], num_classes)
    elif len(s) == 3:
        ic = conv_head(head)({"num_chs": s[0], "size": tuple(s[1:])}, num_classes)
    elif len(s) == 2:
        ic = TokenHead(s[1], num_classes, pool=token_pool)
    elif len(s) == 1:
        ic = LinearHead(s[0], num_classes)
    else:
        raise ConfigError(f"no IC head for node {info['node']!r} of shape (B, {', '.join(map(str, s))})")
    return ReadNode(ic) if info.get("dict_state") else ic


def resolve_graph_ic_after(plan: Plan, spec: Any) -> list[str]:
    """The node names of the ICs for an ``ic_after=`` spec: block indices (as ``common.resolve_ic_after``, the
    default ``"sdn"``), ``"cost:F1,F2,..."`` (the block whose cumulative FLOPs lie nearest each share of the
    backbone's, as ``sdn``), or node names / module paths (a list, or a comma-separated string)."""
    blocks = [b for _, b in plan.blocks]
    costs = [plan.flops[b] for b in blocks[:-1]] + [plan.flops[plan.end]] if blocks else []
    per = [c - p for c, p in zip(costs, [0.0] + costs[:-1])]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s.startswith("cost:"):
            try:
                fr = [float(t) for t in s[5:].split(",") if t.strip()]
            except ValueError:
                fr = []
            if not fr or not all(0 < f <= 1 for f in fr):
                raise ConfigError(f"bad ic_after spec {spec!r}: expected cost:F1,F2,... with shares in (0, 1]")
            return [blocks[i] for i in sdn_placement(per, fr)]
        if s in ("sdn", "default"):
            spec = None
        elif not (s == "none" or s.startswith("every:") or s.replace(",", "").replace(" ", "").isdigit()):
            spec = [t.strip() for t in spec.split(",") if t.strip()]
    if spec is None:
        return [blocks[i] for i in sdn_placement(per)] if blocks else []
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(t, str) for t in spec):
        names = [plan.node(t) for t in spec]
        for n in names:
            plan.check_cut(n)
        return sorted(set(names), key=lambda n: plan.eval.pos[plan.eval.by_name[n]])
    try:
        idx = resolve_ic_after(spec, nn.Identity(), [nn.Identity()] * max(len(blocks), 1), nn.Identity(), None,
                            default=[])
    except ValueError as e:
        raise ConfigError(f"{e} (the model has {len(blocks)} blocks; "
                          "see `python -m earlyexit models --nodes`)") from None
    return [blocks[i] for i in idx]


def cut_model(plan: Plan, *, num_classes: int, input_shape: Sequence[int], ic_after: Any = None, head: str = "sdn",
              token_pool: str = "auto") -> GraphMultiExit:
    """Cut ``plan``'s model into a ``GraphMultiExit`` with ICs at ``ic_after`` (``resolve_graph_ic_after``).

    Args:
        plan: the traced model (``plan_graph``).
        num_classes: classes of every exit (the model's own classifier must already have them).
        input_shape: one sample's shape, for ``example_input``.
        ic_after: the IC placement.
        head: the head of ``(B, C, H, W)`` ICs, ``"sdn"`` or ``"sdn_exact"`` (``heads.conv_head``).
        token_pool: what ``(B, T, D)`` ICs read: ``"token"``, ``"mean"`` or ``"auto"`` (the model's own choice).
    """
    conv_head(head)  # an unknown name fails before anything is cut
    if token_pool not in ("auto", "token", "mean"):
        raise ConfigError(f"unknown token_pool {token_pool!r}; valid: auto, token, mean")
    pool = plan.token_pool if token_pool == "auto" else token_pool
    ics = resolve_graph_ic_after(plan, ic_after)
    ev = plan.eval
    pos = lambda name: ev.pos[ev.by_name[name]]  # noqa: E731
    cuts = sorted({b for _, b in plan.blocks[:-1]} | set(ics), key=pos) + [plan.end]
    stages, info = [], []
    for i, c in enumerate(cuts):
        last = i == len(cuts) - 1
        graphs = {}
        for mode, t in plan.graphs.items():
            inputs = [n for n in t.nodes if n.op == "placeholder"]
            if len(inputs) != 1:
                raise ConfigError(f"the model's forward must take one input, not {len(inputs)}")
            state_in = _carried(t, cuts[i - 1]) if i else inputs
            state_out = [t.by_name[c]] if last else _carried(t, c)
            start = t.pos[t.by_name[cuts[i - 1]]] if i else -1
            graphs[mode] = _piece(t, start, t.pos[t.by_name[c]], state_in, state_out)
        stages.append(GraphStage(plan.model, graphs))
        info.append({"num_chs": _channels(plan, c), "size": _size(plan, c), "shape": plan.shape[c],
                     "layout": plan.layout.get(c), "node": c, "dict_state": not last and len(_carried(ev, c)) > 1})
    exit_at = sorted(cuts.index(n) for n in ics)
    model = GraphMultiExit(stem=nn.Identity(), stages=stages, head=plan.head, ic_after=exit_at,
                           make_head=lambda fi, k: make_ic_head(fi, k, head=head, token_pool=pool),
                           feature_info=info, num_classes=num_classes, input_shape=input_shape)
    model.nodes = list(cuts)
    model.graph_symmetry = graph_symmetry(plan, cuts)
    return model


def graph_model(module: nn.Module, *, num_classes: int, input_shape: Sequence[int], ic_after: Any = None,
                what: str = "the model", **options: Any) -> GraphMultiExit:
    """Any traceable classifier ``module`` (input ``(B, *input_shape)``, output ``(B, num_classes)`` logits) as a
    ``GraphMultiExit``: ``trace``, ``plan_graph`` on a seeded example, ``cut_model`` (its options)."""
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
    plan = plan_graph(module, trace(module, what), example, what)
    return cut_model(plan, num_classes=num_classes, input_shape=input_shape, ic_after=ic_after, **options)


def _channels(plan: Plan, name: str) -> int:
    s = plan.shape[name]
    return s[-1] if len(s) != 3 or plan.layout.get(name) == "NHWC" else s[0]


def _size(plan: Plan, name: str) -> tuple | None:
    s = plan.shape[name]
    if len(s) != 3:
        return None
    return tuple(s[:2]) if plan.layout.get(name) == "NHWC" else tuple(s[1:])


__all__ = ["graph_model", "trace", "plan_graph", "natural_blocks", "cut_model", "resolve_graph_ic_after", "make_ic_head",
           "GraphStage", "GraphMultiExit", "Plan", "Traced"]
