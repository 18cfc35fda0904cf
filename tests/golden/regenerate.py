"""Regenerate the golden numbers of this folder: ``python tests/golden/regenerate.py [flops] [scores] [training]``.

With no argument every file is rewritten. ``tests/test_golden.py`` recomputes
each value with the functions below and compares it with the file, within the
tolerance the file states; a change to any golden value is therefore a diff of
these JSON files (sorted keys, one value per line, one matrix row per line).

- ``flops.json``: per registered model, at its standard input and default exits,
  the cumulative FLOPs of every exit and of the backbone alone (exact integers);
- ``logits.json``: a seeded set of per-exit logits (test and validation), labels
  and costs, in the input layout of ``python -m earlyexit score``;
- ``scores.json``: its evaluation for every exit criterion: per-exit accuracy,
  the threshold curve, the budget table (best within budget), the paper's budget
  table and, for confidence and entropy, the validation-calibrated curves;
- ``training.json``: per-epoch training losses, validation accuracies and final
  per-exit test accuracies of tiny deterministic CPU runs, one per regime, and the
  platform they were made on (``earlyexit.device.platform``): another platform's CPU kernels round
  convolutions differently, so there the test allows a wider tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
FILES = {"flops": "flops.json", "logits": "logits.json", "scores": "scores.json", "training": "training.json"}

FLOPS_CONVENTION = ("FLOPs per sample (an input batch of one) = 2 x multiply-adds, as torch.utils.flop_counter "
                    "counts matrix products and convolutions, the score (Q K^T) and value (P V) products of "
                    "attention included; element-wise ops, pooling, softmax and normalisation are not counted. "
                    "exits[k] is cumulative: the stem and every stage up to the block of exit k plus every head "
                    "up to and including k (earlier ICs included); backbone is the stem, every stage and the "
                    "backbone's own classifier, without ICs (a run's base_flops).")
SCORES_TOLERANCE = {"rtol": 1e-9, "atol": 1e-12, "integers": "exact"}
TRAINING_TOLERANCE = {"train_loss_rtol": 1e-4, "accuracy_atol_samples": 1,
                      "other_platform": {"train_loss_rtol": 0.03, "accuracy_atol": 0.125},
                      "note": "on the platform the file names: train_loss within a relative 1e-4, an accuracy "
                              "within one sample of its split; on another platform (convolutions' float sums "
                              "differ between CPU kernels, and one epoch amplifies them: up to 0.9 % in loss "
                              "and 17 of 256 test samples seen between two machines and kernel choices) "
                              "train_loss within a relative 3 % and an accuracy within 12.5 points"}

# --- per-exit FLOPs ----------------------------------------------------------------

_BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2}
_CIFAR = ({"num_classes": 10, "in_chans": 3, "image_size": 32}, "image 3x32x32")
_IMAGENET = ({"num_classes": 1000, "in_chans": 3, "image_size": 224}, "image 3x224x224")

# model -> (build options, input). Every registered model needs an entry (tests/test_golden.py checks).
STANDARD: dict[str, tuple[dict, str]] = {
    "resnet20": _CIFAR, "resnet32": _CIFAR, "resnet56": _CIFAR, "resnet110": _CIFAR,
    "resnet18": _IMAGENET, "resnet34": _IMAGENET, "resnet50": _IMAGENET,
    "vit_t16": _IMAGENET, "vit_s16": _IMAGENET, "vit_b16": _IMAGENET, "efficientnet_b0": _IMAGENET,
    "vit": _CIFAR,
    "msdnet_cifar": ({"num_classes": 10, "in_chans": 3}, "image 3x32x32 (its default)"),
    "msdnet_imagenet": ({"num_classes": 1000, "in_chans": 3}, "image 3x224x224 (its default)"),
    "bert": ({"num_classes": 2, "config": _BERT_BASE, "cost_seq_len": 64},
             "64 tokens, no padding (BERT-base: 12 layers, width 768, 12 heads)"),
    "bert_tiny": ({"num_classes": 2, "cost_seq_len": 64}, "64 tokens, no padding (2 layers, width 64, 4 heads)"),
    "mlp": ({"num_classes": 10, "in_chans": 1, "image_size": 28}, "image 1x28x28 (its default)"),
}


def flops_entry(name: str) -> dict:
    """The golden FLOPs of one model: its build options, input, exit placement, per-exit and backbone costs."""
    from earlyexit import backbone_cost, build_model, exit_costs

    options, described = STANDARD[name]
    torch.manual_seed(0)  # the counts do not depend on the weights
    model = build_model(name, **options)
    example = model.example_input(1)
    exits = exit_costs(model, example)
    base = backbone_cost(model, example)
    assert all(float(c).is_integer() for c in exits + [base])  # a batch of one: whole counts
    return {"build": options, "input": described, "exit_after": list(model.exit_after),
            "exits": [int(c) for c in exits], "backbone": int(base)}


def compute_flops() -> dict:
    return {"convention": FLOPS_CONVENTION, "models": {name: flops_entry(name) for name in sorted(STANDARD)}}


# --- a seeded logits file and its scores ---------------------------------------------

LOGITS_SHAPE = {"exits": 4, "classes": 6, "test": 120, "val": 120}
COSTS = [20_000_000, 45_000_000, 70_000_000, 100_000_000]  # cumulative, per exit
BASE_FLOPS = 96_000_000  # the backbone alone (its ICs make the last exit cost more)


def _split_logits(g: torch.Generator, n: int, saturated: int) -> tuple[list, list]:
    """(E, n, C) logits on a 1/64 grid (exact in float32 and in JSON) that grow more accurate with depth."""
    E, C = LOGITS_SHAPE["exits"], LOGITS_SHAPE["classes"]
    labels = torch.randint(0, C, (n,), generator=g)  # (n,)
    ease = torch.rand(n, generator=g)  # (n,) easy samples get confident early
    depth = (torch.arange(E, dtype=torch.float64) + 1) / E  # (E,)
    strength = 5.0 * depth[:, None] * ease[None].double()  # (E, n)
    x = torch.randn(E, n, C, generator=g, dtype=torch.float64) * 1.2  # (E, n, C)
    x[:, torch.arange(n), labels] += strength
    x = (x * 64).round() / 64
    for k in range(E):  # no tied maxima: every implementation breaks ties its own way
        for i in range(n):
            row = x[k, i]
            while int((row == row.max()).sum()) > 1:
                row[int(row.argmax())] += 1 / 64
    # a few samples whose float32 softmax saturates at exactly 1.0 at the first exit (confidence leaves on > t)
    for i in range(saturated):
        x[0, i] = 0.0
        x[0, i, int(labels[i])] = 120.0
    return x.tolist(), labels.tolist()


def golden_logits() -> dict:
    """The seeded logits file: ``test`` (logits, labels, costs, base_flops) and ``val`` (logits, labels)."""
    g = torch.Generator().manual_seed(20240601)
    test_logits, test_labels = _split_logits(g, LOGITS_SHAPE["test"], saturated=3)
    val_logits, val_labels = _split_logits(g, LOGITS_SHAPE["val"], saturated=3)
    return {"about": "seeded per-exit logits (E=4 exits, C=6 classes) on a 1/64 grid, read as float32; "
                     "costs are cumulative FLOPs per exit; base_flops is the budgets' reference",
            "test": {"logits": test_logits, "labels": test_labels, "costs": COSTS, "base_flops": BASE_FLOPS},
            "val": {"logits": val_logits, "labels": val_labels}}


def compute_scores(logits: dict) -> dict:
    """Per criterion: the evaluation a run writes to results.json, and the paper's budget table (one seed)."""
    from earlyexit import score
    from earlyexit.metrics import CRITERIA

    test = {k: torch.tensor(v, dtype=torch.float32) if k == "logits" else v for k, v in logits["test"].items()}
    val = {"logits": torch.tensor(logits["val"]["logits"], dtype=torch.float32), "labels": logits["val"]["labels"]}
    out = {}
    for criterion in CRITERIA:
        r = score(test, val=val, criterion=criterion)
        out[criterion] = {"evaluation": r["evaluations"][0], "paper_budgets": r["summary"]["paper_budgets"]}
    return {"tolerance": SCORES_TOLERANCE, "input": FILES["logits"], "criteria": out}


# --- tiny deterministic training runs --------------------------------------------------

REGIMES = ("joint", "disjoint", "mixed")
# Every training option is spelt out, so a change of a package default does not move these numbers; the
# loss weighting is "uniform": every counted exit's loss weighs 1, the plain sum of the exits' losses.
def _phase(lr: float) -> dict:
    return {"optimizer": "sgd", "lr": [lr], "weight_decay": 5e-4, "momentum": 0.9, "schedule": "cosine", "epochs": 1,
            "patience": None, "metric": "mean"}



TRAINING: dict[str, dict] = {
    "mlp-synthetic": {
        "model": "mlp", "model_options": {"width": 64, "depth": 4},
        "dataset": "synthetic", "data": {"train_size": None, "val_fraction": 0.1, "seed": 0}, "test_samples": 200,
        "phase": _phase(0.1), "batch_size": 32, "weighting": "uniform", "seed": 0, "augment": False, "grad_clip": None,
    },
    "resnet20-fashion-mnist": {
        "model": "resnet20", "model_options": {},
        "dataset": "fashion-mnist", "data": {"train_size": 640, "val_fraction": 0.1, "seed": 0}, "test_samples": 256,
        "phase": _phase(0.01), "batch_size": 32, "weighting": "uniform", "seed": 0, "augment": True, "grad_clip": None,
    },
}


def training_run(key: str, regime: str) -> dict:
    """One tiny CPU run (one thread): per epoch its training loss and validation accuracies, then per-exit
    test accuracy on the first ``test_samples`` images of the test split."""
    from earlyexit import build_model, evaluate, load_dataset, train
    from earlyexit.config import PhaseConfig, TrainConfig
    from earlyexit.metrics import accuracy_per_exit

    spec = TRAINING[key]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = load_dataset(spec["dataset"], download=False, **spec["data"])
        torch.manual_seed(spec["seed"])
        model = build_model(spec["model"], num_classes=splits.num_classes, in_chans=splits.in_chans,
                            image_size=splits.image_size, **spec["model_options"])
        phase = PhaseConfig(**{**spec["phase"], "lr": tuple(spec["phase"]["lr"])})
        cfg = TrainConfig(regime=regime, phases=(phase, phase, phase), batch_size=spec["batch_size"],
                          weighting=spec["weighting"], seed=spec["seed"], device="cpu", grad_clip=spec["grad_clip"])
        record = train(model, splits, config=cfg, augment=spec["augment"])
        test = splits.test.subset(range(spec["test_samples"]))
        logits, labels = evaluate(model, test.batches(256))
    finally:
        torch.set_num_threads(threads)
    return {"phase_string": record.regime, "train": len(splits.train), "val": len(splits.val),
            "epochs": [{"phase": h["phase"], "epoch": h["epoch"], "train_loss": h["train_loss"], "val_acc": h["val_acc"]}
                       for h in record.history],
            "test_accuracy": accuracy_per_exit(logits, labels)}


def compute_training() -> dict:
    from earlyexit.device import platform

    runs = {key: {"setup": spec, "regimes": {r: training_run(key, r) for r in REGIMES}}
            for key, spec in TRAINING.items()}
    return {"tolerance": TRAINING_TOLERANCE, "platform": platform("cpu"), "runs": runs}


# --- the file format ---------------------------------------------------------------------

def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def golden_json(obj: Any, indent: int = 0, *, row: bool = False) -> str:
    """JSON with sorted keys and one value per line; a list of numbers inside a list (a matrix row) on one line."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError("golden values must be finite (write None)")
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {golden_json(v, indent + 1)}" for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if row and all(_scalar(v) for v in obj):
            return json.dumps(list(obj))
        items = [inner + golden_json(v, indent + 1, row=True) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def write(name: str, obj: Any) -> Path:
    path = HERE / FILES[name]
    path.write_text(golden_json(obj) + "\n")
    return path


def load(name: str) -> Any:
    return json.loads((HERE / FILES[name]).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="{flops,scores,training}",
                        help="what to regenerate (default: everything)")
    parts = parser.parse_args(argv).parts or ["flops", "scores", "training"]
    for part in parts:  # checked here: argparse rejects an empty list against choices
        if part not in ("flops", "scores", "training"):
            parser.error(f"unknown part {part!r}; valid: flops, scores, training")
    torch.set_num_threads(1)
    if "flops" in parts:
        print(write("flops", compute_flops()))
    if "scores" in parts:
        logits = golden_logits()
        print(write("logits", logits))
        print(write("scores", compute_scores(json.loads(json.dumps(logits)))))
    if "training" in parts:
        print(write("training", compute_training()))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))  # the repository's package, even when another copy is installed
    main()
