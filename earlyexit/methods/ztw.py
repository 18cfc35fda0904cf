"""Zero Time Waste (Wołczyk et al., NeurIPS 2021): cascading ICs and ensembles of past ICs.

Two additions to a multi-exit model, trained in turn:

1. Cascading connections (``CascadeModel``): IC ``k > 0`` reads, besides the
   backbone's state, the logits of IC ``k - 1``, layer-normalised and
   detached (ZTW's default: no gradient flows back into the earlier IC).
   ZTW concatenates them to the features entering the IC's output layer;
   since every head here ends in a linear layer, that equals adding a
   bias-free linear map of the normalised logits to the head's output, which
   is how ``CascadeHead`` wraps any head. The first IC and the backbone's own
   head are unchanged.
2. Geometric ensembles (``EnsembleModel``): exit ``k < E - 1`` outputs
   ``mean_{j <= k} exp(w_kj) * log_softmax(z_j) + b_k`` over the ICs
   ``0 .. k`` (``z_j`` their logits, ``w_kj`` and the per-class ``b_k``
   learned), i.e. a weighted geometric mean of their distributions
   ``prod_j p_j^{w_kj} * exp(b_k)`` up to normalisation, with weights kept
   positive. ZTW does not ensemble the backbone's own head. The ensembles are
   trained in their own stage, with the backbone and the ICs frozen
   (``train_ensembles``): that is phase 3 of ``earlyexit.train`` on an
   ``EnsembleModel``, whose "backbone" holds the ICs and whose "heads" are the
   ensembles, so the one training loop does it.

The log-weights start as ZTW's do: drawn from a normal distribution with
mean 0 and standard deviation 0.01 (ZTW's code calls ``torch.normal(0, 0.01)``,
whose second argument is the standard deviation: variance 1e-4), so the
ensembles start close to the plain geometric mean; the biases start at 0.
The ensemble stage weighs the ensembles' losses as the code of "Joint or
Disjoint" does: the mean over the model's outputs, the frozen final exit
included (weighting ``mean``, each ensemble ``1 / E``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.multiexit import MultiExitModel
from ..regime import Regime
from .base import RewiredModel, batch_of


class CascadeHead(nn.Module):
    """An IC head that also reads the previous IC's logits.

    Args:
        head: the IC head (ending in a linear layer), reading the state.
        num_classes: ``C``.
        cascade: whether this head reads previous logits (False for the first IC).
        detach: cut the gradient into the previous IC (ZTW's default).
        layer_norm: layer-normalise the previous logits first (ZTW's appendix).
    """

    def __init__(self, head: nn.Module, num_classes: int, *, cascade: bool, detach: bool = True,
                 layer_norm: bool = True) -> None:
        super().__init__()
        self.head = head
        self.detach = detach
        self.norm = (nn.LayerNorm(num_classes) if layer_norm else nn.Identity()) if cascade else None
        self.cascade = nn.Linear(num_classes, num_classes, bias=False) if cascade else None

    def forward(self, state: Any, prev: Tensor | None = None) -> Tensor:
        out = self.head(state)  # (B, C)
        if self.cascade is None:
            return out
        if prev is None:
            raise ValueError("a cascading IC needs the previous IC's logits")
        prev = prev.detach() if self.detach else prev
        return out + self.cascade(self.norm(prev))  # (B, C)


def _ic_logits(head: nn.Module, state: Any, prev: Tensor | None) -> Tensor:
    return head(state, prev) if isinstance(head, CascadeHead) else head(state)


class CascadeModel(RewiredModel):
    """A multi-exit model whose ICs cascade (see the module docstring).

    Args:
        source: the model to rewire (its IC heads are wrapped, not copied).
        detach: cut the gradient through the cascading connections.
        layer_norm: layer-normalise the previous logits.
    """

    def __init__(self, source: MultiExitModel, *, detach: bool = True, layer_norm: bool = True) -> None:
        C = source.num_classes
        ics = [CascadeHead(h, C, cascade=k > 0, detach=detach, layer_norm=layer_norm)
               for k, h in enumerate(source.heads[:-1])]
        super().__init__(source, [*ics, source.heads[-1]])

    def exit_step(self, k: int, state: Any, memory: Any) -> tuple[Tensor, Any]:
        """Memory: the previous IC's logits ``(B, C)``."""
        if k == self.num_exits - 1:
            return self.heads[k](state), memory
        logits = _ic_logits(self.heads[k], state, memory)  # (B, C)
        return logits, logits

    def blank_memory(self, k: int, state: Any) -> Any:
        if k == 0 or k == self.num_exits - 1:
            return None
        return torch.zeros(batch_of(state), self.num_classes, device=self.heads[k].cascade.weight.device)


class GeometricEnsemble(nn.Module):
    """``mean_j exp(w_j) * logp_j + b`` over ``members`` log-probability vectors.

    Args:
        members: number of ICs combined.
        num_classes: ``C``.
        init_std: standard deviation of the normal draw of the log-weights ``w`` (ZTW's: 0.01).
    """

    INIT_STD = 0.01

    def __init__(self, members: int, num_classes: int, *, init_std: float = INIT_STD) -> None:
        super().__init__()
        self.log_weight = nn.Parameter(torch.randn(members) * init_std)  # N(0, init_std^2), as ZTW
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, logp: Tensor) -> Tensor:
        w = self.log_weight.exp()  # (M,) positive weights
        return (logp * w[:, None]).mean(1) + self.bias  # (B, M, C) -> (B, C)


class EnsembleModel(RewiredModel):
    """ZTW's full model: (cascading) ICs, each exit the geometric ensemble of the ICs so far.

    Parts as the training phases see them: the stem, the stages, every head
    (ICs included) form the fixed part (``backbone_modules``); the ensembles
    are the trainable "heads" (``head_parameters``). Phase 3 of the training
    loop thus trains the ensembles alone, with the ICs frozen and in eval mode.

    Args:
        source: a ``CascadeModel`` (or any multi-exit model: plain ICs are ensembled too).
    """

    def __init__(self, source: MultiExitModel) -> None:
        super().__init__(source, list(source.heads))
        self.ensembles = nn.ModuleList([GeometricEnsemble(k + 1, self.num_classes) for k in range(self.num_exits - 1)])

    def backbone_modules(self) -> list[nn.Module]:
        return [self.stem, *self.stages, *self.heads]

    def head_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.ensembles.parameters()

    def exit_step(self, k: int, state: Any, memory: Any) -> tuple[Tensor, Any]:
        """Memory: ``{"prev": previous IC logits (B, C), "logp": [log-probabilities (B, C) of ICs 0..k-1]}``."""
        if k == self.num_exits - 1:
            return self.heads[k](state), memory
        prev, logp = (None, []) if memory is None else (memory["prev"], memory["logp"])
        z = _ic_logits(self.heads[k], state, prev)  # (B, C)
        logp = [*logp, F.log_softmax(z.float(), dim=-1)]
        return self.ensembles[k](torch.stack(logp, dim=1)), {"prev": z, "logp": logp}  # (B, C)

    def blank_memory(self, k: int, state: Any) -> Any:
        if k == 0 or k == self.num_exits - 1:
            return None
        z = torch.zeros(batch_of(state), self.num_classes, device=self.ensembles[k].bias.device)
        return {"prev": z, "logp": [z] * k}


def apply(model: MultiExitModel, *, detach: bool = True, layer_norm: bool = True) -> CascadeModel:
    """ZTW's first step: cascading ICs on ``model``'s backbone.

    Args:
        model: a multi-exit model with at least one IC.
        detach: no gradient through the cascading connections (ZTW's default).
        layer_norm: layer-normalise the previous logits (ZTW's default).
    Returns:
        A ``CascadeModel`` sharing ``model``'s backbone and IC heads.
    """
    if model.num_exits < 2:
        raise ValueError("Zero Time Waste needs at least one IC")
    return CascadeModel(model, detach=detach, layer_norm=layer_norm)


def add_ensembles(model: MultiExitModel) -> EnsembleModel:
    """Wrap (cascading) ICs with fresh geometric ensembles (e.g. to load trained ZTW weights)."""
    if model.num_exits < 2:
        raise ValueError("Zero Time Waste needs at least one IC")
    return model if isinstance(model, EnsembleModel) else EnsembleModel(model)


def train_ensembles(model: MultiExitModel, data: Any, config: Any = None, *, out_dir: str | Path | None = None,
                    **train_kw: Any) -> tuple[EnsembleModel, Any]:
    """ZTW's second stage: train the ensembles on the frozen backbone and ICs.

    Runs ``earlyexit.train`` with the regime ``Regime.of(3)`` (``"--+"``, phase 3 alone,
    its optimiser settings from ``config.phases[2]``) and the loss weighting
    ``mean`` (each ensemble ``1 / E``, as the paper's code averages over the
    outputs, the frozen final exit included) on ``add_ensembles(model)``.

    Args:
        model: the trained ``CascadeModel`` (or an ``EnsembleModel`` to train further).
        data: splits with ``train`` and ``val`` (see ``earlyexit.train``).
        config: a ``TrainConfig`` (``None``: defaults).
        out_dir: checkpoint folder of this stage.
        **train_kw: further ``train`` arguments (``log``, ``augment``, ...).
    Returns:
        ``(ensemble_model, train_record)``.
    """
    from ..config import TrainConfig
    from ..training import train

    ens = add_ensembles(model)
    cfg = replace(config if config is not None else TrainConfig(), regime=Regime.of(3), weighting="mean")
    record = train(ens, data, config=cfg, out_dir=out_dir, **train_kw)
    return ens, record
