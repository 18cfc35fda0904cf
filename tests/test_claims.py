"""Tests that guard headline claims against the bugs that used to slip past every other test.

- resume: a run stopped at any kind of position (mid-epoch, mid-grid, under patience, between phases)
  and resumed writes exactly the checkpoints of an uninterrupted run, optimizer state included;
- every grid point of a phase starts from the phase's starting weights;
- FLOPs: closed forms where the count is exact (BERT; attention through the CPU's fused kernel).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from earlyexit import build_model, load_dataset, train
from earlyexit.config import PhaseConfig, TrainConfig
from earlyexit.metrics import backbone_cost, exit_costs
from earlyexit.flops import count_flops
from earlyexit.training.state import CheckpointFiles

# --------------------------------------------------------------------------- resume at every position

PHASES = (PhaseConfig(epochs=2, lr=(0.05, 0.02)),                 # a grid in phase 1
          PhaseConfig(epochs=3, lr=(0.05,), patience=1),         # patience in phase 2
          PhaseConfig(epochs=2, lr=(0.05, 0.02), early_stop="per_exit", patience=2))  # a grid and per-exit stops
CFG = TrainConfig(regime="+++", phases=PHASES, batch_size=16, device="cpu", seed=3)


class Stop(Exception):
    """A kill, raised from the progress hook at a chosen position."""


def _data():
    return load_dataset("synthetic", train_samples=160, test_samples=40)


def _model():
    torch.manual_seed(0)
    return build_model("mlp", num_classes=10, in_chans=1, image_size=28, width=16, depth=3)


def _recording(monkeypatch):
    """Every checkpoint a run writes, read back from disk."""
    saved = []
    real = CheckpointFiles.save

    def save(self, st, model):
        real(self, st, model)
        if self.write:
            saved.append(torch.load(self.path, weights_only=True))

    monkeypatch.setattr(CheckpointFiles, "save", save)
    return saved


def _same(a, b, where="checkpoint"):
    """Equal, tensors bit for bit; wall-clock seconds aside."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        ka, kb = (sorted(k for k in d if k != "seconds") for d in (a, b))
        assert ka == kb, where
        for k in ka:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


class Killer:
    """The progress hook that stops the run at the ``n``-th ``event``."""

    wants_steps = True

    def __init__(self, event: str, n: int) -> None:
        self.event, self.n, self.seen = event, n, 0

    def __call__(self, event: str, **k) -> None:
        if event == self.event:
            self.seen += 1
            if self.seen == self.n:
                raise Stop(f"{event} {self.n}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    saved = _recording(mp)
    try:
        model = _model()
        rec = train(model, _data(), config=CFG, out_dir=tmp_path_factory.mktemp("ref"))
    finally:
        mp.undo()
    return saved, rec, {k: v.clone() for k, v in model.state_dict().items()}


def _positions():
    # epoch events: the hook runs after validation, before the epoch's checkpoint (so the kill loses the epoch);
    # step events: mid-epoch; phase events: at the start of phases 2 and 3, after the previous phase's last save
    return ([("epoch", n) for n in range(2, 12)] + [("step", n) for n in (13, 32, 50, 70, 86)] +
            [("phase", 2), ("phase", 3)])


@pytest.mark.slow
@pytest.mark.parametrize("event,n", _positions())
def test_a_run_stopped_anywhere_resumes_into_the_same_checkpoints(event, n, reference, tmp_path, monkeypatch):
    ref_saved, ref_rec, ref_weights = reference
    assert len(ref_saved) >= 9 and any(h["phase"] == 2 for h in ref_rec.history)
    with pytest.raises(Stop):
        train(_model(), _data(), config=CFG, out_dir=tmp_path, log=Killer(event, n))
    done = len(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["history"])
    saved = _recording(monkeypatch)
    model = _model()
    torch.manual_seed(12345)  # the resumed run must not depend on the global generator's state
    rec = train(model, _data(), config=CFG, out_dir=tmp_path, resume=True)
    assert len(saved) == len(ref_saved) - done  # one checkpoint per epoch still to run
    for i, (a, b) in enumerate(zip(saved, ref_saved[done:])):
        _same(a, b, f"checkpoint after epoch {done + i + 1}")  # state, optimizer, bests, history, weights
    _same(rec.history, ref_rec.history, "history")
    _same([vars(p) for p in rec.phases], [vars(p) for p in ref_rec.phases], "phase records")
    _same(model.state_dict(), ref_weights, "final weights")


def test_every_grid_point_starts_from_the_phase_start():
    """The second grid point trains identically whatever the first one did: it starts from the phase's
    starting weights, not from where the previous grid point ended."""
    data = _data()
    hist = []
    for first_lr in (0.2, 0.01):
        pc = PhaseConfig(epochs=2, lr=(first_lr, 0.05))
        cfg = TrainConfig(regime="+--", phases=(pc, pc, pc), batch_size=16, device="cpu")
        rec = train(_model(), data, config=cfg)
        hist.append([{k: v for k, v in h.items() if k != "seconds"} for h in rec.history if h["lr"] == 0.05])
        assert len(hist[-1]) == 2
    assert hist[0] == hist[1]


# --------------------------------------------------------------------------- FLOPs in closed form


def _bert_flops(*, layers: int, hidden: int, inter: int, seq: int, classes: int) -> tuple[int, int]:
    """(one encoder layer, one classifier head) in FLOPs = 2 x multiply-adds, ``torch.utils.flop_counter``'s rule."""
    qkv, out = 3 * 2 * seq * hidden * hidden, 2 * seq * hidden * hidden
    attention = 2 * (2 * seq * seq * hidden)  # Q K^T and P V over all heads
    ffn = 2 * (2 * seq * hidden * inter)
    head = 2 * hidden * hidden + 2 * hidden * classes  # pooler on [CLS] (or the mean), then the classifier
    return qkv + out + attention + ffn, head


@pytest.mark.parametrize("seq,pool", [(64, "cls"), (16, "mean")])
def test_bert_costs_are_the_closed_form(seq, pool):
    model = build_model("bert_tiny", num_classes=3, cost_seq_len=seq, head_pool=pool)
    layer, head = _bert_flops(layers=2, hidden=64, inter=256, seq=seq, classes=3)
    x = model.example_input(1)
    assert backbone_cost(model, x) == 2 * layer + head
    assert exit_costs(model, x) == [layer + head, 2 * layer + 2 * head]


def test_attention_is_counted_through_the_fused_cpu_kernel():
    """``count_flops`` counts ``scaled_dot_product_attention`` whichever kernel runs it (the score and value
    products: 2 x 2 x B x heads x L x L x d)."""
    q = torch.randn(2, 4, 10, 8)
    flops, out = count_flops(F.scaled_dot_product_attention, q, q, q)
    assert flops == 2 * (2 * 2 * 4 * 10 * 10 * 8)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
