"""Machine benchmark: the four ratios behind the regimes, and ``run_bench``, the ``bench`` command.

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

The step timings are ``bench.training``'s (the training loop's own
``train_step``), the sweep ``bench.sweep``'s, and the early-exit inference
table that follows ``bench.inference``'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .. import metrics
from ..config import ModelConfig, RunConfig
from ..device import local_device
from ..errors import ConfigError
from ..training.phases import phase_exits
from .inference import inference_section
from .sweep import SWEEP_SAMPLES, time_sweep
from .training import time_layouts, time_phases

# Targets of the four ratios: (key in the result, comparison, bound).
TARGETS: dict[str, tuple[str, float]] = {
    "p2_vs_flops": ("within", 0.10),       # |(phase-2 / phase-1) / FLOPs ratio - 1| <= 10%
    "p3_over_p1": ("<=", 0.5),
    "sweep_over_forward": ("<=", 0.05),
    "load_share": ("<", 0.10),
}


def _passes(key: str, value: float) -> bool:
    how, bound = TARGETS[key]
    if how == "within":
        return abs(value - 1.0) <= bound
    return value <= bound if how == "<=" else value < bound


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def run_bench(*, model: str = "resnet20", dataset: str = "fashion-mnist", data_dir: str | None = None,
              batch_size: int = 128, steps: int = 10, run_dir: str | None = None, device: str | None = None,
              echo: Callable[[str], Any] = print, warmup: int = 2, compile: bool = False) -> dict:
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
        compile: also time phase-1 steps through ``torch.compile`` (the compilation itself takes a while).
    Returns:
        A dict of floats: ``flops_ratio``, ``p2_over_p1``, ``p2_vs_flops``, ``p3_over_p1``,
        ``sweep_over_forward``, ``load_share`` (the four checked ratios and what they rest on),
        ``p{1,2,3}_step_s``, ``p{1,2,3}_samples_per_s``, ``load_s``, ``forward_s``, ``sweep_s``, and
        the ``inference_*`` figures of ``bench.inference``, and ``bench.training.time_layouts``'s
        ``layout_*_samples_per_s``, ``channels_last_speedup`` (``compiled_speedup``, ``compile_s``) for image models.
    Raises:
        ConfigError: on bad arguments or a model without IC heads.
        DataError: when the dataset cannot be loaded.
    """
    from ..data import load_dataset
    from ..runs import make_model

    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ConfigError(f"need batch_size >= 1, steps >= 1, warmup >= 0; got {batch_size}, {steps}, {warmup}")
    if run_dir is not None:  # a run folder that cannot be read fails now, not after minutes of timing
        from ..runs import read_run_config

        if not (Path(run_dir) / "config.json").is_file():
            raise ConfigError(f"--run: {run_dir} is not a run folder (no config.json)")
        read_run_config(Path(run_dir) / "config.json")
    dev = local_device(device)
    splits = load_dataset(dataset, data_dir=data_dir)
    torch.manual_seed(0)
    net = make_model(RunConfig(model=ModelConfig(name=model)), splits).to(dev)
    if net.num_exits < 2:
        raise ConfigError(f"model {model!r} has no IC heads: phases 2 and 3 cannot be timed")

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

    # Training-step layouts: contiguous against channels-last (and compiled), phase 1, interleaved.
    if len(net.input_shape or ()) == 3:
        from ..device import memory_format

        res.update(time_layouts(net, splits.train, batch_size=batch_size, steps=steps, warmup=warmup, device=dev,
                                compile=compile))
        auto = "channels_last" if memory_format(net, "auto") is torch.channels_last else "contiguous"
        echo(f"phase-1 training step by memory layout (--memory-format; auto picks {auto} for {model}):")
        echo(f"  contiguous {res['layout_contiguous_samples_per_s']:.0f} samples/s, channels_last "
             f"{res['layout_channels_last_samples_per_s']:.0f} samples/s: {res['channels_last_speedup']:.2f}x")
        if compile:
            echo(f"  compiled ({auto}) {res['layout_compiled_samples_per_s']:.0f} samples/s: "
                 f"{res['compiled_speedup']:.2f}x over contiguous, after a {res['compile_s']:.0f} s compile")

    # Inference: early-exit predict against full forward passes, on real test samples.
    test_split = splits.test
    if run_dir is not None:
        from ..runs import load_run

        inf_model, cfg = load_run(run_dir, device=dev)
        if cfg.data.name != dataset:  # the run's own test data
            test_split = load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, train_size=cfg.data.train_size).test
    else:
        inf_model = net
    flat, lines = inference_section(inf_model, test_split, repeats=steps, warmup=warmup, trained=run_dir is not None)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in inf_model.modules()):
        # the same with BatchNorm folded into the convolutions (memory-bound work that FLOPs do not count)
        from ..inference import fuse_batchnorm

        fused, fused_lines = inference_section(fuse_batchnorm(inf_model), test_split, repeats=steps, warmup=warmup,
                                               trained=run_dir is not None, label="BatchNorm folded")
        flat.update({k.replace("inference_", "inference_fused_"): v for k, v in fused.items()})
        lines += fused_lines
    for line in lines:
        echo(line)
    res.update({k: v for k, v in flat.items() if math.isfinite(v)})
    return res


__all__ = ["run_bench", "TARGETS"]
