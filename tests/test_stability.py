"""Training at the default settings is stable: every phase's training loss falls.

Three epochs per phase on 3,000 Fashion-MNIST images (ResNet-20 with its two
ICs, SGD at lr 0.1, cosine schedule, the default weighting ``mean`` and
gradient clipping at norm 1). Before the defaults averaged the exits' losses
and clipped the gradient, phase 2 diverged within two steps (loss 12-13), and
phase 3 reached 102 on the frozen backbone: the IC heads read pooled features
with a squared norm of about 2,000 per sample (the final classifier: about
120), so one SGD step at lr 0.1 overshoots their loss.

The mixed regime ``++-`` runs exactly the first two phases of ``+++`` (every
epoch is seeded from the seed, the phase, the grid point and the epoch alone,
and phase 2 starts from phase 1's restored weights either way), so the ``+++``
run checks mixed's phases as well; ``-+-`` checks joint training from scratch.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from earlyexit.config import DataConfig, RunConfig, TrainConfig
from earlyexit.runs import load_data, make_model
from earlyexit.training import get_weighting, train
from earlyexit.training.phases import phase_exits, phase_loss_weights
from earlyexit.weighting import TrainingPoint

EPOCH_MARGIN = 1.05  # no epoch's loss may exceed the phase's first by more than 5 %
STEP_MARGIN = 1.25   # in phases 1 and 2, no step's loss may exceed the phase's first step's by more than 25 %


def phase_losses(regime: str, train_cfg: TrainConfig | None = None) -> tuple[dict, dict, dict]:
    """A run at the default settings (``train_cfg``: other ones). Per phase: the training loss of each epoch,
    of each step, and the sum of the weights of the exits the phase counts (in its last epoch)."""
    cfg = RunConfig(data=DataConfig(train_size=3000))
    tc = replace(train_cfg if train_cfg is not None else cfg.train, regime=regime, device="cpu")
    data = load_data(cfg)
    torch.manual_seed(tc.seed)
    model = make_model(cfg, data)
    steps: dict[int, list[float]] = {}

    def log(event, **info):
        if event == "step":
            steps.setdefault(info["phase"], []).append(info["loss"])

    record = train(model, data, config=tc, log=log)
    epochs: dict[int, list[float]] = {}
    for h in record.history:
        epochs.setdefault(h["phase"], []).append(h["train_loss"])
    w = get_weighting(tc.loss_weighting)
    weight = {p: sum(phase_loss_weights(p, w, model.num_exits, phase_exits(model, p),
                                        TrainingPoint(phase=p, epoch=len(ls) - 1, epochs=len(ls), progress=1.0)))
              for p, ls in epochs.items()}
    return epochs, steps, weight


@pytest.fixture(scope="module")
def fmnist_available():
    try:
        load_data(RunConfig(data=DataConfig(train_size=3000)))
    except Exception as e:  # noqa: BLE001 (no local copy and no internet)
        pytest.skip(f"Fashion-MNIST is not available: {e}")


@pytest.mark.slow
@pytest.mark.parametrize("regime, phases", [("+++", (1, 2, 3)), ("-+-", (2,))])
def test_every_phase_loss_falls_at_the_defaults(fmnist_available, regime, phases):
    epochs, steps, weight = phase_losses(regime)
    assert sorted(epochs) == list(phases)
    for p, ls in epochs.items():
        where = f"phase {p} of {regime}: epochs {ls}, steps {steps[p][:8]} ..."
        assert len(ls) == 3, where
        assert ls[-1] < ls[0], where
        assert max(ls) <= ls[0] * EPOCH_MARGIN, where
        # the exits' mean loss ends far below chance (ln 10 = 2.30); a diverged phase stays above it
        assert ls[-1] / weight[p] < math.log(10) / 2, where
        if p < 3:  # a diverging step shows within a few steps (4-7 times the first loss before the fix)
            assert max(steps[p]) <= steps[p][0] * STEP_MARGIN, where
