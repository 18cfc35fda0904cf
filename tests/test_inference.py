"""Batched early-exit inference: equal to the offline decisions, really skips work; the benchmark's rows."""

import pytest
import torch

from earlyexit import build_model, list_models
from earlyexit.bench.inference import inference_bench
from earlyexit.inference import predict, predict_batches
from earlyexit.metrics import exit_decisions
from earlyexit.models import slice_state

N = 40
MODELS = {
    "resnet20": dict(num_classes=10),
    "mlp": dict(num_classes=10, in_chans=3, image_size=8, width=32, depth=4),
    "vit": dict(num_classes=10, image_size=16, width=32, depth=4, num_heads=2),
    "msdnet_cifar": dict(num_classes=10),
    "bert_tiny": dict(num_classes=3),
}


def _model(name):
    assert name in list_models(), f"{name} is not registered"
    torch.manual_seed(0)
    return build_model(name, **MODELS[name]).eval()


def _offline(model, x):
    with torch.inference_mode():
        return torch.stack([o.float() for o in model(x)])  # (E, N, C)


def _scores(logits, criterion):
    x = logits.float()
    if criterion == "confidence":
        return (x.amax(-1) - x.logsumexp(-1)).exp()[:-1]  # (E-1, N)
    return torch.special.entr(torch.softmax(x, -1)).sum(-1)[:-1]


def _thresholds(logits, criterion):
    """Thresholds at least 1e-5 away from every IC score, so that float rounding of the logits
    computed on smaller batches (~1e-7) cannot flip a decision; spread over the scores' range."""
    if criterion == "patience":
        return list(range(1, logits.shape[0] + 1))
    s = torch.unique(_scores(logits, criterion).flatten().double())  # sorted
    mids = ((s[1:] + s[:-1]) / 2)[(s[1:] - s[:-1]) > 2e-5]
    assert mids.numel() >= 3
    picks = [mids[int(q * (mids.numel() - 1))].item() for q in (0.2, 0.5, 0.8)]
    return picks + ([0.0, 1.01] if criterion == "confidence" else [-1.0, 100.0])


def _chunks(x, size):
    n = x["input_ids"].shape[0] if isinstance(x, dict) else x.shape[0]
    for s in range(0, n, size):
        yield slice_state(x, torch.arange(s, min(s + size, n)))


@pytest.mark.parametrize("name", list(MODELS))
def test_predict_equals_offline_decisions(name):
    model = _model(name)
    x = model.example_input(N)
    logits = _offline(model, x)  # (E, N, C)
    E = logits.shape[0]
    top2 = logits.topk(2, dim=-1).values
    assert ((top2[..., 0] - top2[..., 1]) > 1e-6).all()  # no near-ties: arg-max is stable under rounding
    spread = set()
    for criterion in ("confidence", "entropy", "patience"):
        ts = _thresholds(logits, criterion)
        for j, t in enumerate(ts):
            want = exit_decisions(logits, criterion, t)  # (N,)
            want_pred = logits.argmax(-1)[want, torch.arange(N)]  # (N,)
            for bs in ((1, 7, N) if j == 1 else (7, N)):  # one sample at a time for one threshold (slow)
                got = [predict(model, xb, criterion=criterion, threshold=t) for xb in _chunks(x, bs)]
                pred, ex = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
                assert torch.equal(ex, want), (criterion, t, bs)
                assert torch.equal(pred, want_pred), (criterion, t, bs)
            spread.update(want.tolist())
    assert spread == set(range(E))  # every exit was taken by some sample under some threshold


def test_predict_skips_work():
    model = _model("mlp")
    x = model.example_input(N)
    logits = _offline(model, x)
    t = _thresholds(logits, "confidence")[1]
    seen = []
    hooks = [s.register_forward_hook(lambda m, a, o: seen.append(o.shape[0])) for s in model.stages]
    try:
        _, ex = predict(model, x, criterion="confidence", threshold=t)
    finally:
        for h in hooks:
            h.remove()
    # Stage i runs on the samples that did not leave at an exit before it.
    expected = [N] + [int((ex > k).sum()) for k in range(len(model.stages) - 1)]
    assert seen == expected and seen[-1] < N


def test_predict_everyone_leaves_early_and_late():
    model = _model("resnet20")
    x = model.example_input(8)
    pred, ex = predict(model, x, criterion="confidence", threshold=0.0)
    assert (ex == 0).all()
    pred, ex = predict(model, x, criterion="entropy", threshold=-1.0)
    assert (ex == model.num_exits - 1).all()
    torch.testing.assert_close(pred, _offline(model, x)[-1].argmax(-1))


def test_predict_batches_and_flags():
    model = _model("mlp")
    model.train()
    x = model.example_input(N)
    y = torch.arange(N) % 10
    batches = [(xb, yb) for xb, yb in zip(_chunks(x, 16), y.split(16))]
    p, e, labels = predict_batches(model, batches, criterion="patience", threshold=2)
    assert model.training  # restored
    model.eval()
    want = exit_decisions(_offline(model, x), "patience", 2)
    assert torch.equal(e, want) and torch.equal(labels, y) and p.shape == (N,)


def test_bad_input():
    model = _model("mlp")
    x = model.example_input(2)
    with pytest.raises(ValueError, match="unknown criterion"):
        predict(model, x, criterion="margin", threshold=0.5)
    with pytest.raises(ValueError, match="patience"):
        predict(model, x, criterion="patience", threshold=1.5)
    with pytest.raises(TypeError, match="MultiExitModel"):
        predict(torch.nn.Linear(2, 2), x, threshold=0.5)
    with pytest.raises(ValueError, match="pair"):
        predict_batches(model, [x], threshold=0.5)


def test_inference_bench_rows():
    model = _model("mlp")
    rows = inference_bench(model, lambda b: model.example_input(b), thresholds=[0.0, 1.01], batch_sizes=(1, 8),
                           repeats=1, warmup=0)
    assert [(r["batch_size"], r["threshold"]) for r in rows] == [(1, 0.0), (1, 1.01), (8, 0.0), (8, 1.01)]
    keys = {"batch_size", "criterion", "threshold", "backbone_ms", "all_exits_ms", "predict_ms", "measured_speedup",
            "flops_speedup", "avg_flops", "backbone_flops", "exit_counts"}
    for r in rows:
        assert set(r) == keys and r["predict_ms"] > 0 and sum(r["exit_counts"]) == r["batch_size"]
    # Everyone at the first exit: FLOPs predict a speed-up; nobody early: a slow-down (every IC was paid for).
    assert rows[2]["flops_speedup"] > 1 > rows[3]["flops_speedup"]
    assert rows[2]["exit_counts"][0] == 8 and rows[3]["exit_counts"][-1] == 8


@pytest.mark.parametrize("name,kw", [("resnet20", dict(in_chans=1, image_size=16)), ("resnet50", dict(image_size=32)),
                                     ("msdnet_cifar", dict(image_size=32))])
def test_fuse_batchnorm_keeps_the_function_and_the_original(name, kw):
    from earlyexit import build_model
    from earlyexit.inference import fuse_batchnorm

    model = build_model(name, num_classes=5, **kw)
    for m in model.modules():  # non-trivial statistics, so that folding has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_batchnorm(model)
    n_bn = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    if name.startswith("resnet"):
        assert n_bn(fused) == 0
    else:
        assert n_bn(fused) <= n_bn(model)
    x = model.example_input(4)
    with torch.no_grad():
        for a, b in zip(model(x), fused(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
