"""Machine benchmark: training-phase step times, threshold sweep, data loading, early-exit inference.

Checks, on the current machine, the cost assumptions behind the regimes of
"Joint or Disjoint: Mixing Training Regimes for Early-Exit Models":

a) a phase-2 step (all exits) costs what its FLOPs say relative to a phase-1
   step (backbone only): the step-time ratio is within 10% of
   ``exit_costs(...)[-1] / backbone_cost(...)``;
b) a phase-3 step (frozen backbone in eval mode, no backbone activations
   kept, IC heads trained) costs at most half a phase-1 step;
c) the whole 100-threshold confidence sweep over 10,000 samples' stored
   logits costs at most 5% of the one forward pass that produced them;
d) drawing a training batch (with augmentation, moved to the device) is
   under 10% of a training step, loading included.

Steps are the training loop's own: ``earlyexit.train``'s ``set_trainable``,
``set_mode``, ``phase_exits``, ``make_optimizer``, ``lr_at`` and the loss
weighting, with the loop's per-step work (finiteness check, running loss and
per-exit accuracy, the loss read for the step event). The three phases are
timed interleaved, one step of each per round in rotating order, so that a
change in background load hits them alike; step times are medians over the
timed steps, and the phase ratios medians over rounds of each round's own
ratio; warm-up steps are not counted. Time is
``time.perf_counter``, with ``torch.cuda.synchronize`` around each timed
piece on CUDA, where the model runs under bf16 autocast (float32 on CPU).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import metrics
from .config import ModelConfig, PhaseConfig, RunConfig
from .device import cuda_sync, local_device
from .inference import inference_bench
from .models import MultiExitModel
from .train import TrainingError, lr_at, make_optimizer, phase_exits, set_mode, set_trainable
from .weighting import get_weighting

# Targets of the four ratios: (key in the result, comparison, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "p2_vs_flops": ("within", 0.10),       # |(phase-2 / phase-1) / FLOPs ratio - 1| <= 10%
    "p3_over_p1": ("<=", 0.5),
    "sweep_over_forward": ("<=", 0.05),
    "load_share": ("<", 0.10),
}
SWEEP_SAMPLES = 10_000     # samples whose logits the threshold sweep reads
SWEEP_THRESHOLDS = 100     # thresholds of the confidence sweep
EVAL_BATCH_SIZE = 512      # batch size of the forward pass that stores the logits
INFERENCE_BATCHES = (1, 64, 256)
INFERENCE_THRESHOLD = 0.9  # confidence threshold of the inference section
BENCH_LR = 1e-3            # learning rate of the timed steps (see _PhaseStep)


def _passes(key: str, value: float) -> bool:
    how, bound = TARGETS[key]
    if how == "within":
        return abs(value - 1.0) <= bound
    return value <= bound if how == "<=" else value < bound


class _PhaseStep:
    """One training step of ``phase`` exactly as the training loop runs it (no data loading)."""

    def __init__(self, model: MultiExitModel, phase: int, device: torch.device, *, total_steps: int) -> None:
        self.model, self.phase, self.device = model, phase, device
        self.exits = phase_exits(model, phase)
        # The loop's optimizer and schedule, with a small learning rate: a step costs the same at any rate,
        # and the untrained model, whose phase-3 backbone runs on BatchNorm statistics a few steps stale
        # while the phases interleave, diverges within a few steps at the default 0.1.
        self.pc = PhaseConfig(lr=(BENCH_LR,))
        self.lr = BENCH_LR
        self.total = total_steps
        self.weighting = get_weighting("uniform")
        self.step_no = 0
        set_trainable(model, phase)
        self.params = [q for q in model.parameters() if q.requires_grad]
        if not self.params:
            raise ValueError(f"phase {phase} has nothing to train (the model has no IC heads); "
                             "benchmark a model with exits")
        self.opt = make_optimizer(self.params, self.pc, self.lr)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros(len(self.exits), dtype=torch.float64, device=device)  # (exits of the phase,)

    def enter(self) -> None:
        """Switch the model to this phase (per phase in the loop; outside the timed step here)."""
        set_trainable(self.model, self.phase)
        set_mode(self.model, self.phase)

    def __call__(self, x: Any, y: torch.Tensor) -> None:
        p, model = self.phase, self.model
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.pc, self.lr, self.step_no, self.total)
        alphas = self.weighting(model.num_exits, self.step_no / max(self.total, 1))
        alphas = [1.0] if p == 1 else (alphas if p == 2 else alphas[:-1])
        with metrics.autocast_context(self.device):
            outs = model(x, exits=self.exits)  # one (B, C) per exit of the phase
            losses = [F.cross_entropy(o.float(), y) for o in outs]
            loss = sum(a * l for a, l in zip(alphas, losses))
        if not torch.isfinite(loss):  # the loop checks every step (a host sync)
            raise TrainingError(f"non-finite loss in benchmark phase {p}, step {self.step_no + 1}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.loss_sum += loss.detach().double() * y.numel()
            for i, o in enumerate(outs):
                self.correct[i] += (o.argmax(-1) == y).sum()
        float(loss.detach())  # the loop reads the loss for its step event, hook or not
        self.step_no += 1


def _train_batches(split: Any, batch_size: int, device: torch.device) -> Iterator[tuple[float, Any, torch.Tensor]]:
    """Endless training batches as the loop draws them, each with the seconds it took to draw and move."""
    if len(split) < batch_size:
        raise ValueError(f"training set of {len(split)} samples is smaller than one batch of {batch_size}")
    epoch = 0
    while True:
        it = split.batches(batch_size, shuffle=True, seed=0, epoch=epoch, augment=True, drop_last=True)
        while True:
            cuda_sync(device)
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            x, y = metrics.to_device(x, device), y.to(device)
            cuda_sync(device)
            yield time.perf_counter() - t0, x, y
        epoch += 1


def time_phases(model: MultiExitModel, split: Any, *, batch_size: int, steps: int, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Median step time of phases 1-3 and median batch-drawing time.

    Args:
        model: the model, on ``device`` (its weights are trained a few steps).
        split: a training split with ``batches(...)``.
        batch_size: training batch size.
        steps: timed steps per phase.
        warmup: untimed steps per phase before them.
        device: where the model runs.
    Returns:
        ``{"p1_step_s", "p2_step_s", "p3_step_s", "load_s"}`` in seconds (medians), and
        ``"p2_over_p1"``, ``"p3_over_p1"``: the medians over rounds of each round's step-time ratio.
    """
    phases = [_PhaseStep(model, p, device, total_steps=warmup + steps) for p in (1, 2, 3)]
    draws = _train_batches(split, batch_size, device)
    times: dict[int, list[float]] = {1: [], 2: [], 3: []}
    loads: list[float] = []
    for r in range(warmup + steps):
        for j in range(3):
            ph = phases[(r + j) % 3]  # rotate the order so no phase always follows the same one
            ph.enter()
            t_load, x, y = next(draws)
            cuda_sync(device)
            t0 = time.perf_counter()
            ph(x, y)
            cuda_sync(device)
            if r >= warmup:
                times[ph.phase].append(time.perf_counter() - t0)
                loads.append(t_load)
    set_trainable(model, 2)
    model.eval()
    out = {f"p{p}_step_s": statistics.median(ts) for p, ts in times.items()}
    out["load_s"] = statistics.median(loads)
    # Ratios within each round, then their median: a load change that lasts a round cancels out.
    for p in (2, 3):
        out[f"p{p}_over_p1"] = statistics.median(a / b for a, b in zip(times[p], times[1]))
    return out


def _sample_batches(split: Any, n: int, batch_size: int) -> list[tuple[Any, torch.Tensor]]:
    """Exactly ``n`` samples of ``split`` in batches (cycling over it when it is smaller)."""
    out, have = [], 0
    while have < n:
        before = have
        for x, y in split.batches(batch_size):
            take = min(len(y), n - have)
            if take < len(y):
                x, y = _take(x, take), y[:take]
            out.append((x, y))
            have += take
            if have >= n:
                break
        if have == before:
            raise ValueError("the test split holds no samples")
    return out


def _take(x: Any, k: int) -> Any:
    if isinstance(x, torch.Tensor):
        return x[:k]
    if isinstance(x, dict):
        return {key: _take(v, k) for key, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, k) for v in x)
    return x


def time_sweep(model: MultiExitModel, split: Any, costs: Sequence[float], *, device: torch.device,
               samples: int = SWEEP_SAMPLES, thresholds: int = SWEEP_THRESHOLDS, repeats: int = 3) -> dict[str, float]:
    """Seconds of one forward pass over ``samples`` samples vs. a threshold sweep over their stored logits.

    Args:
        model: the model, on ``device``.
        split: a split with ``batches(batch_size)`` (the test split); cycled if smaller than ``samples``.
        costs: per-exit cumulative FLOPs (``metrics.exit_costs``).
        device: where the model runs.
        samples: number of samples.
        thresholds: number of confidence thresholds.
        repeats: the sweep is timed this many times (median).
    Returns:
        ``{"forward_s", "sweep_s"}``.
    """
    batches = _sample_batches(split, samples, EVAL_BATCH_SIZE)
    metrics.evaluate(model, batches[:1], device=device)  # warm-up
    cuda_sync(device)
    t0 = time.perf_counter()
    logits, labels = metrics.evaluate(model, batches, device=device)  # (E, N, C), (N,)
    cuda_sync(device)
    forward_s = time.perf_counter() - t0
    metrics.threshold_curve(logits, labels, costs, thresholds=thresholds)  # warm-up
    sweeps = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        metrics.threshold_curve(logits, labels, costs, thresholds=thresholds, criterion="confidence")
        sweeps.append(time.perf_counter() - t0)
    return {"forward_s": forward_s, "sweep_s": statistics.median(sweeps)}


def _input_batches(split: Any) -> Callable[[int], Any]:
    """``fn(batch_size) -> x``: the first ``batch_size`` samples of ``split`` (cycled when it is smaller)."""
    def fn(batch_size: int) -> Any:
        parts = [x for x, _ in _sample_batches(split, batch_size, batch_size)]
        if len(parts) == 1:
            return parts[0]
        if not all(isinstance(x, torch.Tensor) for x in parts):
            raise ValueError("inference batches larger than the split are only built for tensor inputs")
        return torch.cat(parts)  # (batch_size, ...)
    return fn


def _inference_section(fn: Callable[..., Any], model: MultiExitModel, split: Any, *, repeats: int, warmup: int,
                       trained: bool, label: str = "") -> tuple[dict[str, float], list[str]]:
    """Time early-exit ``predict`` against full forward passes; numeric results and table lines.

    Args:
        fn: ``earlyexit.inference.inference_bench``.
        model: the model, on its device.
        split: the test split its inputs are taken from (real samples: exits depend on the data).
        repeats, warmup: timed and untimed runs per measurement.
        trained: whether the model comes from a trained run (else the table says nothing exits early).
        label: a note on the model variant, shown in the table's title.
    Returns:
        ``({"inference_b{B}_{figure}": value}, lines)``.
    """
    rows = fn(model, _input_batches(split), thresholds=[INFERENCE_THRESHOLD], criterion="confidence",
              batch_sizes=INFERENCE_BATCHES, repeats=repeats, warmup=warmup)
    who = "trained run" if trained else "untrained model: almost nothing leaves early, expect no speed-up"
    lines = [f"inference, confidence >= {INFERENCE_THRESHOLD} ({who}{', ' + label if label else ''}):",
             f"{'batch':>6}{'predict ms':>12}{'backbone ms':>13}{'all exits ms':>14}{'speed-up':>10}"
             f"{'FLOPs speed-up':>16}{'measured/FLOPs':>16}{'left early':>12}"]
    flat: dict[str, float] = {}
    for r in rows:
        counts = r["exit_counts"]
        early = 1.0 - counts[-1] / max(sum(counts), 1)
        lines.append(f"{r['batch_size']:>6}{r['predict_ms']:>12.2f}{r['backbone_ms']:>13.2f}{r['all_exits_ms']:>14.2f}"
                     f"{r['measured_speedup']:>9.2f}x{r['flops_speedup']:>15.2f}x"
                     f"{r['measured_speedup'] / r['flops_speedup']:>16.2f}{early * 100:>11.1f}%")
        for k in ("predict_ms", "backbone_ms", "all_exits_ms", "measured_speedup", "flops_speedup"):
            flat[f"inference_b{r['batch_size']}_{k}"] = float(r[k])
        flat[f"inference_b{r['batch_size']}_early_share"] = early
    return flat, lines


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def run_bench(*, model: str = "resnet20", dataset: str = "fashion-mnist", data_dir: str | None = None,
              batch_size: int = 128, steps: int = 10, run_dir: str | None = None, device: str | None = None,
              echo: Callable[[str], Any] = print, warmup: int = 2) -> dict:
    """Measure the phase, sweep and loading ratios on this machine and print them as a table.

    Args:
        model: registry name of the model to train for the step timings.
        dataset: dataset name; its training split is drawn from, its test split is run forward.
        data_dir: local data root searched first.
        batch_size: training batch size.
        steps: timed steps per phase.
        run_dir: a trained run folder whose model the inference section uses (default: the untrained model).
        device: "cpu", "cuda", "cuda:N"; None = CUDA when available.
        echo: prints one line of the table.
        warmup: untimed steps per phase before the timed ones.
    Returns:
        A dict of floats: ``flops_ratio``, ``p2_over_p1``, ``p2_vs_flops``, ``p3_over_p1``,
        ``sweep_over_forward``, ``load_share`` (the four checked ratios and what they rest on),
        ``p{1,2,3}_step_s``, ``p{1,2,3}_samples_per_s``, ``load_s``, ``forward_s``, ``sweep_s``, and
        ``inference_*`` figures when ``earlyexit.inference.inference_bench`` exists.
    Raises:
        ValueError: on bad arguments or a model without IC heads.
        DataError: when the dataset cannot be loaded.
    """
    from .data import load_dataset
    from .runs import make_model

    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, {steps}, {warmup}")
    dev = local_device(device)
    splits = load_dataset(dataset, data_dir=data_dir)
    torch.manual_seed(0)
    net = make_model(RunConfig(model=ModelConfig(name=model)), splits).to(dev)
    if net.num_exits < 2:
        raise ValueError(f"model {model!r} has no IC heads: phases 2 and 3 cannot be timed")

    example = net.example_input(1, device=dev)
    costs = metrics.exit_costs(net, example)
    base = metrics.backbone_cost(net, example)
    res: dict[str, float] = {"flops_ratio": costs[-1] / base}
    res.update(time_phases(net, splits.train, batch_size=batch_size, steps=steps, warmup=warmup, device=dev))
    for p in (1, 2, 3):
        res[f"p{p}_samples_per_s"] = batch_size / res[f"p{p}_step_s"]
    res["p2_vs_flops"] = res["p2_over_p1"] / res["flops_ratio"]
    shares = {p: res["load_s"] / (res["load_s"] + res[f"p{p}_step_s"]) for p in (1, 2, 3)}
    res["load_share"] = max(shares.values())  # the cheapest step is where loading weighs most
    res.update(time_sweep(net, splits.test, costs, device=dev))
    res["sweep_over_forward"] = res["sweep_s"] / res["forward_s"]

    mark = lambda key: "PASS" if _passes(key, res[key]) else "MISS"  # noqa: E731
    prec = "bf16 autocast" if dev.type == "cuda" else "float32"
    threads = f", {torch.get_num_threads()} threads" if dev.type == "cpu" else ""
    echo(f"bench: {model} on {dataset}, {dev} ({prec}{threads}), batch {batch_size}, "
         f"{steps} interleaved steps per phase after {warmup} warm-up")
    echo("(times: medians over steps; ratios a, b: medians of each round's own ratio)")
    echo(f"{'phase':<6}{'exits':>6}{'ms/step':>10}{'samples/s':>11}{'load share':>12}")
    for p in (1, 2, 3):
        echo(f"{p:<6}{len(phase_exits(net, p)):>6}{_fmt_ms(res[f'p{p}_step_s']):>10}"
             f"{res[f'p{p}_samples_per_s']:>11.0f}{shares[p] * 100:>11.1f}%")
    echo(f"batch drawing + transfer: {_fmt_ms(res['load_s'])} ms")
    echo(f"{'check':<40}{'measured':>9}  {'target':<22}result")
    echo(f"{'a) phase-2 / phase-1 step time':<40}{res['p2_over_p1']:>9.3f}  "
         f"{'FLOPs ratio ' + format(res['flops_ratio'], '.3f'):<22}")
    echo(f"{'   (time ratio) / (FLOPs ratio)':<40}{res['p2_vs_flops']:>9.3f}  {'within 10% of 1':<22}{mark('p2_vs_flops')}")
    echo(f"{'b) phase-3 / phase-1 step time':<40}{res['p3_over_p1']:>9.3f}  {'<= 0.5':<22}{mark('p3_over_p1')}")
    echo(f"{'c) 100-threshold sweep / forward pass':<40}{res['sweep_over_forward']:>9.4f}  {'<= 0.05':<22}"
         f"{mark('sweep_over_forward')}")
    echo(f"   ({SWEEP_SAMPLES} samples: sweep {_fmt_ms(res['sweep_s'])} ms, forward {_fmt_ms(res['forward_s'])} ms)")
    echo(f"{'d) loading share of a step (worst phase)':<40}{res['load_share'] * 100:>8.1f}%  {'< 10%':<22}"
         f"{mark('load_share')}")

    # Inference: early-exit predict against full forward passes, on real test samples.
    test_split = splits.test
    if run_dir is not None:
        from .runs import load_run

        inf_model, cfg = load_run(run_dir, device=dev)
        if cfg.data.name != dataset:  # the run's own test data
            test_split = load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, train_size=cfg.data.train_size).test
    else:
        inf_model = net
    flat, lines = _inference_section(inference_bench, inf_model, test_split, repeats=steps, warmup=warmup,
                                     trained=run_dir is not None)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in inf_model.modules()):
        # the same with BatchNorm folded into the convolutions (memory-bound work that FLOPs do not count)
        from .inference import fuse_batchnorm

        fused, fused_lines = _inference_section(inference_bench, fuse_batchnorm(inf_model), test_split, repeats=steps,
                                                warmup=warmup, trained=run_dir is not None, label="BatchNorm folded")
        flat.update({k.replace("inference_", "inference_fused_"): v for k, v in fused.items()})
        lines += fused_lines
    for line in lines:
        echo(line)
    res.update({k: v for k, v in flat.items() if math.isfinite(v)})
    return res


__all__ = ["run_bench", "time_phases", "time_sweep", "TARGETS"]
