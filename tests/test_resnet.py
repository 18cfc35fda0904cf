"""ResNet options: stems, the CIFAR width multiplier, SDN's exact IC head and SDN's placement; exit specs."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from earlyexit import build_model
from earlyexit.errors import CheckpointError
from earlyexit.models import adapt_foreign_weights, resolve_ic_after
from earlyexit.models.common import sdn_placement
from earlyexit.models.heads import SDNExactHead, SDNHead
from earlyexit.models.resnet import load_torchvision, torchvision_weights
from test_models import _randomise_batchnorm as _randomise_norms  # non-trivial BatchNorm statistics


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- stems ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size,kind", [(32, "cifar"), (64, "cifar"), (65, "imagenet"), (224, "imagenet")])
def test_default_stem_follows_the_image_size(size, kind):
    m = build_model("resnet18", num_classes=10, image_size=size)
    assert m.stem.kind == kind
    conv = m.stem.conv1
    if kind == "cifar":  # the paper's code on 32-64 px images: 3x3 stride 1, no max pooling
        assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
        assert not any(isinstance(x, nn.MaxPool2d) for x in m.stem.modules())
        assert m.feature_info[0]["size"] == (size, size)
    else:
        assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
        assert m.feature_info[0]["size"] == (-(-size // 4),) * 2


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_stem_options_set_the_first_resolution(name):
    sizes = {s: build_model(name, num_classes=10, image_size=32, stem=s).feature_info[0]["size"]
             for s in ("imagenet", "imagenet_nopool", "cifar")}
    assert sizes == {"imagenet": (8, 8), "imagenet_nopool": (16, 16), "cifar": (32, 32)}


def test_nopool_stem_is_the_imagenet_stem_without_its_max_pooling():
    a = build_model("resnet18", num_classes=10, image_size=64, stem="imagenet", ic_after="none").eval()
    b = build_model("resnet18", num_classes=10, image_size=64, stem="imagenet_nopool", ic_after="none").eval()
    assert list(a.state_dict()) == list(b.state_dict())
    _randomise_norms(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre = b.stem(x)  # (2, 64, 32, 32)
        assert pre.shape == (2, 64, 32, 32)
        assert torch.equal(a.stem(x), F.max_pool2d(pre, 3, 2, 1))


def test_stem_errors():
    with pytest.raises(ValueError, match="unknown ResNet stem 'vgg'"):
        build_model("resnet18", num_classes=10, image_size=32, stem="vgg")
    with pytest.raises(ValueError, match="3x3 stem only"):
        build_model("resnet20", num_classes=10, image_size=32, stem="imagenet")


@pytest.mark.parametrize("stem", ["cifar", "imagenet_nopool"])
def test_torchvision_weights_refuse_other_stems(stem, tmp_path):
    import torchvision

    from earlyexit.runs import load_init

    sd = torchvision.models.resnet18().state_dict()
    m = build_model("resnet18", num_classes=10, image_size=64, stem=stem)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for call in (lambda: load_torchvision(m, sd), lambda: adapt_foreign_weights(m, sd), lambda: torchvision_weights(m, sd)):
        with pytest.raises(CheckpointError, match="stem='imagenet'") as e:
            call()
        assert "\n" not in str(e.value) and repr(stem) in str(e.value)
    torch.save(sd, tmp_path / "r18.pt")
    with pytest.raises(CheckpointError, match="stem='imagenet'"):
        load_init(m, tmp_path / "r18.pt")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing loaded
    assert torchvision_weights(m, {"other.weight": torch.zeros(1)}) is None  # other files stay unrecognised


# --- width -----------------------------------------------------------------------------------------

def test_width_multiplies_the_cifar_widths():
    m = build_model("resnet20", num_classes=10, image_size=32, width=2)
    assert m.stem.conv1.out_channels == 32
    assert [fi["num_chs"] for fi in m.feature_info] == [32] * 3 + [64] * 3 + [128] * 3
    assert m.heads[-1].fc.in_features == 128
    base = build_model("resnet20", num_classes=10, image_size=32)
    assert 3.5 < _n_params(m.stages) / _n_params(base.stages) <= 4.0
    assert len(m(m.example_input(2))) == m.num_exits
    half = build_model("resnet20", num_classes=10, image_size=32, width=0.5)
    assert [fi["num_chs"] for fi in half.feature_info][::3] == [8, 16, 32]


def test_width_one_is_the_default_model():
    torch.manual_seed(0)
    a = build_model("resnet32", num_classes=10, image_size=16)
    torch.manual_seed(0)
    b = build_model("resnet32", num_classes=10, image_size=16, width=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("width", [0, -1, 0.3, "2", True])
def test_bad_width(width):
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", num_classes=10, image_size=32, width=width)


@pytest.mark.parametrize("head", ["sdn", "sdn_exact"])
def test_weight_matching_at_width_two(head):
    """The paper's connectivity figure uses ResNet-20 with width 32 (w=2): weight matching must cover it."""
    pytest.importorskip("scipy")
    from earlyexit.analysis import apply_permutation, permutation_spec, weight_matching

    torch.manual_seed(0)
    a = build_model("resnet20", num_classes=4, in_chans=1, image_size=16, width=2, head=head).eval()
    _randomise_norms(a)
    spec = permutation_spec(a)
    assert set(spec.axes) == set(a.state_dict())
    assert spec.sizes["stream0"] == 32 and spec.sizes["stream2"] == 128 and spec.sizes["block0.conv1"] == 32
    g = torch.Generator().manual_seed(1)
    shuffled = apply_permutation(a, spec, {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}).eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert all(torch.allclose(u, v, atol=1e-4) for u, v in zip(a(x), shuffled(x)))
    assert not torch.equal(a.stem.conv1.weight, shuffled.stem.conv1.weight)
    matched = weight_matching(a, shuffled)
    assert all(torch.equal(v, matched.state_dict()[k]) for k, v in a.state_dict().items())


# --- exit placement ----------------------------------------------------------------------------------

def test_every_with_offset():
    spec = lambda s: build_model("resnet20", num_classes=10, image_size=8, ic_after=s).exit_after[:-1]  # noqa: E731
    assert spec("every:2:0") == [0, 2, 4, 6]
    assert spec("every:3:1") == [1, 4, 7]
    assert spec("every:2") == spec("every:2:1") == [1, 3, 5, 7]  # every:N keeps its meaning: N-1, 2N-1, ...
    assert spec("every:4:7") == [7]
    assert spec("every:20") == []
    for bad, msg in [("every:2:8", "OFFSET"), ("every:2:-1", "OFFSET"), ("every:2:x", "every:N:OFFSET"),
                     ("every:0:1", "N must be"), ("every:1:2:3", "every:N:OFFSET")]:
        with pytest.raises(ValueError, match=msg):
            spec(bad)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 30), step=st.integers(1, 8), offset=st.integers(0, 29))
def test_every_offset_property(n, step, offset):
    stages = [nn.Identity()] * n
    if offset > n - 2:
        with pytest.raises(ValueError, match="OFFSET"):
            resolve_ic_after(f"every:{step}:{offset}", nn.Identity(), stages, nn.Identity(), None, default=[])
        return
    got = resolve_ic_after(f"every:{step}:{offset}", nn.Identity(), stages, nn.Identity(), None, default=[])
    assert got == [i for i in range(n - 1) if i >= offset and (i - offset) % step == 0]
    assert got[0] == offset and all(b - a == step for a, b in zip(got, got[1:])) and got[-1] + step >= n - 1


def _flat_ic_indices(add_ic):
    flat = [a for group in add_ic for a in group] if isinstance(add_ic[0], list) else add_ic
    return [i for i, a in enumerate(flat) if a]


def test_sdn_placement_matches_sdn_resnet56():
    # SDN's network_architectures.py, create_resnet56: add_ic per group of 9 blocks ("15, 30, 45, 60, 75, 90 percent of GFLOPs")
    sdn = _flat_ic_indices([[0, 0, 0, 1, 0, 0, 0, 1, 0], [0, 0, 1, 0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1, 0, 0, 0]])
    assert sdn == [3, 7, 11, 15, 19, 23]
    assert build_model("resnet56", num_classes=10, image_size=32, ic_after="sdn").exit_after == sdn + [26]


def test_sdn_placement_matches_sdn_vgg16():
    """The same rule on SDN's VGG-16 (32 px, CIFAR): the convolutions' and linear layers' multiply-adds."""
    chans = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    pools = [1, 2, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1, 2]
    costs, cin, side = [], 3, 32
    for c, p in zip(chans, pools):
        costs.append(9 * cin * c * side * side)
        cin, side = c, side // p
    costs += [512 * 512, 512 * 512 + 512 * 10]  # SDN's fc block (512) and its end layers (512, classes)
    sdn = _flat_ic_indices([0, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0])  # create_vgg16: add_ic
    assert sdn_placement(costs) == sdn == [1, 3, 5, 6, 8, 9]


def test_sdn_placement_rule():
    assert sdn_placement([1] * 20) == [2, 5, 8, 11, 14, 17]  # cumulative 3/20 = 15 %, 6/20 = 30 %, ...
    assert sdn_placement([1, 1, 1, 1]) == [0, 1, 2]  # 15 % -> block 0 (25 %), 90 % -> block 3 is the last: dropped
    assert sdn_placement([1, 1], fractions=(0.5,)) == [0]
    assert sdn_placement([2, 1, 1], fractions=(0.625,)) == [0]  # a tie goes to the earlier block (50 % vs 75 %)


# --- SDN's exact head -----------------------------------------------------------------------------------

def _sdn_ic(input_size: int, channels: int, num_classes: int) -> nn.ModuleDict:
    """SDN's InternalClassifier layer sizes (aux_funcs.py: feature_reduction_formula), built by hand."""
    k = input_size // 4 if input_size >= 4 else -1
    if k == -1:
        return nn.ModuleDict({"linear": nn.Linear(channels * input_size * input_size, num_classes)})
    red = int(input_size / k)
    return nn.ModuleDict({"max_pool": nn.MaxPool2d(k), "avg_pool": nn.AvgPool2d(k),
                          "linear": nn.Linear(channels * red * red, num_classes)})


def test_sdn_exact_head_matches_sdn_resnet56_layer_for_layer():
    torch.manual_seed(0)
    m = build_model("resnet56", num_classes=10, image_size=32, ic_after="sdn", head="sdn_exact").eval()
    _randomise_norms(m)
    # SDN's ResNet-56 on CIFAR tracks input sizes 32, 16, 8 for its three groups of 9 blocks, channels 16, 32, 64
    ics = [3, 7, 11, 15, 19, 23]
    ref = [_sdn_ic(32 >> (i // 9), 16 << (i // 9), 10) for i in ics]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        states = m.forward_intermediates(x, ics)
        outs = m(x)
    for k, (head, r, s) in enumerate(zip(m.heads[:-1], ref, states)):
        assert isinstance(head, SDNExactHead)
        assert _n_params(head) == _n_params(r) + 1  # + SDN's alpha
        assert head.alpha.shape == (1,) and 0 <= float(head.alpha.detach()) < 1
        assert head.linear.weight.shape == r["linear"].weight.shape
        r["linear"].load_state_dict(head.linear.state_dict())
        pooled = head.alpha * r["max_pool"](s) + (1 - head.alpha) * r["avg_pool"](s)  # (3, C, 4, 4)
        assert pooled.shape == (3, 16 << k // 2, 4, 4)
        assert torch.allclose(outs[k], r["linear"](pooled.flatten(1)), atol=1e-6)
    assert [_n_params(h) for h in m.heads[:-1]] == [2571, 2571, 5131, 5131, 10251, 10251]


def test_sdn_exact_head_on_28px_maps():
    """A 7x7 map: SDN pools with kernel 1 (no reduction), SDNHead pools to 4x4."""
    exact = build_model("resnet20", num_classes=10, in_chans=1, image_size=28, head="sdn_exact")
    ours = build_model("resnet20", num_classes=10, in_chans=1, image_size=28)
    assert exact.feature_info[6]["size"] == (7, 7) and exact.exit_after[1] == 6
    assert _n_params(exact.heads[1]) == 31_371 and _n_params(ours.heads[1]) == 10_251
    assert _n_params(exact.heads[0]) == _n_params(ours.heads[0]) == 5_131  # 14x14: both reduce to 4x4
    assert _n_params(_sdn_ic(7, 64, 10)) + 1 == 31_371


@pytest.mark.parametrize("size,out,reduce", [((32, 32), (4, 4), True), ((14, 14), (4, 4), True), ((7, 7), (7, 7), True),
                                             ((9, 9), (4, 4), True), ((3, 3), (3, 3), False), ((16, 8), (4, 4), True),
                                             ((8, 3), (8, 3), False)])
def test_sdn_exact_head_sizes(size, out, reduce):
    h = SDNExactHead(5, size, 3)
    assert h.out_size == out and h.reduce == reduce and hasattr(h, "alpha") == reduce
    assert h.linear.in_features == 5 * out[0] * out[1]
    assert h(torch.randn(2, 5, *size)).shape == (2, 3)


def test_sdn_exact_alpha_is_unbounded():
    h = SDNExactHead(2, (8, 8), 3)
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        h.alpha.fill_(3.0)  # no sigmoid: alpha = 3 weighs max pooling 3 and average pooling -2
    want = h.linear((3 * F.max_pool2d(x, 2) - 2 * F.avg_pool2d(x, 2)).flatten(1))
    assert torch.allclose(h(x), want, atol=1e-6)


def test_sdn_exact_heads_read_the_output_before_the_last_relu():
    torch.manual_seed(0)
    exact = build_model("resnet20", num_classes=5, image_size=16, head="sdn_exact").eval()
    default = build_model("resnet20", num_classes=5, image_size=16).eval()
    _randomise_norms(default)
    backbone = {k: v for k, v in default.state_dict().items() if not k.startswith("heads.") or k.startswith("heads.2.")}
    assert {k for k in exact.state_dict() if not k.startswith("heads.") or k.startswith("heads.2.")} == set(backbone)
    exact.load_state_dict(backbone, strict=False)
    seen = {}
    for k, h in enumerate(exact.heads[:-1]):
        h.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0].clone()))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(exact(x)[-1], default(x)[-1])  # the backbone computes the same function
        assert torch.equal(exact(x, exits=[-1])[0], default(x, exits=[-1])[0])
        for k, i in enumerate(exact.exit_after[:-1]):
            state = default.forward_intermediates(x, [i - 1])[0]  # post-ReLU input of block i
            blk = default.stages[i]
            identity = state if blk.downsample is None else blk.downsample(state)
            pre = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(state))))) + identity
            assert torch.allclose(seen[k], pre, atol=1e-6) and seen[k].min() < 0
            assert torch.equal(torch.relu(seen[k]), default.forward_intermediates(x, [i])[0])
    # only the blocks around an IC move their ReLU; the default model keeps every block as it was
    moved = [(i, b.relu_input, b.relu_output) for i, b in enumerate(exact.stages) if b.relu_input or not b.relu_output]
    assert moved == [(4, False, False), (5, True, True), (6, False, False), (7, True, True)]
    assert all(b.relu_output and not b.relu_input for b in default.stages)


def test_sdn_exact_consecutive_ics_train_and_predict():
    from earlyexit.inference import predict

    m = build_model("resnet20", num_classes=4, in_chans=1, image_size=8, ic_after="every:1", head="sdn_exact")
    assert all(not b.relu_output for b in m.stages[:-1]) and all(b.relu_input for b in m.stages[1:])
    x = m.example_input(5)
    sum(o.sum() for o in m(x)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    with torch.no_grad():
        outs = m(x)
    preds, where = predict(m, x, threshold=0.0)
    assert where.tolist() == [0] * 5 and torch.equal(preds, outs[0].argmax(1))


def test_head_option():
    assert all(isinstance(h, SDNHead) for h in build_model("resnet20", num_classes=3, image_size=8, head="sdn").heads[:-1])
    assert all(isinstance(h, SDNExactHead) for h in build_model("resnet18", num_classes=3, image_size=32, head="sdn_exact").heads[:-1])
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        build_model("resnet20", num_classes=3, image_size=8, head="mlp")
    torch.manual_seed(0)
    a = build_model("resnet20", num_classes=3, image_size=8)
    torch.manual_seed(0)
    b = build_model("resnet20", num_classes=3, image_size=8, head="sdn")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
