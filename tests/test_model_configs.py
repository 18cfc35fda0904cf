"""One way to build a model: per-architecture config dataclasses, ``build_model(..., weights=)``, and the IC
placement ``ic_after`` (issue 16, items 2 and 4)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from earlyexit.config import ModelConfig, parse_ic_after, run_config_from_dict, to_dict, upgrade_config_dict
from earlyexit.config import RunConfig
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.models import build_model, get_spec, list_models, model_config


def test_every_registered_size_is_an_instance_of_its_config():
    for name in list_models():
        cfg = get_spec(name).config
        assert dataclasses.is_dataclass(cfg) and dataclasses.fields(cfg), name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, dataclasses.fields(cfg)[0].name, None)
    assert get_spec("torchvision:resnet18").config.image_size == 224


def test_options_set_config_fields_by_name_and_are_checked_there():
    cfg = model_config("resnet20", width=2, head="sdn_exact")
    assert (cfg.depth, cfg.width, cfg.head) == (20, 2, "sdn_exact") and get_spec("resnet20").config.width == 1
    assert model_config("msdnet_cifar", gr_factor=[1, 2], bn_factor=[1, 2]).gr_factor == (1, 2)  # lists -> tuples
    for name, options, pattern in [("resnet20", {"colour": 1}, "does not take the option 'colour'; its options:"),
                                   ("mlp", {"width": 0}, "option width=0 expects a size >= 1"),
                                   ("vit", {"mlp_dim": "x"}, "expects an integer or null"),
                                   ("resnet18", {"width": 2}, "CIFAR ResNets"),
                                   ("bert_tiny", {"weights": "minilm-l6"}, "takes no weights")]:
        with pytest.raises(ConfigError, match=pattern) as e:
            model_config(name, **options)
        assert "\n" not in str(e.value) and f"model {name!r}" in str(e.value)


def test_weights_are_a_file_in_the_upstream_layout_or_ours(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "r18.pt")
    m = build_model("resnet18", num_classes=10, image_size=32, stem="imagenet", weights=tmp_path / "r18.pt")
    assert torch.equal(m.stem.conv1.weight, tv.conv1.weight) and m.heads[-1].fc.weight.shape == (10, 512)
    torch.save(m.state_dict(), tmp_path / "ours.pt")
    again = build_model("resnet18", num_classes=10, image_size=32, stem="imagenet", weights=tmp_path / "ours.pt")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in m.state_dict().items())
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("resnet18", num_classes=10, image_size=32, weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="has no upstream weights"):
        build_model("mlp", num_classes=10, weights="IMAGENET1K_V1")  # a name only an upstream model knows


def test_weights_from_a_run_folder_or_own_file_for_a_model_without_upstream_weights(tmp_path):
    """``weights=`` takes a run of this package's for every model (issue 16: one way to build a model), mlp too."""
    from safetensors.torch import save_file

    src = build_model("mlp", num_classes=10, in_chans=1, ic_after="every:1")
    run = tmp_path / "run"
    run.mkdir()
    save_file(src.state_dict(), run / "model.safetensors")
    (run / "config.json").write_text('{"model": {"name": "mlp"}, "train": {}}')
    for weights in (run, run / "model.safetensors"):
        m = build_model("mlp", num_classes=10, in_chans=1, ic_after="every:1", weights=weights)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(CheckpointError, match="does not fit"):  # another model's run
        build_model("mlp", num_classes=10, in_chans=1, ic_after="every:1", width=7, weights=run)


@pytest.mark.parametrize("given,parsed", [
    (None, None), ("default", None), ("4,6,8", (4, 6, 8)), ([2, 4], (2, 4)), (" Every:2 ", "every:2"),
    ("SDN", "sdn"), ("none", "none"), ("cost:0.5", "cost:0.5"), ("layer1.0,layer2", "layer1.0,layer2"),
    (["layer1.0"], ("layer1.0",)),
])
def test_ic_after_is_parsed_once_in_the_model_config(given, parsed):
    assert parse_ic_after(given) == parsed == ModelConfig(name="resnet20", ic_after=given).ic_after
    assert parse_ic_after(parsed) == parsed  # a parsed placement is taken as it is


@pytest.mark.parametrize("bad", ["every:x", "every:0", [1.5], [True], {"a": 1}])
def test_a_malformed_ic_after_fails_when_the_config_is_built(bad):
    with pytest.raises(ConfigError, match="bad ic_after spec"):
        ModelConfig(ic_after=bad)


def test_a_config_json_with_the_old_key_exits_loads_as_ic_after(tmp_path):
    from earlyexit.runs import read_run_config

    new = to_dict(RunConfig(model=ModelConfig(name="mlp", ic_after="every:2")))
    old = {**new, "model": {"name": "mlp", "exits": "every:2", "kwargs": {}}}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert read_run_config(tmp_path / "config.json") == run_config_from_dict(new) == run_config_from_dict(old)
    assert upgrade_config_dict(new) is new  # today's files pass unchanged
    (tmp_path / "config.json").write_text(json.dumps({**old, "model": {"name": "mlp", "exits": {"a": 1}}}))
    with pytest.raises(Exception, match="model.ic_after must be"):  # the old key is type-checked as the new one
        read_run_config(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="old name of model.ic_after"):
        upgrade_config_dict({"model": {"exits": [1], "ic_after": [2]}})
