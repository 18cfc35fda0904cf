"""The differences from the authors' code that the package chose on purpose, each pinned (README, "Differences
from the reference code"), and the internal consistencies they rest on."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from earlyexit.config import ModelConfig, PhaseConfig, RunConfig, TrainConfig, run_config_from_dict, to_dict
from earlyexit.data import load_dataset
from earlyexit.models import build_model
from earlyexit.models.heads import LinearHead
from earlyexit.models.multiexit import MultiExitModel
from earlyexit.models.registry import default_grad_clip, effective_grad_clip
from earlyexit.runs import with_model_defaults
from earlyexit.training.optim import lr_at
from earlyexit.weighting import TrainingPoint, get_weighting

tr = importlib.import_module("earlyexit.training")
step_mod = importlib.import_module("earlyexit.training.step")


# -- 1. gradient clipping: per model, as the paper's code (its ViT scripts clip at 1, the rest do not) ---------------

@pytest.mark.parametrize("name,norm", [("resnet20", None), ("resnet56", None), ("bert", None), ("mlp", None),
                                       ("msdnet_cifar", None), ("vit", 1.0), ("vit_b16", 1.0),
                                       ("efficientnet_b0", 1.0)])
def test_clipping_default_is_the_models(name, norm):
    assert default_grad_clip(name) == norm
    cfg = with_model_defaults(RunConfig(model=ModelConfig(name=name)))
    assert cfg.train.grad_clip == norm  # config.json states the number the run used
    # an explicit value wins over the model's default, "none" included
    explicit = RunConfig(model=ModelConfig(name=name), train=TrainConfig(grad_clip=2.5))
    assert with_model_defaults(explicit).train.grad_clip == 2.5
    off = RunConfig(model=ModelConfig(name=name), train=TrainConfig(grad_clip=None))
    assert with_model_defaults(off).train.grad_clip is None


def test_the_step_clips_exactly_when_the_model_says_so():
    """One step with a huge loss scale: the update's gradient norm is capped at 1 only under the ViT's default."""
    for name, clipped in [("mlp", False), ("vit", True)]:
        model = build_model(name, num_classes=10, in_chans=1, image_size=16 if name == "vit" else 8)
        assert effective_grad_clip("model", model) == (1.0 if clipped else None)
        x = torch.randn(4, 1, 16 if name == "vit" else 8, 16 if name == "vit" else 8)
        loss = sum(o.pow(2).sum() for o in model(x)) * 1e3
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        before = torch.norm(torch.stack([p.grad.norm() for p in params]))
        clip = effective_grad_clip("model", model)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        after = torch.norm(torch.stack([p.grad.norm() for p in params]))
        assert before > 10
        assert (after <= 1.0 + 1e-4) == clipped


def test_bad_clipping_value_is_one_line():
    from earlyexit.errors import ConfigError

    with pytest.raises(ConfigError, match="gradient clipping norm must be a number"):
        TrainConfig(grad_clip="sometimes")


def test_warmup_is_linear_then_the_schedule():
    pc = PhaseConfig(lr=(0.1,), warmup=10, schedule="constant")
    assert [round(lr_at(pc, 0.1, s, 100), 6) for s in (0, 4, 9, 10, 50)] == [0.01, 0.05, 0.1, 0.1, 0.1]
    cos = PhaseConfig(lr=(0.1,), warmup=0)
    assert lr_at(cos, 0.1, 0, 100) == 0.1 and lr_at(cos, 0.1, 100, 100) == 0.0


def test_configs_written_before_warmup_read_as_without_it():
    d = to_dict(RunConfig())
    assert d["train"]["phases"][0]["warmup"] == 20  # today's default
    for p in d["train"]["phases"]:
        del p["warmup"]
    assert all(p.warmup == 0 for p in run_config_from_dict(d).train.phases)


# -- 2. the gradient log reports exactly the weights the step trained with ----------------------------------------

def _model():
    torch.manual_seed(0)
    stage = lambda d: nn.Sequential(nn.Linear(d, 16), nn.ReLU())  # noqa: E731
    return MultiExitModel(stem=nn.Flatten(), stages=[stage(64), stage(16), stage(16)], head=LinearHead(16, 10),
                          ic_after=[0, 1], make_head=lambda fi, c: nn.Linear(fi["num_chs"], c),
                          feature_info=[{"num_chs": 16}] * 3, num_classes=10, input_shape=(1, 8, 8))


def test_gradient_log_weights_are_the_steps_weights():
    """Under SDN's per-epoch ramp: the weights the log reports are constant within an epoch and equal the ramp's
    entry for that epoch in phase 2; in phase 3 each IC weighs 1 and the frozen final exit 0 (what the step uses)."""
    data = load_dataset("synthetic", image_size=8, num_classes=10, train_samples=160, test_samples=40)
    logged = []

    def probe(model, x, y, *, phase, weights, **kw):
        logged.append((phase, list(weights)))
        return {"phase": phase, "cos": [None] * len(weights)}

    pc = PhaseConfig(lr=(0.05,), epochs=3, warmup=0)
    cfg = TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu", weighting="sdn", grad_log_every=1)
    tr.train(_model(), data, regime="+++", config=cfg, probe=probe)
    steps_per_epoch = 9  # 144 training samples in batches of 16
    assert len(logged) == 2 * 3 * steps_per_epoch
    sdn = get_weighting("sdn")
    for i, (phase, w) in enumerate(logged):
        epoch = (i % (3 * steps_per_epoch)) // steps_per_epoch
        if phase == 2:
            want = list(sdn.at(3, TrainingPoint(phase=2, epoch=epoch, epochs=3, progress=0.0)))
        else:
            want = [1.0, 1.0, 0.0]
        assert w == pytest.approx(want), (i, phase, epoch)
    # and the step itself trains with those weights (one function serves both)
    assert step_mod.train_step.__code__.co_names.count("step_weights") == 1
