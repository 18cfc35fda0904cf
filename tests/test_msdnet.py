"""Tests of MSDNet (Huang et al., ICLR 2018) as a multi-exit model: shapes, gradients,
stage-wise execution, exit selection, per-exit costs and parity with the authors'
published per-classifier costs and parameter counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
import torch.nn.functional as F

from earlyexit.flops import count_flops
from earlyexit.models import build_model, slice_state
from earlyexit.models.msdnet import block_depths, scale_schedule


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    return build_model("msdnet_cifar", num_classes=10)


def _exit_costs(model) -> list[int]:
    """Cumulative FLOPs (2 x MACs) of leaving at each exit, for one sample."""
    model.eval()
    state, cum, out, k = model.example_input(1), 0, [], 0
    for i in range(len(model.stages)):
        c, state = count_flops(model.stage, i, state)
        cum += c
        while k < model.num_exits and model.exit_after[k] == i:
            c, _ = count_flops(model.head, k, state)
            cum += c
            out.append(cum)
            k += 1
    return out


def test_cifar_forward_shapes_and_scales(cifar):
    x = torch.randn(2, 3, 32, 32)
    outs = cifar(x)
    assert len(outs) == 7 and cifar.exit_after == list(range(7))
    assert all(o.shape == (2, 10) for o in outs)
    # layers 1-6 keep 3 scales, 7-12 two, 13-16 one; blocks end at layers 4, 6, 8, ..., 16
    states = cifar.forward_intermediates(x, range(7))
    assert [len(s) for s in states] == [3, 3, 2, 2, 2, 1, 1]
    assert [tuple(t.shape[2:]) for t in states[0]] == [(32, 32), (16, 16), (8, 8)]
    # feature_info describes the coarsest scale, which the classifiers read
    assert [fi["num_chs"] for fi in cifar.feature_info] == [s[-1].shape[1] for s in states]
    assert all(fi["size"] == (8, 8) for fi in cifar.feature_info)


def test_imagenet_forward_shapes():
    torch.manual_seed(0)
    model = build_model("msdnet_imagenet", num_classes=1000).eval()
    assert model.num_exits == 5 and model.input_shape == (3, 224, 224)
    with torch.no_grad():
        outs = model(model.example_input(1))
    assert [o.shape for o in outs] == [(1, 1000)] * 5
    assert [len(s) for s in (fi["scales"] for fi in model.feature_info)] == [4, 3, 2, 1, 1]
    assert model.feature_info[0]["scales"][0][1] == (56, 56) and model.feature_info[-1]["size"] == (7, 7)


def test_other_input_sizes_and_channels():
    model = build_model("msdnet_imagenet", num_classes=7, in_chans=1, image_size=64, ic_after=[1, 3])
    outs = model(torch.randn(2, 1, 64, 64))
    assert [o.shape for o in outs] == [(2, 7)] * 3 and model.exit_after == [1, 3, 4]


def test_backward_reaches_every_parameter(cifar):
    cifar.train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    cifar.zero_grad()
    sum(F.cross_entropy(o, y) for o in cifar(x)).backward()
    for name, p in cifar.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in cifar.heads[0].parameters())


def test_last_exit_equals_forward_head_of_features(cifar):
    cifar.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        last = cifar(x)[-1]
        ref = cifar.forward_head(cifar.forward_features(x))
        only = cifar(x, exits=[-1])
    assert len(only) == 1
    torch.testing.assert_close(last, ref)
    torch.testing.assert_close(only[0], ref)


def test_exit_selection_computes_only_what_it_needs(cifar):
    calls: list[str] = []
    hooks = [m.register_forward_hook(lambda *a, n=n: calls.append(n))
             for n, m in [*((f"head{k}", h) for k, h in enumerate(cifar.heads)),
                          *((f"stage{i}", s) for i, s in enumerate(cifar.stages))]]
    try:
        x = torch.randn(1, 3, 32, 32)
        cifar(x, exits=[-1])  # phase 1: the final classifier only
        assert calls == [f"stage{i}" for i in range(7)] + ["head6"]
        calls.clear()
        cifar(x, exits=[1])  # stops after the second block
        assert calls == ["stage0", "stage1", "head1"]
    finally:
        for h in hooks:
            h.remove()


def test_stagewise_execution_with_sliced_list_state(cifar):
    # early-exit inference drops samples between stages; list states must slice per scale
    cifar.eval()
    x = torch.randn(4, 3, 32, 32)
    keep = torch.tensor([False, True, False, True])
    with torch.no_grad():
        full = cifar(x)
        state = x
        for i in range(3):
            state = cifar.stage(i, state)
        state = slice_state(state, keep)
        for i in range(3, 7):
            state = cifar.stage(i, state)
        torch.testing.assert_close(cifar.head(6, state), full[-1][keep])


def test_frozen_backbone_trains_heads_only(cifar):
    cifar.train()
    for p in cifar.backbone_parameters():
        p.requires_grad_(False)
    try:
        cifar.zero_grad(set_to_none=True)
        outs = cifar(torch.randn(2, 3, 32, 32), exits=list(range(6)))  # phase 3: ICs only
        sum(o.sum() for o in outs).backward()
        assert all(p.grad is not None for p in cifar.head_parameters())
        assert all(p.grad is None for p in cifar.backbone_parameters())
    finally:
        for p in cifar.backbone_parameters():
            p.requires_grad_(True)


def test_exit_costs_strictly_increase(cifar):
    costs = _exit_costs(cifar)
    assert len(costs) == 7
    assert all(a < b for a, b in zip(costs, costs[1:]))
    # FLOPs = 2 x MACs: the CIFAR-10 network costs about 75 M multiply-adds in all
    assert 145e6 < costs[-1] < 155e6


# Published by the authors' PyTorch code for the ImageNet model with base 7, step 7
# (kalviny/MSDNet-PyTorch issue #10): cumulative per-classifier cost in millions of
# multiply-adds counted their way (conv and linear multiply-adds, plus one operation per
# ReLU input element, per pooling window element and per linear bias) and cumulative
# parameters in millions (every classifier up to it included).
_PUBLISHED_STEP7_MMACS = [615.69, 1436.39, 2283.21, 2967.42, 3253.79]
_PUBLISHED_STEP7_MPARAMS = [8.76, 20.15, 31.73, 41.86, 62.31]


def _authors_count(model) -> tuple[list[float], list[float]]:
    """Per-exit cumulative cost and parameters (millions) in the authors' op-counter convention."""
    ops = [0]

    def hook(mod, inp, out):
        x = inp[0]
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            ops[0] += mod.in_channels * mod.out_channels * k * out.shape[2] * out.shape[3] // mod.groups
        elif isinstance(mod, nn.ReLU):
            ops[0] += x.numel()
        elif isinstance(mod, nn.MaxPool2d):
            ops[0] += out.shape[1] * out.shape[2] * out.shape[3] * mod.kernel_size ** 2
        elif isinstance(mod, nn.AdaptiveAvgPool2d):  # 2x2 -> 1x1 at the standard input sizes
            ops[0] += x.numel()
        elif isinstance(mod, nn.Linear):
            ops[0] += mod.weight.numel() + mod.bias.numel()

    hooks = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    nparams = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    macs, params, state, k, cum_p = [], [], model.example_input(1), 0, nparams(model.stem)
    try:
        with torch.no_grad():
            for i in range(len(model.stages)):
                state = model.stage(i, state)
                cum_p += nparams(model.stages[i])
                while k < model.num_exits and model.exit_after[k] == i:
                    model.head(k, state)
                    cum_p += nparams(model.heads[k])
                    macs.append(ops[0] / 1e6)
                    params.append(cum_p / 1e6)
                    k += 1
    finally:
        for h in hooks:
            h.remove()
    return macs, params


def test_parity_with_published_imagenet_costs_and_parameters():
    model = build_model("msdnet_imagenet", num_classes=1000, base=7, step=7).eval()
    macs, params = _authors_count(model)
    assert [round(m, 2) for m in macs] == _PUBLISHED_STEP7_MMACS
    assert [round(p, 2) for p in params] == _PUBLISHED_STEP7_MPARAMS
    # our convention counts only conv / linear products, twice: a little below 2x theirs
    flops = _exit_costs(model)
    for f, m in zip(flops, macs):
        assert 0.98 * 2 * m < f / 1e6 < 2 * m


def test_default_and_custom_exits():
    assert build_model("msdnet_cifar", num_classes=10, ic_after="none").num_exits == 1
    assert build_model("msdnet_cifar", num_classes=10, ic_after="every:2").exit_after == [1, 3, 5, 6]
    assert build_model("msdnet_cifar", num_classes=10, ic_after="sdn").num_exits >= 2
    with pytest.raises(ValueError, match="IC block indices"):
        build_model("msdnet_cifar", num_classes=10, ic_after=[6])


@pytest.mark.parametrize("kw, msg", [
    (dict(gr_factor=(1, 2)), "one entry per scale"),
    (dict(step_mode="linear"), "step_mode"),
    (dict(num_blocks=0), "at least one layer"),
    (dict(reduction=1.5), "reduction"),
    (dict(image_size=8), "too small"),
    (dict(num_classes=0), ">= 1"),
])
def test_bad_configuration_raises_value_error(kw, msg):
    args = {"num_classes": 10, **kw}
    with pytest.raises(ValueError, match=msg):
        build_model("msdnet_cifar", **args)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 12), base=st.integers(1, 8), step=st.integers(1, 8),
       mode=st.sampled_from(["even", "lin_grow"]), n_scales=st.integers(1, 5))
def test_scale_schedule_invariants(num_blocks, base, step, mode, n_scales):
    depths = block_depths(num_blocks, base, step, mode)
    sched = scale_schedule(sum(depths), n_scales)
    assert len(sched) == sum(depths) and sched[0] == (n_scales, n_scales)
    for (i0, o0), (i1, _) in zip(sched, sched[1:]):
        assert i1 == o0  # each layer reads what the previous one wrote
    assert all(i - o in (0, 1) for i, o in sched)  # at most one scale dropped per layer
    assert sched[-1][1] >= 1
