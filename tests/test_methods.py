"""Early-exit methods: SDN, PABEE, Zero Time Waste, Global Past-Future."""

import pytest
import torch
import torch.nn.functional as F

from earlyexit import build_model
from earlyexit.config import PhaseConfig, TrainConfig
from earlyexit.data import load_dataset
from earlyexit.inference import predict
from earlyexit.metrics import CRITERIA, exit_costs, exit_decisions
from earlyexit.methods import METHODS, get_method, gpf, list_methods, pbee, ztw
from earlyexit.models.bert import BertStateHead
from earlyexit.training import GradientEquilibrium, list_weightings, train

MLP = dict(num_classes=4, in_chans=1, image_size=8, width=16, depth=4)


def _mlp(**kw):
    torch.manual_seed(0)
    return build_model("mlp", **{**MLP, **kw})


def _rewired(name, model):
    m = get_method(name).apply(model)
    return ztw.add_ensembles(m) if name == "ztw" else m


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", image_size=8, in_chans=1, num_classes=4, train_samples=64, test_samples=16)


def _cfg(**kw):
    pc = PhaseConfig(lr=(0.05,), epochs=1, **kw)
    return TrainConfig(phases=(pc, pc, pc), batch_size=16, device="cpu")


def test_registry():
    assert list_methods() == ["gpf", "pbee", "sdn", "ztw"]
    for m in METHODS.values():
        assert m.criterion in CRITERIA and m.weighting in list_weightings()
    with pytest.raises(ValueError, match="unknown method"):
        get_method("deebert")
    assert get_method("ztw").stage is ztw.train_ensembles


@pytest.mark.parametrize("name", ["sdn", "pbee"])
def test_plain_methods_keep_the_model(name):
    model = _mlp()
    assert get_method(name).apply(model) is model
    with pytest.raises(TypeError):
        get_method(name).apply(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backbone", ["mlp", "resnet20", "bert_tiny"])
@pytest.mark.parametrize("name", ["sdn", "pbee", "ztw", "gpf"])
def test_shapes_and_backbone_only(name, backbone):
    kw = MLP if backbone == "mlp" else dict(num_classes=3)
    torch.manual_seed(0)
    model = _rewired(name, build_model(backbone, **kw))
    x = model.example_input(3)
    outs = model(x)
    assert len(outs) == model.num_exits and all(o.shape == (3, kw["num_classes"]) for o in outs)
    calls = []
    hooks = [h.register_forward_hook(lambda *a: calls.append(1)) for h in model.heads[:-1]]
    final = model(x, exits=[-1])
    for h in hooks:
        h.remove()
    assert len(final) == 1 and not calls  # phase 1 runs the backbone alone
    model.eval()
    torch.testing.assert_close(model(x, exits=[-1])[0], model(x)[-1])
    assert len(exit_costs(model, x)) == model.num_exits


# --- PABEE --------------------------------------------------------------------------------

def _pabee_reference(logits, patience):
    """PABEE as published, one sample at a time: a counter of agreements with the previous IC;
    patience 0 runs all layers (the published inference code's own branch)."""
    E, N, _ = logits.shape
    if patience == 0:
        return torch.full((N,), E - 1)
    out = []
    for n in range(N):
        cnt, exit_at, prev = 0, E - 1, None
        for i in range(E):
            pred = int(logits[i, n].argmax())
            cnt = cnt + 1 if i > 0 and pred == prev else 0
            prev = pred
            if cnt == patience:
                exit_at = i
                break
        out.append(exit_at)
    return torch.tensor(out)


def test_pbee_decisions_equal_patience_criterion():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, 3, generator=g)  # 3 classes: agreements are frequent
    for t in range(0, 6):
        want = _pabee_reference(logits, t)
        assert torch.equal(exit_decisions(logits, "patience", pbee.patience_threshold(t)), want)
    with pytest.raises(ValueError):
        pbee.patience_threshold(-1)


def test_pbee_predict_equals_reference():
    model = _mlp(depth=6).eval()
    x = model.example_input(64)
    with torch.inference_mode():
        logits = torch.stack(model(x))
    for t in (0, 1, 2):
        _, ex = predict(model, x, criterion="patience", threshold=pbee.patience_threshold(t))
        assert torch.equal(ex, _pabee_reference(logits, t))


# --- Zero Time Waste ------------------------------------------------------------------------

def _states(model, x):
    """State after each exit's stage."""
    out, s = [], x
    for i in range(len(model.stages)):
        s = model.stage(i, s)
        out.append(s)
    return [out[e] for e in model.exit_after]


def test_cascade_closed_form():
    model = ztw.apply(_mlp()).eval()
    x = model.example_input(5)
    outs = model(x)
    st = _states(model, x)
    z0 = model.heads[0].head(st[0])
    torch.testing.assert_close(outs[0], z0)
    h1 = model.heads[1]
    torch.testing.assert_close(outs[1], h1.head(st[1]) + h1.cascade(F.layer_norm(z0, (4,), h1.norm.weight, h1.norm.bias)))


def test_cascade_uses_previous_ic():
    model = ztw.apply(_mlp())
    x = model.example_input(5)
    # Detached (ZTW's default): IC 1's loss trains its cascade weights, not IC 0.
    model(x)[1].square().sum().backward()
    assert model.heads[1].cascade.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.heads[0].parameters())
    with torch.no_grad():
        before = model(x)[1]
        model.heads[0].head.linear.weight.add_(torch.randn(4, 16))  # (a constant shift would vanish in the LayerNorm)
        assert not torch.allclose(model(x)[1], before)  # IC 1 reads IC 0's output
    # Not detached: the gradient flows back into IC 0.
    model = ztw.apply(_mlp(), detach=False)
    model(x)[1].square().sum().backward()
    assert model.heads[0].head.linear.weight.grad.abs().sum() > 0


def test_ensemble_closed_form():
    cascade = ztw.apply(_mlp()).eval()
    ens = ztw.add_ensembles(cascade).eval()
    x = cascade.example_input(5)
    ics = cascade(x)
    logp = [F.log_softmax(z, -1) for z in ics[:-1]]
    with torch.no_grad():
        for e in ens.ensembles:
            e.log_weight.zero_()  # they start near 0 (ZTW's N(0, 0.01^2)), exactly 0 here
    outs = ens(x)
    for k in range(ens.num_exits - 1):  # zero log-weights and biases: the plain geometric mean
        torch.testing.assert_close(outs[k], torch.stack(logp[: k + 1]).mean(0))
    torch.testing.assert_close(outs[-1], ics[-1])  # the backbone's head is not ensembled
    with torch.no_grad():
        ens.ensembles[2].log_weight.copy_(torch.tensor([0.0, 1.0, -1.0]))
        ens.ensembles[2].bias.fill_(0.5)
    w = torch.tensor([0.0, 1.0, -1.0]).exp()
    want = (w[0] * logp[0] + w[1] * logp[1] + w[2] * logp[2]) / 3 + 0.5
    torch.testing.assert_close(ens(x)[2], want)


def test_ensemble_stage_trains_only_the_ensembles(data):
    cascade = ztw.apply(_mlp())
    fixed = {n: p.detach().clone() for n, p in cascade.named_parameters()}
    ens, record = get_method("ztw").stage(cascade, data, _cfg())
    assert isinstance(ens, ztw.EnsembleModel) and [p.phase for p in record.phases] == [3]
    for n, p in cascade.named_parameters():  # backbone and ICs untouched (shared with ens)
        assert torch.equal(p, fixed[n]), n
    trained = [e.log_weight for e in ens.ensembles] + [e.bias for e in ens.ensembles]
    assert any(t.abs().sum() > 0 for t in trained)
    assert {id(p) for p in ens.head_parameters()} == {id(p) for p in ens.ensembles.parameters()}


def test_cascade_trains_with_the_loop_and_ge(data):
    model = ztw.apply(_mlp())
    before = model.heads[1].cascade.weight.detach().clone()
    cfg = TrainConfig(phases=(PhaseConfig(lr=(0.05,), epochs=1),) * 3, batch_size=16, device="cpu",
                      weighting="gradient-equilibrium")
    train(model, data, regime="-+-", config=cfg)
    assert not torch.equal(model.heads[1].cascade.weight, before)
    x = model.example_input(4)
    with GradientEquilibrium().prepare(model):  # the hook passes the cascade input through
        sum(o.sum() for o in model(x)).backward()


# --- predict on the method models ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["ztw", "gpf"])
@pytest.mark.parametrize("backbone", ["mlp", "bert_tiny"])
def test_predict_equals_offline_on_method_models(name, backbone):
    torch.manual_seed(0)
    model = _rewired(name, build_model(backbone, **(MLP if backbone == "mlp" else dict(num_classes=3)))).eval()
    x = model.example_input(32)
    with torch.inference_mode():
        logits = torch.stack(model(x))  # (E, N, C)
    score = (logits.amax(-1) - logits.logsumexp(-1)).exp()[:-1].flatten().double().unique()
    mids = ((score[1:] + score[:-1]) / 2)[(score[1:] - score[:-1]) > 2e-5]
    for t in [mids[len(mids) // 3].item(), mids[2 * len(mids) // 3].item()]:
        for bs in (5, 32):
            ex = torch.cat([predict(model, {k: v[s:s + bs] for k, v in x.items()} if isinstance(x, dict)
                                    else x[s:s + bs], criterion="confidence", threshold=t)[1]
                            for s in range(0, 32, bs)])
            assert torch.equal(ex, exit_decisions(logits, "confidence", t))


# --- Global Past-Future ---------------------------------------------------------------------------

def test_gpf_parts():
    model = gpf.apply(_mlp())
    n = model.num_exits - 1
    assert len(model.gpf.imitators) == n - 1 and model.state_dim == 16
    head_ids = {id(p) for p in model.head_parameters()}
    assert {id(p) for p in model.gpf.parameters()} <= head_ids
    assert not head_ids & {id(p) for p in model.backbone_parameters()}
    bert = gpf.apply(build_model("bert_tiny", num_classes=3))
    assert bert.state_dim == 64 and isinstance(bert.heads[0], BertStateHead)
    assert bert.gpf.dropout.p == bert.config.hidden_dropout_prob


def test_gpf_past_is_detached():
    model = gpf.apply(_mlp())
    x = model.example_input(4)
    model(x)[1].square().sum().backward()  # IC 1 (not the last IC: no imitation loss attached)
    assert all(p.grad is None for p in model.heads[0].parameters())  # the past state is detached
    assert model.heads[1][0].linear.weight.grad.abs().sum() > 0
    assert model.gpf.imitators[1].__getitem__(0).weight.grad.abs().sum() > 0  # IC 1 imitates IC 2's state


def test_gpf_imitation_loss_gradient():
    """The loss on the last IC carries imitation_weight * grad(imitation loss), as a hand computation gives."""
    x = _mlp().example_input(6)
    grads = {}
    for w in (0.0, 2.0):
        model = gpf.apply(_mlp(), imitation_weight=w)
        model(x)[-2].square().sum().backward()  # the last IC
        grads[w] = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.gpf.imitators.parameters()]
    model = gpf.apply(_mlp())
    st = _states(model, x)
    s = [model.heads[k](st[k]) for k in range(model.num_exits - 1)]  # (B, D) each
    n = len(s)
    terms = []
    for i in range(n - 1):
        pairs = [(s[j].detach(), model.gpf.imitators[j - 1](s[i])) for j in range(i + 1, n)]
        terms.append(torch.cat([1 - F.cosine_similarity(a, b, dim=-1) for a, b in pairs]).mean())
    loss = torch.stack(terms).mean()
    want = torch.autograd.grad(loss, list(model.gpf.imitators.parameters()))
    assert all(g.abs().sum() == 0 for g in grads[0.0])  # the last IC imitates nothing itself
    for g2, gw in zip(grads[2.0], want):
        torch.testing.assert_close(g2, 2.0 * gw)


def test_gpf_trains_with_the_loop(data):
    model = gpf.apply(_mlp())
    before = [p.detach().clone() for p in model.gpf.imitators.parameters()]
    record = train(model, data, regime="-+-", config=_cfg())
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in record.history)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.gpf.imitators.parameters()))
