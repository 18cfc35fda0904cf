"""Tests of the ViT with exits (earlyexit.models.vit): shapes, exits, heads,
parity with torchvision's VisionTransformer, FLOPs and position-embedding
resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings, strategies as st
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from earlyexit.flops import count_flops
from earlyexit.models import build_model, slice_state
from earlyexit.models.vit import (TokenHead, interpolate_pos_embedding, load_torchvision_vit, parse_head,
                                  torchvision_vit_key_map)

TINY = dict(image_size=16, patch_size=4, width=32, depth=4, num_heads=2, mlp_ratio=2.0)


@torch.no_grad()
def _randomize_(module: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Give every parameter random values (LayerNorm weights around 1), so no product is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        for name, p in m.named_parameters(recurse=False):
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * r if isinstance(m, nn.LayerNorm) and name == "weight" else std * r)
    return module


def _tiny_tv(image_size: int = 32, num_classes: int = 10, seed: int = 0) -> VisionTransformer:
    tv = VisionTransformer(image_size=image_size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                           num_classes=num_classes)
    return _randomize_(tv, seed).eval()


def _tiny_ours(image_size: int = 32, num_classes: int = 10, **kw):
    return build_model("vit", num_classes=num_classes, image_size=image_size, patch_size=8, depth=2, num_heads=2,
                       width=32, mlp_dim=64, **kw)


def _x(shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- contract ------------------------------------------------------------------

def test_forward_shapes_and_default_exits():
    model = build_model("vit", num_classes=10)
    assert model.exit_after == [1, 2, 3, 4, 5, 6]  # ICs after blocks 2..6 (1-based), block 7 = final head
    assert model.input_shape == (3, 32, 32)
    assert [fi["num_chs"] for fi in model.feature_info] == [256] * 7
    assert model.feature_info[0]["num_tokens"] == 65
    assert model.stages[0].mlp[0].out_features == 512
    out = model(_x((2, 3, 32, 32)))
    assert len(out) == model.num_exits == 6
    assert all(o.shape == (2, 10) for o in out)
    # the /16 sizes put an IC after every block but the last
    small = build_model("vit_t16", num_classes=5, image_size=32, depth=3)
    assert small.exit_after == [0, 1, 2]
    assert small.stages[0].self_attention.num_heads == 3 and small.feature_info[0]["num_chs"] == 192


@pytest.mark.parametrize("kw", [{}, {"head": "mlp64"}, {"head_pool": "mean", "head": "mlp16x16"}])
def test_last_exit_is_forward_head_of_forward_features(kw):
    model = build_model("vit", num_classes=7, **TINY, **kw).eval()
    x = _x((3, 3, 16, 16))
    with torch.no_grad():
        out = model(x)
        ref = model.forward_head(model.forward_features(x))
        only_last = model(x, exits=[-1])
    assert len(only_last) == 1
    torch.testing.assert_close(out[-1], ref, rtol=0, atol=0)
    torch.testing.assert_close(only_last[0], ref, rtol=0, atol=0)
    assert not torch.allclose(out[0], out[-1])  # ICs are real, distinct classifiers


def test_backward_reaches_every_parameter():
    model = build_model("vit", num_classes=4, dropout=0.1, attention_dropout=0.1, **TINY).train()
    out = model(_x((2, 3, 16, 16)))
    sum(F.cross_entropy(o, torch.tensor([0, 3])) for o in out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_exit_specs():
    model = build_model("vit", num_classes=3, ic_after="every:2")
    assert model.exit_after == [1, 3, 5, 6]
    assert len(model(_x((1, 3, 32, 32)))) == 4
    assert build_model("vit", num_classes=3, ic_after="none").exit_after == [6]
    sdn = build_model("vit", num_classes=3, ic_after="sdn").exit_after
    assert sdn == sorted(sdn) and all(0 <= i < 6 for i in sdn[:-1]) and len(sdn) > 2
    with pytest.raises(ValueError):
        build_model("vit", num_classes=3, ic_after=[6])


def test_stagewise_execution_with_sliced_state():
    model = build_model("vit", num_classes=5, **TINY).eval()
    x = _x((4, 3, 16, 16))
    keep = torch.tensor([True, False, True, True])
    with torch.no_grad():
        full = model(x)
        state = model.stage(1, model.stage(0, x))  # (B, T, D)
        state = slice_state(state, keep)
        for i in range(2, len(model.stages)):
            state = model.stage(i, state)
        torch.testing.assert_close(model.head(model.num_exits - 1, state), full[-1][keep])


# --- heads -----------------------------------------------------------------------

@pytest.mark.parametrize("spec,hidden", [("token", ()), ("mlp1024", (1024,)), ("mlp2048", (2048,)),
                                         ("mlp1024x1024", (1024, 1024)), ((256, 128), (256, 128))])
def test_parse_head_and_head_sizes(spec, hidden):
    assert parse_head(spec) == hidden
    model = build_model("vit", num_classes=10, head=spec)
    ic = model.heads[0]
    linears = [m for m in ic.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [*hidden, 10]
    assert linears[0].in_features == 256  # sized from feature_info
    assert model(_x((1, 3, 32, 32)))[0].shape == (1, 10)


def test_head_hidden_kwarg_matches_named_design():
    a = build_model("vit", num_classes=10, head="mlp64x32", **TINY)
    b = build_model("vit", num_classes=10, head_hidden=(64, 32), **TINY)
    assert [p.shape for p in a.heads[0].parameters()] == [p.shape for p in b.heads[0].parameters()]


@pytest.mark.parametrize("bad", ["mlp", "mlp10x", "foo", "mlpx4"])
def test_bad_head_names(bad):
    with pytest.raises(ValueError, match="unknown ViT head"):
        parse_head(bad)


def test_token_head_pooling_by_hand():
    head = _randomize_(TokenHead(8, 3, pool="mean", hidden=(5,)))
    x = _x((2, 6, 8))
    z = F.layer_norm(x[:, 1:].mean(1), (8,), head.ln.weight, head.ln.bias, eps=1e-6)
    ref = head.head(F.gelu(head.mlp[0](z)))
    torch.testing.assert_close(head(x), ref)
    tok = _randomize_(TokenHead(8, 3))
    ref = tok.head(tok.ln(x)[:, 0])  # LayerNorm per token: normalising all tokens first changes nothing
    torch.testing.assert_close(tok(x), ref)


def test_bad_configurations_raise_clearly():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_model("vit", num_classes=10, image_size=30)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        build_model("vit", num_classes=10, width=250)
    with pytest.raises(ValueError, match="not both"):
        build_model("vit", num_classes=10, head="mlp8", head_hidden=(8,))
    with pytest.raises(ValueError, match="token pooling"):
        build_model("vit", num_classes=10, head_pool="max")
    model = build_model("vit", num_classes=10, **TINY)
    with pytest.raises(ValueError, match=r"expects \(B, C, 16, 16\)"):
        model(_x((1, 3, 32, 32)))


@settings(max_examples=12, deadline=None)
@given(patch=st.sampled_from([2, 4]), grid=st.integers(1, 3), heads=st.integers(1, 3), head_dim=st.integers(1, 6),
       depth=st.integers(1, 4), batch=st.integers(1, 3), classes=st.integers(2, 6), pool=st.sampled_from(["token", "mean"]))
def test_random_configs_keep_the_contract(patch, grid, heads, head_dim, depth, batch, classes, pool):
    model = build_model("vit", num_classes=classes, image_size=patch * grid, patch_size=patch, width=heads * head_dim,
                        num_heads=heads, depth=depth, head_pool=pool, first_exit=0).eval()
    x = _x((batch, 3, patch * grid, patch * grid))
    with torch.no_grad():
        out = model(x)
        ref = model.forward_head(model.forward_features(x))
    assert model.exit_after == list(range(depth))
    assert [o.shape for o in out] == [(batch, classes)] * depth
    torch.testing.assert_close(out[-1], ref, rtol=0, atol=0)


# --- torchvision parity ---------------------------------------------------------------

def test_tiny_parity_with_torchvision():
    tv = _tiny_tv()
    ours = load_torchvision_vit(_tiny_ours(), tv.state_dict()).eval()
    x = _x((4, 3, 32, 32))
    with torch.no_grad():
        ref = tv(x)
        got = ours(x)[-1]
        # the state after block 1 equals torchvision's first encoder layer output
        tokens = torch.cat([tv.class_token.expand(4, -1, -1), tv._process_input(x)], 1) + tv.encoder.pos_embedding
        state = ours.forward_intermediates(x, [0])[0]
        torch.testing.assert_close(state, tv.encoder.layers[0](tokens), rtol=0, atol=1e-5)
    assert ref.abs().max() > 0.1  # random head weights: the comparison is not between zeros
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # training mode without dropout computes the same function
    tv.train(), ours.train()
    torch.testing.assert_close(ours(x)[-1], tv(x), rtol=0, atol=1e-5)


def test_key_map_is_explicit_and_covers_the_backbone():
    ours = _tiny_ours()
    kmap = torchvision_vit_key_map(ours)
    tv_keys = set(_tiny_tv().state_dict())
    assert set(kmap) == tv_keys
    backbone = {k for k in ours.state_dict() if not k.startswith("heads.") or k.startswith(f"heads.{ours.num_exits - 1}.")}
    assert set(kmap.values()) == backbone
    assert kmap["encoder.layers.encoder_layer_1.mlp.3.weight"] == "stages.1.mlp.3.weight"
    assert kmap["encoder.ln.weight"] == f"heads.{ours.num_exits - 1}.ln.weight"


def test_loading_errors_are_clear():
    sd = _tiny_tv().state_dict()
    with pytest.raises(ValueError, match="2 encoder layers, the model 3"):
        load_torchvision_vit(build_model("vit", num_classes=10, image_size=32, patch_size=8, depth=3, num_heads=2,
                                         width=32, mlp_dim=64), sd)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_torchvision_vit(_tiny_ours(num_classes=5), sd)
    with pytest.raises(KeyError, match="unexpected key"):
        load_torchvision_vit(_tiny_ours(), {**sd, "heads.pre_logits.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks backbone keys"):
        load_torchvision_vit(_tiny_ours(), {k: v for k, v in sd.items() if k != "encoder.ln.bias"})
    with pytest.raises(TypeError, match="expected a ViT"):
        load_torchvision_vit(build_model("mlp", num_classes=10), sd)


def test_load_without_head_and_legacy_mlp_names():
    tv = _tiny_tv()
    sd = tv.state_dict()
    ours = _tiny_ours(num_classes=5)
    head_before = ours.heads[-1].head.weight.clone()
    load_torchvision_vit(ours, sd, load_head=False)  # a new number of classes keeps our final linear layer
    torch.testing.assert_close(ours.heads[-1].head.weight, head_before, rtol=0, atol=0)
    torch.testing.assert_close(ours.heads[-1].ln.weight, sd["encoder.ln.weight"], rtol=0, atol=0)
    # checkpoints written before torchvision switched to ops.MLP name the MLP layers linear_1 / linear_2
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in sd.items()}
    a, b = load_torchvision_vit(_tiny_ours(), sd).eval(), load_torchvision_vit(_tiny_ours(), legacy).eval()
    x = _x((2, 3, 32, 32))
    with torch.no_grad():
        torch.testing.assert_close(a(x)[-1], b(x)[-1], rtol=0, atol=0)


@pytest.fixture(scope="module")
def tv_b16_state():
    torch.manual_seed(0)
    tv = _randomize_(torchvision.models.vit_b_16(), seed=0).eval()  # random weights, nothing downloaded
    x = _x((1, 3, 224, 224))
    with torch.no_grad():
        ref = tv(x)
    return tv.state_dict(), x, ref


def test_vit_b16_parity_with_torchvision(tv_b16_state):
    sd, x, ref = tv_b16_state
    model = build_model("vit_b16", num_classes=1000)
    assert model.exit_after == list(range(12))
    assert sum(p.numel() for p in model.backbone_parameters()) == sum(v.numel() for v in sd.values())
    load_torchvision_vit(model, sd).eval()
    with torch.no_grad():
        got = model(x, exits=[-1])[0]
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


# --- position-embedding resampling -----------------------------------------------------

def test_pos_embedding_resampling_identity_and_torchvision_parity():
    sd = _tiny_tv().state_dict()  # 32x32 input, patch 8: a 4x4 grid
    pos = sd["encoder.pos_embedding"]
    torch.testing.assert_close(interpolate_pos_embedding(pos, 4), pos, rtol=0, atol=1e-6)
    for size in (16, 64):  # 2x2 and 8x8 grids
        ref = interpolate_embeddings(size, 8, dict(sd))["encoder.pos_embedding"]
        got = interpolate_pos_embedding(pos, size // 8)
        assert got.shape == (1, (size // 8) ** 2 + 1, 32)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(got[:, 0], pos[:, 0], rtol=0, atol=0)  # class token kept
    with pytest.raises(ValueError, match="square grid"):
        interpolate_pos_embedding(pos[:, :-1], 2)


def test_loading_into_another_image_size_matches_torchvision():
    tv = _tiny_tv()
    ours = load_torchvision_vit(_tiny_ours(image_size=64), tv.state_dict()).eval()
    tv64 = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10).eval()
    tv64.load_state_dict(interpolate_embeddings(64, 8, tv.state_dict()))
    x = _x((2, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[-1], tv64(x), rtol=0, atol=1e-5)


def test_vit_b16_checkpoint_into_112(tv_b16_state):
    sd, _, _ = tv_b16_state
    model = load_torchvision_vit(build_model("vit_b16", num_classes=1000, image_size=112), sd).eval()
    assert model.stem.pos_embedding.shape == (1, 50, 768)
    torch.testing.assert_close(model.stem.pos_embedding[:, 0], sd["encoder.pos_embedding"][:, 0], rtol=0, atol=0)
    with torch.no_grad():
        assert model(_x((1, 3, 112, 112)), exits=[-1])[0].shape == (1, 1000)


# --- FLOPs ------------------------------------------------------------------------------

def _vit_flops(*, image: int, patch: int, width: int, depth: int, mlp: int, classes: int, chans: int = 3) -> int:
    """Closed-form backbone FLOPs (2 x multiply-adds) of a ViT, class-token head."""
    n = (image // patch) ** 2  # patches
    T = n + 1  # tokens
    patch_embed = n * (chans * patch * patch) * width
    block = (T * width * 3 * width  # qkv projection
             + 2 * T * T * width  # Q K^T and A V over all heads
             + T * width * width  # output projection
             + 2 * T * width * mlp)  # MLP
    return 2 * (patch_embed + depth * block + width * classes)


@pytest.fixture(scope="module")
def b16_for_flops():
    return build_model("vit_b16", num_classes=1000, ic_after="none").eval()


def test_vit_b16_backbone_flops(b16_for_flops):
    """35.1 GFLOPs = 2 x 17.56 GMACs at 224x224.

    The math SDPA backend is selected because on CPU the fused kernel
    (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in
    ``torch.utils.flop_counter``; the math backend runs the same two products
    as counted matrix multiplications.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    expected = _vit_flops(image=224, patch=16, width=768, depth=12, mlp=3072, classes=1000)
    assert expected == 35_127_656_448
    model = b16_for_flops
    with sdpa_kernel(SDPBackend.MATH):
        flops, _ = count_flops(lambda t: model(t, exits=[-1]), model.example_input())
    assert flops == expected


def test_vit_b16_backbone_flops_default_sdpa_backend(b16_for_flops):
    """The same count through the default SDPA backend (on CPU the fused kernel, which count_flops maps)."""
    model = b16_for_flops
    flops, _ = count_flops(lambda t: model(t, exits=[-1]), model.example_input())
    assert flops == _vit_flops(image=224, patch=16, width=768, depth=12, mlp=3072, classes=1000)


def test_small_vit_flops_closed_form():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model("vit", num_classes=100, ic_after="none").eval()
    with sdpa_kernel(SDPBackend.MATH):
        flops, _ = count_flops(model, model.example_input())
    assert flops == _vit_flops(image=32, patch=4, width=256, depth=7, mlp=512, classes=100)
