"""Training regimes: freezing semantics, LR grid, early stopping, checkpoints, resume, NaN handling."""

import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earlyexit import build_model
from earlyexit.config import PhaseConfig, TrainConfig
from earlyexit.regime import Regime
from earlyexit.data import load_dataset
from earlyexit.io import load_checkpoint
from earlyexit.models.resnet import cifar_resnet
from earlyexit.training import register_weighting

tr = importlib.import_module("earlyexit.training")  # the package (earlyexit.train is the function)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", seed=0)


def _small_data(data, n_train=64, n_val=32):
    """The synthetic splits cut down further (8x8 images) for property tests."""
    from types import SimpleNamespace

    class Cut:
        def __init__(self, split, n):
            self.split, self.n = split, n

        def __len__(self):
            return self.n

        def batches(self, batch_size, **kw):
            kw.pop("drop_last", None)
            seen = 0
            for x, y in self.split.batches(batch_size, drop_last=True, **kw):
                if seen >= self.n:
                    return
                yield x[:, :, :8, :8], y
                seen += len(y)

    return SimpleNamespace(train=Cut(data.train, n_train), val=Cut(data.val, n_val))


def _cfg(epochs=1, lr=(0.05,), batch=16, **kw):
    pc = PhaseConfig(lr=tuple(lr), epochs=epochs, **kw)
    return TrainConfig(phases=(pc, pc, pc), batch_size=batch, device="cpu")


def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _tiny(kind, depth, exits):
    if kind == "mlp":
        return build_model("mlp", num_classes=10, in_chans=1, image_size=8, width=8, depth=depth, ic_after=exits)
    return cifar_resnet(8 if depth < 4 else 14, num_classes=10, in_chans=1, image_size=8, ic_after=exits)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["mlp", "resnet"]), depth=st.integers(3, 4), every=st.integers(1, 2),
       phases=st.sampled_from(["+--", "+-+", "++-", "-+-", "--+", "+++", "-++"]))
def test_freezing_semantics(data, kind, depth, every, phases):
    torch.manual_seed(depth)
    model = _tiny(kind, depth, f"every:{every}")
    small = _small_data(data)
    ic_params = list(model.head_parameters())
    backbone_state = lambda: _snapshot([p for m in model.backbone_modules() for p in m.state_dict().values()])  # noqa: E731

    head_calls = []
    for h in model.heads[:-1]:
        h.register_forward_pre_hook(lambda m, a: head_calls.append(tr_phase[0]))
    stage_checks = []
    model.stages[0].register_forward_hook(lambda m, a, o: stage_checks.append((tr_phase[0], torch.is_grad_enabled(), m.training)))
    opt_params = []
    real_make = tr.loop.make_optimizer

    def spy(params, pc, lr):
        opt_params.append((tr_phase[0], list(params)))
        return real_make(params, pc, lr)

    tr_phase = [0]  # the phase being run, seen by the hooks
    tr.loop.make_optimizer = spy
    try:
        # one phase per call, so that each phase is checked against the state it started from
        order = [p for p in (1, 2, 3) if phases[p - 1] == "+"]
        for p in order:
            tr_phase[0] = p
            single = "".join("+" if q == p else "-" for q in (1, 2, 3))
            before_b, before_h = backbone_state(), _snapshot(ic_params)
            tr.train(model, small, regime=single, config=_cfg())
            if p == 1:
                assert _same(before_h, ic_params), "phase 1 changed an IC head"
            if p == 3:
                assert _same(before_b, backbone_state()), "phase 3 changed the backbone (weights or BN buffers)"
    finally:
        tr.loop.make_optimizer = real_make
    assert 1 not in head_calls, "phase 1 computed an IC head"
    for p, grad, training in stage_checks:
        if p == 3:
            assert not grad and not training, "phase 3 ran the backbone with grad or in train mode"
    backbone_ids = {id(q) for q in model.backbone_parameters()}
    for p, params in opt_params:
        assert all(q.requires_grad for q in params)
        ids = {id(q) for q in params}
        if p == 1:
            assert ids == backbone_ids
        if p == 3:
            assert ids == {id(q) for q in ic_params} and not (ids & backbone_ids)


def _backbone_state(model):
    """Params and buffers (BN running stats, num_batches_tracked) of the backbone, cloned, keyed by module."""
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(model.backbone_modules()) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("regime", ["+-+", "++-", "+++"])
@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_freezing_across_phases_in_one_call(data, kind, regime):
    """Phase transitions inside one ``train`` call: what each phase starts from, freezes and optimises."""
    torch.manual_seed(0)
    if kind == "mlp":
        model = build_model("mlp", num_classes=10, in_chans=1, image_size=8, width=8, depth=3, ic_after="every:1")
    else:
        model = cifar_resnet(8, num_classes=10, in_chans=1, image_size=8, ic_after="every:1")
    assert model.num_exits > 1
    ic_params = list(model.head_parameters())
    ic_start = _snapshot(ic_params)
    phase = [0]  # the phase being run, as announced by the log hook
    seen = {}  # what the log hook captured at each phase start

    def log(event, **info):
        if event != "phase":
            return
        phase[0] = info["phase"]
        seen[info["phase"]] = {"backbone": _backbone_state(model), "ics": _snapshot(ic_params)}

    log.wants_steps = False  # only phase starts matter here
    ic_calls = []
    for h in model.heads[:-1]:
        h.register_forward_pre_hook(lambda m, a: ic_calls.append(phase[0]))
    opts = []
    real_make = tr.loop.make_optimizer

    def spy(params, pc, lr):
        opts.append(list(params))
        return real_make(params, pc, lr)

    lrs = (0.05, 0.02)
    tr.loop.make_optimizer = spy
    try:
        tr.train(model, _small_data(data), regime=regime, config=_cfg(lr=lrs), log=log)
    finally:
        tr.loop.make_optimizer = real_make

    assert sorted(seen) == [i + 1 for i, c in enumerate(regime) if c == "+"]
    # phase 1: the ICs are never run and leave it exactly as they entered it
    assert 1 not in ic_calls, "phase 1 computed an IC head"
    after_1 = seen[min(q for q in seen if q > 1)]["ics"]
    assert _same(ic_start, after_1), "phase 1 changed an IC head"
    if 3 in seen:
        # phase 3: the backbone (weights and BN buffers) ends bit-identical to how phase 3 started
        start_3, final = seen[3]["backbone"], _backbone_state(model)
        assert start_3.keys() == final.keys()
        assert any(k.endswith("num_batches_tracked") for k in final) == (kind == "resnet")
        for k in final:
            assert torch.equal(start_3[k], final[k]), f"phase 3 changed backbone entry {k}"
        assert not _same(seen[3]["ics"], ic_params), "phase 3 did not train the ICs"
    # every optimizer holds exactly the phase's trainable set
    backbone_ids = {id(q) for q in model.backbone_parameters()}
    ic_ids = {id(q) for q in ic_params}
    want = {1: backbone_ids, 2: backbone_ids | ic_ids, 3: ic_ids}
    # one optimizer per grid point, made in order (the first of a phase before its "phase" event)
    order = [q for q in sorted(seen) for _ in lrs]
    assert len(opts) == len(order)
    for q, params in zip(order, opts):
        ids = [id(x) for x in params]
        assert len(ids) == len(set(ids)) and set(ids) == want[q], f"phase {q} optimizer holds the wrong parameters"


def test_regime_names():
    assert Regime.parse("joint").phases == "-+-" and Regime.parse("disjoint").phases == "+-+" and Regime.parse("mixed").phases == "++-"
    assert Regime.parse("+++").phases == "+++"
    for bad in ["both", "++", "+x-", "---", "++++"]:
        with pytest.raises(ValueError):
            Regime.parse(bad)


def test_mixed_runs_both_phases_and_restores_best(data, tmp_path):
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=32, depth=3)
    rec = tr.train(model, data, regime="mixed", config=_cfg(epochs=2, lr=(0.05, 0.01), batch=32), out_dir=tmp_path)
    assert [r.phase for r in rec.phases] == [1, 2]
    for r in rec.phases:
        assert len(r.grid) == 2 and r.lr in (0.05, 0.01)
        assert r.best_val == max(g["best_val"] for g in r.grid)
    # the restored weights are the best ones of phase 2: their validation metric is best_val
    acc = tr.validate(model, data.val, list(range(model.num_exits)), torch.device("cpu"))
    assert math.isclose(sum(acc) / len(acc), rec.phases[-1].best_val, rel_tol=0, abs_tol=1e-9)
    assert len(rec.history) == 8 and (tmp_path / "history.jsonl").read_text().count("\n") == 8
    assert rec.phases[0].best_val > 0.3  # the synthetic task is learnable


def test_early_stopping(data):
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=16, depth=2)
    # a learning rate this small cannot improve validation accuracy for long
    rec = tr.train(model, data, regime="+--", config=_cfg(epochs=30, lr=(1e-7,), batch=32, patience=2, schedule="constant"))
    assert len(rec.history) < 30
    assert rec.history[-1]["epoch"] - rec.phases[0].best_epoch == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    register_weighting("nan_late", lambda E, progress: [float("nan") if progress >= 0.5 else 1.0] * E)
    model = build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=16, depth=2)
    cfg = TrainConfig(phases=(PhaseConfig(epochs=2, lr=(0.05,)),) * 3, batch_size=32, weighting="nan_late", device="cpu")
    with pytest.raises(tr.TrainingError, match="non-finite loss.*last good checkpoint"):
        tr.train(model, data, regime="joint", config=cfg, out_dir=tmp_path)
    st = load_checkpoint(tmp_path / "checkpoint.pt")
    assert st["epoch"] == 1 and all(torch.isfinite(v).all() for v in st["model"].values())


def test_resume_is_bit_identical(data, tmp_path):
    """Stop a run after some epochs (the checkpoint as a kill leaves it), resume, compare with one run."""
    def fresh():
        torch.manual_seed(1)
        return build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=16, depth=3)

    cfg = _cfg(epochs=2, lr=(0.05, 0.02), batch=32)
    full = fresh()
    tr.train(full, data, regime="+++", config=cfg, out_dir=tmp_path / "a")

    class Kill(Exception):
        pass

    seen = []

    def killer(event, **k):
        if event == "epoch":
            seen.append(1)
            if len(seen) == 5:  # phase 2, first grid point, epoch 1: dies before that epoch's checkpoint
                raise Kill

    part = fresh()
    with pytest.raises(Kill):
        tr.train(part, data, regime="+++", config=cfg, out_dir=tmp_path / "b", log=killer)
    resumed = fresh()
    rec = tr.train(resumed, data, regime="+++", config=cfg, out_dir=tmp_path / "b", resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert len(rec.history) == 12
