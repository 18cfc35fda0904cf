"""Items 4-8 of README's "Differences from the reference code", each pinned against a small re-implementation of
the reference's rule written from its definition (the paper's code, SDN's, PABEE's, MSDNet's).

Each test asserts the documented relation: equality where the package aligns with the reference, the stated
difference where it keeps its own behaviour. The reference rules below are re-stated here, not imported.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from earlyexit import build_model
from earlyexit.config import PhaseConfig, RunConfig, TrainConfig
from earlyexit.methods import pbee
from earlyexit.metrics import (apply_thresholds, calibrate_thresholds, exit_decisions, exit_scores,
                               geometric_fractions, threshold_curve)
from earlyexit.models.heads import LinearHead, SDNHead
from earlyexit.models.multiexit import MultiExitModel
from earlyexit.training.phases import phase_exits, set_trainable
from earlyexit.training.step import RunningSums, StepSetup, step_weights, train_step
from earlyexit.weighting import get_weighting


# =====================================================================================================================
# 4. --method sdn: SDN's own objective, not the paper code's plain mean
# =====================================================================================================================

def _mlp_model(E_ics: int = 3) -> MultiExitModel:
    torch.manual_seed(0)
    stage = lambda d: nn.Sequential(nn.Linear(d, 12), nn.ReLU())  # noqa: E731
    stages = [stage(36)] + [stage(12) for _ in range(E_ics)]
    return MultiExitModel(stem=nn.Flatten(), stages=stages, head=LinearHead(12, 5), ic_after=list(range(E_ics)),
                          make_head=lambda fi, c: nn.Linear(fi["num_chs"], c),
                          feature_info=[{"num_chs": 12}] * len(stages), num_classes=5, input_shape=(1, 6, 6))


def _setup(model: MultiExitModel, phase: int, weighting: str, epochs: int = 1, steps_per_epoch: int = 1) -> StepSetup:
    set_trainable(model, phase)
    params = [p for p in model.parameters() if p.requires_grad]
    return StepSetup(net=model, num_exits=model.num_exits, phase=phase, exits=phase_exits(model, phase),
                     weighting=get_weighting(weighting), opt=torch.optim.SGD(params, lr=0.0), params=params,
                     pc=PhaseConfig(epochs=epochs, warmup=0), lr=0.0, total=epochs * steps_per_epoch,
                     device=torch.device("cpu"), grad_clip=None,
                     on_non_finite=lambda loss, s: (_ for _ in ()).throw(RuntimeError("non-finite")))


def _head_grads_of_our_step(model: MultiExitModel, weighting: str, x, y) -> list[torch.Tensor]:
    """Phase 3 (frozen backbone): the IC heads' gradients of one ``train_step`` (lr 0 leaves the weights)."""
    s = _setup(model, 3, weighting)
    train_step(s, x, y, step=0, index=0, sums=RunningSums.zeros(len(s.exits), s.device))
    return [p.grad.clone() for h in model.heads[:-1] for p in h.parameters()]


def _head_grads_of_papers_loss(model: MultiExitModel, x, y) -> list[torch.Tensor]:
    """The paper's code, IC-only phase: the sum of every output's loss (the frozen final one included) divided
    by the number of outputs, backbone frozen."""
    set_trainable(model, 3)
    for p in model.parameters():
        p.grad = None
    outs = model(x)  # all E outputs
    loss = sum(F.cross_entropy(o, y) for o in outs) / len(outs)
    loss.backward()
    return [p.grad.clone() for h in model.heads[:-1] for p in h.parameters()]


def test_method_sdn_phase3_weighs_each_ic_E_times_the_papers_mean():
    """``--method sdn`` trains phase 3 with SDN's IC-only objective (the ICs' losses summed): every IC gradient
    is ``E`` times the paper code's (the mean over all ``E`` outputs). ``--weighting mean`` gives the paper's."""
    assert RunConfig(method="sdn").train.loss_weighting == "sdn"
    assert RunConfig(method="sdn", train=TrainConfig(weighting="mean")).train.loss_weighting == "mean"
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 5, (16,), generator=g)
    model = _mlp_model(3)
    E = model.num_exits
    assert E == 4
    paper = _head_grads_of_papers_loss(model, x, y)
    ours_sdn = _head_grads_of_our_step(model, RunConfig(method="sdn").train.loss_weighting, x, y)
    ours_mean = _head_grads_of_our_step(model, "mean", x, y)
    assert all(float(p.abs().max()) > 0 for p in paper)
    for p, s, m in zip(paper, ours_sdn, ours_mean):
        assert torch.allclose(s, E * p, rtol=1e-5, atol=1e-7)  # the stated difference: E times
        assert torch.allclose(m, p, rtol=1e-5, atol=1e-7)      # the aligned alternative
        assert not torch.allclose(s, p, rtol=1e-2)


def _sdn_code_coeffs(num_ics: int, epoch: int, epochs: int) -> list[float]:
    """SDN's joint training, epoch ``epoch`` = 1..epochs: IC i weighs min(C_i, 0.01 + epoch * C_i / epochs),
    C_i = 0.15 (i + 1) (SDN fixes 0.15 ... 0.90 for its six ICs); the final output weighs 1."""
    caps = [0.15 * (i + 1) for i in range(num_ics)]
    return [min(c, 0.01 + epoch * c / epochs) for c in caps] + [1.0]


def test_method_sdn_phase2_is_sdns_ramp_not_the_papers_mean():
    """Phase 2 under ``--method sdn``: the weights the step trains with are SDN's per-epoch ramp, epoch by epoch
    (the paper's code weighs every output 1/E there)."""
    model = _mlp_model(3)
    E, epochs, per_epoch = model.num_exits, 5, 4
    s = _setup(model, 2, RunConfig(method="sdn").train.loss_weighting, epochs=epochs, steps_per_epoch=per_epoch)
    for step in range(epochs * per_epoch):
        want = _sdn_code_coeffs(E - 1, step // per_epoch + 1, epochs)
        assert step_weights(s, step) == pytest.approx(want), step
        assert step_weights(s, step) != pytest.approx([1 / E] * E)
    assert step_weights(_setup(model, 2, "mean", epochs=epochs), 0) == pytest.approx([1 / E] * E)


# =====================================================================================================================
# 5. The default IC head against the paper's ``pooled_head`` (and SDN's)
# =====================================================================================================================

class _PapersPooledHead(nn.Module):
    """The paper's ``pooled_head`` by its definition: adaptive max and average pooling to 4x4, mixed by a raw
    weight drawn uniform in [0, 1) (no sigmoid), flattened into a linear layer of ``C * 16`` inputs."""

    def __init__(self, channels: int, num_classes: int, pool: int = 4) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(1))
        self.pool = pool
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mx, av = F.adaptive_max_pool2d(x, self.pool), F.adaptive_avg_pool2d(x, self.pool)  # (B, C, 4, 4) each
        mixed = self.alpha * mx + (1 - self.alpha) * av
        return self.fc(mixed.flatten(1))


@pytest.mark.parametrize("side", [4, 7, 8, 14, 28])
def test_default_head_is_the_papers_pooled_head_reparametrised(side):
    """Maps of at least 4x4: with ``mix = logit(alpha)`` and the same linear layer, ``SDNHead`` computes the
    paper's head exactly; only the parametrisation (a sigmoid) and the initial mix (0.5, not uniform) differ."""
    torch.manual_seed(side)
    C, K = 3, 5
    ref = _PapersPooledHead(C, K)
    ours = SDNHead(C, (side, side), K)
    assert ours.linear.weight.shape == ref.fc.weight.shape  # both C * 16 inputs
    if ours.reduce:
        assert float(torch.sigmoid(ours.mix.detach())) == 0.5  # ours starts at 0.5; the paper's draws it uniformly
        a = float(ref.alpha.detach())
        with torch.no_grad():
            ours.mix.fill_(math.log(a / (1 - a)))
    else:
        assert side == 4 and not hasattr(ours, "mix")  # a 4x4 map: both poolings are the identity, the weight moot
    ours.linear.load_state_dict(ref.fc.state_dict())
    x = torch.randn(6, C, side, side)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)
        if ours.reduce:  # and the initial mixing weights do differ
            ours.mix.zero_()
            ref.alpha.fill_(0.9)
            assert not torch.allclose(ours(x), ref(x), atol=1e-3)


@pytest.mark.parametrize("side", [1, 2])
def test_on_maps_below_4x4_the_papers_head_upsamples_ours_flattens(side):
    """Below 4x4 the paper's adaptive pooling repeats each cell to fill 4x4 (``C * 16`` inputs); ``SDNHead``
    reads the map as it is (``C * h * w`` inputs). Where the paper's windows are whole cells (1x1, 2x2) the
    two compute the same function when ours takes the paper's weights summed over each cell's copies."""
    torch.manual_seed(0)
    C, K = 3, 4
    ref = _PapersPooledHead(C, K)
    ours = SDNHead(C, (side, side), K)
    assert not ours.reduce and ours.linear.in_features == C * side * side != ref.fc.in_features == C * 16
    rep = 4 // side
    w = ref.fc.weight.detach().view(K, C, side, rep, side, rep).sum((3, 5)).reshape(K, -1)  # sum over copies
    with torch.no_grad():
        ours.linear.weight.copy_(w)
        ours.linear.bias.copy_(ref.fc.bias)
        x = torch.randn(5, C, side, side)
        assert torch.allclose(ours(x), ref(x), atol=1e-5)


def test_default_head_reads_the_post_relu_block_output_as_the_papers_code():
    """The paper's ResNets hand their heads each block's output after its final ReLU; so does the default
    ``head="sdn"`` (SDN's own heads read it before, pinned by tests/test_resnet.py for ``head="sdn_exact"``)."""
    model = build_model("resnet20", num_classes=5, image_size=16).eval()
    seen = {}
    for k, h in enumerate(model.heads[:-1]):
        h.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0].clone()))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        model(x)
        for k, i in enumerate(model.exit_after[:-1]):
            state = model.forward_intermediates(x, [i])[0]
            assert torch.equal(seen[k], state) and float(seen[k].min()) >= 0.0
            blk = model.stages[i]
            prev = model.forward_intermediates(x, [i - 1])[0]
            identity = prev if blk.downsample is None else blk.downsample(prev)
            pre = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(prev))))) + identity
            assert torch.allclose(seen[k], torch.relu(pre), atol=1e-6) and float(pre.min()) < 0


# =====================================================================================================================
# 6. Float-level ties of the confidence sweep
# =====================================================================================================================

def _papers_sweep(logits: torch.Tensor, steps: int = 100) -> list[list[int]]:
    """The paper's evaluation: float32 ``linspace(0, 1, steps)`` thresholds, float32 softmax, a sample leaves at
    the first head whose max probability is ``> t``, else at the last. Exit counts per threshold."""
    E = logits.shape[0]
    probs = logits.float().softmax(-1)
    out = []
    for t in torch.linspace(0.0, 1.0, steps=steps):
        exit_at = torch.full((logits.shape[1],), -1)
        for i in range(E):
            leave = (probs[i].max(-1).values > t) & (exit_at == -1)
            exit_at[leave] = i
        exit_at[exit_at == -1] = E - 1
        out.append(torch.bincount(exit_at, minlength=E).tolist())
    return out


def test_confidence_sweep_equals_the_papers_on_generic_logits():
    """On random logits every decision of the 100-threshold sweep is the paper code's (600 000 decisions)."""
    g = torch.Generator().manual_seed(6)
    logits = 3 * torch.randn(3, 2000, 10, generator=g)
    labels = torch.randint(0, 10, (2000,), generator=g)
    ours = threshold_curve(logits, labels, [1.0, 2.0, 3.0], thresholds=100, criterion="confidence")
    assert ours["exit_counts"] == _papers_sweep(logits)
    # the thresholds are the same values up to float32 rounding, and not bit-identical
    lin32 = torch.linspace(0.0, 1.0, steps=100).double()
    got = torch.tensor(ours["thresholds"], dtype=torch.float64)
    assert torch.allclose(got, lin32, atol=1e-7) and not torch.equal(got, lin32)


def _tie_rows() -> tuple[torch.Tensor, list[int]]:
    """Two-class logit rows whose confidence, computed either way in float32, is exactly a float32 threshold
    ``t32`` of the paper's linspace, where ``t32`` is above our float64 threshold ``i / 99``; one per threshold
    index found (searched near the logit of the threshold, so no platform's float values are hard-coded)."""
    lin32 = torch.linspace(0.0, 1.0, steps=100)
    lin64 = torch.linspace(0, 1, 100, dtype=torch.float64)
    rows, idx = [], []
    for i in range(1, 99):
        if not float(lin32[i]) > float(lin64[i]):
            continue
        t = float(lin64[i])
        d0 = torch.tensor(math.log(t / (1 - t)), dtype=torch.float32)
        ds = (d0 + torch.arange(-400, 400, dtype=torch.float32) * 2e-7 * max(abs(float(d0)), 1.0)).unique()
        cand = torch.stack([ds, torch.zeros_like(ds)], -1)  # (M, 2)
        paper_score = cand.softmax(-1).max(-1).values  # float32
        our_score = exit_scores(cand[None], "confidence")[0]  # float64 of a float32 value
        hit = ((paper_score == lin32[i]) & (our_score == float(lin32[i]))).nonzero().flatten()
        if len(hit):
            rows.append(cand[hit[0]])
            idx.append(i)
    return torch.stack(rows), idx


def test_confidence_ties_at_a_threshold_decide_differently():
    """A confidence equal to the paper's float32 threshold ``t32 > i / 99``: the paper keeps the sample
    (``t32 > t32`` is false), the float64 threshold lets it leave. The only way the two sweeps part."""
    rows, idx = _tie_rows()
    assert len(idx) >= 5, idx
    N = len(idx)
    logits = torch.stack([rows, torch.zeros(N, 2)])  # (2, N, 2): exit 0 is the tie, the last exit anything
    labels = torch.zeros(N, dtype=torch.long)
    ours = threshold_curve(logits, labels, [1.0, 2.0], thresholds=100, criterion="confidence")["exit_counts"]
    paper = _papers_sweep(logits)
    for n, i in enumerate(idx):
        one = logits[:, n:n + 1]
        assert int(exit_decisions(one, "confidence", i / 99)) == 0  # ours: leaves at the first exit
        assert _papers_sweep(one)[i] == [0, 1]                     # the paper's: stays to the last
    differ = [j for j in range(100) if ours[j] != paper[j]]
    assert set(idx) <= set(differ)
    for j in differ:  # and every difference is one of the constructed ties
        assert j in idx
    # where the threshold is exact in both (0 and 1) the strict rule decides alike, saturated softmax included
    sat = torch.tensor([[[100.0, 0.0]], [[0.0, 0.0]]])  # (2, 1, 2): float32 confidence exactly 1.0 at exit 0
    assert float(exit_scores(sat, "confidence")[0, 0]) == 1.0 == float(sat[0].softmax(-1).max())
    sweep = threshold_curve(sat, torch.zeros(1, dtype=torch.long), [1.0, 2.0], thresholds=100)["exit_counts"]
    assert sweep == _papers_sweep(sat) and sweep[-1] == [0, 1] and sweep[0] == [1, 0]


# =====================================================================================================================
# 7. Patience: per sample here, per batch in PABEE's code; patience 0
# =====================================================================================================================

def _pabee_batch_exit(logits: torch.Tensor, patience: int) -> int:
    """PABEE's inference on one batch (``(E, B, C)`` logits): a counter of consecutive layers whose arg-max
    agrees with the previous layer's for *every* sample of the batch (reset to 0 otherwise); the whole batch
    stops at the first layer where the counter equals the patience. Patience 0 runs the whole model."""
    E = logits.shape[0]
    if patience == 0:
        return E - 1
    counter, prev = 0, None
    for i in range(E):
        labels = logits[i].argmax(-1)
        counter = counter + 1 if prev is not None and bool((labels == prev).all()) else 0
        prev = labels
        if counter == patience:
            return i
    return E - 1


def _papers_patience_sweep(logits: torch.Tensor) -> list[torch.Tensor]:
    """The paper's PBEE sweep, thresholds ``0 .. E-1``: a per-sample count of equal consecutive arg-max
    predictions (1 at the first head), a sample leaves at the first head where the count is ``> threshold``."""
    E, N, _ = logits.shape
    out = []
    for pt in range(E):
        exit_at, prev, count = torch.full((N,), -1), torch.full((N,), -1), torch.zeros(N, dtype=torch.long)
        for i in range(E):
            pred = logits[i].argmax(-1)
            count = torch.where(pred == prev, count + 1, torch.ones_like(count))
            exit_at[(count > pt) & (exit_at == -1)] = i
            prev = pred
        exit_at[exit_at == -1] = E - 1
        out.append(exit_at)
    return out


def _argmax_logits(preds: list[list[int]], C: int = 3) -> torch.Tensor:
    """``(E, N, C)`` logits whose arg-max at exit ``k`` for sample ``n`` is ``preds[k][n]``."""
    return F.one_hot(torch.tensor(preds), C).float() * 5.0


def test_pabee_per_sample_equals_pabees_code_at_batch_size_one():
    g = torch.Generator().manual_seed(7)
    E, N = 6, 300
    preds = torch.randint(0, 2, (E, N), generator=g)  # two classes: long runs of agreement happen
    logits = F.one_hot(preds, 3).float() + 0.1 * torch.randn(E, N, 3, generator=g)
    for t in range(0, E + 1):
        ours = exit_decisions(logits, "patience", pbee.patience_threshold(t))
        theirs = torch.tensor([_pabee_batch_exit(logits[:, n:n + 1], t) for n in range(N)])
        assert torch.equal(ours, theirs), t
        # at a larger batch PABEE's batch leaves no earlier than any of its samples would alone
        for b in range(0, N, 30):
            assert _pabee_batch_exit(logits[:, b:b + 30], t) >= int(ours[b:b + 30].max()), (t, b)


def test_pabee_per_batch_holds_back_a_sample_that_per_sample_lets_go():
    logits = _argmax_logits([[0, 0], [0, 1], [0, 2], [0, 2]])  # sample 0 agrees from the start, sample 1 late
    t = 1  # PABEE's patience 1: leave once one layer agrees with the previous one
    ours = exit_decisions(logits, "patience", pbee.patience_threshold(t))
    assert ours.tolist() == [1, 3]
    assert _pabee_batch_exit(logits, t) == 3  # the batch: both samples run to the last layer
    assert [_pabee_batch_exit(logits[:, n:n + 1], t) for n in range(2)] == [1, 3]


def test_patience_zero_uses_every_layer_here_and_the_first_head_in_the_papers_sweep():
    g = torch.Generator().manual_seed(8)
    E, N = 5, 400
    logits = F.one_hot(torch.randint(0, 2, (E, N), generator=g), 3).float() + 0.1 * torch.randn(E, N, 3, generator=g)
    labels = torch.zeros(N, dtype=torch.long)
    paper = _papers_patience_sweep(logits)
    # the paper's threshold pt is our p = pt + 1: the same E curve points, pt = 0 being our p = 1
    for pt in range(E):
        assert torch.equal(paper[pt], exit_decisions(logits, "patience", pt + 1)), pt
    curve = threshold_curve(logits, labels, list(range(1, E + 1)), thresholds=100, criterion="patience")
    assert curve["thresholds"] == [float(p) for p in range(1, E + 1)]
    assert curve["exit_counts"] == [torch.bincount(p, minlength=E).tolist() for p in paper]
    # the value 0 itself: the paper's sweep sends everyone out at the first head; here (PABEE's meaning) nobody
    # leaves early
    assert bool((paper[0] == 0).all())
    assert bool((exit_decisions(logits, "patience", 0) == E - 1).all())
    assert pbee.patience_threshold(0) == 0 and _pabee_batch_exit(logits[:, :1], 0) == E - 1


# =====================================================================================================================
# 8. MSDNet: the ImageNet stem's bias, the initialisation, the budget's rounding
# =====================================================================================================================

def test_msdnet_imagenet_stem_has_no_bias_and_computes_the_authors_function():
    """The authors' ImageNet first convolution (7x7/2) keeps PyTorch's default bias, right before a BatchNorm;
    ours has none. BatchNorm removes a constant per channel: in training mode the outputs are the same, in eval
    mode with the running mean shifted by the bias as well; the authors' model has ``c0`` more parameters."""
    torch.manual_seed(0)
    model = build_model("msdnet_imagenet", num_classes=10, image_size=64)
    ours = model.stem.convs[0]
    conv, bn = ours[0], ours[1]
    assert isinstance(conv, nn.Conv2d) and conv.bias is None and conv.kernel_size == (7, 7) and conv.stride == (2, 2)
    c0 = conv.out_channels
    theirs = nn.Sequential(nn.Conv2d(3, c0, 7, 2, 3), nn.BatchNorm2d(c0), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    with torch.no_grad():
        theirs[0].weight.copy_(conv.weight)
        theirs[0].bias.copy_(torch.randn(c0))
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters()) + c0
    x = torch.randn(4, 3, 64, 64)
    ours.train(), theirs.train()
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        theirs[1].running_mean.copy_(bn.running_mean + theirs[0].bias)
        theirs[1].running_var.copy_(bn.running_var)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)
    with torch.no_grad():
        theirs[1].running_mean.copy_(bn.running_mean)  # without the shift the bias shows
    assert not torch.allclose(ours(x), theirs(x), atol=1e-2)


def _authors_init_loop(blocks: list[nn.Module], classifiers: list[nn.Module]) -> None:
    """The authors' initialisation as their constructor applies it: their rule (conv ~ N(0, 2 / (k*k*out)),
    BatchNorm at identity, linear bias 0) called on each item of an iterable block (its direct children) or on the
    module itself otherwise, never recursively."""
    def rule(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear):
            m.bias.data.zero_()

    for group in (blocks, classifiers):
        for m in group:
            for child in (m if hasattr(m, "__iter__") else [m]):
                rule(child)


def test_msdnet_init_is_the_authors_rule_applied_to_every_layer():
    """Their blocks are sequences of composite layers and their classifiers composite modules, so their rule
    reaches no convolution, BatchNorm or linear layer (PyTorch's defaults stay); ours applies the rule to every
    layer: He-normal fan-out convolutions and zero linear biases."""
    torch.manual_seed(0)
    model = build_model("msdnet_cifar", num_classes=10, image_size=32)
    # their loop, run on the same tree (block 0 = the first layer and block 0's layers; the classifiers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [nn.Sequential(model.stem, *model.stages[0])] + list(model.stages[1:])
    _authors_init_loop(blocks, list(model.heads))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing reached
    # ours: every conv drawn with std sqrt(2 / (k*k*out)), every linear bias zero
    big = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() >= 2000]
    assert len(big) > 20
    for m in big:
        want = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
        default = 1.0 / math.sqrt(3.0 * m.weight[0].numel())  # PyTorch's default (what their model keeps)
        assert abs(float(m.weight.detach().std()) / want - 1) < 0.12, m
        if abs(default / want - 1) > 0.3:
            assert abs(float(m.weight.detach().std()) / default - 1) > 0.15, m
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(float(m.bias.detach().abs().max()) == 0.0 for m in linears)


def _authors_geometric_counts(scores: torch.Tensor, q: list[float]) -> list[int]:
    """MSDNet's threshold search: at each exit but the last, walk the samples by decreasing score, count the
    ones not yet gone and put the threshold at the ``floor(N q_k)``-th; a sample leaves at the first exit
    whose score is ``>=`` its threshold (none at an exit whose count is 0). Exit counts."""
    E, N = scores.shape
    T = [math.inf] * E
    gone = torch.zeros(N, dtype=torch.bool)
    for k in range(E - 1):
        out_n = math.floor(N * q[k])
        count = 0
        for j in torch.argsort(scores[k], descending=True).tolist():
            if not gone[j]:
                count += 1
                if count == out_n:
                    T[k] = float(scores[k, j])
                    break
        gone |= scores[k] >= T[k]
    T[-1] = -math.inf
    exits = torch.full((N,), E - 1)
    for k in reversed(range(E)):
        exits[scores[k] >= T[k]] = k
    return torch.bincount(exits, minlength=E).tolist()


def test_msdnet_budget_rounds_the_cumulative_count_where_msdnet_rounds_each_exit():
    """The same geometric fractions ``q``: MSDNet lets ``floor(N q_k)`` samples out at each exit, so by exit
    ``k`` up to ``k`` samples too few have left (they run on to the last exit); here ``floor(N (q_0 + ... +
    q_k))`` have, less than one short of ``N (q_0 + ... + q_k)``."""
    E, N = 5, 1003
    costs = [1.0, 2.0, 3.5, 5.0, 7.0]
    g = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(E, N, 10, generator=g)
    scores = exit_scores(logits, "confidence")
    worst = 0
    for target in (1.6, 2.2, 2.9, 3.3, 4.1, 4.8, 5.5):
        q = geometric_fractions(costs, target)
        cum = [sum(q[:k + 1]) for k in range(E)]
        theirs = _authors_geometric_counts(scores, q)
        th = calibrate_thresholds(logits, costs, target, criterion="confidence", mode="geometric")
        ours = torch.bincount(apply_thresholds(logits, th, criterion="confidence"), minlength=E).tolist()
        gone_ours = [sum(ours[:k + 1]) for k in range(E - 1)]
        gone_theirs = [sum(theirs[:k + 1]) for k in range(E - 1)]
        assert theirs[:-1] == [math.floor(N * qk) for qk in q[:-1]]  # the re-implementation is MSDNet's rule
        assert gone_ours == [math.floor(N * c + 1e-9) for c in cum[:-1]]
        for k in range(E - 1):
            assert 0 <= N * cum[k] - gone_ours[k] < 1
            assert 0 <= gone_ours[k] - gone_theirs[k] <= k
            worst = max(worst, gone_ours[k] - gone_theirs[k])
    assert worst >= 2  # a case where per-exit rounding falls two or more samples behind
