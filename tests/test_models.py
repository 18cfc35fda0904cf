"""Registry-wide contract tests and ResNet weight parity with torchvision."""

import pytest
import torch
import torchvision

from earlyexit import build_model, list_models
from earlyexit.models import get_spec, resolve_ic_after, slice_state
from earlyexit.models.resnet import cifar_resnet, convert_torchvision_state_dict, load_torchvision

SLOW = {"resnet110", "vit_b16", "msdnet_imagenet", "bert"}


def _params():
    for name in list_models():
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_contract(name):
    from earlyexit.metrics import exit_costs

    model = build_model(name, num_classes=5, **get_spec(name).tiny)  # small but faithful builds
    x = model.example_input(3)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == model.num_exits == len(model.exit_after)
    assert all(o.shape == (3, 5) for o in outs)
    assert model.exit_after == sorted(model.exit_after) and model.exit_after[-1] == len(model.stages) - 1
    sum(o.float().sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        outs = model(x)
        final = model.forward_head(model.forward_features(x))
        assert torch.allclose(outs[-1], final, atol=1e-5)
        assert torch.allclose(model(x, exits=[-1])[0], final, atol=1e-5)
    costs = exit_costs(model, model.example_input(1))
    assert all(b > a for a, b in zip(costs, costs[1:]))
    # head parameters are the ICs only; together with the backbone they cover the model
    ids = {id(p) for p in model.backbone_parameters()} | {id(p) for p in model.head_parameters()}
    assert ids == {id(p) for p in model.parameters()}
    assert not ({id(p) for p in model.backbone_parameters()} & {id(p) for p in model.head_parameters()})


def test_forward_exits_subset_skips_heads():
    model = build_model("resnet20", num_classes=3, in_chans=1, image_size=16)
    calls = []
    for k, h in enumerate(model.heads):
        h.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    model(model.example_input(2), exits=[-1])
    assert calls == [model.num_exits - 1]


def test_backbone_runs_without_grad_when_frozen():
    model = build_model("mlp", num_classes=3, in_chans=1, image_size=4)
    for p in model.backbone_parameters():
        p.requires_grad_(False)
    seen = []
    model.stages[0].register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    outs = model(model.example_input(2))
    assert seen == [False]
    assert outs[0].requires_grad and not outs[-1].requires_grad


def test_exit_specs():
    m = build_model("resnet56", num_classes=10, image_size=8)
    assert m.exit_after == list(range(4, 26, 2)) + [26]  # the paper's default: every other block from the fifth
    assert build_model("resnet20", num_classes=10, image_size=8, ic_after="every:2").exit_after == [1, 3, 5, 7, 8]
    assert build_model("resnet20", num_classes=10, image_size=8, ic_after=[0, 3]).exit_after == [0, 3, 8]
    assert build_model("resnet20", num_classes=10, image_size=8, ic_after="none").exit_after == [8]
    sdn = build_model("resnet56", num_classes=10, image_size=32, ic_after="sdn").exit_after
    assert len(sdn) == 7 and sdn[-1] == 26
    with pytest.raises(ValueError, match="IC block indices"):
        build_model("resnet20", num_classes=10, image_size=8, ic_after=[8])
    with pytest.raises(ValueError, match="every:N"):
        build_model("resnet20", num_classes=10, image_size=8, ic_after="every:x")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope", num_classes=10)


def test_sdn_placement_fractions():
    """SDN places each IC at the block whose cumulative backbone cost lies nearest to 15, 30, ..., 90 %."""
    from earlyexit.models import stage_costs

    m = cifar_resnet(56, num_classes=10, image_size=32)
    costs = stage_costs(m.stem, list(m.stages), (1, 3, 32, 32))
    cum = torch.tensor(costs, dtype=torch.float64).cumsum(0) / sum(costs)
    got = resolve_ic_after("sdn", m.stem, list(m.stages), m.heads[-1], (1, 3, 32, 32), default=[])
    want = sorted({int((cum - f).abs().argmin()) for f in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)})
    assert got == want


def test_slice_state_pytree():
    s = {"h": torch.arange(6).view(3, 2), "m": [torch.arange(3), None]}
    out = slice_state(s, torch.tensor([True, False, True]))
    assert out["h"].tolist() == [[0, 1], [4, 5]] and out["m"][0].tolist() == [0, 2] and out["m"][1] is None


def _randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial affine params and running stats.

    A fresh torchvision model has weight 1, bias 0, mean 0, var 1 everywhere, so its BNs are near-identities
    and a BN (or downsample) key copied into the wrong slot would still produce matching outputs.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)  # (C,)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)  # (C,)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)  # (C,)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # (C,) positive


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_parity(name):
    tv = getattr(torchvision.models, name)(num_classes=1000)
    _randomise_batchnorm(tv)
    tv.eval()
    ours = build_model(name, num_classes=1000, image_size=64, stem="imagenet").eval()
    load_torchvision(ours, tv.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x, exits=[-1])[0] - tv(x)).abs().max() < 1e-5


def test_torchvision_key_map_is_complete_and_rejects_bad_keys():
    tv = torchvision.models.resnet18().state_dict()
    ours = build_model("resnet18", num_classes=1000, image_size=32, stem="imagenet")
    conv = convert_torchvision_state_dict(ours, tv)
    assert len(conv) == len(tv) and set(conv) <= set(ours.state_dict())
    with pytest.raises(KeyError):
        convert_torchvision_state_dict(ours, {**tv, "extra.weight": torch.zeros(1)})
    bad = dict(tv)
    bad["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision(ours, bad)


def test_sdn_head_sized_from_feature_info():
    m = build_model("resnet20", num_classes=7, in_chans=1, image_size=28)
    for k, i in enumerate(m.exit_after[:-1]):
        info = m.feature_info[i]
        head = m.heads[k]
        side = [min(s, 4) for s in info["size"]]
        assert head.linear.in_features == info["num_chs"] * side[0] * side[1]


@pytest.mark.parametrize("name", ["resnet20", "mlp", "vit", "msdnet_cifar"])
def test_repr_is_one_line_with_the_exits_and_their_costs(name):
    """``print(model)`` names the backbone, where the exits sit and their costs over the backbone's (as ``run``
    prints them), not the module tree; counting them leaves the model's mode and buffers as they were."""
    from earlyexit.metrics import backbone_cost, exit_costs

    model = build_model(name, num_classes=5, **get_spec(name).tiny)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    text = repr(model)
    assert "\n" not in text and len(text) < 200 and text.startswith(f"{type(model).__name__}({name}, 5 classes: ")
    assert f"exits after stages {model.exit_after} of {len(model.stages)}" in text
    x = model.example_input(1)
    want = [c / backbone_cost(model, x) for c in exit_costs(model, x)]
    assert f"cost [{', '.join(f'{c:.2f}' for c in want)}] x backbone" in text
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert repr(model) == text and str(model) == text
