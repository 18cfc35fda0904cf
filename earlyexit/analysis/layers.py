"""Per-layer activations of the backbone, streamed through forward hooks.

Shared by the per-layer rank (``layer_rank.py``, the paper's Figure 3) and the
per-layer mutual information (``noisy_information.py``, Figure 5) of "Joint or
Disjoint: Mixing Training Regimes for Early-Exit Models".

- Layers: every ``nn.Conv2d`` and ``nn.Linear`` of the backbone, hooked at its
  output, i.e. before any normalisation or activation that follows it. The
  backbone is the stem, the stages and the backbone's own classifier
  (``heads[-1]``); the IC heads are left out. This follows the authors' code
  (the rank analysis of their ``EarlyExitRepr`` repository hooks the Conv2d and
  Linear modules of the backbone network, its final classifier included, before
  the ICs are attached). For a plain ``nn.Module`` every such layer counts.
- Outputs are flattened with the batch first: ``(B, ...) -> (B, d)`` (a token
  sequence ``(B, T, D)`` becomes ``(B, T * D)``).
- Columns: a layer with ``d`` outputs keeps a random subset of
  ``min(n_features, d)`` columns, sorted; a layer with ``d <= n_features`` keeps
  all. Never drawn from the global RNG state, so two models of the same
  architecture are measured on the same columns. Two ways (``columns=``):
  ``"layer"`` (the default) draws a subset per layer, a function of ``(seed,
  layer name, d)`` (a SHA-256 of the three seeds a private generator);
  ``"shared"`` is the protocol of the paper's rank analysis, the same indices
  for every layer its width allows: every flat index ``i`` gets one random key
  ``u_i`` (a function of ``(seed, i)`` only) and a layer keeps the
  ``n_features`` indices below ``d`` with the smallest keys. Layers of one
  width then keep identical indices, and for widths ``d1 < d2`` every index
  below ``d1`` that the wider layer keeps, the narrower keeps too.
- Passes: the layers are split into groups whose accumulators fit a byte
  budget, and the data are streamed once per group, so memory stays bounded
  however many layers the model has. More than one pass needs batches that can
  be iterated again: a list, a re-iterable object, or a zero-argument callable
  returning a fresh iterable (e.g. ``lambda: split.batches(256)``).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..device import model_device
from ..models.multiexit import MultiExitModel
from ..tree import slice_state, state_batch_size, to_device

LAYER_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear)
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


def backbone_layers(model: nn.Module, *, types: tuple[type, ...] = LAYER_TYPES) -> list[tuple[str, nn.Module]]:
    """The hooked layers of ``model``: its ``types`` modules outside the IC heads, in definition order.

    Args:
        model: a ``MultiExitModel`` (IC heads ``heads[:-1]`` excluded) or any module (nothing excluded).
        types: module classes to hook.
    Returns:
        ``(qualified name, module)`` pairs.
    """
    skip: set[int] = set()
    if isinstance(model, MultiExitModel):
        skip = {id(m) for h in model.heads[:-1] for m in h.modules()}
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types) and id(m) not in skip]


COLUMNS = ("layer", "shared")
_KEY_CHUNK = 4096  # the keys of the shared subsets are drawn in blocks of this many indices


def _generator(text: str) -> torch.Generator:
    digest = hashlib.sha256(text.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _shared_keys(dim: int, seed: int) -> Tensor:
    """``(dim,)`` float64 keys in [0, 1); key ``i`` depends on ``(seed, i)`` only (blocks of ``_KEY_CHUNK``)."""
    blocks = [torch.rand(_KEY_CHUNK, generator=_generator(f"{seed}|shared-columns|{b}"), dtype=torch.float64)
              for b in range(math.ceil(dim / _KEY_CHUNK))]
    return torch.cat(blocks)[:dim]


def feature_subset(layer: str, dim: int, n_features: int | None, seed: int = 0, *,
                   columns: str = "layer") -> Tensor | None:
    """Sorted column indices kept from a layer with ``dim`` outputs (None: all of them).

    Args:
        layer: the layer's qualified name (unused with ``columns="shared"``).
        dim: number of outputs per sample.
        n_features: columns kept; None or ``>= dim`` keeps all.
        seed: the analysis seed.
        columns: ``"layer"`` (a subset per layer) or ``"shared"`` (the same indices for every layer
            whose width allows them; see the module docstring).
    Returns:
        ``(min(n_features, dim),)`` long tensor on the CPU, or None.
    """
    if columns not in COLUMNS:
        raise ValueError(f"unknown columns {columns!r}; valid: {', '.join(COLUMNS)}")
    if n_features is not None and n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if n_features is None or n_features >= dim:
        return None
    if columns == "shared":
        return torch.topk(_shared_keys(dim, seed), n_features, largest=False).indices.sort().values
    digest = hashlib.sha256(f"{seed}|{layer}|{dim}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randperm(dim, generator=g)[:n_features].sort().values


def _open(batches: Batches) -> Iterable[Any]:
    return batches() if callable(batches) else batches


def _reopen(batches: Batches) -> Iterable[Any]:
    """A fresh iteration over ``batches``, or a ValueError for a one-shot iterator."""
    if callable(batches):
        return batches()
    if iter(batches) is batches:
        raise ValueError("several passes over the data are needed (raise max_bytes or give fewer layers), but the "
                         "batches are a one-shot iterator: pass a list or a callable returning fresh batches")
    return batches


def _forward(model: nn.Module, x: Any) -> None:
    if isinstance(model, MultiExitModel):
        model(x, exits=[-1])  # the IC heads are not hooked: skip them
    else:
        model(x)


class _Hooks:
    """Forward hooks that hand each selected layer's flattened (and column-subset) output to ``sink``."""

    def __init__(self, named: Sequence[tuple[str, nn.Module]], subsets: dict[str, Tensor | None],
                 sink: Callable[[str, Tensor], None] | None) -> None:
        self.subsets, self.sink = subsets, sink
        self.shapes: dict[str, tuple[int, torch.dtype]] = {}  # layer -> (d, dtype), in call order
        self.batch = -1
        self.fired: set[str] = set()
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in named]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, Tensor):
                raise ValueError(f"layer {name} returned a {type(out).__name__}, not a tensor")
            if name in self.fired:
                raise ValueError(f"layer {name} ran twice in one forward pass (shared weights are not supported)")
            self.fired.add(name)
            if out.dim() < 1 or out.shape[0] != self.batch:
                raise ValueError(f"layer {name}'s output {tuple(out.shape)} is not batch-first (batch {self.batch})")
            flat = out.detach().reshape(out.shape[0], -1)  # (B, d)
            self.shapes.setdefault(name, (flat.shape[1], flat.dtype))
            if self.sink is not None:
                idx = self.subsets.get(name)
                if idx is not None:
                    flat = flat.index_select(1, idx.to(flat.device))  # (B, k): a copy, safe from later in-place ops
                self.sink(name, flat)
        return hook

    def run(self, model: nn.Module, x: Any, device: torch.device) -> None:
        self.batch, self.fired = state_batch_size(x), set()
        _forward(model, to_device(x, device))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _limited(batches: Iterable[Any], max_samples: int | None) -> Iterator[Any]:
    """The inputs of ``(x, y)`` batches (or bare inputs), cut after ``max_samples`` samples."""
    seen = 0
    for b in batches:
        x = b[0] if isinstance(b, (tuple, list)) and len(b) == 2 else b
        n = state_batch_size(x)
        if max_samples is not None:
            if seen >= max_samples:
                return
            if seen + n > max_samples:
                x, n = slice_state(x, slice(0, max_samples - seen)), max_samples - seen
        seen += n
        yield x


def stream_layers(model: nn.Module, batches: Batches, *, n_features: int | None, seed: int,
                  bytes_per_layer: Callable[[int, int], int], max_bytes: int,
                  layers: Sequence[str] | None = None, max_samples: int | None = None,
                  sink: Callable[[str, Tensor], None],
                  on_pass_end: Callable[[list[str], int], None] | None = None,
                  columns: str = "layer") -> tuple[list[dict], int]:
    """Stream the data through the hooked layers, in passes that respect a memory budget.

    Args:
        model: the model, run in eval mode without gradients (its mode is restored).
        batches: ``(x, y)`` pairs or bare inputs; an iterable or a callable returning one.
        n_features: columns kept per layer (see ``feature_subset``).
        seed: seed of the column subsets.
        columns: ``"layer"`` or ``"shared"`` column subsets (see ``feature_subset``).
        bytes_per_layer: ``(k, d) -> bytes`` that the caller's accumulator for a layer with ``k``
            kept columns (of ``d``) will hold; passes are planned so that their sum is ``<= max_bytes``
            (a layer over the budget on its own gets a pass to itself).
        max_bytes: the budget per pass.
        layers: names of the layers to measure (default: all of ``backbone_layers``).
        max_samples: stop after this many samples (None: the whole split).
        sink: ``sink(layer, (B, k) tensor)``, called from the hooks for every batch.
        on_pass_end: ``on_pass_end(layers, n)`` after each pass, with the pass's layers and the
            samples streamed (to reduce and free their accumulators before the next pass).
    Returns:
        ``(info, n)``: one ``{"layer", "dim", "features", "dtype"}`` per layer in the order the
        forward pass reaches them, and the number of samples streamed.
    Raises:
        ValueError: on unknown layer names, no data, or a one-shot iterator that would need several passes.
    """
    named = backbone_layers(model)
    if layers is not None:
        known = {n for n, _ in named}
        bad = [n for n in layers if n not in known]
        if bad:
            raise ValueError(f"unknown layer {bad[0]!r}; valid: {', '.join(sorted(known)) or 'none'}")
        named = [(n, m) for n, m in named if n in set(layers)]
    if not named:
        raise ValueError("the model has no Conv2d or Linear layer to measure")
    device = model_device(model)
    was = model.training
    model.eval()
    try:
        it = iter(_limited(_open(batches), max_samples))
        first = next(it, None)
        if first is None:
            raise ValueError("no batches to analyse")
        probe = _Hooks(named, {}, None)  # one forward on the first batch: the shapes and the call order
        try:
            with torch.no_grad():
                probe.run(model, first, device)
        finally:
            probe.remove()
        order = [n for n in probe.shapes]  # layers the forward pass reached, in call order
        by_name = dict(named)
        subsets = {n: feature_subset(n, probe.shapes[n][0], n_features, seed, columns=columns) for n in order}
        info = [{"layer": n, "dim": probe.shapes[n][0], "dtype": probe.shapes[n][1],
                 "features": probe.shapes[n][0] if subsets[n] is None else len(subsets[n])} for n in order]
        passes: list[list[str]] = []
        used = 0
        for row in info:
            cost = bytes_per_layer(row["features"], row["dim"])
            if not passes or used + cost > max_bytes:
                passes.append([])
                used = 0
            passes[-1].append(row["layer"])
            used += cost
        n_seen = 0
        for p, group in enumerate(passes):
            data = itertools.chain([first], it) if p == 0 else _limited(_reopen(batches), max_samples)
            hooks = _Hooks([(n, by_name[n]) for n in group], subsets, sink)
            n_seen = 0
            try:
                with torch.no_grad():
                    for x in data:
                        hooks.run(model, x, device)
                        n_seen += state_batch_size(x)
            finally:
                hooks.remove()
            if on_pass_end is not None:
                on_pass_end(group, n_seen)
    finally:
        model.train(was)
    return info, n_seen
