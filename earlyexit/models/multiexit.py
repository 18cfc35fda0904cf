"""MultiExitModel: a backbone cut into stages, with internal classifiers (ICs).

Follows the structure used by "Joint or Disjoint: Mixing Training Regimes for
Early-Exit Models": after some stages an IC head turns the hidden state into
logits; the backbone's own classifier is the last exit.

Contracts (relied on by training, metrics and inference):

- ``forward(x) -> list[Tensor]``: one ``(B, C)`` logits tensor per exit, in
  depth order, the backbone's own head last. ``forward(x, exits=[...])``
  computes only the listed exits (still a list), and stops after the deepest
  stage it needs; phase 1 of training uses ``exits=[-1]`` so the ICs are not
  computed at all.
- Parts as data: ``stem``, ``stages``, ``heads`` (``heads[-1]`` is the
  backbone's classifier), ``exit_after[k]`` (stage index after which exit k
  sits), ``feature_info`` (one dict per stage: at least ``num_chs``),
  ``backbone_parameters()`` and ``head_parameters()`` (IC heads only).
- Stage-wise execution: ``stage(i, state)`` and ``head(k, state)``; a state
  is a tensor or a small pytree, and ``slice_state`` selects samples from it.
- When every backbone parameter is frozen (``requires_grad=False``), the
  stages run under ``torch.no_grad()``: phase 3 keeps no activations of the
  backbone, only of the heads.
- ``map_ic_input(state, fn)`` applies ``fn`` to the part of a state an IC
  reads (default: all of it; MSDNet: its coarsest scale).
- Parts describe themselves: a block or head whose BatchNorm layers directly
  follow a convolution declares ``conv_bn_pairs() -> [(conv name, BN name)]``
  (names relative to the part), gathered by ``MultiExitModel.conv_bn_pairs``
  for folding; a part that weight matching can permute declares
  ``permutation_axes(rules, prefix, inp)`` (``earlyexit.analysis.connectivity``).
- ``prefers_channels_last``: the model trains faster in channels-last memory
  layout (set by the builders whose ``bench`` shows it; the training loop's
  ``memory_format="auto"`` reads it).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..tree import State, slice_state, state_batch_size  # noqa: F401  (State: the type of a stage state)

class MultiExitModel(nn.Module):
    """A backbone (stem + stages + final head) with IC heads after some stages.

    Args:
        stem: module applied to the input before stage 0 (``nn.Identity`` if none).
        stages: the backbone's blocks, in order.
        head: the backbone's own classifier (the last exit).
        ic_after: stage indices after which an IC head is placed (sorted, unique,
            excluding the last stage, whose exit is ``head``).
        make_head: ``make_head(feature_info[i], num_classes) -> nn.Module``.
        feature_info: one dict per stage describing its output (``num_chs``, ...).
        num_classes: number of classes of every exit.
        input_shape: shape of one input sample, e.g. ``(C, H, W)``; used by
            ``example_input`` (FLOP counting, tests, benchmarks).
    """

    prefers_channels_last: bool = False  # see the module docstring; a builder sets it on its model

    def __init__(
        self,
        *,
        stem: nn.Module,
        stages: Sequence[nn.Module],
        head: nn.Module,
        ic_after: Sequence[int],
        make_head: Callable[[dict, int], nn.Module],
        feature_info: Sequence[dict],
        num_classes: int,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        n = len(stages)
        ic_after = sorted(set(int(e) for e in ic_after))
        if any(e < 0 or e >= n - 1 for e in ic_after):
            raise ValueError(f"IC positions must lie in [0, {n - 2}] (the last stage has the backbone's head), got {ic_after}")
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList([make_head(feature_info[e], num_classes) for e in ic_after] + [head])
        self.exit_after: list[int] = ic_after + [n - 1]
        self.feature_info = [dict(fi) for fi in feature_info]
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape) if input_shape is not None else None

    # --- parts -------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def backbone_modules(self) -> list[nn.Module]:
        """Stem, stages and the backbone's own classifier."""
        return [self.stem, *self.stages, self.heads[-1]]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        for m in self.backbone_modules():
            yield from m.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the IC heads (not the backbone's own classifier)."""
        for h in self.heads[:-1]:
            yield from h.parameters()

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """Names of the ``(Conv2d, BatchNorm2d)`` pairs in which the BatchNorm directly follows the convolution.

        Gathered from the parts that declare ``conv_bn_pairs()`` (names relative to the part), in module order.
        """
        pairs = []
        for name, m in self.named_modules():
            declare = getattr(m, "conv_bn_pairs", None)
            if declare is None or isinstance(m, MultiExitModel):
                continue
            pre = f"{name}." if name else ""
            pairs += [(pre + conv, pre + bn) for conv, bn in declare()]
        return pairs

    def example_input(self, batch_size: int = 1, device: torch.device | str | None = None) -> Any:
        """A deterministic input batch of the model's input shape (models with other inputs override this)."""
        if self.input_shape is None:
            raise ValueError("model has no input_shape; pass an example input explicitly")
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, *self.input_shape, generator=g).to(device)

    # --- stage-wise execution ---------------------------------------------
    def stage(self, i: int, state: State) -> State:
        """Run stage ``i`` (stage 0 includes the stem) on ``state``."""
        if i == 0:
            state = self.stem(state)
        return self.stages[i](state)

    def head(self, k: int, state: State) -> Tensor:
        """Logits ``(B, C)`` of exit ``k`` from the state after stage ``exit_after[k]``."""
        return self.heads[k](state)

    def map_ic_input(self, state: State, fn: Callable[[Any], Any]) -> State:
        """``state`` with ``fn`` applied to the part of it that an IC head reads, the rest unchanged.

        The default: an IC reads the whole state. A backbone whose ICs read only part of the state overrides
        this (MSDNet: the coarsest scale). Gradient equilibrium rescales the gradient of that part alone.
        """
        return fn(state)

    def _backbone_grad(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        return any(p.requires_grad for p in self.backbone_parameters())

    def forward(self, x: Tensor, *, exits: Sequence[int] | None = None) -> list[Tensor]:
        """Logits of every exit (or of ``exits``, negative indices allowed), depth order."""
        E = self.num_exits
        wanted = range(E) if exits is None else sorted({k % E for k in exits})
        wanted_set = set(wanted)
        last_stage = max(self.exit_after[k] for k in wanted)
        outs: list[Tensor] = []
        state = x
        grad = self._backbone_grad()
        k = 0
        for i in range(last_stage + 1):
            with torch.set_grad_enabled(grad):
                state = self.stage(i, state)
            while k < E and self.exit_after[k] == i:
                if k in wanted_set:
                    outs.append(self.head(k, state))
                k += 1
        return outs

    # --- timm-style feature API -------------------------------------------
    def forward_features(self, x: Tensor) -> State:
        """The backbone's final state (stem and all stages, no heads)."""
        state = x
        for i in range(len(self.stages)):
            state = self.stage(i, state)
        return state

    def forward_head(self, state: State) -> Tensor:
        """The backbone's own classifier on its final state."""
        return self.heads[-1](state)

    def forward_intermediates(self, x: Tensor, indices: Sequence[int]) -> list[State]:
        """States after the stages in ``indices``."""
        want = {i % len(self.stages) for i in indices}
        out, state = [], x
        for i in range(max(want) + 1):
            state = self.stage(i, state)
            if i in want:
                out.append(state)
        return out

    # --- description ---------------------------------------------------------
    def __repr__(self) -> str:
        """One line instead of the module tree: the backbone, where its exits sit and what leaving there costs.

        E.g. ``MultiExitModel(resnet20, 10 classes: exits after stages [2, 5, 8] of 9, cost [0.36, 0.69, 1.04]
        x backbone)``. The costs are ``earlyexit.metrics.exit_costs`` over the backbone's cost (what ``run``
        prints as "cost %"), counted once on ``example_input()`` and kept; ``print(model.stages)`` and
        ``named_modules()`` still show the parts.
        """
        arch = getattr(self, "arch", None)
        head = f"{arch}, " if arch else ""
        costs = self._relative_costs()
        cost = f", cost [{', '.join(f'{c:.2f}' for c in costs)}] x backbone" if costs else ""
        return (f"{type(self).__name__}({head}{self.num_classes} classes: exits after stages {list(self.exit_after)} "
                f"of {len(self.stages)}{cost})")

    def _relative_costs(self) -> list[float] | None:
        """Each exit's cumulative per-sample FLOPs over the backbone's (stages and own head); None when the model
        cannot be run on its example input. Counted in eval mode, no gradients; kept until the exits change."""
        from ..flops import count_flops

        key = (tuple(self.exit_after), tuple(id(h) for h in self.heads))
        cached = self.__dict__.get("_cost_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        if getattr(torch.compiler, "is_compiling", lambda: False)():
            return None  # never a forward pass from inside a trace
        was_training = self.training
        try:
            p = next(self.parameters(), None)
            state = self.example_input(device=p.device if p is not None else None)
            self.eval()
            stages, heads, k = [], [], 0
            for i in range(len(self.stages)):
                c, state = count_flops(self.stage, i, state)
                stages.append(c)
                while k < self.num_exits and self.exit_after[k] == i:
                    heads.append(count_flops(self.head, k, state)[0])
                    k += 1
        except Exception:  # a repr never fails: the model is described without its costs
            return None
        finally:
            self.train(was_training)
        base = sum(stages) + heads[-1]
        cum = [sum(stages[: self.exit_after[k] + 1]) + sum(heads[: k + 1]) for k in range(self.num_exits)]
        costs = [c / base for c in cum] if base > 0 else None
        self.__dict__["_cost_cache"] = (key, costs)
        return costs
