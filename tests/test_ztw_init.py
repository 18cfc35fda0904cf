"""ZTW's geometric ensembles start as ZTW's code starts them: log-weights drawn from N(0, 0.01^2)."""

import pytest
import torch

from earlyexit import build_model
from earlyexit.methods import ztw


def test_log_weights_are_drawn_with_std_001():
    torch.manual_seed(0)
    e = ztw.GeometricEnsemble(20_000, 3)
    w = e.log_weight.detach()
    assert ztw.GeometricEnsemble.INIT_STD == 0.01
    assert w.std().item() == pytest.approx(0.01, rel=0.03)  # the standard deviation, not the variance (std 0.1)
    assert abs(w.mean().item()) < 3e-4
    assert torch.equal(e.bias.detach(), torch.zeros(3))
    assert ztw.GeometricEnsemble(5, 3, init_std=0.0).log_weight.abs().sum() == 0


def test_model_ensembles_start_random_and_close_to_the_geometric_mean():
    torch.manual_seed(0)
    ens = ztw.add_ensembles(ztw.apply(build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=4)))
    ws = torch.cat([e.log_weight.detach() for e in ens.ensembles])
    assert ws.numel() == sum(range(1, ens.num_exits)) and (ws != 0).all() and ws.abs().max() < 0.06
    torch.manual_seed(1)
    other = ztw.add_ensembles(ztw.apply(build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8, depth=4)))
    assert not torch.equal(ws, torch.cat([e.log_weight.detach() for e in other.ensembles]))


def test_ensemble_stage_weighs_each_ensemble_one_over_e(monkeypatch):
    """The ensemble stage uses the weighting "mean" (the paper's code averages over all outputs)."""
    seen = {}

    def fake_train(model, data, *, config, **kw):
        seen["cfg"] = config
        return "record"

    import earlyexit.training as training

    monkeypatch.setattr(training, "train", fake_train)
    ens, record = ztw.train_ensembles(ztw.apply(build_model("mlp", num_classes=3, in_chans=1, image_size=4, width=8,
                                                             depth=3)), data=None)
    assert record == "record" and seen["cfg"].regime == "--+" and seen["cfg"].weighting == "mean"
