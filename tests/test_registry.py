"""Adding a backbone takes one file: a tiny conv net defined and registered here runs through everything.

The model below is what CONTRIBUTING.md's recipe asks of a new backbone file:
a builder registered with ``@register_model`` (its spec: input kind, tiny build
options, a foreign-weights adapter) and parts that describe themselves (conv/BN
pairs for folding, permutation rules for weight matching). Nothing else in the
package is told about it, yet training, evaluation, early-exit prediction,
BatchNorm folding, weight matching, ``weights`` (an "upstream" checkpoint format
its adapter converts), ``--init`` (from a run folder) and whole runs work.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import earlyexit as ee
from earlyexit.config import DataConfig, EvalConfig, ModelConfig, PhaseConfig, RunConfig, TrainConfig
from earlyexit.errors import CheckpointError
from earlyexit.models import (MultiExitModel, build_model, feature_info_for, get_spec, init_conv_bn, list_models,
                              register_model, resolve_ic_after, unregister_model)
from earlyexit.models.heads import PoolLinearHead

NAME = "tiny_conv_test"
NUM_CLASSES = 4


# --- the backbone: what a new model file holds ---------------------------------------------------

class ConvBN(nn.Module):
    """3x3 conv, BatchNorm, ReLU: the stem and every stage."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        return [("conv", "bn")]

    def permutation_axes(self, rules, prefix: str, inp: str | None) -> str:
        p = rules.new("stem" if rules.stage is None else f"stage{rules.stage}", self.conv.out_channels)
        rules.axes[prefix + "conv.weight"] = (p, inp, None, None)
        rules.norm(prefix + "bn", p)
        return p


def upstream_weights(model: MultiExitModel, sd) -> dict[str, Tensor] | None:
    """The foreign-weights adapter: an "upstream" checkpoint (``features.N``, ``classifier``) in our names."""
    if "classifier.weight" not in sd or not any(k.startswith("features.") for k in sd):
        return None
    names = _upstream_names(model)
    out = {}
    for k, v in sd.items():
        pre = next((p for p in names if k.startswith(p)), None)
        if pre is None:
            raise KeyError(f"unexpected key in upstream checkpoint: {k}")
        out[names[pre] + k[len(pre):]] = v
    return out


def _upstream_names(model: MultiExitModel) -> dict[str, str]:
    names = {"features.0.": "stem.conv.", "features.1.": "stem.bn.", "classifier.": f"heads.{model.num_exits - 1}.fc."}
    for i in range(len(model.stages)):
        names[f"features.{2 * i + 2}."], names[f"features.{2 * i + 3}."] = f"stages.{i}.conv.", f"stages.{i}.bn."
    return names


def tiny_conv(*, num_classes: int, in_chans: int = 1, ic_after=None, image_size: int = 8, width: int = 8,
              depth: int = 3) -> MultiExitModel:
    """A conv stem and ``depth`` conv stages (the second and later ones strided); ICs after every stage."""
    stem = ConvBN(in_chans, width)
    stages = [ConvBN(width, width, 1 if i == 0 else 2) for i in range(depth)]
    shape = (1, in_chans, image_size, image_size)
    info = feature_info_for(stem, stages, shape)
    final = PoolLinearHead(width, num_classes)
    chosen = resolve_ic_after(ic_after, stem, stages, final, shape, default=list(range(depth - 1)))
    model = MultiExitModel(stem=stem, stages=stages, head=final, ic_after=chosen,
                           make_head=lambda fi, c: PoolLinearHead(fi["num_chs"], c), feature_info=info,
                           num_classes=num_classes, input_shape=shape[1:])
    init_conv_bn(model)
    return model


@pytest.fixture(scope="module")
def name():
    """Registered for this module's tests only, so that the registry stays as the package defines it."""
    register_model(NAME, input="image", tiny=dict(image_size=8, width=4), foreign_weights=upstream_weights)(tiny_conv)
    try:
        yield NAME
    finally:
        unregister_model(NAME)


@pytest.fixture(scope="module")
def data():
    return ee.load_dataset("synthetic", image_size=8, in_chans=1, num_classes=NUM_CLASSES, train_samples=128,
                           test_samples=64)


def _build(seed: int, **kw) -> MultiExitModel:
    torch.manual_seed(seed)
    return build_model(NAME, **{"num_classes": NUM_CLASSES, "in_chans": 1, **kw})


def _randomise_norms(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def _upstream_state(model: MultiExitModel) -> dict[str, Tensor]:
    """The backbone of ``model`` as the upstream format names it (what the adapter reads)."""
    back = {ours: up for up, ours in _upstream_names(model).items()}
    out = {}
    for k, v in model.state_dict().items():
        pre = next((p for p in back if k.startswith(p)), None)
        if pre is not None:
            out[back[pre] + k[len(pre):]] = v.clone()
    return out


def _backbone_keys(model: MultiExitModel) -> list[str]:
    final = f"heads.{model.num_exits - 1}."
    return [k for k in model.state_dict() if not k.startswith("heads.") or k.startswith(final)]


# --- the tests ---------------------------------------------------------------------------------------

def test_registration_and_spec(name):
    assert name in list_models()
    spec = get_spec(name)
    assert spec.builder is tiny_conv and spec.input == "image" and dict(spec.tiny) == dict(image_size=8, width=4)
    model = build_model(name, num_classes=5, **spec.tiny)
    x = model.example_input(3)
    outs = model(x)
    assert model.arch == name and len(outs) == model.num_exits == 3 and all(o.shape == (3, 5) for o in outs)
    with pytest.raises(ValueError, match="already registered"):
        register_model(name)(tiny_conv)
    with pytest.raises(ValueError, match="does not take the option"):
        build_model(name, num_classes=5, heads=7)


def test_register_and_unregister_leave_the_registry_as_it_was():
    before = list_models()
    register_model("tiny_conv_other", tiny=dict(image_size=8))(tiny_conv)
    assert "tiny_conv_other" in list_models()
    unregister_model("tiny_conv_other")
    assert list_models() == before
    with pytest.raises(ValueError, match="unknown model"):
        unregister_model("tiny_conv_other")
    with pytest.raises(ValueError, match="input must be one of"):
        register_model("tiny_conv_other", input="audio")(tiny_conv)
    assert list_models() == before


def test_train_evaluate_predict(name, data):
    model = _build(0)
    pc = PhaseConfig(epochs=1, lr=(0.05,))
    record = ee.train(model, data, regime="mixed", config=TrainConfig(phases=(pc, pc, pc), batch_size=32, device="cpu"))
    assert [p.phase for p in record.phases] == [1, 2]
    logits, labels = ee.evaluate(model, data.test.batches(64))
    assert logits.shape == (model.num_exits, 64, NUM_CLASSES) and labels.shape == (64,)
    x, _ = next(iter(data.test.batches(64)))
    with torch.inference_mode():
        offline = torch.stack(model.eval()(x))  # (E, N, C)
    first, at_first = ee.predict(model, x, criterion="confidence", threshold=0.0)
    last, at_last = ee.predict(model, x, criterion="confidence", threshold=1.01)
    assert at_first.eq(0).all() and torch.equal(first, offline[0].argmax(-1))
    assert at_last.eq(model.num_exits - 1).all() and torch.equal(last, offline[-1].argmax(-1))
    costs = ee.exit_costs(model, model.example_input(1))
    assert all(b > a for a, b in zip(costs, costs[1:]))


def test_batchnorm_folding_uses_the_declared_pairs(name):
    from earlyexit.inference import fuse_batchnorm

    model = _build(0)
    _randomise_norms(model, 0)
    model.eval()
    assert model.conv_bn_pairs() == [("stem.conv", "stem.bn")] + [(f"stages.{i}.conv", f"stages.{i}.bn") for i in range(3)]
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    x = model.example_input(4)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_weight_matching_with_the_declared_rule(name):
    pytest.importorskip("scipy")
    from earlyexit.analysis import apply_permutation, permutation_spec, weight_matching

    a, b = _build(0), _build(1)
    _randomise_norms(a, 0)
    _randomise_norms(b, 1)
    spec = permutation_spec(a)
    assert sorted(spec.sizes) == ["stage0", "stage1", "stage2", "stem"]
    matched = weight_matching(a, b)
    x = a.example_input(8)
    b.eval(), matched.eval()
    with torch.no_grad():
        assert max(float((u - v).abs().max()) for u, v in zip(b(x), matched(x))) < 1e-5
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert (flat(a) - flat(matched)).norm() < (flat(a) - flat(b)).norm()
    g = torch.Generator().manual_seed(3)
    shuffled = apply_permutation(a, spec, {p: torch.randperm(n, generator=g) for p, n in spec.sizes.items()})
    recovered = weight_matching(a, shuffled)
    assert all(torch.equal(v, recovered.state_dict()[k]) for k, v in a.state_dict().items())


def test_weights_from_upstream_and_init_from_a_run(name, tmp_path):
    from earlyexit.models import load_pretrained
    from earlyexit.runs import load_init, load_run, run_experiment

    source = _build(0, num_classes=10, image_size=28)
    _randomise_norms(source, 0)
    torch.save(_upstream_state(source), tmp_path / "upstream.pt")

    # the adapter converts the upstream names; the ICs keep their initialisation
    model = _build(1, num_classes=10, image_size=28)
    ics = {k: v.clone() for k, v in model.state_dict().items() if k not in _backbone_keys(model)}
    load_pretrained(model, tmp_path / "upstream.pt")
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in _backbone_keys(model))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ics.items())
    # another number of classes: the upstream classifier does not fit, ours keeps its initialisation
    other = _build(1, num_classes=3, image_size=28)
    fc = other.heads[-1].fc.weight.detach().clone()
    load_pretrained(other, tmp_path / "upstream.pt")
    assert torch.equal(other.stem.conv.weight, source.stem.conv.weight) and torch.equal(other.heads[-1].fc.weight, fc)
    bad = _upstream_state(source)
    bad["features.99.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_pretrained(_build(1, num_classes=10, image_size=28), tmp_path / "bad.pt")

    # a whole run by name: only the ICs train ('--+') on the upstream backbone, which stays as it was
    pc = PhaseConfig(epochs=1, lr=(0.05,))
    cfg = RunConfig(model=ModelConfig(name=name, kwargs={"weights": str(tmp_path / "upstream.pt")}),
                    data=DataConfig(name="synthetic", train_size=200),
                    train=TrainConfig(regime="--+", phases=(pc, pc, pc), batch_size=50, device="cpu"),
                    eval=EvalConfig(thresholds=5))
    res = run_experiment(cfg, tmp_path / "run")
    assert res.model == name and len(res.exits) == 3
    trained, _ = load_run(tmp_path / "run")
    assert all(torch.equal(trained.state_dict()[k], source.state_dict()[k]) for k in _backbone_keys(trained))

    # --init from that run folder: every weight, ICs included
    again = _build(2, num_classes=10, image_size=28)
    load_init(again, tmp_path / "run")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in trained.state_dict().items())
