"""Global Past-Future early exit (Liao et al., NAACL 2021).

Each IC ``k`` (of ``n``) turns the backbone's state into a state vector
``s_k``: a head that defines ``gpf_state() -> (state head, D, activation,
init std)`` says how (BERT's: the ``[CLS]`` pooler, dense + tanh, with tanh
imitators); otherwise the IC head's design with its output layer resized to
``dim``, then ReLU. Its prediction combines

- the past: the states ``s_0 .. s_{k-1}`` of the earlier ICs (detached, as in
  the published code) and ``s_k`` itself;
- the future: imitations ``s^_{k->j} = act(W_j s_k + c_j)`` of the states of
  the deeper ICs ``j > k``, learned by an imitation loss, the cosine distance
  ``1 - cos(s_j, s^_{i->j})`` to the (detached) real states, averaged over
  the deeper ICs and the batch per source ``i``, then over the sources.

Every state slot ``l`` is projected to ``2C`` values ``[u_l, v_l]``; with the
past logits ``P = sum_{l <= k} u_l``, the future logits ``F = sum_{l > k} u_l``
and the gate ``lambda = sigmoid(G tanh(mean_{l <= k} v_l))`` (``G`` a ``C x C``
linear layer), the exit's logits are ``2 lambda P + (2 - 2 lambda) F``. This
follows the authors' BERT code, whose merging differs in detail from the
paper's description. Their loss
weighs the exits as PABEE does (weighting ``pabee``) and adds the imitation
loss with weight 1; here it rides on the last IC's logits (``attach_loss``),
so the one training loop trains it without knowing of it, and the reported
loss leaves it out. Exits leave by entropy (criterion ``entropy``).

Differences from the BERT setting as published: there every layer, the last
included, has a GPF classifier; here the backbone's own head stays the plain
final exit (so phase 1 trains the backbone alone), and GPF covers the ICs.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.multiexit import MultiExitModel
from .base import RewiredModel, attach_loss, batch_of


def _resized(head: nn.Module, dim: int) -> nn.Module:
    """A copy of ``head`` whose last linear layer outputs ``dim`` values, followed by ReLU."""
    h = copy.deepcopy(head)
    last = [name for name, m in h.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"GPF needs IC heads that end in a linear layer; {type(head).__name__} has none")
    parent_name, _, child = last[-1].rpartition(".")
    parent = h.get_submodule(parent_name) if parent_name else h
    setattr(parent, child, nn.Linear(getattr(parent, child).in_features, dim))
    return nn.Sequential(h, nn.ReLU())


class PastFuture(nn.Module):
    """Imitators of future states and the gated past/future classifier shared by GPF's exits.

    Args:
        n: number of ICs.
        dim: state size ``D``.
        num_classes: ``C``.
        act: activation of the imitators (that of the state heads).
        dropout: dropout on the stacked states.
        init_std: standard deviation of the slot projections' initial weights.
    """

    def __init__(self, n: int, dim: int, num_classes: int, *, act: type[nn.Module], dropout: float,
                 init_std: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        # imitators[j - 1] predicts the state of IC j (no IC before IC 0 predicts it).
        self.imitators = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), act()) for _ in range(n - 1)])
        self.weight = nn.Parameter(torch.randn(n, dim, 2 * num_classes) * init_std)
        self.bias = nn.Parameter(torch.zeros(n, 2 * num_classes))
        self.gate = nn.Linear(num_classes, num_classes)
        self.dropout = nn.Dropout(dropout)

    def imitate(self, s: Tensor, k: int) -> list[Tensor]:
        """Predicted states ``(B, D)`` of the ICs after ``k`` from IC ``k``'s state."""
        return [self.imitators[j - 1](s) for j in range(k + 1, len(self.imitators) + 1)]

    def forward(self, states: list[Tensor], k: int) -> Tensor:
        """Logits of IC ``k`` from the ``n`` state slots (past, own, imitated future)."""
        C = self.num_classes
        S = self.dropout(torch.stack(states, dim=1))  # (B, n, D)
        P = torch.einsum("bnd,ndc->bnc", S, self.weight) + self.bias  # (B, n, 2C)
        past = P[:, : k + 1, :C].sum(1)  # (B, C)
        future = P[:, k + 1:, :C].sum(1)  # (B, C), zero for the last IC
        lam = torch.sigmoid(self.gate(torch.tanh(P[:, : k + 1, C:].mean(1))))  # (B, C)
        return 2 * lam * past + (2 - 2 * lam) * future  # (B, C)


def imitation_loss(actual: list[Tensor], predicted: list[list[Tensor]]) -> Tensor:
    """GPF's imitation loss.

    Args:
        actual: the real states ``s_0 .. s_{n-1}``, each ``(B, D)`` (detached by the caller).
        predicted: ``predicted[i]`` holds ``s^_{i->j}`` for ``j = i+1 .. n-1``.
    Returns:
        ``mean_i mean_{j > i, batch} (1 - cos(s_j, s^_{i->j}))`` over the sources ``i = 0 .. n-2``.
    """
    terms = []
    for i, preds in enumerate(predicted[: len(actual) - 1]):
        real = torch.cat(actual[i + 1:])  # ((n-1-i) B, D)
        terms.append((1 - F.cosine_similarity(real, torch.cat(preds), dim=-1)).mean())
    return torch.stack(terms).mean()


class GPFModel(RewiredModel):
    """A multi-exit model whose ICs are GPF exits (see the module docstring).

    Args:
        source: the model to rewire (its IC heads give the state heads' design).
        dim: state size ``D`` (ignored when the heads declare ``gpf_state``, e.g. BERT's pooler fixes it).
        dropout: dropout on the stacked states.
        imitation_weight: weight of the imitation loss.
    """

    def __init__(self, source: MultiExitModel, *, dim: int, dropout: float, imitation_weight: float) -> None:
        n = source.num_exits - 1
        own = [getattr(h, "gpf_state", None) for h in source.heads[:-1]]
        if all(f is not None for f in own):  # the heads say how their state is read
            declared = [f() for f in own]
            states = [d[0] for d in declared]
            _, dim, act, init_std = declared[0]
        else:
            states = [_resized(h, dim) for h in source.heads[:-1]]
            act, init_std = nn.ReLU, 1 / math.sqrt(dim)
        super().__init__(source, [*states, source.heads[-1]])
        self.state_dim = dim
        self.imitation_weight = float(imitation_weight)
        self.gpf = PastFuture(n, dim, self.num_classes, act=act, dropout=dropout, init_std=init_std)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        for h in self.heads[:-1]:
            yield from h.parameters()
        yield from self.gpf.parameters()

    def exit_step(self, k: int, state: Any, memory: Any) -> tuple[Tensor, Any]:
        """Memory: ``{"past": [detached states (B, D) of ICs 0..k-1]}``, plus, while gradients are
        recorded, ``"pred"``: each earlier IC's imitations, for the imitation loss."""
        n = self.num_exits - 1
        if k == n:
            return self.heads[k](state), memory
        past = [] if memory is None else memory["past"]
        s = self.heads[k](state)  # (B, D)
        future = self.gpf.imitate(s, k)  # n - 1 - k tensors (B, D)
        logits = self.gpf([*past, s, *future], k)  # (B, C)
        out = {"past": [*past, s.detach()]}
        if torch.is_grad_enabled():
            out["pred"] = [*(memory or {}).get("pred", []), future]
            if k == n - 1 and n > 1:
                logits = attach_loss(logits, imitation_loss(out["past"], out["pred"]), self.imitation_weight)
        return logits, out

    def blank_memory(self, k: int, state: Any) -> Any:
        z = torch.zeros(batch_of(state), self.state_dim, device=self.gpf.bias.device)
        return {"past": [z] * k}


def apply(model: MultiExitModel, *, dim: int | None = None, dropout: float | None = None,
          imitation_weight: float = 1.0) -> GPFModel:
    """Turn ``model``'s ICs into GPF exits.

    Args:
        model: a multi-exit model with at least one IC.
        dim: state size for heads without ``gpf_state`` (default: the widest IC stage's ``num_chs``).
        dropout: dropout on the stacked states (default: BERT's hidden dropout, else 0).
        imitation_weight: weight of the imitation loss (the authors': 1).
    Returns:
        A ``GPFModel`` sharing ``model``'s backbone.
    """
    if model.num_exits < 2:
        raise ValueError("GPF needs at least one IC")
    if dim is None:
        dim = max(int(model.feature_info[i]["num_chs"]) for i in model.exit_after[:-1])
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if dropout is None:
        dropout = float(getattr(getattr(model, "config", None), "hidden_dropout_prob", 0.0))
    return GPFModel(model, dim=dim, dropout=dropout, imitation_weight=imitation_weight)
