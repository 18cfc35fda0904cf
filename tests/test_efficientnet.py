"""EfficientNet-B0 with ICs: parity with torchvision's efficientnet_b0, its weights adapter, its options."""

import pytest
import torch
import torchvision
from torch import nn

from earlyexit import build_model
from earlyexit.errors import CheckpointError
from earlyexit.models import adapt_foreign_weights
from earlyexit.models.efficientnet import (
    B0_STAGES,
    MBConv,
    convert_torchvision_efficientnet,
    load_torchvision_efficientnet,
    stochastic_depth,
)
from earlyexit.models.heads import SDNExactHead, SDNHead
from test_models import _randomise_batchnorm as _randomise_norms  # non-trivial BatchNorm statistics


@pytest.fixture(scope="module")
def tv():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None)
    _randomise_norms(model)
    return model.eval()


def _backbone_keys(model):
    final = f"heads.{model.num_exits - 1}."
    return {k for k in model.state_dict() if not k.startswith("heads.") or k.startswith(final)}


@pytest.mark.parametrize("size", [64, 97])
def test_torchvision_parity(tv, size):
    ours = build_model("efficientnet_b0", num_classes=1000, image_size=size).eval()
    load_torchvision_efficientnet(ours, tv.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = tv(x)
        outs = ours(x)
        assert torch.allclose(outs[-1], want, atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours(x, exits=[-1])[0], want, atol=1e-5, rtol=1e-5)
    assert len(outs) == 7 and all(o.shape == (2, 1000) for o in outs)
    assert sum(p.numel() for p in ours.backbone_parameters()) == sum(p.numel() for p in tv.parameters())


def test_key_map_is_exact(tv):
    ours = build_model("efficientnet_b0", num_classes=1000, image_size=32)
    sd = tv.state_dict()
    conv = convert_torchvision_efficientnet(ours, sd)
    assert len(conv) == len(sd) and set(conv) == _backbone_keys(ours)
    assert all(conv[k].shape == v.shape for k, v in ours.state_dict().items() if k in conv)
    assert torch.equal(conv["stages.15.block.3.1.running_var"], sd["features.7.0.block.3.1.running_var"])
    assert torch.equal(conv["heads.6.conv.0.weight"], sd["features.8.0.weight"])
    with pytest.raises(KeyError, match="unexpected key"):
        convert_torchvision_efficientnet(ours, {**sd, "features.9.0.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["features.1.0.block.0.0.weight"] = torch.zeros(32, 1, 5, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision_efficientnet(ours, bad)
    with pytest.raises(KeyError, match="lacks backbone keys"):
        load_torchvision_efficientnet(ours, {k: v for k, v in sd.items() if k != "features.8.1.bias"})


def test_foreign_weights_adapter_and_load_pretrained(tv, tmp_path):
    from earlyexit.models import load_pretrained

    ours = build_model("efficientnet_b0", num_classes=10, image_size=32)
    assert adapt_foreign_weights(ours, torchvision.models.resnet18().state_dict()) is None
    assert set(adapt_foreign_weights(ours, tv.state_dict())) == _backbone_keys(ours)  # fc of 1000 classes too
    torch.save(tv.state_dict(), tmp_path / "b0.pt")
    load_pretrained(ours, tmp_path / "b0.pt")  # another number of classes: our final linear layer keeps its init
    assert torch.equal(ours.stem[0].weight, tv.features[0][0].weight)
    assert torch.equal(ours.stages[7].block[1][1].running_mean, tv.features[4][2].block[1][1].running_mean)
    assert ours.heads[-1].fc.weight.shape == (10, 1280)
    torch.save({k: v for k, v in tv.state_dict().items() if not k.startswith("features.3.")}, tmp_path / "part.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_pretrained(build_model("efficientnet_b0", num_classes=10, image_size=32), tmp_path / "part.pt")


def test_stages_and_default_exits():
    m = build_model("efficientnet_b0", num_classes=10, image_size=224)
    assert len(m.stages) == 16 and all(isinstance(s, MBConv) for s in m.stages)
    assert m.exit_after == [4, 6, 8, 10, 12, 14, 15]
    chans = [c for (_, _, _, _, c, n) in B0_STAGES for _ in range(n)]
    assert [fi["num_chs"] for fi in m.feature_info] == chans
    assert [fi["size"][0] for fi in m.feature_info] == [112, 56, 56, 28, 28, 14, 14, 14, 14, 14, 14, 7, 7, 7, 7, 7]
    assert [fi["module"] for fi in m.feature_info][:4] == ["features.1.0", "features.2.0", "features.2.1", "features.3.0"]
    assert all(isinstance(h, SDNHead) for h in m.heads[:-1])
    assert build_model("efficientnet_b0", num_classes=10, image_size=32, ic_after="every:5").exit_after == [4, 9, 14, 15]
    exact = build_model("efficientnet_b0", num_classes=10, image_size=64, head="sdn_exact", ic_after=[3, 10])
    assert all(isinstance(h, SDNExactHead) for h in exact.heads[:-1])
    assert len(exact(exact.example_input(2))) == 3


def test_in_chans_and_drop_probabilities():
    m = build_model("efficientnet_b0", num_classes=3, in_chans=1, image_size=32)
    assert m.stem[0].in_channels == 1 and m(torch.randn(2, 1, 32, 32))[-1].shape == (2, 3)
    probs = [s.drop_prob for s in m.stages]
    assert probs[0] == 0 and probs[-1] == pytest.approx(0.2 * 15 / 16) and probs == sorted(probs)
    tvm = torchvision.models.efficientnet_b0()
    tv_probs = [b.stochastic_depth.p for g in tvm.features[1:8] for b in g]
    assert probs == pytest.approx(tv_probs)
    assert m.heads[-1].dropout.p == 0.2


def test_stochastic_depth():
    x = torch.randn(64, 3, 2, 2)
    assert torch.equal(stochastic_depth(x, 0.5, training=False), x)
    assert torch.equal(stochastic_depth(x, 0.0, training=True), x)
    torch.manual_seed(0)
    y = stochastic_depth(x, 0.25, training=True)
    kept = (y != 0).flatten(1).any(1)
    assert 0 < int(kept.sum()) < 64  # whole samples dropped, the others scaled by 1 / (1 - p)
    assert torch.allclose(y[kept], x[kept] / 0.75) and torch.equal(y[~kept], torch.zeros_like(y[~kept]))


def test_fuse_batchnorm_keeps_the_function():
    from earlyexit.inference import fuse_batchnorm

    m = build_model("efficientnet_b0", num_classes=5, image_size=32)
    _randomise_norms(m)
    m.eval()
    fused = fuse_batchnorm(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in fused.modules())
    assert len(m.conv_bn_pairs()) == sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    x = m.example_input(3)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(m(x), fused(x)))


def test_ic_heads_keep_their_own_initialisation():
    """torchvision's initialisation covers the backbone; IC heads keep PyTorch's default (as in the paper's code)."""
    torch.manual_seed(0)
    m = build_model("efficientnet_b0", num_classes=10, image_size=32)
    fc = m.heads[-1].fc
    assert float(fc.weight.detach().abs().max()) <= 1 / 10 ** 0.5 and torch.equal(fc.bias, torch.zeros(10))
    ic = m.heads[0].linear
    assert float(ic.bias.detach().abs().sum()) > 0  # nn.Linear's default: uniform bias
